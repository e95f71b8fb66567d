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


@pytest.mark.parametrize("streaming", [True, False, None])
def test_streaming_stores_any_alignment(streaming) -> None:
    """Non-temporal stores: unaligned heads, sub-line tails and strided rows all land exactly."""
    g = torch.Generator().manual_seed(7)
    src = torch.randint(0, 256, (70_000,), generator=g, dtype=torch.uint8)
    dst = torch.zeros(80_000, dtype=torch.uint8)
    blocks = [[src.data_ptr() + 3, dst.data_ptr() + 5, 1, 40_001, 40_001, 40_001],  # odd offsets and size
              [src.data_ptr() + 40_010, dst.data_ptr() + 50_001, 37, 129, 300, 131]]  # strided rows
    _C.strided_copy(np.array(blocks, dtype=np.int64), num_threads=2, chunk_bytes=4096, streaming=streaming)
    assert torch.equal(dst[5:40_006], src[3:40_004])
    rows_src = src[40_010:40_010 + 37 * 300].view(37, 300)[:, :129]
    rows_dst = dst[50_001:50_001 + 37 * 131].view(37, 131)
    assert torch.equal(rows_dst[:, :129], rows_src) and torch.count_nonzero(rows_dst[:, 129:]) == 0
    assert torch.count_nonzero(dst[:5]) == 0 and torch.count_nonzero(dst[40_006:50_001]) == 0


def test_copy_bytes_pairs_and_errors() -> None:
    from k15sys.weights.hostcopy import copy_bytes

    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(n, generator=g) for n in (0, 1, 16_385, 70_001)]  # empty, tiny, around a 64 KiB row
    dsts = [torch.empty(s.numel() * 2, dtype=torch.bfloat16) for s in srcs]  # same bytes, another dtype
    copy_bytes(list(zip(dsts, srcs)), num_threads=2)
    assert all(torch.equal(d.view(torch.float32), s) for d, s in zip(dsts, srcs))
    with pytest.raises(ValueError, match="pair 0 copies"):
        copy_bytes([(torch.empty(3), torch.empty(4))], num_threads=1)
    with pytest.raises(ValueError, match="contiguous"):
        copy_bytes([(torch.empty(4, 2).t(), torch.empty(8))], num_threads=1)
    with pytest.raises(ValueError, match="num_threads"):
        copy_bytes([], num_threads=0)


def test_concurrent_callers_with_different_thread_counts() -> None:
    """Pools of different sizes coexist: a caller on one size never invalidates another's pool."""
    src = torch.randn(2048, 1024)
    outs = [torch.empty_like(src) for _ in range(6)]

    def run(dst: torch.Tensor, n: int) -> None:
        for _ in range(5):
            _C.strided_copy(np.array([_block(src, dst)], dtype=np.int64), num_threads=n, chunk_bytes=1 << 14)

    threads = [threading.Thread(target=run, args=(o, 1 + i % 3)) for i, o in enumerate(outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, src) for o in outs)
