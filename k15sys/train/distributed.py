"""torch.distributed glue for the trainer (paper 2.6.3): FSDP2 sharding, full state dicts, reductions.

Launch with ``torchrun --nproc-per-node N -m k15sys.cli train ...`` (gloo on the CPU, NCCL on GPUs).
With one process every helper degrades to the plain single-process operation, so the trainer has one
code path. Parallelism is applied to a model by :func:`shard` (FSDP2 ``fully_shard`` on every decoder
layer, then on the root), never baked into the model class.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from k15sys.train.config import ConfigError
from k15sys.train.optim import MasterWeights


def init_from_env(device: str = "auto") -> None:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL with one
    GPU per rank (``LOCAL_RANK``) when the run uses CUDA (``device`` "cuda", or "auto" with GPUs), else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if resolve_device(device).type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")


def shutdown(*, barrier: bool = False) -> None:
    """Tear the trainer's process group down (every rank), so no backend thread outlives the interpreter.

    ``barrier=True`` (a run that ended normally on every rank) first waits until no peer still needs this
    rank; after an error it must stay False, as a peer stuck in a collective would never reach the barrier.
    """
    if _distributed():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> NoReturn:
    """End a torchrun rank after :func:`shutdown` without tearing the interpreter down.

    torch's DTensor caches (sharding propagation, redistribute plans, mesh topology) keep FSDP2's device
    mesh, and through it the process group and its gloo worker threads, alive after
    ``destroy_process_group``. Interpreter teardown with those threads running aborts now and then
    ("terminate called without an active exception"), which torchrun reports as a failed run. So a rank
    that is done flushes its output and leaves with ``os._exit``.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def resolve_device(device: str) -> torch.device:
    """``run.device`` as a torch device: "auto" is CUDA when available; under torchrun, this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device: 'cuda' requested but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device != "cpu":
        raise ConfigError(f"run.device: expected auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    """The trainer's (rank, world size): the torchrun group's, (0, 1) in a single process (rollout workers of
    :class:`~k15sys.rollout.RemoteEngine` are not part of it: they join a weight group of their own)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return rank_and_world()[1] > 1


def shard(policy: nn.Module) -> nn.Module:
    """FSDP2-shard a :class:`~k15sys.train.policy.PackedPolicy`: each decoder layer, then the root."""
    if not _distributed():
        return policy
    from torch.distributed.fsdp import fully_shard

    for layer in policy.lm.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    return policy


def full_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers of ``lm`` by HF name (tied weights once), on the CPU."""
    out = {}
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.cpu()
    return out


def load_full_state_dict(lm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`full_state_dict`: copy full tensors into (possibly sharded) parameters."""
    own = dict([*lm.named_parameters(), *lm.named_buffers()])
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"state: missing tensors {missing[:5]}")
    with torch.no_grad():
        for name, t in own.items():
            src = state[name]
            if hasattr(t, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(t.dtype), t.device_mesh, t.placements)
                t.to_local().copy_(src.to_local())
            else:
                t.copy_(src)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state, unsharded (identical on every rank count-independent layout)."""
    if isinstance(optimizer, MasterWeights):  # name-keyed full tensors already, any rank count
        return optimizer.state_dict()
    if not _distributed():
        return copy_state(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state_dict`."""
    if isinstance(optimizer, MasterWeights):
        optimizer.load_state_dict(state)
        return
    if not _distributed():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def copy_state(obj: Any) -> Any:
    """Deep copy of nested containers of tensors (a snapshot unaffected by later in-place updates)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: copy_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_state(v) for v in obj]
    return obj


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0 = only measure it); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_sampler_feedback(groups: Sequence[Any], correct: Sequence[float]) -> tuple[list[int], list[float]]:
    """Every rank's (prompt index, correctness) pairs, in rank order, so all samplers see the same feedback."""
    mine = ([g.prompt_index for g in groups for _ in g.trajectories], list(correct))
    idx: list[int] = []
    rew: list[float] = []
    for i, r in all_gather_objects(mine):
        idx += i
        rew += r
    return idx, rew


def sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Sum of float dicts over ranks (max for keys ending in ``_max``)."""
    rows = all_gather_objects(values)
    return {k: (max if k.endswith("_max") else sum)(r[k] for r in rows) for k in values}


def max_int(value: int) -> int:
    """Maximum of an int over ranks."""
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _distributed():
        dist.barrier()
