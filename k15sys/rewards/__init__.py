"""Verifiable rewards (paper 2.3.5): math answers and code tests.

- :func:`math_reward`, :func:`extract_answer`, :func:`math_equal` — math-verify underneath, bounded in time
- :func:`code_reward`, :func:`run_tests` — programs against tests in ``k15sys.sandbox``
"""
from k15sys.rewards.code import code_reward, default_sandbox, run_tests, to_test_cases
from k15sys.rewards.math import extract_answer, last_number, math_equal, math_reward, normalize_answer

__all__ = [
    "code_reward",
    "default_sandbox",
    "extract_answer",
    "last_number",
    "math_equal",
    "math_reward",
    "normalize_answer",
    "run_tests",
    "to_test_cases",
]
