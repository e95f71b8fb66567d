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
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_ALIGN_BYTES = 512  # each view starts on a 512-byte boundary of its buffer (DMA-friendly)


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
        self._layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...] | None = None
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._views: list[torch.Tensor] = []
        self._moved: list[torch.Tensor] = []
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.allocations = 0  # how many times the host buffers were (re)allocated: once per new layout

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def offloaded(self) -> bool:
        """Whether tensors are on the host now (moved by :meth:`offload`, not yet brought back)."""
        return bool(self._moved)

    def offload(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (distinct tensor objects on ``device``, not views of each other) into the host
        buffers and make each point at its host copy; their device memory is released. The buffers are
        allocated on the first call, and again only when the tensors' dtypes or shapes change."""
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
            self._reserve(layout)
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

    def _reserve(self, layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...]) -> None:
        """One flat host buffer per dtype holding every tensor of ``layout`` (aligned views)."""
        if self._cuda:  # a later offload's copies must not overwrite buffers still read by a queued onload
            self._stream.synchronize()
        offsets, sizes = [], {}
        for dtype, shape in layout:
            align = max(1, _ALIGN_BYTES // dtype.itemsize)
            start = -(-sizes.get(dtype, 0) // align) * align
            numel = 1
            for s in shape:
                numel *= s
            offsets.append(start)
            sizes[dtype] = start + numel
        self._buffers = {}  # release the old buffers before pinning the new ones
        self._views = []
        self._buffers = {dtype: torch.empty(n, dtype=dtype, pin_memory=self._cuda) for dtype, n in sizes.items()}
        for (dtype, shape), start in zip(layout, offsets):
            numel = 1
            for s in shape:
                numel *= s
            self._views.append(self._buffers[dtype][start: start + numel].view(shape))
        self._layout = layout
        self.allocations += 1
