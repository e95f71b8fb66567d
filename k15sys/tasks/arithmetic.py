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
"""
from __future__ import annotations

import random
from dataclasses import dataclass


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
