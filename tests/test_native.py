"""k15sys._C: the threaded strided-copy primitive."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from k15sys import _C


def _block(src: torch.Tensor, dst: torch.Tensor) -> list[int]:
    """One copy block moving the 2-D view src into the 2-D view dst (same shape, rows may be strided)."""
    assert src.shape == dst.shape and src.dim() == 2 and src.stride(1) == 1 and dst.stride(1) == 1
    e = src.element_size()
    return [src.data_ptr(), dst.data_ptr(), src.shape[0], src.shape[1] * e, src.stride(0) * e, dst.stride(0) * e]


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_strided_copy_matches_slicing(threads: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(threads)
    src = (torch.randn(301, 77, generator=g) * 50).to(dtype)
    dst = torch.zeros(77, 400, dtype=dtype)
    # a column slice into a contiguous buffer, and an odd-shaped block into a strided destination
    scratch = torch.zeros(301, 40, dtype=dtype)
    blocks = [_block(src[:, 10:50], scratch), _block(src[5:82, 3:74], dst[:, 100:171])]
    _C.strided_copy(np.array(blocks, dtype=np.int64), num_threads=threads, chunk_bytes=4096)
    assert torch.equal(scratch, src[:, 10:50])
    assert torch.equal(dst[:, 100:171], src[5:82, 3:74])
    assert torch.count_nonzero(dst[:, :100]) == 0 and torch.count_nonzero(dst[:, 171:]) == 0


def test_large_copy_many_chunks_and_concurrent_callers() -> None:
    src = torch.randn(4096, 1024)
    outs = [torch.empty_like(src) for _ in range(3)]

    def run(dst: torch.Tensor) -> None:
        _C.strided_copy(np.array([_block(src, dst)], dtype=np.int64), num_threads=2, chunk_bytes=1 << 16)

    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        assert torch.equal(o, src)


def test_bad_blocks_are_rejected() -> None:
    with pytest.raises(ValueError, match="blocks"):
        _C.strided_copy(np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="null pointer"):
        _C.strided_copy(np.array([[0, 0, 4, 8, 8, 8]], dtype=np.int64))
    # empty plans are a no-op
    _C.strided_copy(np.zeros((0, 6), dtype=np.int64))
