"""Verifiable code reward through the sandbox (paper 2.3.5, 2.6.4).

``code_reward(program, tests)`` is the fraction of tests the program passes. Tests are either assert
statements (function tests: each runs after the program, in its own execution) or
``{"input": ..., "output": ...}`` pairs (stdin/stdout, compared whitespace-tolerantly or by a checker).
A test that crashes, loops or exceeds a limit fails within its limit; nothing the program does raises.
An assert test passes only when the sandbox's judge ran it to completion in its own process, on plain
values the program returned (a program that exits early, fakes ``__eq__`` or reads its tests fails).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping, Sequence

from k15sys.sandbox import LANGUAGES, Limits, RunResult, Sandbox, TestCase
from k15sys.sandbox.runner import Checker

Test = str | Mapping[str, str]

_default_lock = threading.Lock()
_default: Sandbox | None = None


def default_sandbox() -> Sandbox:
    """The process-wide sandbox (2 pre-started containers), created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox(workers=2)
        return _default


def to_test_cases(tests: Sequence[Test], language: str) -> list[TestCase]:
    """Assert statements -> judged Python tests (``TestCase.suffix``); {"input", "output"} -> stdin +
    expected stdout, compared by the caller's process."""
    if not isinstance(language, str) or language not in LANGUAGES:
        raise ValueError(f"language: unknown {language!r}; supported: {', '.join(LANGUAGES)}")
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence) or len(tests) == 0:
        raise ValueError(f"tests: expected a non-empty list of tests, got {tests!r:.80}")
    cases = []
    for i, t in enumerate(tests):
        if isinstance(t, str):
            if language != "python":
                raise ValueError(f"tests[{i}]: assert tests need language='python', got {language!r}")
            if not t.strip():
                raise ValueError(f"tests[{i}]: empty assert test")
            cases.append(TestCase(suffix=t))
        elif isinstance(t, Mapping) and "input" in t and "output" in t:
            cases.append(TestCase(stdin=str(t["input"]), expected=str(t["output"])))
        else:
            raise ValueError(f"tests[{i}]: expected an assert statement or a dict with 'input' and 'output', "
                             f"got {t!r:.80}")
    return cases


def test_limits(timeout_s: float, base: Limits | None = None) -> Limits:
    """``base`` (default :class:`Limits`) with a wall-clock limit of ``timeout_s`` per test and a CPU limit of the
    same, rounded up; ValueError unless ``timeout_s`` > 0."""
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
    return dataclasses.replace(base or Limits(), wall_s=float(timeout_s), cpu_s=max(1, math.ceil(timeout_s)))


def pass_fraction(results: Sequence[RunResult]) -> float:
    """The code reward of one program (paper 2.3.5): the share of its test results that passed."""
    return sum(r.status.value == "OK" for r in results) / len(results)


def run_tests(program: str, tests: Sequence[Test], *, language: str = "python", timeout_s: float = 5.0,
              sandbox: Sandbox | None = None, checker: Checker | None = None) -> list[RunResult]:
    """Run every test in the sandbox; one :class:`RunResult` per test (status OK = passed)."""
    limits = test_limits(timeout_s, sandbox.limits if sandbox else None)  # the default sandbox has the default limits
    cases = to_test_cases(tests, language)
    return (sandbox or default_sandbox()).run_tests(program, cases, language=language, limits=limits, checker=checker)


def code_reward(program: str, tests: Sequence[Test], *, language: str = "python", timeout_s: float = 5.0,
                sandbox: Sandbox | None = None, checker: Checker | None = None) -> float:
    """Fraction of ``tests`` passed by ``program``, in [0, 1] (paper 2.3.5).

    Args:
        program: the policy's program (Python 3 or C++ source); an empty program scores 0.
        tests: assert statements (Python) or ``{"input": ..., "output": ...}`` stdin/stdout pairs.
        language: "python" or "cpp" (anything else is a ValueError).
        timeout_s: wall-clock limit per test (CPU limit: the same, rounded up).
        sandbox: a :class:`Sandbox` to use (default: a shared one with 2 workers).
        checker: ``checker(input, expected, actual) -> bool`` instead of whitespace-tolerant equality.
    """
    return pass_fraction(run_tests(program, tests, language=language, timeout_s=timeout_s, sandbox=sandbox,
                                   checker=checker))
