"""``varlen_attention`` as a transformers attention implementation (paper 2.6.3, packed training).

After ``register()``, a Llama/Qwen2-family model built with ``attn_implementation="k15_varlen"`` trains on
packed batches: pass ``input_ids`` of shape [1, T] holding several sequences back to back and
``position_ids`` that restart at 0 at every sequence start; each sequence attends only to itself (causal),
with no padding and no [T, T] mask. Rows of a [B, S] batch are treated the same way (each row may itself
hold several packed sequences). Training / full-sequence forward only: a KV-cache decode step is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from k15sys.ops.attention import varlen_attention

NAME = "k15_varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence starts where the flattened position ids are 0 (every row starts a sequence)."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    B, S = pos.shape
    starts = (pos == 0)
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    cu = torch.cat([flat, torch.tensor([B * S], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _make_forward(backend: str):
    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        B, Hq, S, D = query.shape
        if key.shape[2] != S:
            raise ValueError(f"{NAME}: query length {S} != key length {key.shape[2]}: KV-cache decoding is not "
                             "supported by this implementation; generate with sdpa/eager")
        if dropout:
            raise ValueError(f"{NAME}: attention dropout is not supported (got {dropout})")
        if position_ids is None:
            position_ids = torch.arange(S, device=query.device).expand(B, S)
        cu, max_len = cu_seqlens_from_position_ids(position_ids.to(query.device))
        q = query.transpose(1, 2).reshape(B * S, Hq, D)
        k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
        out = varlen_attention(q, k, v, cu, max_len, causal=True, softmax_scale=scaling, backend=backend)
        return out.reshape(B, S, Hq, D), None

    return forward


def register(backend: str = "auto", name: str = NAME) -> str:
    """Register the implementation under ``name`` in transformers' attention registry; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, _make_forward(backend))
    return name
