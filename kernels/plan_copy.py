"""Triton kernel: a whole reshard plan of 2-D strided copies in one launch (paper 2.6.3, device path).

Every copy is described in elements relative to one base pointer (the tensors of a plan live in one device
address space): ``TABLE[i] = (src_off, dst_off, cols, src_ld, dst_ld)``. The host splits every copy into
tiles of up to ``ROWS`` rows (``TILE_COPY``, ``TILE_ROW``); one program copies one tile, ``COLS`` columns at
a time. ``ALIGN`` (elements) is a common divisor of every offset, leading dimension and width that the host
checked, so loads and stores vectorise.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _plan_copy_kernel(BASE, TABLE, TILE_COPY, TILE_ROW, TILE_NROWS, ROWS: tl.constexpr, COLS: tl.constexpr,
                      ALIGN: tl.constexpr):
    t = tl.program_id(0)
    i = tl.load(TILE_COPY + t)
    r0 = tl.load(TILE_ROW + t)
    nrows = tl.load(TILE_NROWS + t)
    src_off = tl.multiple_of(tl.load(TABLE + i * 5), ALIGN)
    dst_off = tl.multiple_of(tl.load(TABLE + i * 5 + 1), ALIGN)
    cols = tl.multiple_of(tl.load(TABLE + i * 5 + 2), ALIGN)
    src_ld = tl.multiple_of(tl.load(TABLE + i * 5 + 3), ALIGN)
    dst_ld = tl.multiple_of(tl.load(TABLE + i * 5 + 4), ALIGN)
    rows = tl.arange(0, ROWS)
    row_ok = rows < nrows
    src_row = src_off + (r0 + rows).to(tl.int64) * src_ld
    dst_row = dst_off + (r0 + rows).to(tl.int64) * dst_ld
    for c0 in range(0, cols, COLS):
        c = c0 + tl.arange(0, COLS)
        ok = row_ok[:, None] & (c[None, :] < cols)
        x = tl.load(BASE + src_row[:, None] + c[None, :], mask=ok)
        tl.store(BASE + dst_row[:, None] + c[None, :], x, mask=ok)
