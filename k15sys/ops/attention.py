"""Causal attention over packed variable-length sequences (paper 2.6.3: long-context training).

k1.5 trains on packed batches of very different lengths; ``varlen_attention`` takes the packed
``[T, heads, D]`` tensors plus ``cu_seqlens`` (cumulative sequence starts, int32 ``[B + 1]``) and never
pads. GQA: ``Hq`` must be a multiple of ``Hkv``; query head h reads kv head ``h // (Hq // Hkv)``.

Backends: ``"triton"`` runs the fused kernels of ``k15sys.kernels.varlen_attention`` (CUDA, or the CPU
interpreter under ``TRITON_INTERPRET=1``); forward saves the log-sum-exp, backward recomputes the
probabilities. The kernels stream their tiles through tensor descriptors built here over the
``[T, heads * D]`` views (inputs are made contiguous and 16-byte aligned). ``"torch"`` runs each sequence
through ``scaled_dot_product_attention`` (the reference, any device). ``"auto"`` picks triton on CUDA and
torch elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from k15sys.ops.backend import Backend, pick_backend

_LOG2E = 1.4426950408889634


def _validate(q, k, v, cu_seqlens, max_seqlen) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not q.is_floating_point():
        raise ValueError(f"q: expected a floating-point tensor (float32, float16 or bfloat16), got {q.dtype}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q/k/v: expected [T, heads, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k: shape {tuple(k.shape)} is incompatible with q shape {tuple(q.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: {k.shape[1]} kv heads do not divide {q.shape[1]} query heads (GQA)")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"k/v: dtypes {k.dtype}/{v.dtype} differ from q dtype {q.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected an int32 [B + 1] tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens: must start at 0, be non-decreasing and end at T={q.shape[0]}, got {cu[:4]}...{cu[-2:]}")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen: {max_seqlen} is smaller than the longest sequence ({longest})")


def _torch_varlen(q, k, v, cu_seqlens, causal, scale):
    # SDPA's CUDA kernels pick their vectorised (aligned) variants from strides and head dim alone: an input
    # starting off a 16-byte boundary crashes them with 'misaligned address' (pytorch/pytorch#183484)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    rep = q.shape[1] // k.shape[1]
    outs = []
    cu = cu_seqlens.tolist()
    for a, b in zip(cu, cu[1:]):
        if b == a:
            continue
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(rep, dim=0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(rep, dim=0)
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=causal, scale=scale)[0]
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim on CUDA, one table per kernel;
# bench/attention.py --sweep retunes them
FWD_CONFIG: dict[int, tuple[int, int, int, int]] = {128: (128, 128, 8, 3), 64: (128, 64, 4, 3)}
DKDV_CONFIG: dict[int, tuple[int, int, int, int]] = {128: (64, 128, 8, 3), 64: (64, 128, 8, 2)}
DQ_CONFIG: dict[int, tuple[int, int, int, int]] = {128: (128, 64, 8, 4), 64: (128, 64, 8, 3)}
_INTERPRETER_CONFIG = (16, 16, 4, 1)


def _precision(q: torch.Tensor) -> str:
    """``tl.dot`` input precision: full fp32 for fp32 inputs (not TF32), the tensor-core default otherwise."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _config(table: dict[int, tuple[int, int, int, int]], q: torch.Tensor) -> tuple[int, int, int, int]:
    if q.device.type != "cuda":
        return _INTERPRETER_CONFIG
    return table.get(q.shape[-1], table[64])


def _desc(t: torch.Tensor, rows: int):
    """Tensor descriptor over the [T, heads * D] view of a contiguous [T, heads, D] tensor: tiles of one head's
    ``rows`` x D elements."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, H, D = t.shape
    return TensorDescriptor(t.view(T, H * D), [T, H * D], [H * D, 1], [rows, D])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (tensor descriptors need both); copies only when needed."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, causal, scale):
        from k15sys.kernels.varlen_attention import _fwd_kernel

        T, HQ, D = q.shape
        group = HQ // k.shape[1]
        o = torch.empty_like(q)
        lse = torch.empty(T, HQ, dtype=torch.float32, device=q.device)
        bm, bn, warps, stages = _config(FWD_CONFIG, q)
        grid = (triton_cdiv(max_seqlen, bm), (cu.numel() - 1) * HQ)
        _fwd_kernel[grid](_desc(q, bm), _desc(k, bn), _desc(v, bn), o, lse, cu, scale * _LOG2E, HQ, o.stride(0),
                          o.stride(1), GROUP=group, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=D, PREC=_precision(q),
                          num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.cfg = (max_seqlen, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        return (*_backward(q, k, v, o, lse, _aligned(do), cu, *ctx.cfg), None, None, None, None)


def _backward(q, k, v, o, lse, do, cu, max_seqlen: int, causal: bool, scale: float):
    """dq, dk, dv: delta = rowsum(dO * O) first, then the dK/dV kernel and the dQ kernel (which recomputes QKᵀ
    and dP: on the H200 that beat adding dQ from the dK/dV kernel, see docs/attention.md)."""
    from k15sys.kernels.varlen_attention import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_pre_kernel

    T, HQ, D = q.shape
    HKV = k.shape[1]
    group = HQ // HKV
    delta = torch.empty(T, HQ, dtype=torch.float32, device=q.device)
    pre = 64 if q.device.type == "cuda" else 16
    _bwd_pre_kernel[(triton_cdiv(T * HQ, pre),)](o, do, delta, T, HQ, o.stride(0), o.stride(1), BLOCK=pre, D=D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    nb = cu.numel() - 1
    bm, bn, warps, stages = _config(DKDV_CONFIG, q)
    _bwd_dkdv_kernel[(triton_cdiv(max_seqlen, bn), nb * HKV)](
        _desc(q, bm), k, v, _desc(do, bm), lse, delta, dk, dv, cu, scale * _LOG2E, scale, HQ, HKV,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        GROUP=group, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=D, PREC=_precision(q), num_warps=warps,
        num_stages=stages)
    bm, bn, warps, stages = _config(DQ_CONFIG, q)
    _bwd_dq_kernel[(triton_cdiv(max_seqlen, bm), nb * HQ)](
        q, _desc(k, bn), _desc(v, bn), do, lse, delta, dq, cu, scale * _LOG2E, scale, HQ,
        q.stride(0), q.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        GROUP=group, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=D, PREC=_precision(q), num_warps=warps,
        num_stages=stages)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of every packed sequence with itself only.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0.
        cu_seqlens: int32 [B + 1] offsets of the sequences in the packed dimension (0 ... T).
        max_seqlen: the longest sequence length (an upper bound is fine).
        causal: causal mask inside each sequence.
        softmax_scale: default 1/sqrt(D).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        [T, Hq, D] in q's dtype; differentiable w.r.t. q, k and v.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen)
    backend = pick_backend(backend, q.device)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if backend == "torch":
        return _torch_varlen(q, k, v, cu_seqlens, causal, scale)
    D = q.shape[-1]
    if D > 128:
        raise ValueError(f"q: head dim {D} is not supported by the triton backend (at most 128; or backend='torch')")
    padded = max(16, 1 << (D - 1).bit_length())  # zero dims change no score and give zero outputs
    if padded != D:
        q, k, v = (torch.nn.functional.pad(x, (0, padded - D)) for x in (q, k, v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out = _VarlenAttention.apply(_aligned(q), _aligned(k), _aligned(v), cu, int(max_seqlen), causal, scale)
    return out[..., :D] if padded != D else out
