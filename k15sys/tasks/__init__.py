"""Tasks shipped with k15sys: verifiable problems + a locally built tokenizer (paper 2.2, 2.3.1).

- :func:`make_splits`, :func:`make_problem`, :func:`solution` — seeded multi-step arithmetic with the
  answer in ``\\boxed{}``, a difficulty label per problem, long-CoT and short-CoT solution traces.
- :class:`CharTokenizer` — the character-level tokenizer of that task.
"""
from k15sys.tasks.arithmetic import (Problem, TaskSplits, direct_answer, make_problem, make_splits, solution,
                                     solution_segments)
from k15sys.tasks.tokenizer import CharTokenizer

__all__ = ["CharTokenizer", "Problem", "TaskSplits", "direct_answer", "make_problem", "make_splits", "solution",
           "solution_segments"]
