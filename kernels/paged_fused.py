"""Triton kernels: the element-wise steps of the rollout engine's decoder layer, fused (paper 2.6.2 rollouts).

A decode step moves few bytes per kernel, so the count of kernels matters as much as their speed.
``_add_rmsnorm_kernel`` adds a sublayer's output to the residual stream (in place) and RMS-normalises the
result in one pass; ``_silu_mul_kernel`` is the MLP's gate; ``_rope_store_kernel`` applies the rotary
embedding to a token's query and key (in place) and writes the key and value into the token's KV-cache slot. Rounding follows transformers' Qwen2 /
Llama modules: the residual sum and the normalised activations are rounded to the model dtype before the
weight product; statistics in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(X, DELTA, W, Y, eps, N, s_x, s_d, s_y, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * s_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(DELTA + row * s_d + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(X + row * s_x + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    h = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, (w * h).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_store_kernel(Q, K, V, COS, SIN, POS, SLOTS, KC, VC, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cos, s_ct, s_ch,
                       HQ, HKV, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    dm = offs_d < HALF  # half head dims padded to a power of two are masked
    c1 = tl.load(COS + pos * s_cos + offs_d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + pos * s_cos + HALF + offs_d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + pos * s_cos + offs_d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + pos * s_cos + HALF + offs_d, mask=dm, other=0.0).to(tl.float32)[None, :]
    # queries: rotated in place
    qm = (offs_h < HQ)[:, None] & dm[None, :]
    qp = Q + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :]
    q1 = tl.load(qp, mask=qm, other=0.0)
    q2 = tl.load(qp + HALF, mask=qm, other=0.0)
    tl.store(qp, (q1.to(tl.float32) * c1 - q2.to(tl.float32) * s1).to(q1.dtype), mask=qm)
    tl.store(qp + HALF, (q2.to(tl.float32) * c2 + q1.to(tl.float32) * s2).to(q1.dtype), mask=qm)
    # keys: rotated into the cache slot; values: copied there
    km = (offs_h < HKV)[:, None] & dm[None, :]
    kp = K + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :]
    k1 = tl.load(kp, mask=km, other=0.0)
    k2 = tl.load(kp + HALF, mask=km, other=0.0)
    r1 = (k1.to(tl.float32) * c1 - k2.to(tl.float32) * s1).to(k1.dtype)
    r2 = (k2.to(tl.float32) * c2 + k1.to(tl.float32) * s2).to(k1.dtype)
    tl.store(kp, r1, mask=km)
    tl.store(kp + HALF, r2, mask=km)
    cp = slot * s_ct + offs_h[:, None] * s_ch + offs_d[None, :]
    tl.store(KC + cp, r1.to(KC.dtype.element_ty), mask=km)
    tl.store(KC + cp + HALF, r2.to(KC.dtype.element_ty), mask=km)
    vp = V + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :]
    tl.store(VC + cp, tl.load(vp, mask=km, other=0.0), mask=km)
    tl.store(VC + cp + HALF, tl.load(vp + HALF, mask=km, other=0.0), mask=km)


@triton.jit
def _silu_mul_kernel(GU, OUT, N, s_g, s_o, BLOCK: tl.constexpr):
    """``silu(gate) * up`` of one row block, with ``[gate | up]`` side by side in ``GU`` (one fused GEMM's output)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(GU + row * s_g + offs, mask=mask, other=0.0)
    u = tl.load(GU + row * s_g + N + offs, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(OUT + row * s_o + offs, (s * u).to(OUT.dtype.element_ty), mask=mask)
