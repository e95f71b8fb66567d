"""Held-out evaluation metrics (k15sys.train.evaluation) on scripted completions."""
import pytest

from k15sys.rollout.types import Completion
from k15sys.tasks import ArithmeticTask, CharTokenizer, direct_answer, make_splits, solution
from k15sys.train.evaluation import evaluate, score


class ScriptedEngine:
    """Answers each prompt with a fixed response text, whatever the sampling parameters."""

    def __init__(self, tok: CharTokenizer, responses: dict[str, str]) -> None:
        self.tok, self.responses = tok, responses

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = self.responses[self.tok.decode(ids)]
            ids = self.tok.encode(text, eos=True)
            out.append(Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
        return out


def test_evaluate_counts_direct_answers_and_accuracy():
    tok = CharTokenizer()
    splits = make_splits(seed=3, num_train=4, num_eval=10, min_ops=2, max_ops=4, max_operand=9)
    problems = splits.eval
    # 4 direct answers (3 right, 1 wrong), 6 worked solutions (5 right, 1 with a wrong boxed answer)
    texts = [direct_answer(p) for p in problems[:3]] + [f"\\boxed{{{int(problems[3].answer) + 1}}}"]
    texts += [solution(p) for p in problems[4:9]] + [solution(problems[9]).replace(f"\\boxed{{{problems[9].answer}}}", "\\boxed{999}")]
    row = evaluate(ScriptedEngine(tok, {p.prompt: t for p, t in zip(problems, texts)}), ArithmeticTask(splits, tok), problems, max_new_tokens=96,
                   batch_size=3)
    assert row["eval/pass@1"] == 0.8
    assert row["eval/direct_share"] == 0.4
    lengths = [len(tok.encode(t, eos=True)) for t in texts]
    assert abs(row["eval/response_len"] - sum(lengths) / len(lengths)) < 1e-12


def test_score_verifies_only_uncut_responses():
    """The one scoring rule of the trainer, evaluation and long2short: a response cut at the length limit gets
    ``truncated_reward`` unverified (even when its text holds the right answer); the others the task's reward."""
    tok = CharTokenizer()
    splits = make_splits(seed=5, num_train=4, num_eval=3, min_ops=2, max_ops=3, max_operand=9)
    task, problems = ArithmeticTask(splits, tok), splits.eval
    right = [tok.encode(solution(p), eos=True) for p in problems]
    assert score(task, problems, right, [False, False, False]) == [1.0, 1.0, 1.0]
    assert score(task, problems, right, [False, True, False], truncated_reward=-0.5) == [1.0, -0.5, 1.0]
    wrong = tok.encode("\\boxed{999}", eos=True)
    assert score(task, problems, [right[0], wrong, right[2]], [True, False, False]) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="responses"):
        score(task, problems, right, [False, False])
