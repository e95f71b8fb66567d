"""Triton kernels: causal attention over packed variable-length sequences, forward and backward (paper 2.6.3).

Layout: q [T, Hq, D], k/v [T, Hkv, D] with sequences packed along T and delimited by ``cu_seqlens``.
Query head h reads kv head ``h // GROUP``. The forward keeps a running max / sum per row (online softmax,
base-2 exponentials with the scale folded in) and saves the log-sum-exp (base 2) for the backward. The
backward recomputes probabilities block by block: one kernel accumulates dK/dV per KV block over every
query block (and every query head of the GQA group), another accumulates dQ per query block. Blocks past
a sequence's end exit at once; causal blocks above the diagonal are never visited.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc):
    """One key block of the online softmax: rescale the running sums to the new row max, add p @ v."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, scale_log2, HQ, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    if pid_m * BLOCK_M < L:
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row = (start + offs_m).to(tl.int64)
        q = tl.load(Q + row[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=offs_m[:, None] < L, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # blocks entirely below the diagonal need no mask; the diagonal ones (and the ragged end) do
        full = 0
        hi = L
        if CAUSAL:
            full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        for n0 in range(0, full, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col = (start + offs_n).to(tl.int64)
            kt = tl.load(K + col[None, :] * s_kt + kvh * s_kh + offs_d[:, None])
            v = tl.load(V + col[:, None] * s_vt + kvh * s_vh + offs_d[None, :])
            s = tl.dot(q, kt).to(tl.float32) * scale_log2
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc)
        for n0 in range(full, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col = (start + offs_n).to(tl.int64)
            kt = tl.load(K + col[None, :] * s_kt + kvh * s_kh + offs_d[:, None], mask=offs_n[None, :] < L, other=0.0)
            v = tl.load(V + col[:, None] * s_vt + kvh * s_vh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
            s = tl.dot(q, kt).to(tl.float32) * scale_log2
            valid = offs_n[None, :] < L
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(valid, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc)
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
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, scale_log2, scale, HQ, HKV,
                     s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    if pid_n * BLOCK_N < L:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        col = (start + offs_n).to(tl.int64)
        k = tl.load(K + col[:, None] * s_kt + kvh * s_kh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        v = tl.load(V + col[:, None] * s_vt + kvh * s_vh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        for g in range(GROUP):
            h = kvh * GROUP + g
            for m0 in range(lo, L, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                row = (start + offs_m).to(tl.int64)
                mrow = offs_m < L
                q = tl.load(Q + row[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mrow[:, None], other=0.0)
                do = tl.load(DO + row[:, None] * s_dot + h * s_doh + offs_d[None, :], mask=mrow[:, None], other=0.0)
                lse = tl.load(LSE + row * HQ + h, mask=mrow, other=0.0)
                delta = tl.load(DELTA + row * HQ + h, mask=mrow, other=0.0)
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
                valid = mrow[:, None] & (offs_n[None, :] < L)
                if CAUSAL:
                    valid = valid & (offs_m[:, None] >= offs_n[None, :])
                p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
                dp = tl.dot(do, tl.trans(v)).to(tl.float32)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
        tl.store(DK + col[:, None] * s_dkt + kvh * s_dkh + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=offs_n[:, None] < L)
        tl.store(DV + col[:, None] * s_dvt + kvh * s_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=offs_n[:, None] < L)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, scale_log2, scale, HQ,
                   s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh,
                   GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    if pid_m * BLOCK_M < L:
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row = (start + offs_m).to(tl.int64)
        mrow = offs_m < L
        q = tl.load(Q + row[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mrow[:, None], other=0.0)
        do = tl.load(DO + row[:, None] * s_dot + h * s_doh + offs_d[None, :], mask=mrow[:, None], other=0.0)
        lse = tl.load(LSE + row * HQ + h, mask=mrow, other=0.0)
        delta = tl.load(DELTA + row * HQ + h, mask=mrow, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col = (start + offs_n).to(tl.int64)
            k = tl.load(K + col[:, None] * s_kt + kvh * s_kh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
            v = tl.load(V + col[:, None] * s_vt + kvh * s_vh + offs_d[None, :], mask=offs_n[:, None] < L, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
            valid = mrow[:, None] & (offs_n[None, :] < L)
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
        tl.store(DQ + row[:, None] * s_dqt + h * s_dqh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=mrow[:, None])
