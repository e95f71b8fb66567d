"""Host byte copies through the C++ thread pool (paper 2.6.3: packing weight buckets on the host).

``torch.Tensor.copy_`` on the host uses torch's intra-op (OpenMP) threads, which fight the transport's own
threads (gloo, a pinned-memory DMA feeder) for the cores: on a 2-core machine packing a bucket while the
previous one is on the wire ran 4-8x slower than the memcpy. These copies run in ``k15sys._C.strided_copy``
with the GIL released, on an explicit number of threads, split into row chunks so that even one large
tensor spreads over the threads.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from k15sys import _C

_ROW = 1 << 16  # bytes per row of a contiguous copy: the unit the thread pool balances


def default_copy_threads() -> int:
    """Half the cores (at least one): the other half stays free for the transport."""
    return max(1, (os.cpu_count() or 2) // 2)


def copy_bytes(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_threads: int) -> None:
    """Copy each contiguous host ``src`` into the contiguous host ``dst`` of the same byte size.

    Raises ValueError naming the pair when a tensor is not a contiguous CPU tensor or the sizes differ.
    """
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads: must be a positive int, got {num_threads!r}")
    blocks = []
    for i, (dst, src) in enumerate(pairs):
        nb = dst.numel() * dst.element_size()
        if src.numel() * src.element_size() != nb:
            raise ValueError(f"pairs: pair {i} copies {src.numel() * src.element_size()} bytes into {nb}")
        if dst.device.type != "cpu" or src.device.type != "cpu" or not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError(f"pairs: pair {i} must be contiguous CPU tensors, got {src.device} -> {dst.device}")
        if nb == 0:
            continue
        s, d = src.data_ptr(), dst.data_ptr()
        rows = nb // _ROW
        if rows:
            blocks.append((s, d, rows, _ROW, _ROW, _ROW))
        tail = nb - rows * _ROW
        if tail:
            blocks.append((s + rows * _ROW, d + rows * _ROW, 1, tail, tail, tail))
    if blocks:
        _C.strided_copy(np.array(blocks, dtype=np.int64), num_threads=num_threads, chunk_bytes=1 << 20)
