"""Verifiable rewards (paper 2.3.5): math answers and code tests.

- :func:`math_reward`, :func:`extract_answer`, :func:`math_equal` — math-verify underneath
- :func:`code_reward`, :func:`run_tests` — programs against tests in ``k15sys.sandbox``
"""
from k15sys.rewards.code_reward import TestOutcome, code_reward, outputs_match, run_tests
from k15sys.rewards.math_reward import extract_answer, last_number, math_equal, math_reward, normalize_answer

__all__ = [
    "TestOutcome",
    "code_reward",
    "extract_answer",
    "last_number",
    "math_equal",
    "math_reward",
    "normalize_answer",
    "outputs_match",
    "run_tests",
]
