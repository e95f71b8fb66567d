"""Tasks: verifiable problems + tokenizers behind the protocols the trainer uses (paper 2.2, 2.3.1).

- :mod:`k15sys.tasks.base` -- the :class:`Task` and :class:`Tokenizer` protocols (the trainer names no task).
- :func:`make_splits`, :func:`make_problem`, :func:`solution`, :class:`ArithmeticTask` -- the shipped seeded
  multi-step arithmetic with the answer in ``\\boxed{}``, a difficulty label per problem, long-CoT and short-CoT
  solution traces; :class:`CharTokenizer` -- its character-level tokenizer.
- :mod:`k15sys.tasks.jsonl` -- a user's math / code problems and SFT traces from JSONL (``data.train``);
  :mod:`k15sys.tasks.hf_tokenizer` -- a transformers tokenizer (``model.path``); :func:`build_task` picks the
  task of a config (import it from :mod:`k15sys.tasks.factory`).
"""
from k15sys.tasks.arithmetic import (ArithmeticTask, Problem, TaskSplits, direct_answer, make_problem, make_splits,
                                     sft_examples, solution, solution_segments, warmup_problems)
from k15sys.tasks.base import Task, Tokenizer
from k15sys.tasks.tokenizer import CharTokenizer

__all__ = ["ArithmeticTask", "CharTokenizer", "Problem", "Task", "TaskSplits", "Tokenizer", "direct_answer",
           "make_problem", "make_splits", "sft_examples", "solution", "solution_segments", "warmup_problems"]
