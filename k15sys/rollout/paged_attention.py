"""Decode attention over a paged KV cache (the rollout engine's inner loop, paper 2.6.2).

``paged_decode_attention`` attends one query token per sequence to the sequence's cached keys / values,
read through its block table (see ``k15sys.kernels.paged_attention`` for the layout); in a decode step it
can also take the newest token's key / value, rotate q and that key, and file them in the cache itself
(``new_kv`` / ``rotary``). Backends:
``"triton"`` (flash-decoding kernel, CUDA or ``TRITON_INTERPRET=1``), ``"torch"`` (gathers the pages and
runs plain attention: the CPU path and the reference), ``"auto"`` (triton on CUDA).
"""
from __future__ import annotations

import torch

from k15sys.ops.backend import Backend, pick_backend

_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 512


def _torch_paged(q, k_cache, v_cache, block_tables, seq_lens, scale):
    B, HQ, D = q.shape
    page, HKV = k_cache.shape[1], k_cache.shape[2]
    width = -(-int(seq_lens.max()) // page)
    bt = block_tables[:, :width].long()
    k = k_cache[bt].reshape(B, width * page, HKV, D).float()
    v = v_cache[bt].reshape(B, width * page, HKV, D).float()
    qg = q.float().view(B, HKV, HQ // HKV, D)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, k) * scale
    pad = torch.arange(width * page, device=q.device)[None, :] >= seq_lens[:, None]
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, dim=-1), v)
    return o.reshape(B, HQ, D).to(q.dtype)


def _file_newest(q, new_kv, rotary, k_cache, v_cache, block_tables, seq_lens) -> torch.Tensor:
    """The torch backend's ``new_kv`` / ``rotary``: rotate q and the new key, write the new key / value into their
    cache slots; returns the rotated q."""
    k, v = new_kv
    pos = seq_lens.long() - 1
    if rotary is not None:
        cos, sin = (t[pos][:, None, :].float() for t in rotary)
        half = q.shape[-1] // 2

        def rot(x):
            xf = x.float()
            return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), -1) * sin).to(x.dtype)

        q, k = rot(q), rot(k)
    page = k_cache.shape[1]
    pages = block_tables.gather(1, (pos // page)[:, None]).squeeze(1).long()
    k_cache[pages, pos % page] = k.to(k_cache.dtype)
    v_cache[pages, pos % page] = v.to(v_cache.dtype)
    return q


def decode_launch_config(device: torch.device, programs: int) -> dict:
    """Tile and launch parameters of the decode kernel for a grid of ``programs`` (sequence, kv head, split)
    programs: tokens per block, whether the next block's loads are issued before this block's arithmetic,
    warps, pipeline stages. With fewer programs than SMs each program's latency is the step's: 128-token
    blocks, 8 warps, loads issued a block ahead; otherwise 64-token blocks and 4 warps. (H200, graph-timed per
    layer: batch 64 at 512 tokens, 128 programs: 14.1 us vs 18.4; batch 256 at 512 and batch 64 at 8k in 4
    splits, 512 programs: the 64-token / 4-warp tile was the fastest of seven, 3.4 and 4.0 TB/s.)"""
    if device.type != "cuda":  # the interpreter: tiny test grids take both variants
        return {"BLOCK_N": 16, "PREFETCH": programs < 16, "num_warps": 4, "num_stages": 2}
    if programs < torch.cuda.get_device_properties(device).multi_processor_count:
        return {"BLOCK_N": 128, "PREFETCH": True, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "PREFETCH": False, "num_warps": 4, "num_stages": 2}


def default_splits(batch: int, kv_heads: int, device: torch.device, context: int | None = None) -> int:
    """Splits of the context per (sequence, kv head): enough programs to fill the GPU about three times, but no
    split shorter than ``_MIN_SPLIT_TOKENS`` of a ``context``-token sequence (one split needs no merge kernel;
    on an H200 one split was fastest at batch 256 up to 8k tokens, and at batch 64 up to ~512)."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-3 * sms // max(1, batch * kv_heads))
    if context is not None:
        want = min(want, -(-context // _MIN_SPLIT_TOKENS))
    return min(64, 1 << max(0, want - 1).bit_length())


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    splits: int | None = None,
    backend: Backend = "auto",
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context (GQA).

    Args:
        q: ``[B, Hq, D]``, the query of each sequence's newest token.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` with ``Hq % Hkv == 0``.
        block_tables: int32 ``[B, max_pages]``: the pages of each sequence, in order.
        seq_lens: int32 ``[B]``: tokens of each sequence in the cache (the new one included), >= 1.
        softmax_scale: default ``1/sqrt(D)``.
        splits: context splits per (sequence, kv head) for the triton kernel (a power of two; default
            from the batch size and the GPU). Checked cheaply: no host sync, so CUDA graphs can capture it.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        new_kv: ``(k, v)``, each ``[B, Hkv, D]``: the newest token's key and value (position ``seq_lens - 1``),
            written into its cache slot (through ``block_tables``) by this call; the cache then holds only
            the older tokens on entry. Without it the cache holds all ``seq_lens`` tokens.
        rotary: ``(cos, sin)`` tables ``[positions, D]`` (rotate-half convention, as transformers' Llama /
            Qwen2): q and the new key are rotated at position ``seq_lens - 1`` first (needs ``new_kv`` and
            an even D). Rounding as a separate rotary pass: fp32 arithmetic, rounded to the input dtype.

    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q/k_cache/v_cache: expected [B, Hq, D] and two equal [pages, page_size, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, HQ, D = q.shape
    HKV = k_cache.shape[2]
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache/v_cache: the head dim must be contiguous and both caches laid out alike")
    if k_cache.shape[3] != D or HQ % HKV != 0:
        raise ValueError(f"k_cache: shape {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} (head dim, GQA groups)")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables/seq_lens: expected [B, max_pages] and [B] for B={B}, got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    if rotary is not None and (new_kv is None or D % 2):
        raise ValueError("rotary: needs new_kv and an even head dim")
    if new_kv is not None and (new_kv[0].shape != (B, HKV, D) or new_kv[1].shape != (B, HKV, D)):
        raise ValueError(f"new_kv: expected two [B, Hkv, D] = {(B, HKV, D)} tensors, got "
                         f"{tuple(new_kv[0].shape)}, {tuple(new_kv[1].shape)}")
    backend = pick_backend(backend, q.device)
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    if backend == "torch":
        if new_kv is not None:
            q = _file_newest(q, new_kv, rotary, k_cache, v_cache, block_tables, seq_lens)
        return _torch_paged(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if D > 256:
        raise ValueError(f"q: head dim {D} is not supported by the triton backend (at most 256; or backend='torch')")
    splits = splits if splits is not None else default_splits(B, HKV, q.device)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits: must be a power of two >= 1, got {splits}")
    from k15sys.kernels.paged_attention import _combine_kernel, _paged_decode_kernel

    group = HQ // HKV
    d_pad = max(16, 1 << (D - 1).bit_length())
    page = k_cache.shape[1]
    config = decode_launch_config(q.device, B * HKV * splits)
    if q.stride(2) != 1:  # a strided view (the q columns of the fused q/k/v GEMM) is read in place
        q = q.contiguous()
    out = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    final = splits == 1
    if final:  # one split: the kernel writes the output, no partials to merge
        o_part, lse_part = out[:, :, None], out
    else:
        o_part = torch.empty(B, HQ, splits, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, HQ, splits, dtype=torch.float32, device=q.device)
    kn, vn = new_kv if new_kv is not None else (q, q)
    cos, sin = rotary if rotary is not None else (q[0], q[0])
    if kn.stride(2) != 1 or vn.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("new_kv/rotary: the head dim must be contiguous and cos / sin laid out alike")
    _paged_decode_kernel[(B, HKV, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse_part, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        kn, vn, cos, sin, kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), cos.stride(0),
        GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), PAGE=page, D=D, D_PAD=d_pad,
        IEEE=q.dtype == torch.float32, FINAL=final, NEW_KV=new_kv is not None, ROPE=rotary is not None, **config)
    if not final:
        _combine_kernel[(B * HQ,)](o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                   out.stride(0), out.stride(1), HQ, SPLITS=splits, D=D, D_PAD=d_pad, num_warps=4)
    return out
