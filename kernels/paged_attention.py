"""Triton kernels: decode attention over a paged KV cache, GQA, split over the context (paper 2.6.2 rollouts).

One query token per sequence. The KV cache is a pool of pages of ``PAGE`` token slots,
``[num_pages, PAGE, Hkv, D]`` per layer; row ``b`` of the block table lists the pages of sequence ``b`` in
order, so token ``t`` of the sequence lives in slot ``t % PAGE`` of page ``block_table[b, t // PAGE]``.

Flash-decoding: program ``(b, kv head, split)`` handles every query head of its GQA group (their rows
padded to ``GROUP_PAD``, so the score and value products are ``tl.dot`` tiles) against one contiguous
range of the sequence's tokens, keeping a running max / sum (base-2 exponentials, scale folded in). The
range length is derived from the sequence's length at run time, so one launch shape (one CUDA graph) serves
every length; programs whose range is empty write an empty partial. ``_combine_kernel`` merges the
partials of the splits by their log-sum-exps; with one split (``FINAL``) the kernel writes the output itself
(short contexts: one launch instead of two).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(Q, K, V, BT, LENS, O_PART, LSE_PART, scale_log2,
                         s_qb, s_qh, s_kp, s_kt, s_kh, s_bt, s_ob, s_oh, s_os,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
                         FINAL: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    L = tl.load(LENS + b)
    per_split = tl.cdiv(tl.cdiv(L, n_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(L, lo + per_split)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d[None, :] < D  # head dims padded to a power of two read zeros (masks only when padded)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    qmask = offs_g[:, None] < GROUP
    if D_PAD != D:
        qmask = qmask & dmask
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=qmask, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    bt_row = BT + b.to(tl.int64) * s_bt
    for n0 in range(lo, hi, BLOCK_N):
        tok = n0 + offs_n
        valid = tok < hi
        page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        base = page * s_kp + (tok % PAGE) * s_kt + kvh * s_kh
        kvmask = valid[:, None]
        if D_PAD != D:
            kvmask = kvmask & dmask
        k = tl.load(K + base[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        v = tl.load(V + base[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row = b.to(tl.int64) * s_ob + heads * s_oh + split * s_os
    gmask = offs_g < GROUP
    omask = gmask[:, None]
    if D_PAD != D:
        omask = omask & dmask
    tl.store(O_PART + row[:, None] + offs_d[None, :], out.to(O_PART.dtype.element_ty), mask=omask)
    if not FINAL:
        tl.store(LSE_PART + (b * tl.num_programs(1) * GROUP + heads) * n_splits + split, lse, mask=gmask)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, O, s_ob, s_oh, s_os, s_fb, s_fh, HQ,
                    SPLITS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """One (sequence, head): out = sum_s exp2(lse_s - lse) * o_s with lse = log2 sum_s exp2(lse_s)."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    lse = tl.load(LSE_PART + bh * SPLITS + offs_s)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    w = w / tl.sum(w, 0)
    part = tl.load(O_PART + b.to(tl.int64) * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_d[None, :],
                   mask=dmask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    tl.store(O + b.to(tl.int64) * s_fb + h * s_fh + offs_d, out.to(O.dtype.element_ty), mask=dmask)
