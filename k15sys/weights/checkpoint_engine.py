"""Checkpoint engine: move a named set of tensors from a trainer rank to inference ranks (paper 2.6.3).

One call per weight version, on every rank of a ``torch.distributed`` group (NCCL on GPUs, gloo on CPU):

* the source rank packs the tensors into buckets of ``bucket_bytes`` and broadcasts them, double-buffered:
  bucket i+1 is packed (or copied host-to-device from pinned memory) while bucket i is in flight;
* receivers stage every bucket, optionally verify a checksum per bucket, and take part in a final vote;
  only when every rank has the whole version intact do they hand the tensors to ``load_fn`` (e.g. a vLLM
  model's ``load_weights`` or ``TorchEngine.update_weights``). So a receiver applies a whole version or
  keeps the old one;
* any failure (a dead peer, a timeout, a bad checksum) raises :class:`WeightSyncError` on every live
  rank, within the group's timeout, with nothing applied;
* colocated mode (``colocated=True``, trainer and engine processes on the same GPU): no bytes move; the
  source sends CUDA IPC handles of its tensors and receivers hand zero-copy views of them to ``load_fn``.
  The source waits until every receiver has loaded before it returns (its memory must stay untouched).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]


class WeightSyncError(RuntimeError):
    """A weight version could not be delivered; no rank applied it."""


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    bucket: int
    offset: int  # bytes
    nbytes: int


def _plan_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[list[_Entry], list[int]]:
    entries, sizes = [], []
    cur = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and cur + nb > bucket_bytes:
            sizes.append(cur)
            cur = 0
        pad = (-cur) % 16  # 16-byte aligned offsets keep every dtype view aligned
        cur += pad
        entries.append(_Entry(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), len(sizes), cur, nb))
        cur += nb
    sizes.append(cur)
    return entries, sizes


def _checksum(buf: torch.Tensor) -> str:
    return hashlib.blake2b(buf.cpu().numpy().tobytes(), digest_size=16).hexdigest()


class CheckpointEngine:
    """Versioned, bucketed, pipelined broadcast of named tensors from ``src`` to every other rank.

    Args:
        group: the process group (default: the world).
        src: global rank that holds the new weights.
        bucket_bytes: bucket size.
        device: where buckets travel (``cuda`` for NCCL, ``cpu`` for gloo); default from the backend.
        verify: compute and check a checksum per bucket.
        colocated: share CUDA IPC handles instead of copying (source tensors must be on a CUDA device
            that the receivers can open, i.e. the same GPU or peer-accessible ones).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, src: int = 0, bucket_bytes: int = 256 << 20,
                 device: str | torch.device | None = None, verify: bool = False, colocated: bool = False) -> None:
        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
        if bucket_bytes < 1 << 10:
            raise ValueError(f"bucket_bytes: must be >= 1024, got {bucket_bytes!r}")
        self.group = group
        self.src = src
        self.bucket_bytes = bucket_bytes
        self.verify = verify
        backend = dist.get_backend(group)
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        self.rank = dist.get_rank()
        self.colocated = colocated
        self.version = -1  # last version applied on this rank

    # ------------------------------------------------------------------ one version
    def update(self, version: int, named_tensors: dict[str, torch.Tensor] | None = None,
               load_fn: LoadFn | None = None) -> int:
        """Deliver ``version``. The source passes ``named_tensors``; receivers pass ``load_fn``.

        Returns the version now applied on this rank. Raises :class:`WeightSyncError` on every live rank
        if the version could not be delivered; then nothing was applied anywhere.
        """
        is_src = self.rank == self.src
        if is_src and named_tensors is None:
            raise ValueError("named_tensors: the source rank must pass the tensors to send")
        if not is_src and load_fn is None:
            raise ValueError("load_fn: a receiving rank must pass a load function")
        if version <= self.version:
            raise ValueError(f"version: {version} is not newer than the applied version {self.version}")
        if self.colocated:
            return self._update_ipc(version, named_tensors, load_fn)
        stage = "header"
        try:
            header = [None]
            if is_src:
                entries, sizes = _plan_buckets(named_tensors, self.bucket_bytes)  # type: ignore[arg-type]
                header = [(version, entries, sizes)]
            dist.broadcast_object_list(header, src=self.src, group=self.group)
            v, entries, sizes = header[0]  # type: ignore[misc]
            if v != version:
                raise WeightSyncError(f"version mismatch: source sends {v}, this rank expects {version}")
            stage = "buckets"
            buckets = self._send(entries, sizes, named_tensors) if is_src else self._receive(sizes)
            stage = "verify"
            ok = True
            if self.verify:
                sums = [[_checksum(b) for b in buckets]] if is_src else [None]
                dist.broadcast_object_list(sums, src=self.src, group=self.group)
                ok = is_src or sums[0] == [_checksum(b) for b in buckets]
            stage = "commit"
            vote = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
        except WeightSyncError:
            raise
        except Exception as e:  # dead peer, timeout, transport error: same error on every live rank
            raise WeightSyncError(f"weight version {version} failed during {stage}: {type(e).__name__}: {e}") from e
        if int(vote.item()) != 1:
            raise WeightSyncError(f"weight version {version}: checksum mismatch on some rank; nothing applied")
        if not is_src:
            load_fn(self._unpack(entries, buckets))  # type: ignore[misc]
        self.version = version
        return version

    def _update_ipc(self, version: int, named_tensors: dict[str, torch.Tensor] | None, load_fn: LoadFn | None) -> int:
        from torch.multiprocessing.reductions import reduce_tensor

        is_src = self.rank == self.src
        stage = "handles"
        try:
            msg: list = [None]
            if is_src:
                for name, t in named_tensors.items():  # type: ignore[union-attr]
                    if not t.is_cuda:
                        raise ValueError(f"named_tensors: colocated mode needs CUDA tensors, {name!r} is on {t.device}")
                msg = [(version, [(n, reduce_tensor(t.detach())) for n, t in named_tensors.items()])]  # type: ignore[union-attr]
            dist.broadcast_object_list(msg, src=self.src, group=self.group)
            v, handles = msg[0]
            if v != version:
                raise WeightSyncError(f"version mismatch: source sends {v}, this rank expects {version}")
            named = None
            ok = True
            if not is_src:
                try:
                    named = [(n, fn(*args)) for n, (fn, args) in handles]
                except Exception:  # a handle that cannot be opened here: vote no
                    ok = False
            stage = "commit"
            vote = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
            if int(vote.item()) != 1:
                raise WeightSyncError(f"weight version {version}: a receiver could not open the CUDA IPC handles")
            stage = "load"
            if named is not None:
                load_fn(named)  # type: ignore[misc]
                torch.cuda.synchronize()
            dist.barrier(group=self.group)  # the source's memory may change only after every receiver loaded
        except (WeightSyncError, ValueError):
            raise
        except Exception as e:
            raise WeightSyncError(f"weight version {version} failed during {stage}: {type(e).__name__}: {e}") from e
        self.version = version
        return version

    def _send(self, entries: list[_Entry], sizes: list[int], tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Double-buffered: pack bucket i (host: into pinned memory, then an async H2D copy) while bucket
        i-1 is being broadcast. Returns the buckets when ``verify`` needs them for checksums."""
        by_bucket: dict[int, list[_Entry]] = {}
        for e in entries:
            by_bucket.setdefault(e.bucket, []).append(e)
        first = next(iter(tensors.values()))
        host_src = self.device.type == "cuda" and first.device.type == "cpu"
        # pinned host tensors go straight to the device bucket (async DMA); pageable ones through pinned staging
        direct = host_src and all(t.is_pinned() and t.is_contiguous() for t in tensors.values())
        cap = max(sizes)
        ring = [torch.empty(cap, dtype=torch.uint8, device=self.device) for _ in range(2)] if not self.verify else []
        pinned = [torch.empty(cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if host_src and not direct else []
        h2d_done: list[torch.cuda.Event | None] = [None, None]
        sent, works = [], []
        for i, size in enumerate(sizes):
            if self.verify:
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
                sent.append(buf)
            else:
                if i >= 2:
                    works[i - 2].wait()  # the ring slot's previous broadcast has finished (stream order)
                buf = ring[i % 2][:size]
            stage = buf
            if host_src and not direct:
                ev = h2d_done[i % 2]
                if ev is not None:
                    ev.synchronize()  # the pinned slot's previous H2D copy has finished (host order)
                stage = pinned[i % 2][:size]
            for e in by_bucket.get(i, []):
                t = tensors[e.name].detach().contiguous().reshape(-1).view(torch.uint8)
                stage[e.offset : e.offset + e.nbytes].copy_(t, non_blocking=direct)
            if host_src and not direct:
                buf.copy_(stage, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                h2d_done[i % 2] = ev
            works.append(dist.broadcast(buf, src=self.src, group=self.group, async_op=True))
        for w in works:
            w.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return sent

    def _receive(self, sizes: list[int]) -> list[torch.Tensor]:
        bufs = [torch.empty(s, dtype=torch.uint8, device=self.device) for s in sizes]
        works = [dist.broadcast(b, src=self.src, group=self.group, async_op=True) for b in bufs]
        for w in works:
            w.wait()
        return bufs

    @staticmethod
    def _unpack(entries: list[_Entry], buckets: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        out = []
        for e in entries:
            raw = buckets[e.bucket][e.offset : e.offset + e.nbytes]
            out.append((e.name, raw.view(getattr(torch, e.dtype)).view(e.shape)))
        return out
