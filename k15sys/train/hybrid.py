"""Hybrid deployment (paper 2.6.3): trainer and rollout engine share the accelerator and take turns with its memory.

The engine's half is ``sleep()`` / ``wake()`` (weights to host memory while the trainer works). This module is the
trainer's half: while the engine generates, the policy's parameters and buffers and the optimizer's state tensors
wait in host memory, and they come back, bit for bit, before the training step. Gradients are not kept across
iterations (``zero_grad(set_to_none=True)``), so there is nothing else to move.
"""
from __future__ import annotations

import torch
from torch import nn


class TrainerOffload:
    """Moves a module and its optimizer's state between ``device`` and host memory.

    Args:
        model: the policy, plain or FSDP2-sharded (``module.to`` moves the local shards); its Parameter objects
            stay the same, so the optimizer keeps them.
        optimizer: its optimizer; per-parameter state tensors on the accelerator move with it (CPU-resident
            ones, such as Adam's step counters, stay where they are).
        device: the accelerator the trainer runs on; a CPU device makes both calls no-ops.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self._moved: list[tuple[dict, str]] = []  # optimizer state entries sent to the host, to bring back
        self.offloaded = False

    def offload(self) -> None:
        """Parameters, buffers and optimizer state to host memory; frees the accelerator's cached blocks."""
        if self.offloaded or self.device.type == "cpu":
            return
        self.model.to("cpu")
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device.type == self.device.type:
                    state[key] = value.to("cpu")
                    self._moved.append((state, key))
        self.offloaded = True
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """Everything :meth:`offload` moved back to ``device``."""
        if not self.offloaded:
            return
        self.model.to(self.device)
        for state, key in self._moved:
            state[key] = state[key].to(self.device)
        self._moved.clear()
        self.offloaded = False
