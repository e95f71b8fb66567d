"""The shipped verifiable task: seeded multi-step arithmetic with the answer in ``\\boxed{}``.

It plays the role of the paper's RL prompt set (2.2: verifiable problems with a difficulty label for
curriculum sampling, 2.3.4) and of the long-CoT warm-up data (2.3.1), small enough that a tiny model
learns it on a laptop CPU. A problem is a chain ``a op1 b1 op2 b2 ...`` (+ and -, never below zero);
its difficulty is the number of operations. Solutions rewrite the expression one operation at a time:

    prompt   7+5-3+8=
    short    12-3+8=9+8=17;\\boxed{17}
    long     12-3+8[12-5=7]=9+8[9+3=12]=17[17-8=9];\\boxed{17}

The long-CoT trace checks each step by inverting it (the bracket), as a long chain of thought re-checks
its work; each check is present with probability ``verify_prob``, so long traces vary in length, which
is what long2short (2.4) shortens.

:func:`direct_answer` is the gold answer with no working, ``\\boxed{17}``: warm-up data can mix such
answers in (``TaskConfig.direct_prob``), as distilled data of mixed styles does, so the SFT model
sometimes answers without reasoning -- which a small model cannot do reliably on multi-step chains;
RL with the verifier then learns that reasoning first pays.

:class:`ArithmeticTask` is this task behind the :class:`k15sys.tasks.base.Task` protocol the trainer uses.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from k15sys.rewards import math_reward
from k15sys.tasks.base import SFTBatch
from k15sys.tasks.tokenizer import CharTokenizer


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` (text fed to the model), ``answer`` (gold string), ``difficulty`` (#ops)."""

    prompt: str
    answer: str
    difficulty: int
    start: int
    ops: tuple[tuple[str, int], ...]


def _expr(start: int, ops: tuple[tuple[str, int], ...]) -> str:
    return str(start) + "".join(f"{o}{b}" for o, b in ops)


def make_problem(rng: random.Random, num_ops: int, max_operand: int) -> Problem:
    """A random chain of ``num_ops`` operations on operands in [1, max_operand]; values stay >= 0."""
    if num_ops < 1:
        raise ValueError(f"num_ops: must be >= 1, got {num_ops}")
    if max_operand < 1:
        raise ValueError(f"max_operand: must be >= 1, got {max_operand}")
    value = rng.randint(1, max_operand)
    start, ops = value, []
    for _ in range(num_ops):
        b = rng.randint(1, max_operand)
        op = "-" if value >= b and rng.random() < 0.5 else "+"
        value = value + b if op == "+" else value - b
        ops.append((op, b))
    ops_t = tuple(ops)
    return Problem(prompt=_expr(start, ops_t) + "=", answer=str(value), difficulty=num_ops, start=start, ops=ops_t)


def solution_segments(problem: Problem, *, rng: random.Random | None = None, verify_prob: float = 0.0,
                      mistake_prob: float = 0.0) -> list[tuple[str, bool]]:
    """The step-by-step solution (response only) as ``(text, imitate)`` segments; ``"".join`` of the texts
    is :func:`solution`. ``verify_prob`` > 0 adds long-CoT checks; ``mistake_prob`` > 0 makes that share of
    the checked steps first come out wrong, the check expose it (its result is not the previous value) and
    ``?`` mark the step redone: ``10+8[10+3=13]?9+8[9+3=12]``, as a long chain of thought catches and
    corrects its own slips (both need rng). The wrong step itself (``10+8``) is the one segment with
    ``imitate=False``: SFT trains on the check that exposes it and on the redo, not on making the slip."""
    for name, p in (("verify_prob", verify_prob), ("mistake_prob", mistake_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {p}")
    if (verify_prob > 0 or mistake_prob > 0) and rng is None:
        raise ValueError("rng: required when verify_prob or mistake_prob > 0")
    value, rest, segs = problem.start, list(problem.ops), []
    while rest:
        op, b = rest.pop(0)
        prev, value = value, (value + b if op == "+" else value - b)
        inv = "-" if op == "+" else "+"
        step = _expr(value, tuple(rest))
        if segs:
            segs.append(("=", True))
        if verify_prob > 0 and rng.random() < verify_prob:
            check = f"[{value}{inv}{b}={prev}]"
            if mistake_prob > 0 and rng.random() < mistake_prob:
                w = rng.choice([w for w in range(value - 3, value + 4)
                                if w != value and w >= 0 and (op == "-" or w >= b)])
                back = w - b if op == "+" else w + b
                segs += [(_expr(w, tuple(rest)), False), (f"[{w}{inv}{b}={back}]?", True)]
            step += check
        segs.append((step, True))
    segs.append((f";\\boxed{{{value}}}", True))
    return segs


def solution(problem: Problem, *, rng: random.Random | None = None, verify_prob: float = 0.0,
             mistake_prob: float = 0.0) -> str:
    """The step-by-step solution text (response only); see :func:`solution_segments` for the options."""
    return "".join(t for t, _ in solution_segments(problem, rng=rng, verify_prob=verify_prob,
                                                   mistake_prob=mistake_prob))


def direct_answer(problem: Problem) -> str:
    """The gold answer with no working: ``\\boxed{answer}``."""
    return f"\\boxed{{{problem.answer}}}"


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint train (RL prompts + SFT data) and held-out eval problems, all from one seed."""

    train: list[Problem]
    eval: list[Problem]


def make_splits(
    *, seed: int, num_train: int, num_eval: int, min_ops: int, max_ops: int, max_operand: int
) -> TaskSplits:
    """Seeded problem sets; difficulties uniform in [min_ops, max_ops]; eval prompts never occur in train."""
    for name, v in (("num_train", num_train), ("num_eval", num_eval), ("min_ops", min_ops)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if max_ops < min_ops:
        raise ValueError(f"max_ops: must be >= min_ops={min_ops}, got {max_ops}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(n: int) -> list[Problem]:
        out: list[Problem] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"num_train/num_eval: cannot draw {n} distinct problems from this task space")
            p = make_problem(rng, rng.randint(min_ops, max_ops), max_operand)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return out

    held_out = draw(num_eval)
    return TaskSplits(train=draw(num_train), eval=held_out)


def sft_examples(
    problems: Sequence[Problem], tokenizer: CharTokenizer, *, rng: random.Random, verify_prob: float, n: int,
    direct_prob: float = 0.0, mistake_prob: float = 0.0,
) -> tuple[list[list[int]], list[int], list[list[bool]]]:
    """``n`` random (prompt + solution) token sequences, their prompt lengths and per-token target flags
    (False on the slips of self-correcting traces, which SFT must not imitate; see
    :func:`solution_segments`); a ``direct_prob`` share of the responses are the answer with no working
    (:func:`direct_answer`)."""
    seqs, plens, targets = [], [], []
    for _ in range(n):
        p = problems[rng.randrange(len(problems))]
        prompt = tokenizer.encode(p.prompt, bos=True)
        if rng.random() < direct_prob:
            segs = [(direct_answer(p), True)]
        else:
            segs = solution_segments(p, rng=rng, verify_prob=verify_prob, mistake_prob=mistake_prob)
        seq, keep = list(prompt), [True] * len(prompt)
        for text, imitate in segs:
            ids = tokenizer.encode(text)
            seq += ids
            keep += [imitate] * len(ids)
        seqs.append(seq + [tokenizer.eos_token_id])
        targets.append(keep + [True])
        plens.append(len(prompt))
    return seqs, plens, targets


def warmup_problems(problems: Sequence[Problem], max_ops: int) -> list[Problem]:
    """The warm-up set (paper 2.3.1): the problems with at most ``max_ops`` operations (0 = all of them).

    A warm-up on the easier problems only leaves the harder ones to RL, whose curriculum (2.3.4) moves
    from easy to hard."""
    if max_ops < 0:
        raise ValueError(f"max_ops: must be >= 0, got {max_ops}")
    chosen = [p for p in problems if not max_ops or p.difficulty <= max_ops]
    if problems and not chosen:
        raise ValueError(f"max_ops={max_ops}: no training problem has that few operations")
    return chosen


class ArithmeticTask:
    """The shipped task as a :class:`k15sys.tasks.base.Task`: :func:`make_splits` problems, the character tokenizer,
    ``math_reward`` on the decoded response, long-CoT (or short, ``long_cot=False``) warm-up traces.

    Args:
        splits: the train / held-out problems.
        tokenizer: the task's :class:`CharTokenizer`.
        sft_max_ops: warm-up set, see :func:`warmup_problems`.
        long_cot: warm-up traces with checks (``verify_prob``, ``mistake_prob``) or short ones without.
        verify_prob, direct_prob, mistake_prob: the trace options of :func:`sft_examples`.
    """

    has_sft = True
    has_short_cot = True

    def __init__(self, splits: TaskSplits, tokenizer: CharTokenizer, *, sft_max_ops: int = 0, long_cot: bool = True,
                 verify_prob: float = 0.0, direct_prob: float = 0.0, mistake_prob: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.train, self.eval = splits.train, splits.eval
        self.warmup_set = warmup_problems(splits.train, sft_max_ops)
        self.verify_prob, self.mistake_prob = (verify_prob, mistake_prob) if long_cot else (0.0, 0.0)
        self.direct_prob = direct_prob

    def prompt_ids(self, item: Problem) -> list[int]:
        return self.tokenizer.encode_prompt(item.prompt)

    def reward(self, items: Sequence[Problem], responses: Sequence[Sequence[int]]) -> list[float]:
        if len(items) != len(responses):
            raise ValueError(f"responses: {len(responses)} for {len(items)} problems")
        return [math_reward(self.tokenizer.decode(r), p.answer) for p, r in zip(items, responses)]

    def sft_examples(self, rng: random.Random, n: int) -> SFTBatch:
        return sft_examples(self.warmup_set, self.tokenizer, rng=rng, verify_prob=self.verify_prob, n=n,
                            direct_prob=self.direct_prob, mistake_prob=self.mistake_prob)

    def response_metrics(self, responses: Sequence[Sequence[int]]) -> dict[str, float]:
        """``direct_share``: the share of responses whose first token opens the boxed answer (no working)."""
        if not responses:
            return {}
        direct = [bool(r) and r[0] == self.tokenizer.boxed_token_id for r in responses]
        return {"direct_share": sum(direct) / len(direct)}

    def close(self) -> None:
        pass
