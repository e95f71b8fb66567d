"""The rollout-engine protocol (paper 2.6.2): what the partial-rollout scheduler and trainer need."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from k15sys.rollout.types import Completion, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates segments, takes new weights, and frees / retakes its memory.

    Implemented by :class:`~k15sys.rollout.TorchEngine` (transformers, the default) and
    :class:`~k15sys.rollout.VLLMEngine`; any object with these four methods works with the scheduler.
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order. Continuing a trajectory is generating from
        ``prompt + tokens so far``: under greedy decoding, 8 tokens then 12 more equal 20 in one go."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights given as (HF name, tensor) pairs; never called during :meth:`generate`."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (weights, KV cache) for a colocated trainer."""
        ...

    def wake(self) -> None:
        """Retake the memory freed by :meth:`sleep`; :meth:`generate` works again."""
        ...
