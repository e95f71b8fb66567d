"""Persistent pinned host copies of device tensors, for the hybrid deployment's moves (paper 2.6.3).

Trainer and rollout engine share one accelerator and take turns with its memory: the side that waits keeps its
tensors in host memory. :class:`HostMirror` moves a set of tensors between the device and host buffers it
allocates once (page-locked, one flat buffer per dtype, every tensor a view of it) and reuses on every move:

- to the host: every copy is queued on a side stream (non-blocking DMA from pinned memory, no per-tensor
  synchronisation), then one ``synchronize`` of that stream, and only then do the tensors point at their host
  views (the device blocks are released after the data left them);
- back: a fresh device tensor per tensor, copies on the side stream, and the current stream waits for that
  stream on the device (no host synchronisation at all).

The tensors are moved in place (``tensor.data`` is swapped): the same ``Parameter`` / state-tensor objects stay
in the module and the optimizer, and the bytes come back bit for bit. ``torch.Tensor.to`` on pageable memory,
the path this replaces, allocates a new host tensor for each tensor on each move and synchronises after each copy.

The buffers are page-locked with ``cudaHostRegister`` on plain host memory, not taken from torch's pinned-memory
allocator, which rounds every request up to a power of two (a 20.1 GiB buffer would lock 32 GiB; locking runs at
roughly 2 GiB/s, measured on an H200 host). A new layout (e.g. the optimizer's state appearing after its first
step) reuses the buffers when it fits them; :meth:`HostMirror.reserve` sizes them ahead for a known growth.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_ALIGN_BYTES = 512  # each view starts on a 512-byte boundary of its buffer (DMA-friendly)
Layout = tuple[tuple[torch.dtype, tuple[int, ...]], ...]


class _Registered(np.ndarray):
    """Host bytes page-locked with ``cudaHostRegister``; unregistered when the last tensor viewing them is gone
    (``torch.from_numpy`` keeps the array alive as long as any view of its storage)."""

    def __del__(self) -> None:
        ptr = getattr(self, "_registered_ptr", None)
        if ptr:
            torch.cuda.cudart().cudaHostUnregister(ptr)


def host_buffer(numel: int, dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
    """A 1-D host tensor of ``numel`` elements, page-locked (``cudaHostRegister``, exactly its size) if ``pinned``."""
    nbytes = numel * dtype.itemsize
    if not pinned or nbytes == 0:
        return torch.empty(numel, dtype=dtype)
    raw = np.empty(nbytes, dtype=np.uint8).view(_Registered)
    err = int(torch.cuda.cudart().cudaHostRegister(raw.ctypes.data, nbytes, 0))
    if err != 0:
        raise RuntimeError(f"host_buffer: cudaHostRegister of {nbytes} bytes failed with CUDA error {err}")
    raw._registered_ptr = raw.ctypes.data
    return torch.from_numpy(raw).view(dtype)


def _offsets(layout: Layout) -> tuple[list[int], dict[torch.dtype, int]]:
    """Start of each tensor of ``layout`` in its dtype's buffer, and each buffer's length (elements)."""
    offsets, sizes = [], {}
    for dtype, shape in layout:
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        start = -(-sizes.get(dtype, 0) // align) * align
        offsets.append(start)
        sizes[dtype] = start + math.prod(shape)
    return offsets, sizes


class HostMirror:
    """Moves a list of same-device tensors to persistent host buffers and back (see the module docstring).

    Args:
        device: the device the tensors live on between moves. On a CUDA device the host buffers are pinned and
            the copies asynchronous on a side stream; on the CPU (tests, a fake "device") the same moves run as
            plain synchronous copies into the host buffers.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._layout: Layout | None = None
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._reserved: dict[torch.dtype, int] = {}
        self._views: list[torch.Tensor] = []
        self._moved: list[torch.Tensor] = []
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.allocations = 0  # host buffers allocated so far (a new layout that fits reuses them)

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def layout_bytes(self) -> int:
        """Bytes of the tensors of the current layout: what each move copies."""
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in self._layout or ())

    @property
    def offloaded(self) -> bool:
        """Whether tensors are on the host now (moved by :meth:`offload`, not yet brought back)."""
        return bool(self._moved)

    def reserve(self, layout: Layout) -> None:
        """Make the next buffer allocation large enough for ``layout`` too (a layout the tensors will grow to),
        so that growing to it later reuses the buffers instead of page-locking new ones."""
        for dtype, n in _offsets(layout)[1].items():
            self._reserved[dtype] = max(self._reserved.get(dtype, 0), n)

    def offload(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (distinct tensor objects on ``device``, not views of each other) into the host
        buffers and make each point at its host copy; their device memory is released. The buffers are
        allocated on the first call, and again only when a new layout of dtypes and shapes does not fit them."""
        if self._moved:
            raise RuntimeError("HostMirror.offload: tensors are already on the host; call onload() first")
        tensors = list(tensors)
        if len({id(t) for t in tensors}) != len(tensors):
            raise ValueError("HostMirror.offload: a tensor is listed twice")
        for t in tensors:
            if t.device.type != self.device.type:
                raise ValueError(f"HostMirror.offload: a tensor is on {t.device}, the mirror's device is {self.device}")
        layout = tuple((t.dtype, tuple(t.shape)) for t in tensors)
        if layout != self._layout:
            self._place(layout)
        with torch.no_grad():
            if self._cuda:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    for view, t in zip(self._views, tensors):
                        view.copy_(t, non_blocking=True)
                self._stream.synchronize()  # the one host sync: the data has left the device blocks
            else:
                for view, t in zip(self._views, tensors):
                    view.copy_(t)
        for view, t in zip(self._views, tensors):
            t.data = view
        self._moved = tensors

    def onload(self) -> None:
        """Bring the tensors of the last :meth:`offload` back to ``device`` (new device storage, same objects).
        On CUDA the copies are ordered before any later work of the current stream; the host does not wait."""
        if not self._moved:
            return
        with torch.no_grad():
            fresh = [torch.empty(v.shape, dtype=v.dtype, device=self.device) for v in self._views]
            if self._cuda:  # allocated on the current stream, filled on the side stream, used after it
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    for dst, view in zip(fresh, self._views):
                        dst.copy_(view, non_blocking=True)
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            else:
                for dst, view in zip(fresh, self._views):
                    dst.copy_(view)
        for t, dst in zip(self._moved, fresh):
            t.data = dst
        self._moved = []

    def _place(self, layout: Layout) -> None:
        """Views for ``layout`` in the buffers, allocating a dtype's buffer only when it is missing or too small."""
        if self._cuda:  # a queued onload may still read the buffers
            self._stream.synchronize()
        offsets, sizes = _offsets(layout)
        self._views = []
        for dtype, need in sizes.items():
            have = self._buffers.get(dtype)
            if have is None or have.numel() < need:
                self._buffers.pop(dtype, None)  # released before the new one is locked
                self._buffers[dtype] = host_buffer(max(need, self._reserved.get(dtype, 0)), dtype, pinned=self._cuda)
                self.allocations += 1
        self._views = [self._buffers[dtype][start: start + math.prod(shape)].view(shape)
                       for (dtype, shape), start in zip(layout, offsets)]
        self._layout = layout
