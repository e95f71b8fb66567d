"""Triton row kernels for fused log-probs / entropy and their gradient (paper 2.6.3 training efficiency).

The LM-head matmul is done per chunk of rows by cuBLAS (``k15sys.ops.logprobs``); these kernels do
everything else on a chunk of logits ``[C, V]`` in one pass per row, so no fp32 ``[T, V]`` tensor and no
softmax tensor ever exists:

* statistics: online (max, sum exp, sum exp * z) over V gives ``lse``, the entropy
  ``H = lse - sum p z`` and the label's log-prob ``z_label - lse`` (``z = logits / temperature``);
* partial statistics of a chunk that holds only some vocabulary columns ``[col0, col0 + Vc)`` (``PARTIAL``):
  the chunk's ``(m, s, t, z_label)``, merged over the chunks afterwards (the autograd path tiles [T, V]
  over the vocabulary);
* gradient, written IN PLACE over the logits chunk (which is then multiplied by W and by h):
  ``dl = (g_lp (1[v = label] - p) - g_ent p (z - lse + H)) / temperature``.

``STATS`` and ``GRAD`` are compile-time switches: the backward runs GRAD only (with the saved lse / H),
and the fused loss (coefficients known up front) runs both in one launch. All arithmetic is fp32 (loads
are upcast first, which is also what keeps the kernels right under Triton's CPU interpreter).

:func:`logits_stats_kernel` is the fully fused alternative for the statistics: it computes logit tiles
``h @ W^T`` itself (``tl.dot``, fp32 accumulation, rounded to the input dtype as a GEMM's output would
be) and folds each tile into per-row online statistics
(running max ``m``, ``s = sum e^(z-m)``, ``t = sum e^(z-m) z``) without writing any logits, so a
statistics-only pass (the autograd forward, the no-grad log-probs of the reference policy) needs no
``[C, V]`` buffer at all. The vocabulary is split over ``NSPLIT`` programs per row block; their partial
statistics are merged by ``k15sys.ops.logprobs.merge_partials`` (plain torch, shared with the chunked path).
"""
from __future__ import annotations

import os

import torch
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
    part_ptr,
    part_stride,
    V,
    col0,
    inv_temp,
    ignore_index,
    STATS: tl.constexpr,
    PARTIAL: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    label = label - col0  # the chunk holds vocabulary columns [col0, col0 + V)
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
        if PARTIAL:  # this chunk's (m, s, t, z_label), merged over the chunks by ``merge_partials``
            tl.store(part_ptr + row, mx)
            tl.store(part_ptr + part_stride + row, s_tot)
            tl.store(part_ptr + 2 * part_stride + row, t_tot)
            tl.store(part_ptr + 3 * part_stride + row, tl.sum(z_label, axis=0))
        else:
            lse = mx + tl.log(s_tot)
            ent = lse - t_tot / s_tot
            lp = tl.sum(z_label, axis=0) - lse
            tl.store(lse_ptr + row, lse)
            tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
            tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    if not STATS:
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
    col0: int = 0,
    part=None,
) -> None:
    """Run :func:`logprob_rows_kernel` over every row of a contiguous-row ``logits`` chunk [C, Vc].

    The chunk holds vocabulary columns ``[col0, col0 + Vc)``. With ``part`` (a [4, C] fp32 view, rows
    contiguous) the statistics pass writes this chunk's partial ``(m, s, t, z_label)`` there instead of
    ``lse`` / ``ent`` / ``lp`` (no gradient in the same launch then)."""
    C, V = logits.shape
    if C == 0:
        return
    if part is not None and (grad or not stats):
        raise ValueError("part: partial statistics are a statistics-only pass")
    block_v = min(4096, triton.next_power_of_2(V))
    dummy = labels  # stands in for unused pointers (never dereferenced)
    logprob_rows_kernel[(C,)](
        logits,
        logits.stride(0),
        labels,
        lse if lse is not None else dummy,
        ent if ent is not None else dummy,
        lp if lp is not None else dummy,
        g_lp if g_lp is not None else dummy,
        g_ent if g_ent is not None else dummy,
        part if part is not None else dummy,
        part.stride(0) if part is not None else 0,
        V,
        col0,
        inv_temp,
        ignore_index,
        STATS=stats,
        PARTIAL=part is not None,
        GRAD=grad,
        HAS_G_ENT=g_ent is not None,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# block_t is fixed per launch (the split count depends on it); the rest is autotuned on CUDA only
# (the interpreter rejects autotune with more than one config, and wants tiny tiles to stay fast).
_BLOCK_T = 16 if _INTERPRET else 128
_STATS_CONFIGS = (
    [triton.Config({"BLOCK_V": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    if _INTERPRET
    else [  # 128 x 128 tiles: ptxas reports no spills for these (128 x 256 tiles spill in the epilogue)
        triton.Config({"BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_V": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    ]
)


def _prune_for_precision(configs, named_args, **kwargs):
    """fp32 inputs (``IEEE``: FMA dots, no tensor cores) are for accuracy, not speed: one config, one compile."""
    return configs[:1] if kwargs.get("IEEE") else configs


@triton.autotune(configs=_STATS_CONFIGS, key=["H", "V", "SPLIT_V"],
                 prune_configs_by={"early_config_prune": _prune_for_precision})
@triton.heuristics({"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0})
@triton.jit
def logits_stats_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    part_ptr,
    T,
    H,
    V,
    SPLIT_V,
    part_stride,
    inv_temp,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Partial (m, s, t, z_label) of rows [pid_t*BLOCK_T, +BLOCK_T) over vocabulary [pid_s*SPLIT_V, +SPLIT_V).

    ``hidden`` [T, H] and ``weight`` [V, H] are row-major and contiguous; ``part`` is fp32 [4, NSPLIT, T]
    (``part_stride`` = NSPLIT * T).
    """
    # grouped order: the programs in flight share GROUP_T row blocks and a run of vocabulary splits, so
    # both their hidden rows and their weight tiles stay in L2 (as in a GEMM's grouped tile order)
    nsplit = tl.cdiv(V, SPLIT_V)
    pid = tl.program_id(0)
    group = pid // (GROUP_T * nsplit)
    first_t = group * GROUP_T
    group_rows = tl.minimum(tl.cdiv(T, BLOCK_T) - first_t, GROUP_T)
    pid_t = first_t + (pid % (GROUP_T * nsplit)) % group_rows
    pid_s = (pid % (GROUP_T * nsplit)) // group_rows
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    ks = tl.arange(0, BLOCK_K)
    vs = tl.arange(0, BLOCK_V)
    # 64-bit scalar bases, 32-bit tile offsets (a row block and a split are far below 2^31 elements)
    h_base = h_ptr + (pid_t * BLOCK_T).to(tl.int64) * H
    h_offs = tl.arange(0, BLOCK_T)[:, None] * H + ks[None, :]
    v_begin = pid_s * SPLIT_V
    v_end = tl.minimum(v_begin + SPLIT_V, V)
    w_base = w_ptr + v_begin.to(tl.int64) * H

    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    t = tl.zeros([BLOCK_T], tl.float32)
    z_label = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        col_ok = (v0 + vs) < v_end
        a_ptrs = h_base + h_offs
        b_ptrs = w_base + ((v0 - v_begin + vs)[None, :] * H + ks[:, None])
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < H
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        # logits rounded to the input dtype, exactly like the [chunk, V] buffer the backward recomputes:
        # the saved lse then normalises the very logits the gradient is taken of. Columns past the
        # vocabulary get a finite -1e30 (not -inf), so that e = 0 and e * z = 0, never NaN.
        z = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * inv_temp
        z = tl.where(col_ok[None, :], z, -1e30)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # m = -inf on the first tile: alpha = 0, s = t = 0 anyway
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * z, axis=1)
        z_label += tl.sum(tl.where(vs[None, :] == (label - v0)[:, None], z, 0.0), axis=1)
        m = m_new
    out = part_ptr + pid_s * T + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + part_stride, s, mask=row_ok)
    tl.store(out + 2 * part_stride, t, mask=row_ok)
    tl.store(out + 3 * part_stride, z_label, mask=row_ok)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so the merge is exercised


def launch_stats(hidden, weight, labels, *, inv_temp: float):
    """Partial statistics of every row over vocabulary splits: returns fp32 ``part`` [4, NSPLIT, T].

    Splits of about 4096 columns, so that the programs in flight share few weight tiles and hidden row
    blocks (L2), and more (down to 1024 columns) when T is small, so that there are many waves of
    programs and a short tail. The merge reads 16 bytes per row and split: negligible.
    """
    T, H = hidden.shape
    V = weight.shape[0]
    t_blocks = triton.cdiv(T, _BLOCK_T)
    cols, min_cols = (64, 64) if _INTERPRET else (4096, 1024)
    fill = triton.cdiv(16 * _num_sms(hidden.device), t_blocks)
    nsplit = min(triton.cdiv(V, min_cols), max(triton.cdiv(V, cols), fill))
    split_v = triton.cdiv(triton.cdiv(V, nsplit), 128) * 128  # multiple of every BLOCK_V
    nsplit = triton.cdiv(V, split_v)
    part = torch.empty(4, nsplit, T, dtype=torch.float32, device=hidden.device)
    logits_stats_kernel[(t_blocks * nsplit,)](
        hidden, weight, labels, part, T, H, V, split_v, nsplit * T, inv_temp,
        BLOCK_T=_BLOCK_T, GROUP_T=8, IEEE=hidden.dtype == torch.float32,
    )
    return part
