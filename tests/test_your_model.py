"""``k15 train`` on a user's transformers model, tokenizer and JSONL problems (issue 18, docs/your_model.md):
the Task protocol's JSONL task (loading, errors, rewards, SFT traces), the model/tokenizer factory, and the
whole loop through the CLI on tiny Qwen2 / Llama directories with GSM8K and MBPP rows, then export, eval,
plot and long2short on the run."""
from __future__ import annotations

import json
import random

import pytest
import torch
from hf_fixtures import gsm8k_files, mbpp_files, mbpp_rows, scratch_tokenizer, tiny_llama, tiny_qwen2, write_jsonl  # noqa: F401
from sandbox_support import requires_sandbox

from k15sys.cli import main
from k15sys.tasks.hf_tokenizer import HFTokenizer
from k15sys.tasks.jsonl import CodeProblem, DataError, JsonlTask, MathProblem, extract_program, load_problems
from k15sys.train.config import load_config

FAST = ["rl.prompts_per_iteration=4", "rl.group_size=2", "rl.minibatch_size=4", "rl.max_new_tokens=12",
        "rl.skip_zero_advantage=false", "eval.every=1", "run.threads=1", "run.rollout_threads=1", "run.progress=false",
        "run.tensorboard=false"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


# ---------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("line, message", [
    ('{"answer": "3"}', "missing field 'prompt'"),
    ('{"prompt": "1+2?", "answer": 3}', "'answer' must be a string"),
    ('{"prompt": "1+2?"}', "found neither"),
    ('{"prompt": "1+2?", "answer": "3", "tests": ["assert 1"]}', "not both"),
    ('{"prompt": "f", "tests": []}', "non-empty list"),
    ('{"prompt": "f", "tests": ["assert f() == 1"], "language": "rust"}', "'language' must be one of"),
    ('{"prompt": "f", "tests": ["assert f() == 1"], "language": "cpp"}', "assert tests need language='python'"),
    ('{"prompt": "f", "tests": [{"input": "1"}]}', "'input' and 'output'"),
    ('{"prompt": "f", "tests": [{"input": 1, "output": "2"}]}', "must be strings"),
    ('{"prompt": "1+2?", "answer": "3", "difficulty": "hard"}', "'difficulty' must be a finite number"),
    ('{"prompt": "1+2?", "answer": "3"', "not valid JSON"),
    ('["1+2?", "3"]', "expected a JSON object"),
])
def test_a_bad_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4"}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_problems(str(path))
    assert f"data.train: {path}:3: " in str(e.value) and message in str(e.value)


def test_rows_of_both_kinds_load_with_their_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2?", "answer": "4", "difficulty": 3, "source": "ignored"},
        {"prompt": "echo", "tests": [{"input": "1\n", "output": "1"}], "language": "cpp"},
        *mbpp_rows(0, 1)])
    math_row, cpp_row, mbpp_row = load_problems(str(path))
    assert math_row == MathProblem("2+2?", "4", 3.0)
    assert cpp_row == CodeProblem("echo", ({"input": "1\n", "output": "1"},), "cpp", 1.0)
    assert mbpp_row.language == "python" and mbpp_row.tests[0].startswith("assert remove_Occ")
    with pytest.raises(DataError, match="file not found"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_problems(str(tmp_path / "empty.jsonl"))


def test_extract_program_takes_the_last_fenced_block_of_the_language():
    text = "Plan:\n```text\nnot code\n```\n```python\ndef f():\n    return 1\n```\nthen\n```cpp\nint main(){}\n```"
    assert extract_program(text, "python") == "def f():\n    return 1"
    assert extract_program(text, "cpp") == "int main(){}"
    assert extract_program("def g(): return 2", "python") == "def g(): return 2"


# ---------------------------------------------------------------------------------------------- the task
@pytest.fixture(scope="module")
def hf_tok(tiny_qwen2):
    from k15sys.train.model import build_tokenizer

    return build_tokenizer(load_config(None, [f"model.path={tiny_qwen2}"]).model)


def test_tokenizer_factory_applies_the_chat_template(hf_tok, scratch_tokenizer):
    assert isinstance(hf_tok, HFTokenizer) and hf_tok.has_chat_template
    ids = hf_tok.encode_prompt("What is 2+2?")
    assert hf_tok.tok.decode(ids) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert hf_tok.eos_token_id == scratch_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert hf_tok.stop_token_ids == (hf_tok.eos_token_id,)
    assert hf_tok.pad_token_id == scratch_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert hf_tok.decode(hf_tok.encode("héllo \\boxed{18}", eos=True)) == "héllo \\boxed{18}"


def test_math_rewards_and_sft_traces_of_the_jsonl_task(tmp_path, hf_tok, gsm8k_files):
    task = JsonlTask(str(gsm8k_files["train"]), str(gsm8k_files["eval"]), hf_tok, sft=str(gsm8k_files["sft"]))
    p = task.train[0]  # Janet's ducks: 18
    responses = [hf_tok.encode(t, eos=True) for t in ("16 - 3 - 4 = 9, 9 * 2 = 18. The answer is 18.",
                                                      "So \\boxed{17}", "#### 18")]
    assert task.reward([p, p, p], responses) == [1.0, 0.0, 1.0]
    assert task.has_sft and not task.has_short_cot
    seqs, plens, targets = task.sft_examples(random.Random(0), 5)
    assert targets is None and len(seqs) == 5
    for seq, plen in zip(seqs, plens):
        prompt = hf_tok.decode(seq[:plen])  # the chat-rendered question; loss only on what follows
        trace = next(r for r in map(json.loads, gsm8k_files["sft"].read_text().splitlines()) if r["prompt"] in prompt)
        assert seq[:plen] == hf_tok.encode_prompt(trace["prompt"])
        assert seq[plen:] == hf_tok.encode(trace["response"], eos=True)
    assert task.sft_examples(random.Random(0), 5) == (seqs, plens, targets)  # the RNG alone decides (resumable)


def test_sft_warm_up_on_traces_lowers_the_response_loss(tiny_qwen2, hf_tok, gsm8k_files):
    from k15sys.train.model import build_lm
    from k15sys.train.policy import PackedPolicy
    from k15sys.train.sft import WarmUp

    task = JsonlTask(str(gsm8k_files["train"]), str(gsm8k_files["eval"]), hf_tok, sft=str(gsm8k_files["sft"]))
    policy = PackedPolicy(build_lm(load_config(None, [f"model.path={tiny_qwen2}"]).model, hf_tok, torch.device("cpu")))
    sft = load_config(None, ["sft.steps=4", "sft.batch_size=2", "sft.lr=1e-2", "sft.warmup_steps=1"]).sft
    rows = list(WarmUp(policy, task.sft_examples, sft, seed=0, pad_id=hf_tok.pad_token_id))
    assert [r["sft/step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["sft/loss"] < rows[0]["sft/loss"] - 0.2


class RecordingSandbox:
    """Stands in for the sandbox pool: records each run_batch call and answers every test with ``status``."""

    def __init__(self, status):
        self.status, self.calls = status, []

    def run_batch(self, requests, checker=None):
        from k15sys.sandbox import RunResult

        self.calls.append(list(requests))
        return [[RunResult(self.status, stderr="no bwrap") for _ in r.tests] for r in requests]

    def close(self):
        pass


def test_code_rewards_are_one_batch_and_a_broken_sandbox_is_an_error(tmp_path, hf_tok):
    from k15sys.sandbox import Status

    path = write_jsonl(tmp_path / "code.jsonl", mbpp_rows(0, 3))
    task = JsonlTask(str(path), str(path), hf_tok, code_timeout_s=2.0)
    task._sandbox = RecordingSandbox(Status.OK)
    responses = [hf_tok.encode(f"```python\ndef f{i}(): pass\n```", eos=True) for i in range(6)]
    assert task.reward([*task.train, *task.train], responses) == [1.0] * 6
    (requests,) = task._sandbox.calls  # the six programs in one call, not one at a time
    assert [r.program for r in requests] == [f"def f{i}(): pass" for i in range(6)]
    assert all(r.language == "python" and r.limits.wall_s == 2.0 and len(r.tests) == 3 for r in requests)
    task._sandbox = RecordingSandbox(Status.SANDBOX_ERROR)
    with pytest.raises(RuntimeError, match="the sandbox ran none of 6 programs: no bwrap"):
        task.reward([*task.train, *task.train], responses)


@requires_sandbox
def test_code_rewards_run_a_batch_of_programs_in_the_sandbox(tmp_path, hf_tok):
    rows = mbpp_rows(0, 2)
    path = write_jsonl(tmp_path / "code.jsonl", rows + [
        {"prompt": "read n, print n+1", "tests": [{"input": "4\n", "output": "5"}, {"input": "0\n", "output": "1"}],
         "language": "cpp"}])
    task = JsonlTask(str(path), str(path), hf_tok)
    good = [f"Here it is:\n```python\n{r['solution']}\n```" for r in rows]
    cpp = "```cpp\n#include <cstdio>\nint main(){int n; std::scanf(\"%d\",&n); std::printf(\"%d\\n\", n+1);}\n```"
    half = "```cpp\n#include <cstdio>\nint main(){std::printf(\"5\\n\");}\n```"
    texts = [*good, cpp, "```python\ndef nothing(): pass\n```", half]
    try:
        rewards = task.reward([*task.train, task.train[0], task.train[2]], [hf_tok.encode(t, eos=True) for t in texts])
    finally:
        task.close()
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.5]


# ---------------------------------------------------------------------------------------------- the model
def test_model_factory_dtype_and_gradient_checkpointing(tiny_llama, hf_tok):
    from k15sys.train.model import build_lm, model_dtype
    from k15sys.train.packing import pack
    from k15sys.train.policy import PackedPolicy

    cpu = torch.device("cpu")
    base = load_config(None, [f"model.path={tiny_llama}"]).model
    assert model_dtype(base, cpu) == torch.float32 and model_dtype(base, torch.device("cuda")) == torch.bfloat16
    assert model_dtype(load_config(None, []).model, torch.device("cuda")) == torch.float32  # the built-in toy
    bf16 = build_lm(load_config(None, [f"model.path={tiny_llama}", "model.dtype=bfloat16"]).model, hf_tok, cpu)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    batch = pack([hf_tok.encode_prompt("a b") + hf_tok.encode("c d e", eos=True)] * 2, [9, 9])
    grads = []
    for ckpt in (False, True):
        cfg = load_config(None, [f"model.path={tiny_llama}", f"model.gradient_checkpointing={str(ckpt).lower()}"]).model
        policy = PackedPolicy(build_lm(cfg, hf_tok, cpu))
        on = getattr(policy.lm, "is_activation_checkpointing", None)
        assert (policy.lm.is_gradient_checkpointing if on is None else on) == ckpt
        policy.train()
        policy(batch).seq_logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------- the CLI
def test_model_path_and_data_go_together(tmp_path, capsys, tiny_qwen2, gsm8k_files):
    out = tmp_path / "never"
    base = ["train", "--output-dir", str(out)]
    assert main([*base, *_sets([f"model.path={tiny_qwen2}"])]) == 2
    assert "model.path: needs data.train" in capsys.readouterr().err
    assert main([*base, *_sets([f"data.train={gsm8k_files['train']}", f"data.eval={gsm8k_files['eval']}"])]) == 2
    assert "data.train: needs model.path" in capsys.readouterr().err
    assert main([*base, *_sets([f"model.path={tiny_qwen2}", f"data.train={gsm8k_files['train']}"])]) == 2
    assert "data.eval" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "y"}\n')
    assert main([*base, *_sets([f"model.path={tiny_qwen2}", f"data.train={bad}", f"data.eval={bad}"])]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: a row needs either 'answer'" in err and "Traceback" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def qwen_gsm8k_run(tmp_path_factory, tiny_qwen2, gsm8k_files):
    """SFT on GSM8K traces, then RL on GSM8K problems, on the tiny Qwen2 through ``k15 train``."""
    run = tmp_path_factory.mktemp("qwen_run") / "run"
    code = main(["train", "--output-dir", str(run), *_sets([
        f"model.path={tiny_qwen2}", f"data.train={gsm8k_files['train']}", f"data.eval={gsm8k_files['eval']}",
        f"sft.data={gsm8k_files['sft']}", "sft.steps=4", "sft.batch_size=4", "sft.lr=1e-3", "rl.iterations=2", *FAST])])
    assert code == 0
    return run


def test_train_on_gsm8k_rows_with_a_qwen2_directory(qwen_gsm8k_run):
    rows = [json.loads(line) for line in (qwen_gsm8k_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pass@1" in r]
    assert [r["iteration"] for r in evals] == [0, 1, 2] and evals[0]["stage"] == "sft"
    for r in evals[1:]:
        assert r["rl/groups"] == 4 and r["rl/train_tokens"] > 0 and "eval/pass@1/d1" in r and r["rl/grad_norm"] >= 0


def test_export_eval_plot_long2short_on_the_run(qwen_gsm8k_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from k15sys.train.checkpoint import latest_checkpoint, load_checkpoint

    out = tmp_path / "exported"
    assert main(["export", str(qwen_gsm8k_run), "--out", str(out)]) == 0
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    saved = load_checkpoint(latest_checkpoint(qwen_gsm8k_run / "checkpoints"))["model"]
    own = dict(model.named_parameters())
    assert own.keys() <= saved.keys() and all(torch.equal(own[k], saved[k]) for k in own)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    capsys.readouterr()
    assert main(["eval", str(qwen_gsm8k_run)]) == 0
    own_row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(qwen_gsm8k_run), "--model", str(out), "--samples", "2"]) == 0
    exported_row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported_row["eval/pass@1"] == own_row["eval/pass@1"] and "eval/pass@2" in exported_row
    assert exported_row["eval/response_len"] == own_row["eval/response_len"]
    assert main(["plot", str(qwen_gsm8k_run), "--out", str(tmp_path / "c.png")]) == 0
    assert main(["long2short", "rl", str(qwen_gsm8k_run), *_sets(["long2short.rl_iterations=1",
                                                                  "long2short.rl_max_new_tokens=8"])]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "rl" and row["response_len"] <= 8
    assert AutoModelForCausalLM.from_pretrained(row["model_dir"]) is not None
    assert main(["long2short", "merge", str(qwen_gsm8k_run)]) == 2
    assert "use srs, dpo or rl" in capsys.readouterr().err


@requires_sandbox
def test_train_on_mbpp_rows_with_a_llama_directory(tmp_path, tiny_llama, mbpp_files):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *_sets([
        f"model.path={tiny_llama}", f"data.train={mbpp_files['train']}", f"data.eval={mbpp_files['eval']}",
        "rl.iterations=1", "data.code_timeout_s=2", *FAST])]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]  # no sft.data: no warm-up, the SFT row evaluates the start
    assert rows[1]["rl/groups"] == 4 and rows[1]["time/reward_s"] > 0 and 0 <= rows[1]["eval/pass@1"] <= 1


def test_the_your_model_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "your_model.py"
    out = subprocess.run([sys.executable, str(example), "--work", str(tmp_path), "--train-rows", "4", "--eval-rows", "2",
                          "--sft-steps", "1", "--iterations", "1", "--max-new-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary["pass@1"]) == {"0", "1"} and isinstance(summary["export_answer"], str)
    assert "$ k15 train --output-dir" in out.stdout and "--set model.path=" in out.stdout


def test_prompt_plus_response_must_fit_the_model_context(tmp_path, capsys, tiny_qwen2, gsm8k_files):
    assert main(["train", "--output-dir", str(tmp_path / "run"), *_sets([
        f"model.path={tiny_qwen2}", f"data.train={gsm8k_files['train']}", f"data.eval={gsm8k_files['eval']}",
        "rl.max_new_tokens=2048"])]) == 2  # the tiny model has 2,048 positions
    assert "max_position_embeddings=2048" in capsys.readouterr().err
