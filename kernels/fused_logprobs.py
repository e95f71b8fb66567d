"""Triton row kernels for fused log-probs / entropy and their gradient (paper 2.6.3 training efficiency).

The LM-head matmul is done per chunk of rows by cuBLAS (``k15sys.ops.logprobs``); these kernels do
everything else on a chunk of logits ``[C, V]`` in one pass per row, so no fp32 ``[T, V]`` tensor and no
softmax tensor ever exists:

* statistics: online (max, sum exp, sum exp * z) over V gives ``lse``, the entropy
  ``H = lse - sum p z`` and the label's log-prob ``z_label - lse`` (``z = logits / temperature``);
* gradient, written IN PLACE over the logits chunk (which is then multiplied by W and by h):
  ``dl = (g_lp (1[v = label] - p) - g_ent p (z - lse + H)) / temperature``.

``STATS`` and ``GRAD`` are compile-time switches: the autograd forward runs STATS only, the backward
GRAD only (with the saved lse / H), and the fused loss (coefficients known up front) runs both in one
launch. All arithmetic is fp32 (loads are upcast first, which is also what keeps the kernels right
under Triton's CPU interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logprob_rows_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    lse_ptr,
    ent_ptr,
    lp_ptr,
    g_lp_ptr,
    g_ent_ptr,
    V,
    inv_temp,
    ignore_index,
    STATS: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK_V)

    if STATS:
        # per-lane online accumulators, merged once at the end
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        t = tl.zeros([BLOCK_V], tl.float32)
        z_label = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            inb = offs < V
            z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_temp
            m_new = tl.where(inb, tl.maximum(m, z), m)
            # lanes that have seen nothing keep m = -inf: guard their rescale factor
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            e = tl.where(inb, tl.exp(z - m_new), 0.0)
            s = s * alpha + e
            t = t * alpha + e * z
            z_label += tl.where(inb & (offs == label), z, 0.0)
            m = m_new
        mx = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
        s_tot = tl.sum(s * w, axis=0)
        t_tot = tl.sum(t * w, axis=0)
        lse = mx + tl.log(s_tot)
        ent = lse - t_tot / s_tot
        lp = tl.sum(z_label, axis=0) - lse
        tl.store(lse_ptr + row, lse)
        tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
        tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    else:
        lse = tl.load(lse_ptr + row)
        ent = tl.load(ent_ptr + row)

    if GRAD:
        g_lp = tl.where(valid, tl.load(g_lp_ptr + row).to(tl.float32), 0.0)
        if HAS_G_ENT:
            g_ent = tl.where(valid, tl.load(g_ent_ptr + row).to(tl.float32), 0.0)
        else:
            g_ent = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            inb = offs < V
            z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            d = g_lp * (tl.where(offs == label, 1.0, 0.0) - p) - g_ent * p * (z - lse + ent)
            d = d * inv_temp
            tl.store(base + offs, d.to(logits_ptr.dtype.element_ty), mask=inb)


def launch_rows(
    logits,
    labels,
    lse,
    ent,
    lp,
    g_lp,
    g_ent,
    *,
    inv_temp: float,
    ignore_index: int,
    stats: bool,
    grad: bool,
) -> None:
    """Run :func:`logprob_rows_kernel` over every row of a contiguous-row ``logits`` chunk [C, V]."""
    C, V = logits.shape
    if C == 0:
        return
    block_v = min(4096, triton.next_power_of_2(V))
    dummy = lse  # any fp32 tensor stands in for unused pointers
    logprob_rows_kernel[(C,)](
        logits,
        logits.stride(0),
        labels,
        lse,
        ent,
        lp if lp is not None else dummy,
        g_lp if g_lp is not None else dummy,
        g_ent if g_ent is not None else dummy,
        V,
        inv_temp,
        ignore_index,
        STATS=stats,
        GRAD=grad,
        HAS_G_ENT=g_ent is not None,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
