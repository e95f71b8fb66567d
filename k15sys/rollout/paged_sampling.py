"""Sampling of the rollout engine on the device: Gumbel-max over counter-based noise (paper 2.6.2 rollouts).

:func:`sample_tokens` draws each row's next token from ``softmax(logits / T)`` (temperature 0: the argmax)
and returns it with its log-prob under that distribution, in one pass over the logits and without a host
sync, so it runs inside the decode step's CUDA graph. The noise of row ``r`` at vocabulary index ``v`` is a
hash of ``(seeds[r], pos[r], v)`` (see ``k15sys.kernels.paged_sample``): a request's draws depend only on its
seed and positions, never on the batch it shared or on an RNG state. Backends: ``"triton"`` (the kernels),
``"torch"`` (the same arithmetic in torch ops: the CPU path and the reference). Top-k / top-p filtering is
:func:`sample_filtered` (torch, outside the graph; the same noise).
"""
from __future__ import annotations

import torch

from k15sys.ops.backend import Backend, pick_backend
from k15sys.rollout.torch_engine import _filtered_logprobs
from k15sys.rollout.types import SamplingParams

_M32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap, then are masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_seed(call_seed: int, index: int) -> int:
    """The 32-bit noise seed of request ``index`` of a call seeded with ``call_seed`` (splitmix64 of both)."""
    z = (call_seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _M32


def gumbel_noise(seeds: torch.Tensor, pos: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[n, vocab]`` float32 Gumbel(0, 1) noise of rows keyed by ``seeds`` / ``pos`` (the kernels' values)."""
    key = (pos.long() * 0x9E3779B9 + 0x7F4A7C15) & _M32
    key = _fmix32((seeds.long() + _fmix32(key)) & _M32)[:, None]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.long)[None, :]
    h = _fmix32(((idx * 0x85EBCA77) & _M32) ^ key)
    h = _fmix32((h + key) & _M32)
    u = ((h >> 8).float() + 0.5) * 2.0 ** -24
    return -torch.log(-torch.log(u))


def _chunks(rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary slices per row: about four programs per SM in all, each slice at least 4k entries."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = min(-(-4 * sms // max(1, rows)), max(1, vocab // 4096))
    return min(64, 1 << max(0, want - 1).bit_length())


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    pos: torch.Tensor,
    *,
    advance: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token of each row and its log-prob under the sampling distribution (untempered when greedy).

    Args:
        logits: ``[n, V]`` (any float dtype; the row stride may exceed V).
        temperature: float32 ``[n]``; 0 is greedy.
        seeds: int64 ``[n]`` row seeds (:func:`row_seed`), values in [0, 2^32).
        pos: int64 ``[n]``: the position each row's noise is keyed by (the input token's position).
        advance: ``(tokens, pos, start, out_tok, out_lp)`` buffers of a decode round (first n rows used):
            the token becomes the next step's input (``tokens[r]``), ``pos[r] += 1``, and the token and its
            log-prob go to column ``pos[r] - start[r]`` of ``out_tok`` / ``out_lp`` (nowhere when outside
            them). ``pos`` is then the round's ``pos`` buffer itself.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        tokens (int64 ``[n]``) and log-probs (float32 ``[n]``).
    """
    n, vocab = logits.shape
    backend = pick_backend(backend, logits.device)
    if backend == "torch":
        z = logits.float() / torch.where(temperature == 0, 1.0, temperature)[:, None]
        lp_all = torch.log_softmax(z, dim=-1)
        score = torch.where((temperature == 0)[:, None], z, z + gumbel_noise(seeds, pos, vocab))
        tok = score.argmax(-1)
        lp = lp_all.gather(-1, tok[:, None]).squeeze(-1)
        if advance is not None:
            _advance(advance, n, tok, lp)
        return tok, lp
    from k15sys.kernels.paged_sample import _sample_final_kernel, _sample_partial_kernel

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = _chunks(n, vocab, logits.device)
    part_f = torch.empty(n, chunks, 3, dtype=torch.float32, device=logits.device)
    part_i = torch.empty(n, chunks, dtype=torch.int32, device=logits.device)
    block = 2048 if logits.device.type == "cuda" else 64
    _sample_partial_kernel[(n, chunks)](logits, temperature, seeds, pos, part_f, part_i, vocab, logits.stride(0),
                                        CHUNKS=chunks, BLOCK=block, FAST=logits.device.type == "cuda",
                                        num_warps=8 if block >= 2048 else 4)
    tok = torch.empty(n, dtype=torch.long, device=logits.device)
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    if advance is None:
        _sample_final_kernel[(n,)](logits, temperature, part_f, part_i, tok, lp, logits.stride(0),
                                   tok, pos, pos, tok, lp, 0, 0, CHUNKS=chunks, ADVANCE=False, num_warps=1)
    else:
        tokens, cur, start, out_tok, out_lp = advance
        _sample_final_kernel[(n,)](logits, temperature, part_f, part_i, tok, lp, logits.stride(0),
                                   tokens, cur, start, out_tok, out_lp, out_tok.stride(0), out_tok.shape[1], CHUNKS=chunks,
                                   ADVANCE=True, num_warps=1)
    return tok, lp


def sample_filtered(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, pos: torch.Tensor, *,
                    advance: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_tokens` under ``params``' top-k / top-p filter (``params.temperature > 0``; torch ops)."""
    lp_all = _filtered_logprobs(logits, params)
    tok = (lp_all + gumbel_noise(seeds, pos, logits.shape[1])).argmax(-1)
    lp = lp_all.gather(-1, tok[:, None]).squeeze(-1)
    if advance is not None:
        _advance(advance, logits.shape[0], tok, lp)
    return tok, lp


def _advance(advance: tuple[torch.Tensor, ...], n: int, tok: torch.Tensor, lp: torch.Tensor) -> None:
    tokens, pos, start, out_tok, out_lp = advance
    col = (pos[:n] - start[:n])[:, None]
    inside = (col >= 0) & (col < out_tok.shape[1])
    col = col.clamp(0, out_tok.shape[1] - 1)
    out_tok[:n].scatter_(1, col, torch.where(inside, tok[:, None].to(out_tok.dtype), out_tok[:n].gather(1, col)))
    out_lp[:n].scatter_(1, col, torch.where(inside, lp[:, None], out_lp[:n].gather(1, col)))
    tokens[:n].copy_(tok)
    pos[:n] += 1
