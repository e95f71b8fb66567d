"""Causal attention over packed variable-length sequences (paper 2.6.3: long-context training).

k1.5 trains on packed batches of very different lengths; ``varlen_attention`` takes the packed
``[T, heads, D]`` tensors plus ``cu_seqlens`` (cumulative sequence starts, int32 ``[B + 1]``) and never
pads. GQA: ``Hq`` must be a multiple of ``Hkv``; query head h reads kv head ``h // (Hq // Hkv)``.

Backends: ``"torch"`` runs each sequence through ``scaled_dot_product_attention`` (the reference, any
device); ``"auto"`` picks it.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "torch"]


def _validate(q, k, v, cu_seqlens, max_seqlen) -> None:
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
        backend: ``"auto"`` | ``"torch"``.

    Returns:
        [T, Hq, D] in q's dtype; differentiable w.r.t. q, k and v.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen)
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend: expected 'auto' or 'torch', got {backend!r}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _torch_varlen(q, k, v, cu_seqlens, causal, scale)
