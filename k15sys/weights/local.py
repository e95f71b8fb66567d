"""Single-process weight sync: trainer tensors -> a rollout engine in the same process (paper 2.6.3).

The CPU default (trainer and ``TorchEngine`` in one process) needs no process group and no checkpoint
engine: the trainer's tensors, unsharded from their layout by the C++ reshard plan when they are shards,
go straight to ``engine.update_weights`` (all-or-nothing on ``TorchEngine``).
"""
from __future__ import annotations

from typing import Any

import torch

from k15sys.weights.layout import ModelLayout


def push_weights(engine: Any, weights: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], *,
                 layout: ModelLayout | None = None) -> int:
    """Hand ``weights`` to ``engine.update_weights`` in HF names; returns the bytes handed over.

    Args:
        engine: any object with ``update_weights(named_tensors)`` (``TorchEngine``, ``VLLMEngine``).
        weights: full tensors in HF names (``layout`` None), or ``layout``'s shards (a list, one dict per
            rank; a single dict for a one-rank layout).
        layout: the layout of ``weights`` when they are shards.
    """
    if not callable(getattr(engine, "update_weights", None)):
        raise ValueError(f"engine: {type(engine).__name__} has no update_weights method")
    if layout is not None:
        shards = [weights] if isinstance(weights, dict) else weights
        if not isinstance(shards, list):
            raise ValueError(f"weights: expected a list of per-rank dicts for layout {layout!r}, "
                             f"got {type(weights).__name__}")
        full = layout.unshard([{k: v.detach() for k, v in s.items()} for s in shards])
    elif isinstance(weights, dict):
        full = {k: v.detach() for k, v in weights.items()}
    else:
        raise ValueError(f"weights: expected a dict of HF-named tensors (or pass layout=), "
                         f"got {type(weights).__name__}")
    engine.update_weights(list(full.items()))
    return sum(t.numel() * t.element_size() for t in full.values())
