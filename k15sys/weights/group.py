"""A process group of its own for weight sync (paper 2.6.3: trainer ranks -> rollout ranks).

torch's collective functions (``dist.broadcast``, ``dist.send_object_list``...) work on the default process
group or on groups made from it (``dist.new_group``). Rollout worker processes are not part of a torchrun job's
default group, and a second ``init_process_group`` in the same process is not allowed, so the weight path needs
a group that exists beside the trainer's: :class:`WeightGroup` is a backend (gloo or NCCL) made from a TCP
store rendezvous of its own and driven through the backend's own methods, never through torch's registry of
groups. It works the same whether the process also has a default group (a torchrun rank) or none (a worker).

:meth:`WeightGroup.wrap` gives the same interface over an existing torch group (the default world by default),
so :class:`~k15sys.weights.CheckpointEngine` has one code path for both.
"""
from __future__ import annotations

import datetime
import pickle
import socket
from typing import Any

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a ``tcp://`` rendezvous that another process group's ranks join."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _timeout(seconds: float) -> datetime.timedelta:
    if not isinstance(seconds, (int, float)) or not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"timeout_s: must be a finite number > 0, got {seconds!r}")
    return datetime.timedelta(seconds=seconds)


class WeightGroup:
    """Ranks ``0..size-1`` that move weights (and, for rollout workers, commands) among themselves.

    Build one with :meth:`create` (a private group: its own store, its own backend) or :meth:`wrap` (an
    existing torch group). Every method takes and returns ranks of this group.

    Attributes:
        rank, size: this process's rank in the group and the group's size.
        backend: ``"gloo"`` or ``"nccl"``.
        device: where collective tensors live (``cpu`` for gloo, this process's GPU for NCCL).
        timeout: bound on every blocking call (a dead or silent peer is an error after it); None for a wrapped
            torch group, whose own timeout applies.
    """

    def __init__(self, pg: Any, rank: int, size: int, backend: str, device: torch.device,
                 timeout: datetime.timedelta | None, store: Any = None, global_ranks: list[int] | None = None) -> None:
        self._pg, self._store = pg, store  # the store (rank 0 hosts it) must live as long as the group
        self.rank, self.size, self.backend, self.device, self.timeout = rank, size, backend, device, timeout
        self.global_ranks = global_ranks  # a wrapped torch group: group rank -> the default group's rank

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, rank: int, size: int, *, port: int, host: str = "127.0.0.1", backend: str = "gloo",
               timeout_s: float = 300.0, join_timeout_s: float | None = None, store: Any = None) -> "WeightGroup":
        """Join (rank 0: host) the rendezvous at ``host:port`` and build a ``backend`` group of ``size`` ranks.

        Independent of ``torch.distributed``'s default group: it may or may not exist in this process.
        ``store``: rank 0 may pass a ``TCPStore`` it already opened (``is_master=True``, e.g. on port 0 to let
        the OS choose a port it then hands to the other ranks); the others connect to ``host:port``.
        Blocks until every rank has joined (at most ``join_timeout_s``, default ``max(timeout_s, 120)``:
        freshly spawned processes take a while to import torch); ``timeout_s`` bounds every call after that.
        """
        if not isinstance(size, int) or size < 2:
            raise ValueError(f"size: a weight group needs at least 2 ranks, got {size!r}")
        if not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"rank: must be an int in [0, {size}), got {rank!r}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if not isinstance(port, int) or not 0 <= port < 1 << 16 or (port == 0 and store is None):
            raise ValueError(f"port: must be the rendezvous's TCP port (1..65535), got {port!r}")
        timeout = _timeout(timeout_s)
        join = _timeout(max(timeout_s, 120.0) if join_timeout_s is None else join_timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=join, wait_for_workers=False)
        elif rank != 0:
            raise ValueError("store: only rank 0 (the store's host) may pass its own store")
        store.set_timeout(join)
        prefixed = dist.PrefixStore("k15sys-weights/", store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = join
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            pg = dist.ProcessGroupGloo(prefixed, rank, size, opts)  # connects to every peer
            device = torch.device("cpu")
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = join
            pg = dist.ProcessGroupNCCL(prefixed, rank, size, opts)  # connects lazily, at the first collective
            device = torch.device("cuda", torch.cuda.current_device())
        pg.set_timeout(timeout)
        store.set_timeout(timeout)
        return cls(pg, rank, size, backend, device, timeout, store=store)

    @classmethod
    def wrap(cls, group: dist.ProcessGroup | None = None) -> "WeightGroup":
        """The same interface over an existing torch group (``None``: the default world)."""
        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call init_process_group first, or "
                             "build a group of its own with WeightGroup.create)")
        pg = group if group is not None else dist.group.WORLD
        backend = str(dist.get_backend(pg))
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(pg, pg.rank(), pg.size(), backend, device, None, global_ranks=dist.get_process_group_ranks(pg))

    # ------------------------------------------------------------------ collectives (ranks of this group)
    @property
    def _backend(self) -> Any:
        if self._pg is None:
            raise RuntimeError("WeightGroup: closed")
        return self._pg

    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Any:
        """``tensor`` of ``src`` on every rank; returns the pending work when ``async_op``."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        work = self._backend.broadcast([tensor], opts)
        if async_op:
            return work
        work.wait()
        return None

    def all_reduce_min(self, tensor: torch.Tensor) -> None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._backend.allreduce([tensor], opts).wait()

    def barrier(self) -> None:
        self.all_reduce_min(torch.zeros(1, dtype=torch.int32, device=self.device))

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``src``'s picklable ``obj`` on every rank (a length, then the bytes)."""
        data = _to_bytes(obj, self.device) if self.rank == src else None
        size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=self.device)
        self.broadcast(size, src)
        if data is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(data, src)
        return obj if self.rank == src else pickle.loads(data.cpu().numpy().tobytes())

    def send_object(self, obj: Any, dst: int) -> None:
        """Point to point: ``obj`` (picklable) to rank ``dst``, which calls :meth:`recv_object`."""
        data = _to_bytes(obj, self.device)
        self._wait(self._backend.send([torch.tensor([data.numel()], dtype=torch.int64, device=self.device)], dst, 0))
        self._wait(self._backend.send([data], dst, 1))

    def recv_object(self, src: int) -> Any:
        """The object rank ``src`` sends with :meth:`send_object`."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._wait(self._backend.recv([size], src, 0))
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._wait(self._backend.recv([data], src, 1))
        return pickle.loads(data.cpu().numpy().tobytes())

    def _wait(self, work: Any) -> None:
        if self.timeout is None:
            work.wait()
        else:
            work.wait(self.timeout)

    def close(self) -> None:
        """Drop the backend and the store (a private group; a wrapped torch group is left to its owner)."""
        if self._store is not None:
            self._pg = self._store = None


def _to_bytes(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
