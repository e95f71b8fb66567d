"""Repeat detection for long-CoT rollouts (paper section 2.6.2).

Partial rollouts end degenerate trajectories early: when the tail of a generated stream has become a
loop (a block of p tokens repeated over and over), the generator stops and the trajectory gets a
penalty. ``RepeatDetector`` watches one stream token by token.

Algorithm (O(candidates) = O(1) per token): the detector keeps a small set of candidate periods p, each with
``run``, the number of trailing positions i with ``tok[i] == tok[i - p]``. A matching token extends a run,
a mismatch drops that candidate. New candidates come from the last ``max_candidates`` earlier occurrences
of the last ``key_len`` tokens (a dict lookup); their run is known to be at least ``key_len``. The tail
``run + p`` tokens are periodic with period p, and a loop is reported when
``run + p >= max(min_repeats * p, min_span)``. Runs are lower bounds, so the detector may fire a few tokens
late but never reports a loop that is not there; a loop of period p is always found as long as the key
occurs at most ``max_candidates - 1`` times inside one block of the loop.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RepeatMatch:
    """A loop found at the end of a stream: ``span`` trailing tokens with period ``period``, detected
    when the stream had ``end`` tokens."""

    period: int
    span: int
    end: int


class RepeatDetector:
    """Online detector of a repeated-block loop at the end of one token stream.

    Args:
        min_repeats: how many copies of the block must be present (>= 2).
        min_span: the looping tail must also cover at least this many tokens, so short legitimate
            repetitions (``0000`` in a number) are not flagged.
        max_period: the longest block considered.
        key_len: tokens used to find a candidate period (>= 1).
    """

    def __init__(self, min_repeats: int = 4, min_span: int = 32, max_period: int = 512, key_len: int = 4,
                 max_candidates: int = 16) -> None:
        if min_repeats < 2:
            raise ValueError(f"min_repeats: must be >= 2, got {min_repeats!r}")
        if min_span < 1:
            raise ValueError(f"min_span: must be >= 1, got {min_span!r}")
        if max_period < 1:
            raise ValueError(f"max_period: must be >= 1, got {max_period!r}")
        if key_len < 1:
            raise ValueError(f"key_len: must be >= 1, got {key_len!r}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates: must be >= 1, got {max_candidates!r}")
        self.min_repeats = min_repeats
        self.min_span = min_span
        self.max_period = max_period
        self.key_len = key_len
        self.max_candidates = max_candidates
        self.reset()

    def reset(self) -> None:
        self._tokens: list[int] = []
        self._seen: dict[tuple[int, ...], list[int]] = {}  # key -> its last positions (newest last)
        self._runs: dict[int, int] = {}  # candidate period -> run
        self.match: RepeatMatch | None = None

    @property
    def detected(self) -> bool:
        return self.match is not None

    @property
    def period(self) -> int | None:
        return self.match.period if self.match else None

    def push(self, token: int) -> bool:
        """Append one token; True once a loop has been detected (it stays True until :meth:`reset`)."""
        toks = self._tokens
        toks.append(int(token))
        if self.match is not None:
            return True
        i = len(toks) - 1
        self._runs = {p: r + 1 for p, r in self._runs.items() if toks[i] == toks[i - p]}
        if i + 1 >= self.key_len:
            key = tuple(toks[i + 1 - self.key_len :])
            prev = self._seen.setdefault(key, [])
            for j in prev:
                if i - j <= self.max_period:
                    self._runs.setdefault(i - j, self.key_len)
            prev.append(i)
            if len(prev) > self.max_candidates:
                del prev[0]
        for p in sorted(self._runs):
            if self._runs[p] + p >= max(self.min_repeats * p, self.min_span):
                self.match = RepeatMatch(period=p, span=self._runs[p] + p, end=i + 1)
                return True
        return False

    def extend(self, tokens: Iterable[int]) -> bool:
        """Push several tokens; True if a loop has been detected."""
        for t in tokens:
            if self.push(t):
                return True
        return self.detected


def find_repeat(tokens: Iterable[int], **kwargs: int) -> RepeatMatch | None:
    """Run a fresh :class:`RepeatDetector` (``kwargs`` are its options) over ``tokens``; the first loop, or None."""
    det = RepeatDetector(**kwargs)
    det.extend(tokens)
    return det.match


def penalize_repeats(rewards: torch.Tensor, repeated: torch.Tensor, *, penalty: float = -1.0) -> torch.Tensor:
    """Add ``penalty`` (<= 0) to the reward of every trajectory that was stopped for repeating."""
    if penalty > 0:
        raise ValueError(f"penalty: must be <= 0, got {penalty!r}")
    if rewards.shape != repeated.shape:
        raise ValueError(f"repeated: shape {tuple(repeated.shape)} does not match rewards {tuple(rewards.shape)}")
    return rewards + penalty * repeated.to(rewards.dtype)
