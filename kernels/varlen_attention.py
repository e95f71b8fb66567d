"""Triton kernels: causal attention over packed variable-length sequences, forward and backward (paper 2.6.3).

Layout: q [T, Hq, D], k/v [T, Hkv, D] with sequences packed along T and delimited by ``cu_seqlens``.
Query head h reads kv head ``h // GROUP``. The forward keeps a running max / sum per row (online softmax,
base-2 exponentials with the scale folded in) and saves the log-sum-exp (base 2) for the backward. The
backward recomputes probabilities block by block: one kernel accumulates dK/dV per key block over every
query block (and every query head of the GQA group), with keys as the rows of its tiles (``k @ q^T``, so that
P^T and dS^T feed the next products straight from registers); another accumulates dQ per query block.

The tiles streamed in the inner loops are read through tensor descriptors (TMA on Hopper) over the
``[T, heads * D]`` views, built on the host by ``k15sys.ops.attention``. Each loop is split in two kinds of
block: blocks strictly off the causal diagonal and inside the sequence run with no mask at all; only the
diagonal blocks and the block at a sequence's ragged end (whose rows past the end hold the next sequence, or
zeros past T) take the masked path. Blocks past a sequence's end exit at once; causal blocks above the
diagonal are never visited. Query-block kernels run the longest (last) blocks first.

``PREC`` is every ``tl.dot``'s input precision: ``"ieee"`` for fp32 inputs (fp32 attention is asked for where
accuracy matters; TF32 would be 1e3 times less accurate than PyTorch's fp32 math), ``"tf32"`` (the default, a
no-op for 16-bit inputs) otherwise.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fwd_block(q, k_desc, v_desc, row_n, col, m_i, l_i, acc, offs_m, offs_n, L, scale_log2,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax: rescale the running sums to the new row max, add p @ v."""
    k = k_desc.load([row_n, col])
    v = v_desc.load([row_n, col])
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        valid = offs_n[None, :] < L
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(q_desc, k_desc, v_desc, O, LSE, CU, scale_log2, HQ, s_ot, s_oh,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    if pid_m * BLOCK_M < L:
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_nb = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row = (start + offs_m).to(tl.int64)
        q = q_desc.load([start + pid_m * BLOCK_M, h * D])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # key blocks below the diagonal (and inside the sequence) need no mask; the diagonal / ragged end do
        if CAUSAL:
            full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        else:
            full = L // BLOCK_N * BLOCK_N
            hi = L
        for n0 in range(0, full, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, k_desc, v_desc, start + n0, kvh * D, m_i, l_i, acc, offs_m,
                                       n0 + offs_nb, L, scale_log2, CAUSAL, False, PREC)
        for n0 in range(full, hi, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, k_desc, v_desc, start + n0, kvh * D, m_i, l_i, acc, offs_m,
                                       n0 + offs_nb, L, scale_log2, CAUSAL, True, PREC)
        out = acc / l_i[:, None]
        tl.store(O + row[:, None] * s_ot + h * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < L)
        tl.store(LSE + row * HQ + h, m_i + tl.log2(l_i), mask=offs_m < L)


@triton.jit
def _bwd_pre_kernel(O, DO, DELTA, T, HQ, s_ot, s_oh, BLOCK: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # flattened (t, h)
    t = (offs // HQ).to(tl.int64)
    h = offs % HQ
    offs_d = tl.arange(0, D)
    mask = offs < T * HQ
    o = tl.load(O + t[:, None] * s_ot + h[:, None] * s_oh + offs_d[None, :], mask=mask[:, None], other=0.0)
    do = tl.load(DO + t[:, None] * s_ot + h[:, None] * s_oh + offs_d[None, :], mask=mask[:, None], other=0.0)
    tl.store(DELTA + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_desc, do_desc, LSE_s, DELTA_s, i, lo, start, kvh, offs_mb, offs_n, L, HQ, scale_log2,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, PREC: tl.constexpr):
    """Step i of a loop over (query block, query head of the GQA group) pairs from query block ``lo`` on: that
    block's contribution to dK, dV of a key block. Keys are the tile rows (p^T, dS^T are [keys, queries]).
    Columns past the sequence end only touch dK/dV rows that are never stored."""
    h = kvh * GROUP + i % GROUP
    offs_m = lo + (i // GROUP) * BLOCK_M + offs_mb
    q = q_desc.load([start + lo + (i // GROUP) * BLOCK_M, h * D])
    do = do_desc.load([start + lo + (i // GROUP) * BLOCK_M, h * D])
    if MASK:
        mrow = offs_m < L
        lse = tl.load(LSE_s + offs_m * HQ + h, mask=mrow, other=0.0)
        delta = tl.load(DELTA_s + offs_m * HQ + h, mask=mrow, other=0.0)
    else:
        lse = tl.load(LSE_s + offs_m * HQ + h)
        delta = tl.load(DELTA_s + offs_m * HQ + h)
    pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2 - lse[None, :])
    if MASK:
        valid = offs_m[None, :] < L
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        pT = tl.where(valid, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_desc, K, V, do_desc, LSE, DELTA, DK, DV, CU, scale_log2, scale, HQ, HKV,
                     s_kt, s_kh, s_vt, s_vh, s_dkt, s_dkh, s_dvt, s_dvh,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)  # key blocks near the start have the most query blocks: they go first
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    n_start = pid_n * BLOCK_N
    if n_start < L:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_mb = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        col = (start + offs_n).to(tl.int64)
        k = tl.load(K + col[:, None] * s_kt + kvh * s_kh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        v = tl.load(V + col[:, None] * s_vt + kvh * s_vh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        LSE_s = LSE + start.to(tl.int64) * HQ
        DELTA_s = DELTA + start.to(tl.int64) * HQ
        # query blocks [lo, mid) straddle the diagonal; [mid, L_full) need no mask; [L_full, L) is the ragged end.
        # Each range is one flat loop over (query block, query head) pairs: no nested loop around the pipelined one.
        if CAUSAL:
            lo = n_start // BLOCK_M * BLOCK_M
            mid = (n_start + BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        else:
            lo = 0
            mid = 0
        L_full = L // BLOCK_M * BLOCK_M
        tail = tl.maximum(mid, L_full)
        for i in range(0, (tl.minimum(mid, L) - lo + BLOCK_M - 1) // BLOCK_M * GROUP):
            dk, dv = _dkdv_block(dk, dv, k, v, q_desc, do_desc, LSE_s, DELTA_s, i, lo, start, kvh, offs_mb, offs_n, L,
                                 HQ, scale_log2, GROUP, BLOCK_M, D, CAUSAL, True, PREC)
        for i in range(0, (L_full - mid) // BLOCK_M * GROUP):
            dk, dv = _dkdv_block(dk, dv, k, v, q_desc, do_desc, LSE_s, DELTA_s, i, mid, start, kvh, offs_mb, offs_n, L,
                                 HQ, scale_log2, GROUP, BLOCK_M, D, CAUSAL, False, PREC)
        for i in range(0, (L - tail + BLOCK_M - 1) // BLOCK_M * GROUP):
            dk, dv = _dkdv_block(dk, dv, k, v, q_desc, do_desc, LSE_s, DELTA_s, i, tail, start, kvh, offs_mb, offs_n,
                                 L, HQ, scale_log2, GROUP, BLOCK_M, D, CAUSAL, True, PREC)
        tl.store(DK + col[:, None] * s_dkt + kvh * s_dkh + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=offs_n[:, None] < L)
        tl.store(DV + col[:, None] * s_dvt + kvh * s_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=offs_n[:, None] < L)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_desc, v_desc, row_n, col, offs_m, offs_n, L, scale_log2,
              CAUSAL: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """One key block's contribution to dQ of a query block (rows past the sequence end are never stored)."""
    k = k_desc.load([row_n, col])
    v = v_desc.load([row_n, col])
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2 - lse[:, None])
    if MASK:
        valid = offs_n[None, :] < L
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.jit
def _bwd_dq_kernel(Q, k_desc, v_desc, DO, LSE, DELTA, DQ, CU, scale_log2, scale, HQ, s_qt, s_qh, s_dot, s_doh,
                   s_dqt, s_dqh, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    if pid_m * BLOCK_M < L:
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_nb = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row = (start + offs_m).to(tl.int64)
        mrow = offs_m < L
        q = tl.load(Q + row[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mrow[:, None], other=0.0)
        do = tl.load(DO + row[:, None] * s_dot + h * s_doh + offs_d[None, :], mask=mrow[:, None], other=0.0)
        lse = tl.load(LSE + row * HQ + h, mask=mrow, other=0.0)
        delta = tl.load(DELTA + row * HQ + h, mask=mrow, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        if CAUSAL:
            full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        else:
            full = L // BLOCK_N * BLOCK_N
            hi = L
        for n0 in range(0, full, BLOCK_N):
            dq = _dq_block(dq, q, do, lse, delta, k_desc, v_desc, start + n0, kvh * D, offs_m, n0 + offs_nb, L,
                           scale_log2, CAUSAL, False, PREC)
        for n0 in range(full, hi, BLOCK_N):
            dq = _dq_block(dq, q, do, lse, delta, k_desc, v_desc, start + n0, kvh * D, offs_m, n0 + offs_nb, L,
                           scale_log2, CAUSAL, True, PREC)
        tl.store(DQ + row[:, None] * s_dqt + h * s_dqh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=mrow[:, None])
