"""User-facing rollout types (paper 2.6.2): sampling parameters and completions."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

FinishReason = Literal["stop", "length", "repeat"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one segment.

    ``temperature == 0`` is greedy decoding (log-probs then come from the untempered distribution);
    ``top_k == 0`` and ``top_p == 1`` disable those filters. A sampled token in ``stop_token_ids`` ends
    the sequence and is kept as its last token. ``seed`` makes a call reproducible.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed: must be None or an int >= 0, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def with_budget(self, max_new_tokens: int, seed: int | None = None) -> "SamplingParams":
        """A copy with another ``max_new_tokens`` (and ``seed``, when given)."""
        return replace(self, max_new_tokens=max_new_tokens, seed=self.seed if seed is None else seed)


@dataclass
class Completion:
    """One generated segment: the new token ids, the log-prob of each under the sampling distribution
    (after temperature / top-k / top-p), and why generation stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
