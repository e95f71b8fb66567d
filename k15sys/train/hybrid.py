"""Hybrid deployment (paper 2.6.3): trainer and rollout engine share the accelerator and take turns with its memory.

The engine's half is ``sleep()`` / ``wake()`` (:meth:`k15sys.rollout.paged_engine.PagedEngine.sleep`: the trainer
asks for level 2, weights discarded, since a weight sync follows every wake). This module is the trainer's half:
while the engine generates, the policy's parameters and buffers, the optimizer's parameters (fp32 master weights,
:mod:`k15sys.train.optim`) and its state tensors wait in host memory, and they come back, bit for bit, before the
training step (a bf16 parameter that is its master's rounding is not copied: it is recomputed from the master).
Gradients are not kept across iterations (``zero_grad(set_to_none=True)``); any that exist move too.

Plain tensors move through a :class:`~k15sys.weights.pinned.HostMirror`: pinned host buffers allocated once and
reused, all copies queued on a side stream, one host synchronisation per offload and none per onload. The
module's FSDP2 shards (DTensors, under torchrun) move with ``module.to``, which FSDP2 follows (it re-registers
its sharded parameters); the optimizer's DTensors (state, master weights) move their local tensors through
the mirror.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from k15sys.train.optim import MasterWeights
from k15sys.weights.pinned import HostMirror


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


class TrainerOffload:
    """Moves a module and its optimizer's tensors between ``device`` and host memory.

    Args:
        model: the policy, plain or FSDP2-sharded; its Parameter objects stay the same, so the optimizer keeps them.
        optimizer: its optimizer (or a :class:`~k15sys.train.optim.MasterWeights`): the parameters it steps and its
            per-parameter state tensors on the accelerator move with the model (CPU-resident ones, such as Adam's
            step counters, stay where they are).
        device: the accelerator the trainer runs on; a CPU device makes both calls no-ops (``enabled`` False).

    The freed device blocks go back to the driver after an offload (``torch.cuda.empty_cache``): kept in torch's
    cache they would spare the onload a ``cudaMalloc`` per tensor, but the engine's allocations would carve them
    up and the next onload would allocate beside them.
    """

    def __init__(self, model: nn.Module, optimizer: Any, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.enabled = self.device.type != "cpu"
        self.mirror = HostMirror(self.device)
        self._sharded = False  # the last offload moved FSDP2 shards with module.to
        self._derived: list[tuple[nn.Parameter, nn.Parameter]] = []  # parameters recomputed from their masters
        self.offloaded = False

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What moves, each tensor once: (the module's parameters, their gradients and its buffers; the optimizer's
        parameters that are not the module's, e.g. fp32 master weights, and its state tensors on ``device``).
        DTensors outside the module (master weights and optimizer state under FSDP2) are given as their local
        tensors."""
        seen: set[int] = set()

        def collect(items) -> list[torch.Tensor]:
            out = []
            for t in items:
                if t is None or not torch.is_tensor(t):
                    continue
                if id(t) in seen:
                    continue
                seen.add(id(t))
                if t.device.type == self.device.type:
                    out.append(t)
            return out

        module = collect(t for p in self.model.parameters() for t in (p, p.grad))
        module += collect(self.model.buffers())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rest = collect(t for p in params for t in (p, p.grad))
        rest += collect(v for state in self.optimizer.state.values() for v in state.values())
        return module, [t._local_tensor if _is_dtensor(t) else t for t in rest]

    def offload(self) -> None:
        """Everything :meth:`tensors` lists to host memory; the accelerator's cached blocks are released."""
        if self.offloaded or not self.enabled:
            return
        module, rest = self.tensors()
        if any(_is_dtensor(t) for t in module):  # FSDP2 shards: module.to, which FSDP2 follows
            self.model.to("cpu")
            self._sharded = True
            moving = rest
        else:
            self._derived = self._rounded_masters()
            skip = {id(p) for p, _ in self._derived}
            moving = [t for t in module if id(t) not in skip] + rest
        if not self.optimizer.state:  # before the first step: size the buffers for the state to come
            self.mirror.reserve(tuple((t.dtype, tuple(t.shape)) for t in moving) + self._future_state())
        self.mirror.offload(moving)  # synchronises: no queued work reads the derived parameters any more
        for p, _ in self._derived:  # a CPU placeholder of the parameter's shape that holds no memory
            p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)
        self.offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _rounded_masters(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (parameter, fp32 master) pairs of a :class:`MasterWeights` optimizer whose parameter is exactly its
        master rounded to the parameter's dtype (true after every step and after ``sync_masters``; checked on
        the device, one synchronisation): such a parameter is not copied to the host, it is recomputed from its
        master at onload, which saves 2 of the 14 bytes per parameter each way."""
        if not isinstance(self.optimizer, MasterWeights):
            return []
        pairs = [(p, m) for p, m in zip(self.optimizer.params, self.optimizer.masters)
                 if m is not p and p.grad is None and p.device.type == self.device.type and not _is_dtensor(m)]
        if not pairs:
            return []
        with torch.no_grad():
            exact = torch.stack([(p == m.to(p.dtype)).all() for p, m in pairs]).tolist()
        return [pair for pair, ok in zip(pairs, exact) if ok]

    def _future_state(self) -> tuple[tuple[torch.dtype, tuple[int, ...]], ...]:
        """The device state tensors the optimizer creates at its first step, for the optimizers the trainer builds
        (:func:`k15sys.train.optim.build_optimizer`): Adam(W)'s two moments (three with amsgrad), SGD's momentum
        buffer; none known for other optimizers (their state then gets buffers when it appears)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # MasterWeights' inner optimizer
        per_param = 0
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            per_param = 2 + any(g.get("amsgrad") for g in inner.param_groups)
        elif isinstance(inner, torch.optim.SGD):
            per_param = int(any(g.get("momentum") for g in inner.param_groups))
        params = [p for g in inner.param_groups for p in g["params"] if p.device.type == self.device.type]
        return tuple((p.dtype, tuple(p.shape)) for p in params for _ in range(per_param))

    def onload(self) -> None:
        """Everything :meth:`offload` moved back to ``device``."""
        if not self.offloaded:
            return
        if self._sharded:
            self.model.to(self.device)
            self._sharded = False
        self.mirror.onload()  # ordered before the current stream's next work: the masters are back for it
        with torch.no_grad():
            for p, m in self._derived:
                p.data = m.detach().to(p.dtype)
        self._derived = []
        self.offloaded = False
