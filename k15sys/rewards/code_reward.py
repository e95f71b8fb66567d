"""Verifiable code reward through the sandbox (paper 2.3.5, 2.6.4).

``code_reward(program, tests)`` is the fraction of tests the program passes. Tests are either assert
statements (function tests: each runs after the program, in its own execution) or
``{"input": ..., "output": ...}`` pairs (stdin/stdout, compared whitespace-tolerantly or by a checker).
A test that crashes, loops or exceeds a limit fails; nothing the program does raises here.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from k15sys.sandbox import Limits, RunRequest, RunResult, Sandbox, Status

Checker = Callable[[str, str, str], bool]  # (input, expected, actual) -> passed

_default_lock = threading.Lock()
_default: Sandbox | None = None


def default_sandbox() -> Sandbox:
    """A process-wide sandbox with 2 workers, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox(workers=2)
        return _default


def outputs_match(actual: str, expected: str) -> bool:
    """Whitespace-tolerant comparison: the same tokens in the same order."""
    return actual.split() == expected.split()


@dataclass
class TestOutcome:
    passed: bool
    status: Status
    detail: str = ""


def _requests(program: str, tests: Sequence[str | dict], language: str, limits: Limits) -> list[RunRequest]:
    reqs = []
    for i, t in enumerate(tests):
        if isinstance(t, str):
            if language != "python":
                raise ValueError(f"tests[{i}]: assert tests need language='python', got {language!r}")
            reqs.append(RunRequest(program + "\n\n" + t + "\n", "python", "", limits))
        elif isinstance(t, dict) and "input" in t and "output" in t:
            reqs.append(RunRequest(program, language, str(t["input"]), limits))
        else:
            raise ValueError(f"tests[{i}]: expected an assert statement or a dict with 'input' and 'output', got {t!r:.80}")
    return reqs


def run_tests(
    program: str,
    tests: Sequence[str | dict],
    *,
    language: str = "python",
    timeout_s: float = 5.0,
    sandbox: Sandbox | None = None,
    checker: Checker | None = None,
) -> list[TestOutcome]:
    """Run every test in the sandbox (in parallel on its worker pool); one :class:`TestOutcome` per test."""
    if not tests:
        raise ValueError("tests: empty")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
    if not isinstance(program, str) or not program.strip():
        return [TestOutcome(False, Status.INVALID, "program: empty") for _ in tests]
    sb = sandbox or default_sandbox()
    limits = Limits(wall_s=timeout_s, cpu_s=max(1, int(timeout_s + 0.999)), memory_mb=sb.limits.memory_mb,
                    max_procs=sb.limits.max_procs, output_bytes=sb.limits.output_bytes)
    results: list[RunResult] = sb.run_batch(_requests(program, tests, language, limits))
    outcomes = []
    for t, r in zip(tests, results):
        if r.status != Status.OK:
            outcomes.append(TestOutcome(False, r.status, r.stderr[-500:]))
        elif isinstance(t, str):
            outcomes.append(TestOutcome(True, r.status))
        else:
            expected = str(t["output"])
            ok = checker(str(t["input"]), expected, r.stdout) if checker else outputs_match(r.stdout, expected)
            outcomes.append(TestOutcome(bool(ok), r.status, "" if ok else "wrong answer"))
    return outcomes


def code_reward(
    program: str,
    tests: Sequence[str | dict],
    *,
    language: str = "python",
    timeout_s: float = 5.0,
    sandbox: Sandbox | None = None,
    checker: Checker | None = None,
) -> float:
    """Fraction of ``tests`` passed by ``program`` in [0, 1] (paper 2.3.5); 0.0 for an invalid program."""
    outcomes = run_tests(program, tests, language=language, timeout_s=timeout_s, sandbox=sandbox, checker=checker)
    return sum(o.passed for o in outcomes) / len(outcomes)
