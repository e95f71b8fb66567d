"""What the trainer needs from a task and from a tokenizer (paper 2.2: verifiable prompts; 2.3.1: warm-up data).

The trainer, the evaluation and the long2short jobs name no task: they see a :class:`Task` -- training and
held-out problems with a difficulty label (curriculum sampling, 2.3.4), the token ids of each problem's
prompt, the verifier reward of a batch of responses (2.3.5) and the warm-up's SFT examples (2.3.1) -- and a
:class:`Tokenizer`. The shipped arithmetic task (:class:`k15sys.tasks.arithmetic.ArithmeticTask`) and a
user's JSONL problems (:class:`k15sys.tasks.jsonl.JsonlTask`) implement it.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

# (token ids of prompt + response, prompt length, per-token target flags or None = every response token)
SFTBatch = tuple[list[list[int]], list[int], list[list[bool]] | None]


class Tokenizer(Protocol):
    """Text <-> token ids with the fixed ids the trainer uses (pad for packing, eos for stopping)."""

    pad_token_id: int
    eos_token_id: int
    stop_token_ids: tuple[int, ...]  # a sampled token among these ends a response

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (a response, or any plain text)."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids the model is conditioned on for the problem statement ``text`` (a chat template's user turn
        and assistant header when the tokenizer has one)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens."""
        ...


class Item(Protocol):
    """One problem: the statement the prompt is made of and its difficulty label."""

    prompt: str
    difficulty: float


class Task(Protocol):
    """A verifiable task (paper 2.2): problems, their prompts, the reward of responses, warm-up examples.

    ``train`` are the RL prompts (and what the arithmetic warm-up draws from), ``eval`` the held-out set.
    """

    tokenizer: Tokenizer
    train: Sequence[Item]
    eval: Sequence[Item]
    has_sft: bool  # whether :meth:`sft_examples` has data (else the warm-up is skipped)
    has_short_cot: bool  # whether a short-CoT warm-up exists (long2short merge, 2.4)

    def prompt_ids(self, item: Item) -> list[int]:
        """The prompt's token ids of ``item``."""
        ...

    def reward(self, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> list[float]:
        """Verifier reward in [0, 1] of ``responses[i]`` (token ids, generated from ``prompt_ids(items[i])``), for the
        whole batch at once (code runs many programs in parallel)."""
        ...

    def sft_examples(self, rng: random.Random, n: int) -> SFTBatch:
        """``n`` warm-up sequences drawn with ``rng`` (the only randomness used, so the warm-up is resumable)."""
        ...

    def response_metrics(self, responses: Sequence[Sequence[int]]) -> dict[str, float]:
        """Task-specific figures of greedy held-out responses, e.g. ``{"direct_share": ...}`` (may be empty)."""
        ...

    def close(self) -> None:
        """Release what the task holds (sandbox containers)."""
        ...
