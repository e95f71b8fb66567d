"""Fused hidden states -> per-token log-probs / entropy / loss (paper 2.6.3, training efficiency).

RL training needs ``log pi(y_t | y_<t)`` of the sampled tokens (and often the entropy), not the
logits: with a 152k vocabulary the fp32 logits of a 16k-token sequence alone are 10 GB. Here the LM
head is applied to ``chunk`` rows at a time (cuBLAS / torch matmul), and a row kernel turns the chunk
into statistics (forward) or, in place, into the gradient w.r.t. the logits (backward), which two more
matmuls turn into ``d hidden`` and ``d weight``. Peak extra memory is one ``[chunk, V]`` buffer in the
input dtype, never ``[T, V]`` and never fp32 softmax tensors.

Two entry points:

* :func:`fused_logprobs` -- differentiable (custom autograd Function) for any upstream gradient on the
  log-probs and on the entropy: forward = 1 matmul + stats, backward = 3 matmuls (logits recomputed).
* :func:`fused_logprob_loss` -- the loss ``sum_t c_t logp_t + e_t H_t`` with per-token coefficients
  known up front (for k1.5 these are ``pmd_seq_grad`` broadcast over each response's tokens): the
  gradient is produced during the forward, so forward + backward cost 3 matmuls, no recomputation.

Backends: ``"triton"`` runs the row kernels of ``k15sys.kernels.fused_logprobs`` (CUDA, or the CPU
interpreter when ``TRITON_INTERPRET=1``); ``"torch"`` runs the same chunked algorithm in plain torch
(fp32 math on one chunk); ``"auto"`` picks triton on CUDA and torch elsewhere. With ``chunk=0`` the
Triton backend computes the forward statistics with the buffer-free fused kernel instead (logit tiles
never leave the chip; no ``[chunk, V]`` buffer), for memory-critical no-grad passes.
Measurements and the design rationale: ``docs/fused_logprobs.md``.
"""
from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]

_DEFAULT_CHUNK_BYTES = 640 * 2**20  # budget for the [chunk, V] logits buffer


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter")
    return backend


def _chunk_rows(T: int, V: int, itemsize: int, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk: must be >= 1 (0 only for fused_logprobs' buffer-free forward), got {chunk}")
        return chunk
    rows = max(1, _DEFAULT_CHUNK_BYTES // max(1, V * itemsize))
    return min(T, 1 << (rows.bit_length() - 1)) if T > 0 else 1  # a power of two keeps GEMMs aligned


def _validate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"weight: hidden size {weight.shape[1]} does not match hidden's {hidden.shape[1]}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels: expected shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels: expected int32/int64, got {labels.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: expected float32/float16/bfloat16, got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if len({hidden.device, weight.device, labels.device}) != 1:
        raise ValueError(f"labels/weight: devices differ ({hidden.device}, {weight.device}, {labels.device})")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")


def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels: {int(bad.sum())} label(s) outside [0, {V}) that are not ignore_index={ignore_index}")


# ------------------------------------------------------------------ row operations (per backend)
def _rows_torch(logits, labels, lse, ent, lp, g_lp, g_ent, *, inv_temp, ignore_index, stats, grad) -> None:
    z = logits.float() * inv_temp
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if stats:
        lse_c = torch.logsumexp(z, dim=1)
        p = torch.exp(z - lse_c[:, None])
        ent_c = lse_c - (p * z).sum(dim=1)
        lse.copy_(lse_c)
        ent.copy_(torch.where(valid, ent_c, 0.0))
        lp.copy_(torch.where(valid, z.gather(1, safe[:, None]).squeeze(1) - lse_c, 0.0))
    if grad:
        lse_c, ent_c = lse, ent
        p = torch.exp(z - lse_c[:, None])
        gl = torch.where(valid, g_lp.float(), 0.0)
        d = -gl[:, None] * p
        if g_ent is not None:
            ge = torch.where(valid, g_ent.float(), 0.0)
            d -= ge[:, None] * p * (z - lse_c[:, None] + ent_c[:, None])
        d.scatter_add_(1, safe[:, None], gl[:, None])
        logits.copy_(d * inv_temp)


def _rows_triton(logits, labels, lse, ent, lp, g_lp, g_ent, **kw) -> None:
    from k15sys.kernels.fused_logprobs import launch_rows

    launch_rows(logits, labels, lse, ent, lp, g_lp, g_ent, **kw)


_ROWS = {"torch": _rows_torch, "triton": _rows_triton}


# ------------------------------------------------------------------ chunk drivers
def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """The one [chunk, V] buffer every chunk's logits (then its gradient) are written into."""
    return torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def _forward_stats(hidden, weight, labels, *, inv_temp, ignore_index, backend, chunk, grads=None):
    """Log-probs, entropy and lse of every row; with ``grads=(g_lp, g_ent)`` also d hidden / d weight."""
    T, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    ent = torch.empty(T, dtype=torch.float32, device=dev)
    lp = torch.empty(T, dtype=torch.float32, device=dev)
    rows = _ROWS[backend]
    dh = dw = None
    if grads is not None:
        dh = torch.empty_like(hidden)
        dw = torch.empty_like(weight) if T else torch.zeros_like(weight)
    buf = _logits_buffer(hidden, weight, chunk)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        h = hidden[c0:c1]
        logits = torch.mm(h, weight.T, out=buf[: c1 - c0])
        g_lp = g_ent = None
        if grads is not None:
            g_lp = grads[0][c0:c1]
            g_ent = None if grads[1] is None else grads[1][c0:c1]
        rows(logits, labels[c0:c1], lse[c0:c1], ent[c0:c1], lp[c0:c1], g_lp, g_ent,
             inv_temp=inv_temp, ignore_index=ignore_index, stats=True, grad=grads is not None)
        if grads is not None:
            torch.mm(logits, weight, out=dh[c0:c1])
            _accumulate_dweight(dw, logits, h, first=c0 == 0)
    return lp, ent, lse, dh, dw


def _accumulate_dweight(dw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, *, first: bool) -> None:
    """``dw (+)= dlogits^T h``: the first chunk overwrites (no zero fill, no read of zeros)."""
    if first:
        torch.mm(dlogits.T, h, out=dw)
    else:
        dw.addmm_(dlogits.T, h)


def _stats(hidden, weight, labels, *, inv_temp, ignore_index, backend, chunk):
    """(log-probs, entropy, lse) of every row, no gradient.

    ``chunk == 0``: the buffer-free Triton kernel (logit tiles never leave the chip); otherwise the
    chunked path (cuBLAS logits chunk + row statistics), which is faster on an H100 (docs/fused_logprobs.md).
    """
    if chunk == 0:
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty, empty
        from k15sys.kernels.fused_logprobs import launch_stats, merge_partials

        part = launch_stats(hidden, weight, labels, inv_temp=inv_temp)
        lse, ent, lp = merge_partials(part, labels, ignore_index)
        return lp, ent, lse
    lp, ent, lse, _, _ = _forward_stats(hidden, weight, labels, inv_temp=inv_temp, ignore_index=ignore_index,
                                        backend=backend, chunk=chunk)
    return lp, ent, lse


def _backward(hidden, weight, labels, lse, ent, g_lp, g_ent, *, inv_temp, ignore_index, backend, chunk):
    T = hidden.shape[0]
    dh = torch.empty_like(hidden)
    dw = torch.empty_like(weight) if T else torch.zeros_like(weight)
    rows = _ROWS[backend]
    buf = _logits_buffer(hidden, weight, chunk)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        h = hidden[c0:c1]
        logits = torch.mm(h, weight.T, out=buf[: c1 - c0])
        rows(logits, labels[c0:c1], lse[c0:c1], ent[c0:c1], None, g_lp[c0:c1],
             None if g_ent is None else g_ent[c0:c1],
             inv_temp=inv_temp, ignore_index=ignore_index, stats=False, grad=True)
        torch.mm(logits, weight, out=dh[c0:c1])
        _accumulate_dweight(dw, logits, h, first=c0 == 0)
    return dh, dw


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temp, ignore_index, backend, fwd_chunk, chunk):
        lp, ent, lse = _stats(hidden, weight, labels, inv_temp=inv_temp, ignore_index=ignore_index,
                              backend=backend, chunk=fwd_chunk)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.cfg = (inv_temp, ignore_index, backend, chunk)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, backend, chunk = ctx.cfg
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        dh, dw = _backward(hidden, weight, labels, lse, ent, g_lp.contiguous(),
                           None if g_ent is None else g_ent.contiguous(),
                           inv_temp=inv_temp, ignore_index=ignore_index, backend=backend, chunk=chunk)
        return (dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: Backend = "auto",
    chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[label]`` without materialising [T, V].

    Args:
        hidden: [T, H] final hidden states (fp32, fp16 or bf16).
        weight: [V, H] LM-head weight, same dtype and device.
        labels: [T] int token ids; rows equal to ``ignore_index`` give log-prob 0, entropy 0 and no gradient.
        temperature: the sampling temperature of the rollout (divides the logits).
        return_entropy: also return the per-token entropy of the tempered distribution.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).
        chunk: rows per LM-head chunk; default: the largest power of two whose logits fit in 640 MiB.
            Larger chunks mean fewer read-modify-writes of d weight (one per chunk). ``0`` (Triton backend
            only): the forward statistics come from the buffer-free fused kernel (no logits buffer at all,
            for memory-critical no-grad passes; 1.03-1.15x slower than the chunked forward on an H100),
            and a backward, if any, uses the default chunk.

    Returns:
        fp32 ``logprobs[T]`` (and fp32 ``entropy[T]``), differentiable w.r.t. ``hidden`` and ``weight``.
    """
    _validate(hidden, weight, labels, temperature)
    _check_label_range(labels, weight.shape[0], ignore_index)
    be = _pick_backend(backend, hidden.device)
    if chunk == 0 and be != "triton":
        raise ValueError(f"chunk: 0 (buffer-free forward) needs the triton backend, got backend {be!r}")
    n = _chunk_rows(hidden.shape[0], weight.shape[0], hidden.element_size(), None if chunk == 0 else chunk)
    lp, ent = _FusedLogprobs.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                                   1.0 / temperature, ignore_index, be, 0 if chunk == 0 else n, n)
    return (lp, ent) if return_entropy else lp


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, lp_coef, ent_coef, inv_temp, ignore_index, backend, chunk):
        lp, ent, _, dh, dw = _forward_stats(hidden, weight, labels, inv_temp=inv_temp, ignore_index=ignore_index,
                                            backend=backend, chunk=chunk, grads=(lp_coef, ent_coef))
        loss = (lp * lp_coef).sum()
        if ent_coef is not None:
            loss = loss + (ent * ent_coef).sum()
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(lp, ent)
        return loss, lp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_lp, _g_ent):
        dh, dw = ctx.saved_tensors
        if bool(g_loss != 1):  # the usual loss.backward() passes 1: hand out the saved gradients, no copy
            dh, dw = dh * g_loss.to(dh.dtype), dw * g_loss.to(dw.dtype)
        return (dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None)


def fused_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lp_coef: torch.Tensor,
    ent_coef: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: Backend = "auto",
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loss = sum_t lp_coef[t] * logprob[t] + ent_coef[t] * entropy[t]``, gradient computed in the forward.

    For the k1.5 loss (paper 2.3.2) pass ``lp_coef[t] = pmd_seq_grad(...)[seq(t)]`` on response tokens
    (the sequence's ``dL/dlogp`` broadcast to its tokens): ``loss.backward()`` then yields exactly the
    gradient of ``pmd_loss`` w.r.t. hidden and weight, with one pass over the vocabulary fewer than
    :func:`fused_logprobs` + autograd. Coefficients are constants (no gradient flows into them).

    Returns:
        ``(loss, logprobs, entropy)``: ``loss`` is a differentiable scalar; ``logprobs``/``entropy`` are
        detached fp32 [T] tensors (for metrics and the KL estimate).
    """
    _validate(hidden, weight, labels, temperature)
    _check_label_range(labels, weight.shape[0], ignore_index)
    T = hidden.shape[0]
    for name, c in (("lp_coef", lp_coef), ("ent_coef", ent_coef)):
        if c is not None and (c.shape != (T,) or c.device != hidden.device):
            raise ValueError(f"{name}: expected shape ({T},) on {hidden.device}, got {tuple(c.shape)} on {c.device}")
        if c is not None and not bool(torch.isfinite(c).all()):
            raise ValueError(f"{name}: contains NaN/inf")
    be = _pick_backend(backend, hidden.device)
    n = _chunk_rows(T, weight.shape[0], hidden.element_size(), chunk)
    return _FusedLoss.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                            lp_coef.detach().float().contiguous(),
                            None if ent_coef is None else ent_coef.detach().float().contiguous(),
                            1.0 / temperature, ignore_index, be, n)
