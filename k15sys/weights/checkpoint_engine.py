"""Checkpoint engine: move named tensors from trainer ranks to inference ranks (paper 2.6.3).

One call per weight version, on every rank of a ``torch.distributed`` group (NCCL on GPUs, gloo on CPU):

* each source rank (``src``: one rank or several, e.g. trainer TP ranks each holding their own shards)
  broadcasts a header (names, shapes, dtypes, bucket offsets), then packs its tensors into buckets of
  ``bucket_bytes`` and broadcasts them double-buffered: bucket i+1 is packed (or copied host-to-device
  straight from pinned memory) while bucket i is in flight;
* receivers take a version in one of two ways, both all-or-nothing:

  - staged (``load_fn``): every bucket lands in fresh staging memory; ``check_fn`` (if given) sees the tensors
    before the commit vote and may reject the version (it raises: no rank applies it, every rank raises
    :class:`WeightSyncError` naming the rejecting rank and its reason); after a unanimous commit vote the
    tensors (views of the staging buckets, owned by the receiver from then on, never reused by the engine)
    go to ``load_fn`` -- e.g. a vLLM model's ``load_weights`` or ``TorchEngine.update_weights``. A ``load_fn``
    that still fails after the commit is reported on every rank (in-place receivers restore their bytes);
  - in place (``targets``: the receiver's own tensors by name, e.g. vLLM's parameters, which carry the names
    of :meth:`ModelLayout.vllm`): bucket i is unpacked into the targets while bucket i+1 is in flight, after
    saving the old bytes in a backup; a failed vote or transfer restores them. No copy after the vote;

* a dead peer, a timeout (the process group's) or a bad checksum (``verify=True``) raises
  :class:`WeightSyncError` on every live rank, and no rank keeps any byte of that version;
* the group: a :class:`~k15sys.weights.group.WeightGroup` of its own (rollout worker processes beside a
  torchrun job), or a torch group (the default world when None) whose ``src`` ranks are global ranks;
* colocated mode (``colocated=True``, trainer and engine processes on the same GPU): no bytes move; sources
  send CUDA IPC handles of their tensors and receivers hand zero-copy views to ``load_fn``. Sources wait
  until every receiver has loaded before they return (their memory must stay untouched until then).
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from k15sys.weights.group import WeightGroup
from k15sys.weights.hostcopy import copy_bytes, default_copy_threads

LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]
_CHECKSUM_CHUNK = 1 << 24  # int32 words per device checksum step (64 MiB)


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


@dataclass(frozen=True)
class _Header:
    entries: list[_Entry]
    sizes: list[int]  # bytes per bucket
    key: tuple[int, int]  # 128-bit digest of (entries, sizes), as two int64


def _plan_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[list[_Entry], list[int]]:
    """Greedy packing in the given order; a tensor larger than a bucket gets a bucket of its own."""
    entries, sizes = [], []
    cur = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and cur + nb > bucket_bytes:
            sizes.append(cur)
            cur = 0
        cur += (-cur) % 16  # 16-byte aligned offsets keep every dtype view aligned
        entries.append(_Entry(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), len(sizes), cur, nb))
        cur += nb
    if entries:
        sizes.append(cur)
    return entries, sizes


def _digest(buf: torch.Tensor) -> str | torch.Tensor:
    """Checksum of a bucket: blake2b on the host; on a device, position-weighted int64 sums (no host copy,
    no sync: the result stays a device tensor until :func:`_resolve`)."""
    if buf.device.type == "cpu":
        return hashlib.blake2b(memoryview(buf.numpy()), digest_size=16).hexdigest()
    n4 = buf.numel() // 4
    words = buf[: n4 * 4].view(torch.int32)
    acc = torch.zeros(2, dtype=torch.int64, device=buf.device)
    for j in range(0, n4, _CHECKSUM_CHUNK):
        w = words[j : j + _CHECKSUM_CHUNK].to(torch.int64)
        acc[0] += w.sum()
        acc[1] += (w * torch.arange(j + 1, j + 1 + w.numel(), device=buf.device)).sum()
    acc[0] += buf[n4 * 4 :].to(torch.int64).sum()
    return acc


def _resolve(digests: list[str | torch.Tensor]) -> list[str | list[int]]:
    return [d.tolist() if isinstance(d, torch.Tensor) else d for d in digests]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (a contiguous copy first if it is strided)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _views(staged: list[tuple[_Entry, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of the staged buckets."""
    return [(e.name, buf[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape))
            for e, buf in staged]


def _by_bucket(entries: list[_Entry]) -> dict[int, list[_Entry]]:
    out: dict[int, list[_Entry]] = {}
    for e in entries:
        out.setdefault(e.bucket, []).append(e)
    return out


def _copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int) -> None:
    """dst.copy_(src) for every pair: host pairs in the C++ pool, device ones as (async) device copies."""
    host = [(d, s) for d, s in pairs if d.device.type == "cpu" and s.device.type == "cpu"]
    copy_bytes(host, threads)
    for d, s in pairs:
        if d.device.type != "cpu" or s.device.type != "cpu":
            d.copy_(s, non_blocking=True)


class _InPlace:
    """Receiver sink of the in-place mode: unpacks buckets into the targets, keeping the old bytes."""

    def __init__(self, targets: dict[str, torch.Tensor], backup: torch.Tensor, threads: int) -> None:
        self.targets = targets
        self.backup = backup
        self.threads = threads
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (target bytes, their old bytes)
        self.used = 0

    def __call__(self, entries: list[_Entry], buf: torch.Tensor) -> None:
        saves, unpacks = [], []
        for e in entries:
            dst = self.targets[e.name].view(-1).view(torch.uint8)
            saves.append((self.backup[self.used : self.used + e.nbytes], dst))
            unpacks.append((dst, buf[e.offset : e.offset + e.nbytes]))
            self.used += e.nbytes
        _copy(saves, self.threads)
        self.saved += [(dst, old) for old, dst in saves]
        _copy(unpacks, self.threads)

    def rollback(self) -> None:
        _copy(self.saved, self.threads)
        self.saved = []


def _check_targets(targets: dict[str, torch.Tensor], entries: list[_Entry], device: torch.device) -> str | None:
    """Why ``targets`` cannot take this version (None when it can)."""
    names = {e.name for e in entries}
    missing = sorted(names - targets.keys())
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"targets: no tensor for {missing[0]!r} sent by the source{more}"
    extra = sorted(targets.keys() - names)
    if extra:
        return f"targets: {extra[0]!r} is not sent by the source"
    for e in entries:
        t = targets[e.name]
        dtype = str(t.dtype).replace("torch.", "")
        if tuple(t.shape) != e.shape or dtype != e.dtype:
            return f"targets: {e.name!r} is {dtype}{list(t.shape)}, the source sends {e.dtype}{list(e.shape)}"
        if not t.is_contiguous() or t.device.type != device.type:
            return f"targets: {e.name!r} must be contiguous on {device.type}, got device {t.device}"
    return None


class CheckpointEngine:
    """Versioned, bucketed, pipelined broadcast of named tensors from the source rank(s) to every other rank.

    Args:
        group: a :class:`~k15sys.weights.group.WeightGroup` (a group of its own: ``src`` are its ranks), or a
            torch process group (default: the world; ``src`` are global ranks).
        src: rank, or ranks, holding the new weights; with several, each sends its own tensors
            (names must be distinct) and receivers get the union.
        bucket_bytes: bucket size.
        device: where buckets travel (``cuda`` for NCCL, ``cpu`` for gloo); default from the backend.
        verify: compute and check a checksum per bucket.
        colocated: share CUDA IPC handles instead of copying (source tensors must be on a CUDA device
            that the receivers can open, i.e. the same GPU or peer-accessible ones).
        copy_threads: threads of the host copies (packing, in-place unpacking); default half the cores.

    Failures are bounded by the group's timeout (``WeightGroup.create(timeout_s=...)``,
    ``init_process_group(timeout=...)``).
    """

    def __init__(self, group: WeightGroup | dist.ProcessGroup | None = None, *, src: int | Sequence[int] = 0,
                 bucket_bytes: int = 256 << 20, device: str | torch.device | None = None, verify: bool = False,
                 colocated: bool = False, copy_threads: int | None = None) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1 << 10:
            raise ValueError(f"bucket_bytes: must be an int >= 1024, got {bucket_bytes!r}")
        self.group = group if isinstance(group, WeightGroup) else WeightGroup.wrap(group)
        names = self.group.global_ranks or list(range(self.group.size))  # how the caller names the ranks
        sources = [src] if isinstance(src, int) else list(src)
        if not sources or len(set(sources)) != len(sources) or not set(sources) <= set(names) \
                or len(sources) == len(names):
            raise ValueError(f"src: must be distinct ranks of the group leaving at least one receiver, got {src!r}")
        self.sources = [names.index(s) for s in sources]  # ranks of the group from here on
        self.bucket_bytes = bucket_bytes
        self.verify = verify
        self.device = torch.device(device) if device is not None else self.group.device
        self.rank = self.group.rank
        self.colocated = colocated
        self.version = -1  # last version applied on this rank
        self.copy_threads = default_copy_threads() if copy_threads is None else copy_threads
        if not isinstance(self.copy_threads, int) or self.copy_threads < 1:
            raise ValueError(f"copy_threads: must be a positive int, got {copy_threads!r}")
        self._ring: list[torch.Tensor] = []  # two reusable bucket buffers
        self._pinned: list[torch.Tensor] = []  # two pinned host buffers (pageable host sources on a GPU)
        self._backup: torch.Tensor | None = None  # old bytes of the in-place targets
        self._known: dict[int, _Header] = {}  # last header seen from each source
        self._own: tuple[tuple, _Header] | None = None  # (signature of the tensors, header) on a source

    # ------------------------------------------------------------------ one version
    def update(self, version: int, named_tensors: dict[str, torch.Tensor] | None = None,
               load_fn: LoadFn | None = None, *, targets: dict[str, torch.Tensor] | None = None,
               check_fn: LoadFn | None = None) -> int:
        """Deliver ``version``. Sources pass ``named_tensors``; receivers pass ``load_fn`` or ``targets``.

        ``check_fn`` (staged receivers): called with the received tensors before the commit vote; raising
        rejects the version on every rank (validate there what ``load_fn`` would refuse, e.g. unknown names,
        shapes, dtypes, so that a rejection is all-or-nothing).

        Returns the version now applied on this rank. Raises :class:`WeightSyncError` on every live rank
        if the version could not be delivered or was rejected; then no rank keeps any of it. If ``load_fn``
        raises after the commit, every rank raises :class:`WeightSyncError` naming that rank (in-place
        receivers restore their old bytes; staged receivers whose ``load_fn`` returned keep the version).
        """
        is_src = self.rank in self.sources
        if is_src:
            if not isinstance(named_tensors, dict):
                raise ValueError("named_tensors: a source rank must pass a dict of the tensors to send")
            bad = next((n for n, t in named_tensors.items() if not isinstance(t, torch.Tensor)), None)
            if bad is not None:
                raise ValueError(f"named_tensors: {bad!r} is a {type(named_tensors[bad]).__name__}, not a tensor")
        if not is_src and (load_fn is None) == (targets is None):
            raise ValueError("load_fn/targets: a receiving rank must pass exactly one of them")
        if check_fn is not None and (is_src or load_fn is None):
            raise ValueError("check_fn: only a staged receiver (load_fn) checks a version before the commit")
        if not isinstance(version, int) or version <= self.version:
            raise ValueError(f"version: {version!r} is not newer than the applied version {self.version}")
        if self.colocated:
            if targets is not None:
                raise ValueError("targets: colocated mode hands views to load_fn; pass load_fn")
            return self._update_ipc(version, named_tensors, load_fn)
        stage, sink, staged = "header", None, []
        try:
            headers, reason = self._headers(version, named_tensors if is_src else None)
            entries_all = [e for entries, _ in headers for e in entries]
            if targets is not None and reason is None:
                reason = _check_targets(targets, entries_all, self.device)
                if reason is None:
                    sink = _InPlace(targets, self._backup_buffer(sum(e.nbytes for e in entries_all)), self.copy_threads)
            stage = "prepare"
            self._agree(version, "refused", reason)
            stage = "buckets"
            digests = []
            for s, (entries, sizes) in zip(self.sources, headers):
                if self.rank == s:
                    digests.append(self._send(s, entries, sizes, named_tensors))  # type: ignore[arg-type]
                else:
                    keep = sink if sink is not None else (None if is_src else staged)
                    digests.append(self._receive(s, entries, sizes, keep))
            stage = "verify"
            reason = None
            if self.verify:
                for i, s in enumerate(self.sources):
                    theirs = self.group.broadcast_object(_resolve(digests[i]) if self.rank == s else None, s)
                    if self.rank != s and theirs != _resolve(digests[i]):
                        reason = reason or f"checksum mismatch on a bucket from source rank {s}"
            stage = "check"
            views = [] if is_src or load_fn is None else _views(staged)
            if check_fn is not None and reason is None:
                try:
                    check_fn(views)
                except Exception as e:  # the receiver rejects the version: nobody applies it
                    reason = f"check_fn: {type(e).__name__}: {e}"
            stage = "commit"
            self._agree(version, "not applied", reason)
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            failure = None
            if load_fn is not None and not is_src:
                try:
                    load_fn(views)
                except Exception as e:
                    failure = f"load_fn: {type(e).__name__}: {e}"
            stage = "load"
            self._agree(version, "failed after the commit (in-place receivers restored their weights; staged "
                                 "receivers whose load_fn returned hold the version; pass check_fn to reject a "
                                 "version before the commit)", failure)
        except Exception as e:  # dead peer, timeout, transport error, refusal: an error on every live rank
            if sink is not None:
                sink.rollback()
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"weight version {version} failed during {stage}: {type(e).__name__}: {e}") from e
        self.version = version
        return version

    def _agree(self, version: int, what: str, reason: str | None) -> None:
        """A vote of every rank; when some rank says no (``reason`` on it), the lowest such rank's reason
        reaches every rank and each raises the same :class:`WeightSyncError`."""
        refused = self._vote(reason is None)
        if refused is not None:
            why = self.group.broadcast_object(reason, refused)
            raise WeightSyncError(f"weight version {version} {what}: rank {refused}: {why}")

    def _headers(self, version: int,
                 tensors: dict[str, torch.Tensor] | None) -> tuple[list[tuple[list[_Entry], list[int]]], str | None]:
        """Every source's header, and why this rank refuses them (None when it accepts).

        Each source broadcasts (version, header digest) in a small tensor; the header itself (an object
        broadcast, ~1-2 ms for hundreds of tensors) travels only when some rank has not seen that digest
        yet, i.e. on the first version or when the set of tensors changes."""
        metas = []
        for s in self.sources:
            key = (0, 0)
            if self.rank == s:
                header = self._own_header(tensors)  # type: ignore[arg-type]
                self._known[s] = header
                key = header.key
            meta = torch.tensor([version, *key], dtype=torch.int64, device=self.device)
            self.group.broadcast(meta, s)
            metas.append(meta)
        reason = None
        got = torch.stack(metas).tolist()
        for s, (v, *key) in zip(self.sources, got):
            if v != version:
                reason = reason or f"source rank {s} sends version {v}, rank {self.rank} expects {version}"
        known = all(s in self._known and list(self._known[s].key) == key for s, (_, *key) in zip(self.sources, got))
        if self._vote(known) is not None:
            for s in self.sources:
                self._known[s] = self.group.broadcast_object(self._known[s] if self.rank == s else None, s)
        headers = [(self._known[s].entries, self._known[s].sizes) for s in self.sources]
        names = [e.name for entries, _ in headers for e in entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            reason = reason or f"tensor {dup!r} is sent by more than one source"
        return headers, reason

    def _own_header(self, tensors: dict[str, torch.Tensor]) -> _Header:
        """This source's header, rebuilt only when names, shapes or dtypes change."""
        signature = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors.items())
        if self._own is None or self._own[0] != signature:
            entries, sizes = _plan_buckets(tensors, self.bucket_bytes)
            digest = hashlib.blake2b(pickle.dumps((entries, sizes)), digest_size=16).digest()
            key = (int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True))
            self._own = (signature, _Header(entries, sizes, key))
        return self._own[1]

    def _vote(self, ok: bool) -> int | None:
        """None when every rank says ``ok``, else the lowest rank that does not."""
        flag = torch.tensor([self.group.size if ok else self.rank], dtype=torch.int64, device=self.device)
        self.group.all_reduce_min(flag)
        refused = int(flag.item())
        return None if refused == self.group.size else refused

    def _ring_buffers(self, cap: int) -> list[torch.Tensor]:
        if not self._ring or self._ring[0].numel() < cap or self._ring[0].device.type != self.device.type:
            self._ring = [torch.empty(cap, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._ring

    def _pinned_buffers(self, cap: int) -> list[torch.Tensor]:
        """Pinned host staging for pageable host sources (pinning is slow: kept across versions)."""
        if not self._pinned or self._pinned[0].numel() < cap:
            self._pinned = [torch.empty(cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        return self._pinned

    def _backup_buffer(self, nbytes: int) -> torch.Tensor:
        if self._backup is None or self._backup.numel() < nbytes or self._backup.device.type != self.device.type:
            self._backup = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._backup

    def _send(self, src: int, entries: list[_Entry], sizes: list[int],
              tensors: dict[str, torch.Tensor]) -> list[str | torch.Tensor]:
        """Double-buffered: pack bucket i (host: into pinned memory, then an async H2D copy) while bucket
        i-1 is being broadcast. Returns the bucket digests when ``verify`` is on."""
        if not sizes:
            return []
        by_bucket = _by_bucket(entries)
        first = next(iter(tensors.values()), None)
        host_src = self.device.type == "cuda" and first is not None and first.device.type == "cpu"
        # pinned host tensors go straight to the device bucket (async DMA); pageable ones through pinned staging
        direct = host_src and all(t.is_pinned() and t.is_contiguous() for t in tensors.values())
        ring = self._ring_buffers(max(sizes))
        pinned = self._pinned_buffers(max(sizes)) if host_src and not direct else []
        h2d_done: list[torch.cuda.Event | None] = [None, None]
        works, digests = [], []
        for i, size in enumerate(sizes):
            if i >= 2:
                works[i - 2].wait()  # the ring slot's previous broadcast has finished (stream order on GPUs)
            buf = ring[i % 2][:size]
            stage = buf
            if host_src and not direct:
                ev = h2d_done[i % 2]
                if ev is not None:
                    ev.synchronize()  # the pinned slot's previous H2D copy has finished (host order)
                stage = pinned[i % 2][:size]
            _copy([(stage[e.offset : e.offset + e.nbytes], _bytes(tensors[e.name])) for e in by_bucket.get(i, [])],
                  self.copy_threads)
            if host_src and not direct:
                buf.copy_(stage, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                h2d_done[i % 2] = ev
            if self.verify:
                digests.append(_digest(buf))
            works.append(self.group.broadcast(buf, src, async_op=True))
        for w in works[-2:]:
            w.wait()
        return digests

    def _receive(self, src: int, entries: list[_Entry], sizes: list[int],
                 keep: _InPlace | list | None) -> list[str | torch.Tensor]:
        """Receive the buckets of ``src``. ``keep``: a list collects (entry, staging bucket) pairs in fresh
        buffers; an :class:`_InPlace` unpacks each bucket into its targets while the next is in flight
        (two ring buffers); None drops them (another source's tensors on a source rank)."""
        if not sizes:
            return []
        by_bucket = _by_bucket(entries)
        staged = isinstance(keep, list)
        ring = [] if staged else self._ring_buffers(max(sizes))
        bufs: dict[int, torch.Tensor] = {}
        works: dict[int, Any] = {}

        def post(i: int) -> None:
            if i < len(sizes):
                if staged:
                    bufs[i] = torch.empty(sizes[i], dtype=torch.uint8, device=self.device)
                else:
                    bufs[i] = ring[i % 2][: sizes[i]]
                works[i] = self.group.broadcast(bufs[i], src, async_op=True)

        for i in range(len(sizes) if staged else 2):
            post(i)
        digests = []
        for i in range(len(sizes)):
            works.pop(i).wait()
            buf = bufs.pop(i)
            if self.verify:
                digests.append(_digest(buf))
            if staged:
                keep.extend((e, buf) for e in by_bucket.get(i, []))  # type: ignore[union-attr]
            else:
                if keep is not None:
                    keep(by_bucket.get(i, []), buf)  # enqueued before the next broadcast reuses this slot
                post(i + 2)
        return digests

    def _update_ipc(self, version: int, named_tensors: dict[str, torch.Tensor] | None, load_fn: LoadFn | None) -> int:
        from torch.multiprocessing.reductions import reduce_tensor

        is_src = self.rank in self.sources
        stage = "handles"
        try:
            handles = []
            for s in self.sources:
                msg = None
                if self.rank == s:
                    for name, t in named_tensors.items():  # type: ignore[union-attr]
                        if not t.is_cuda:
                            raise ValueError(f"named_tensors: colocated mode needs CUDA tensors, {name!r} is on "
                                             f"{t.device}")
                    msg = (version, [(n, reduce_tensor(t.detach())) for n, t in named_tensors.items()])
                v, h = self.group.broadcast_object(msg, s)
                if v != version:
                    raise WeightSyncError(f"weight version {version}: source rank {s} sends version {v}")
                handles += h
            named = None
            ok = True
            if not is_src:
                try:
                    named = [(n, fn(*args)) for n, (fn, args) in handles]
                except Exception:  # a handle that cannot be opened here: vote no
                    ok = False
            stage = "commit"
            if self._vote(ok) is not None:
                raise WeightSyncError(f"weight version {version}: a receiver could not open the CUDA IPC handles")
            stage = "load"
            if named is not None:
                load_fn(named)  # type: ignore[misc]
                torch.cuda.synchronize()
            self.group.barrier()  # the sources' memory may change only after every receiver loaded
        except (WeightSyncError, ValueError):
            raise
        except Exception as e:
            raise WeightSyncError(f"weight version {version} failed during {stage}: {type(e).__name__}: {e}") from e
        self.version = version
        return version
