"""The trainer's one weight path to its rollout engine: one version per :meth:`WeightSync.push` (paper 2.6.3).

The sources are the trainer module's weights (:func:`~k15sys.weights.local.module_weights`): plain tensors
(``ModelLayout.hf``) or FSDP2 shards (DTensors split on dim 0 like ``ModelLayout.fsdp``). Where they go:

* an in-process engine that generates with an ``nn.Module`` of its own (``TorchEngine``, ``PagedEngine``):
  the version is checked against the engine's tensors first (names, shapes, dtypes: a bad version changes
  nothing), then copied straight into them on their device, never through the host. Plain sources of one
  dtype and device in the HF layout of a Llama/Qwen2 config go in one reshard-plan execution
  (:func:`~k15sys.weights.reshard.plan_reshard` HF -> HF: the C++ copy pool on the host, one Triton launch on
  a GPU); FSDP2 sources are gathered one tensor at a time into their target (an all-gather straight into
  the engine's tensor when the shards are even and the dtypes match), so no GPU ever holds a second full copy
  of the model. The engine's ``weight_version`` advances once per version;
* any other engine (``RemoteEngine`` -> :class:`~k15sys.weights.CheckpointEngine` to worker processes,
  ``VLLMEngine``): ``update_weights`` with the full tensors, gathered one at a time as the engine consumes
  them (``RemoteEngine`` copies each into host buckets), after a dtype check.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from k15sys.weights.layout import ModelLayout
from k15sys.weights.local import check_weights, engine_weights, module_weights
from k15sys.weights.reshard import ReshardPlan, plan_reshard


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard is all-gathered (a collective: every rank calls it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def _copy_into(target: torch.Tensor, t: torch.Tensor) -> None:
    """``target.copy_(full t)``; dim-0 shards of equal size and the target's dtype and device are all-gathered
    straight into ``target`` (no temporary full tensor, no second copy)."""
    if hasattr(t, "full_tensor"):
        from torch.distributed.tensor import Shard

        local, mesh = t.to_local(), t.device_mesh
        if (mesh.ndim == 1 and tuple(t.placements) == (Shard(0),) and t.shape[0] % mesh.size() == 0
                and local.dtype == target.dtype and local.device == target.device and target.is_contiguous()):
            dist.all_gather_into_tensor(target, local.contiguous(), group=mesh.get_group())
            return
    target.copy_(_full(t))


class WeightSync:
    """Pushes ``module``'s weights to ``engine`` (see the module docstring for the paths).

    Args:
        module: the trainer's model (e.g. a transformers causal LM, possibly FSDP2-sharded).
        engine: the rollout engine (any object with ``update_weights(named_tensors)``).
    """

    def __init__(self, module: torch.nn.Module, engine: Any) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not callable(getattr(engine, "update_weights", None)):
            raise ValueError(f"engine: {type(engine).__name__} has no update_weights method")
        self.module, self.engine = module, engine
        self._plan: ReshardPlan | None = None
        self._planned = False  # whether the module's names were matched against a layout already

    @property
    def path(self) -> str:
        """``"in-place"`` (into the engine's own tensors) or ``"update_weights"``."""
        return "in-place" if engine_weights(self.engine) is not None else "update_weights"

    def push(self) -> int:
        """Send the current weights as one version; returns its bytes. Every trainer rank calls it."""
        sources = module_weights(self.module)
        own = engine_weights(self.engine)
        if own is None:
            check_weights(sources.items(), what="trainer weights")
            self.engine.update_weights((name, _full(t)) for name, t in sources.items())
        else:
            targets, optional = own
            check_weights(sources.items(), targets, optional=optional, what="trainer weights")
            with torch.no_grad():
                if not self._plan_copy(sources, targets):
                    for name, t in sources.items():
                        _copy_into(targets[name], t)
            self.engine.weight_version += 1
        return sum(t.numel() * t.element_size() for t in sources.values())

    def _plan_copy(self, sources: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> bool:
        """The whole version as one plan execution, when sources and targets allow it (else False)."""
        tensors = [*sources.values(), *(targets[n] for n in sources)]
        if any(hasattr(t, "full_tensor") for t in tensors) or len({(t.dtype, t.device) for t in tensors}) != 1:
            return False
        if not self._planned:
            self._planned = True
            try:
                layout = ModelLayout.hf(self.module.config)
            except (AttributeError, TypeError, ValueError):  # not a Llama/Qwen2-family config
                return False
            if layout.full_shapes == {n: tuple(t.shape) for n, t in sources.items()}:
                self._plan = plan_reshard(layout, layout)
        if self._plan is None:
            return False
        self._plan.execute_into([sources], [{n: targets[n] for n in sources}])
        return True
