"""The rollout-engine protocol (paper 2.6.2): what the partial-rollout scheduler and trainer need."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from k15sys.rollout.types import Completion, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates segments, takes new weights, and frees / retakes its memory.

    Continuing a trajectory is generating from ``prompt + tokens so far``.
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...
