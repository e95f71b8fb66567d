"""Triton kernels: one sampling step of the rollout engine, on the device, without sorting (paper 2.6.2 rollouts).

Gumbel-max: ``argmax_v z_v / T + g_v`` with ``g_v = -log(-log u_v)`` is a draw from ``softmax(z / T)``; the
uniforms ``u_v`` come from a counter-based hash of (row seed, position, vocabulary index), so a draw depends
only on its request's seed and the token's position -- not on the batch it ran in, nor on any RNG state
that a CUDA graph would have to capture. Temperature 0 rows take the plain argmax (first maximum, as
``torch.argmax``) and report the untempered log-prob.

``_sample_partial_kernel``: program ``(row, chunk)`` streams one slice of the vocabulary once, keeping a
running max / sum of ``exp2`` (the log-sum-exp, in base 2) and the best score with its index; base-2 units
throughout, so each vocabulary entry costs one ``exp2`` and two ``log2`` (hardware approximations on CUDA). ``_sample_final_kernel``:
one program per row merges the chunks, reads the chosen token's logit, and writes the token and its
log-prob ``z_tok / T - logsumexp(z / T)``; with ``ADVANCE`` it also feeds the token to the next decode step
(``TOKENS[row]``, ``POS[row] += 1``) and files it in column ``POS - START`` of the round's output buffers
(when inside them).

The hash is 32-bit murmur3 finalisers (``fmix32``); ``k15sys.rollout.paged_sampling.gumbel_noise`` computes
the same noise with torch integer ops (the CPU path and the filtered top-k / top-p path).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _row_key(seed, pos):
    """uint32 key of one (row seed, position); the per-element hash mixes it with the vocabulary index."""
    return _fmix32(seed.to(tl.uint32) + _fmix32(pos.to(tl.uint32) * 0x9E3779B9 + 0x7F4A7C15))


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:  # the hardware approximation (relative error < 2^-22); tl.log2 is a polynomial of ~12 FMAs
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _gumbel2(idx, key, FAST: tl.constexpr):
    """Gumbel noise in base-2 units, up to a constant: ``-log2(-log2 u)`` = (g - log(log 2)) / log 2 for
    g ~ Gumbel(0, 1) -- the argmax of z * log2(e) / T plus it is the Gumbel-max draw (two log2s)."""
    h = _fmix32((idx.to(tl.uint32) * 0x85EBCA77) ^ key)
    h = _fmix32(h + key)
    u = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # (k + 1/2) / 2^24: never 0 or 1
    return -_log2(-_log2(u, FAST), FAST)


@triton.jit
def _sample_partial_kernel(LOGITS, TEMP, SEEDS, POS, PART_F, PART_I, V, s_l,
                           CHUNKS: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(TEMP + row)
    greedy = t == 0.0
    scale = 1.4426950408889634 / tl.where(greedy, 1.0, t)  # logits to base-2 units: z * log2(e) / T
    key = _row_key(tl.load(SEEDS + row), tl.load(POS + row))
    per = tl.cdiv(tl.cdiv(V, CHUNKS), BLOCK) * BLOCK
    lo = chunk * per
    hi = tl.minimum(V, lo + per)
    offs = tl.arange(0, BLOCK)
    base = LOGITS + row.to(tl.int64) * s_l
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for v0 in range(lo, hi, BLOCK):  # running log-sum-exp per block; best score per lane, reduced at the end
        idx = v0 + offs
        valid = idx < hi
        raw = tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32)
        z = raw * scale
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new), 0)
        m = m_new
        # greedy rows rank the raw logits: scaling could merge two logits one ulp apart
        score = tl.where(valid, tl.where(greedy, raw, z + _gumbel2(idx, key, FAST)), float("-inf"))
        better = score > best  # strict: the earliest index keeps a tie, as torch.argmax
        best_i = tl.where(better, idx, best_i)
        best = tl.where(better, score, best)
    top = tl.max(best, 0)
    top_i = tl.min(tl.where(best == top, best_i, V), 0)
    out = (row * CHUNKS + chunk) * 3
    tl.store(PART_F + out, m)
    tl.store(PART_F + out + 1, s)
    tl.store(PART_F + out + 2, top)
    tl.store(PART_I + row * CHUNKS + chunk, top_i)


@triton.jit
def _sample_final_kernel(LOGITS, TEMP, PART_F, PART_I, TOK, LP, s_l,
                         TOKENS, POS, START, OUT_TOK, OUT_LP, s_out, n_out,
                         CHUNKS: tl.constexpr, ADVANCE: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS)
    pf = PART_F + (row * CHUNKS + c) * 3
    m = tl.load(pf)
    s = tl.load(pf + 1)
    best = tl.load(pf + 2)
    mm = tl.max(m, 0)
    lse2 = mm + tl.log2(tl.sum(s * tl.exp2(tl.where(m == float("-inf"), float("-inf"), m - mm)), 0))
    top = tl.max(best, 0)
    tok = tl.min(tl.where(best == top, tl.load(PART_I + row * CHUNKS + c), 2147483647), 0)  # earliest chunk wins
    t = tl.load(TEMP + row)
    t = tl.where(t == 0.0, 1.0, t)
    z_tok = tl.load(LOGITS + row.to(tl.int64) * s_l + tok).to(tl.float32) / t
    lp = z_tok - lse2 * 0.6931471805599453
    tl.store(TOK + row, tok.to(TOK.dtype.element_ty))
    tl.store(LP + row, lp)
    if ADVANCE:
        p = tl.load(POS + row)
        col = p - tl.load(START + row)
        inside = (col >= 0) & (col < n_out)  # a replay past the round's columns files nothing
        tl.store(OUT_TOK + row * s_out + col, tok.to(OUT_TOK.dtype.element_ty), mask=inside)
        tl.store(OUT_LP + row * s_out + col, lp, mask=inside)
        tl.store(TOKENS + row, tok.to(TOKENS.dtype.element_ty))
        tl.store(POS + row, p + 1)
