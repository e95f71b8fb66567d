"""Triton kernels: decode attention over a paged KV cache, GQA, split over the context (paper 2.6.2 rollouts).

One query token per sequence. The KV cache is a pool of pages of ``PAGE`` token slots,
``[num_pages, PAGE, Hkv, D]`` per layer; row ``b`` of the block table lists the pages of sequence ``b`` in
order, so token ``t`` of the sequence lives in slot ``t % PAGE`` of page ``block_table[b, t // PAGE]``.

Flash-decoding: program ``(b, kv head, split)`` handles every query head of its GQA group (their rows
padded to ``GROUP_PAD``, so the score and value products are ``tl.dot`` tiles) against one contiguous
range of the sequence's tokens, keeping a running max / sum (base-2 exponentials, scale folded in). The
range length is derived from the sequence's length at run time, so one launch shape (one CUDA graph) serves
every length; programs whose range is empty write an empty partial. With ``NEW_KV`` the newest token's key
and value arrive in registers (the cache holds the older ones): the kernel applies the rotary embedding to
the queries and that key (``ROPE``), the split holding the newest position writes both into the cache, and
every split attends to its cached range (plus the newest token, in its owner) -- one launch instead of a
rotary / cache-write kernel and the attention. ``_combine_kernel`` merges the
partials of the splits by their log-sum-exps; with one split (``FINAL``) the kernel writes the output itself
(short contexts: one launch instead of two).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attend_block(q, k, v, valid, m_i, l_i, acc, scale_log2, IEEE: tl.constexpr):
    """One block of cached tokens into the running max / sum / output of the online softmax (base 2)."""
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
    return m_new, l_i, acc


@triton.jit
def _kv_block(K, V, bt_row, tok, hi, col, dmask, kvh, s_kp, s_kt, s_kh, PAGE: tl.constexpr, PADDED: tl.constexpr):
    """Keys / values of tokens ``tok`` (those below ``hi``) through the block table row."""
    valid = tok < hi
    page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
    base = page * s_kp + (tok % PAGE) * s_kt + kvh * s_kh
    kvmask = valid[:, None]
    if PADDED:
        kvmask = kvmask & dmask
    k = tl.load(K + base[:, None] + col[None, :], mask=kvmask, other=0.0)
    v = tl.load(V + base[:, None] + col[None, :], mask=kvmask, other=0.0)
    return k, v, valid


@triton.jit
def _paged_decode_kernel(Q, K, V, BT, LENS, O_PART, LSE_PART, scale_log2,
                         s_qb, s_qh, s_kp, s_kt, s_kh, s_bt, s_ob, s_oh, s_os,
                         KN, VN, COS, SIN, s_knb, s_knh, s_vnb, s_vnh, s_cos,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
                         FINAL: tl.constexpr, NEW_KV: tl.constexpr, ROPE: tl.constexpr, PREFETCH: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    L = tl.load(LENS + b)
    per_split = tl.cdiv(tl.cdiv(L, n_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(L, lo + per_split)

    # columns: for an even head dim, the two rotary halves each padded to D_PAD / 2 (identity when D is a
    # power of two), so that a column's rotary partner is column (c + D_PAD / 2) mod D_PAD
    HP: tl.constexpr = D_PAD // 2
    offs_c = tl.arange(0, D_PAD)
    if D % 2 == 0:
        col = (offs_c // HP) * (D // 2) + offs_c % HP
        cvalid = (offs_c % HP) < (D // 2)
    else:
        col = offs_c
        cvalid = offs_c < D
    dmask = cvalid[None, :]  # padded head dims read zeros (masks only when padded)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    qmask = offs_g[:, None] < GROUP
    if D_PAD != D:
        qmask = qmask & dmask
    q_ptr = Q + b * s_qb + heads[:, None] * s_qh
    q = tl.load(q_ptr + col[None, :], mask=qmask, other=0.0)
    bt_row = BT + b.to(tl.int64) * s_bt
    if NEW_KV:  # the newest token's k / v come in registers: rotate, file in the cache, attend to the rest
        pos = L - 1
        k_ptr = KN + b.to(tl.int64) * s_knb + kvh * s_knh
        k_new = tl.load(k_ptr + col, mask=cvalid, other=0.0)
        v_new = tl.load(VN + b.to(tl.int64) * s_vnb + kvh * s_vnh + col, mask=cvalid, other=0.0)
        if ROPE:  # rotate-half convention: x' = x cos + (-x2, x1) sin, in fp32, rounded to the input dtype
            partner = (offs_c + HP) % D_PAD
            pcol = (partner // HP) * (D // 2) + partner % HP
            sign = tl.where(offs_c < HP, -1.0, 1.0)
            cs = tl.load(COS + pos * s_cos + col, mask=cvalid, other=0.0).to(tl.float32)
            sn = tl.load(SIN + pos * s_cos + col, mask=cvalid, other=0.0).to(tl.float32) * sign
            qp = tl.load(q_ptr + pcol[None, :], mask=qmask, other=0.0)
            q = (q.to(tl.float32) * cs[None, :] + qp.to(tl.float32) * sn[None, :]).to(q.dtype)
            kp = tl.load(k_ptr + pcol, mask=cvalid, other=0.0)
            k_new = (k_new.to(tl.float32) * cs + kp.to(tl.float32) * sn).to(k_new.dtype)
        if (lo <= pos) & (pos < hi):  # the split that holds the newest position writes it
            page = tl.load(bt_row + pos // PAGE).to(tl.int64)
            slot = page * s_kp + (pos % PAGE) * s_kt + kvh * s_kh
            tl.store(K + slot + col, k_new.to(K.dtype.element_ty), mask=cvalid)
            tl.store(V + slot + col, v_new.to(V.dtype.element_ty), mask=cvalid)
        hi_cached = tl.minimum(hi, pos)
    else:
        hi_cached = hi
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    PADDED: tl.constexpr = D_PAD != D
    if PREFETCH:  # the next block's loads are issued before this block's arithmetic (register double buffer)
        k, v, valid = _kv_block(K, V, bt_row, lo + offs_n, hi_cached, col, dmask, kvh, s_kp, s_kt, s_kh, PAGE, PADDED)
        for n0 in range(lo, hi_cached, BLOCK_N):
            k_n, v_n, valid_n = _kv_block(K, V, bt_row, n0 + BLOCK_N + offs_n, hi_cached, col, dmask, kvh, s_kp,
                                          s_kt, s_kh, PAGE, PADDED)
            m_i, l_i, acc = _attend_block(q, k, v, valid, m_i, l_i, acc, scale_log2, IEEE)
            k, v, valid = k_n, v_n, valid_n
    else:
        for n0 in range(lo, hi_cached, BLOCK_N):
            k, v, valid = _kv_block(K, V, bt_row, n0 + offs_n, hi_cached, col, dmask, kvh, s_kp, s_kt, s_kh, PAGE,
                                    PADDED)
            m_i, l_i, acc = _attend_block(q, k, v, valid, m_i, l_i, acc, scale_log2, IEEE)
    if NEW_KV:
        mine = (lo <= pos) & (pos < hi)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
        s_new = tl.where(mine, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_new = tl.exp2(s_new - m_safe).to(v_new.dtype).to(tl.float32)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row = b.to(tl.int64) * s_ob + heads * s_oh + split * s_os
    gmask = offs_g < GROUP
    omask = gmask[:, None]
    if D_PAD != D:
        omask = omask & dmask
    tl.store(O_PART + row[:, None] + col[None, :], out.to(O_PART.dtype.element_ty), mask=omask)
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
