"""The main job's optimizers, with fp32 master weights for bfloat16 / float16 models (``model.master_weights``).

A bf16 parameter holds 8 significant bits: an update smaller than about 1/256 of the weight rounds away. RL
fine-tuning steps are that small (``rl.lr`` 1e-6 moves a weight of 0.02 by 5e-5 of itself), so AdamW applied to
bf16 parameters directly leaves most weights where they were. :class:`MasterWeights` keeps an fp32 copy of
each low-precision parameter: the optimizer steps the copies, from fp32 gradients, with fp32 moments, and the
module's parameters receive the rounded result after every step. Forward, backward, the rollout engine and the
weight sync keep working in the module's dtype. Memory: 2 bytes (bf16) + 4 (master) + 8 (AdamW moments) per
parameter, against 2 + 4 (bf16 moments) without masters; :class:`~k15sys.train.hybrid.TrainerOffload` moves the
masters and moments to host memory with the rest during colocated rollouts. float32 parameters are stepped
directly (no copy). Checkpoints hold the masters (:meth:`MasterWeights.state_dict`), so a resumed run continues
from the same fp32 values.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A host snapshot of ``t`` (an FSDP2 shard is all-gathered first: every rank calls it, in the same order)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def _like(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``src`` (a full host tensor) placed like ``ref``: sharded as ``ref`` when it is a DTensor of its shape."""
    if hasattr(ref, "device_mesh") and tuple(src.shape) == tuple(ref.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(src.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements)
    return src


class MasterWeights:
    """An optimizer over fp32 master copies of a module's low-precision parameters (see the module docstring).

    It offers what the trainer uses of a ``torch.optim.Optimizer``: ``param_groups`` and ``state`` (the inner
    optimizer's, over the masters), ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict``.

    Args:
        named_params: the module's parameters by name (plain tensors or FSDP2 DTensors).
        make_optimizer: builds the inner optimizer over the list of fp32 tensors it steps.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]],
                 make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.masters = [p if p.dtype not in LOW_PRECISION else nn.Parameter(p.detach().to(torch.float32))
                        for p in self.params]
        self.optimizer = make_optimizer(self.masters)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the module's gradients and the masters'."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """One step of the inner optimizer on the masters, from the module's gradients upcast to fp32 (each
        low-precision gradient is released once copied); the module's parameters then take the masters'
        values rounded to their dtype."""
        pairs = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        for p, m in pairs:
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None
        self.optimizer.step()
        for p, m in pairs:
            p.copy_(m)
            m.grad = None

    @torch.no_grad()
    def sync_masters(self) -> None:
        """Make every master the exact value of its parameter again, after something else changed the parameters
        (the SFT warm-up steps them with an optimizer of its own); the optimizer state is kept."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.copy_(p)

    def state_dict(self) -> dict[str, Any]:
        """Masters and optimizer state as full host tensors keyed by parameter name (FSDP2 shards gathered: a
        collective under torchrun), and the hyper-parameters of each group; independent of the rank count."""
        index = {id(m): n for n, m in zip(self.names, self.masters)}
        return {
            "master_weights": {n: _full_cpu(m) for n, m in zip(self.names, self.masters)},
            "state": {n: {k: _full_cpu(v) if torch.is_tensor(v) else v for k, v in self.optimizer.state[m].items()}
                      for n, m in zip(self.names, self.masters) if m in self.optimizer.state},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                              "params": [index[id(m)] for m in g["params"]]} for g in self.optimizer.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (any rank count). The module's parameters are not touched: they come from
        the checkpoint's model weights, which are the masters rounded (or, saved during the SFT warm-up, newer than
        this optimizer's masters, which :meth:`sync_masters` refreshes when the warm-up ends).

        Raises:
            ValueError: ``state`` has no master weights (written with ``model.master_weights=none``) or other names.
        """
        if "master_weights" not in state:
            raise ValueError("optimizer state: no fp32 master weights in it (the checkpoint was written with "
                             "model.master_weights=none); resume with the setting it was written with")
        if sorted(state["master_weights"]) != sorted(self.names):
            missing = sorted(set(self.names) ^ set(state["master_weights"]))
            raise ValueError(f"optimizer state: its master weights do not match the model's parameters ({missing[:5]})")
        with torch.no_grad():
            for n, m in zip(self.names, self.masters):
                src = _like(state["master_weights"][n], m)
                local = m.to_local() if hasattr(m, "device_mesh") else m
                local.copy_(src.to_local() if hasattr(src, "device_mesh") else src)
        position = {n: i for i, n in enumerate(self.names)}
        inner = {
            "state": {position[n]: {k: _like(v, self.masters[position[n]]) if torch.is_tensor(v) else v
                                    for k, v in st.items()} for n, st in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
        }
        self.optimizer.load_state_dict(inner)


def build_optimizer(kind: str, module: nn.Module, *, lr: float, master_weights: bool, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.98), weight_decay: float = 0.0) -> Any:
    """``kind`` ("adamw" or "sgd" with momentum) over ``module``'s parameters; with ``master_weights`` and any
    bf16/fp16 parameter, wrapped in :class:`MasterWeights` (an fp32 model gets the plain optimizer)."""
    if kind not in ("adamw", "sgd"):
        raise ValueError(f"kind: expected 'adamw' or 'sgd', got {kind!r}")

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)

    named = list(module.named_parameters())
    if master_weights and any(p.dtype in LOW_PRECISION for _, p in named):
        return MasterWeights(named, make)
    return make([p for _, p in named])
