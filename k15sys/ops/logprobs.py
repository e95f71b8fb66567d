"""Fused hidden states -> per-token log-probs / entropy / loss (paper 2.6.3, training efficiency).

RL training needs ``log pi(y_t | y_<t)`` of the sampled tokens (and often the entropy), not the
logits: with a 152k vocabulary the fp32 logits of a 16k-token sequence alone are 10 GB. Here the LM
head is applied one logits tile at a time (cuBLAS / torch matmul into one reused buffer of about 640 MiB
in the input dtype), and a row kernel turns the tile into statistics (forward) or, in place, into the
gradient w.r.t. the logits (backward), which two more matmuls turn into ``d hidden`` and ``d weight``.
Never ``[T, V]``, never fp32 softmax tensors.

Two entry points:

* :func:`fused_logprobs` -- differentiable (custom autograd Function) for any upstream gradient on the
  log-probs and on the entropy. Tiles are ``[rows, vocab columns]``: the forward merges each row's partial
  statistics over the vocabulary chunks; the backward recomputes the logits tile by tile (except the
  forward's last tile, still in the buffer), writes ``d weight`` of a vocabulary chunk in one GEMM over the
  whole row block and accumulates ``d hidden`` in fp32. 4 matmuls minus the kept tile.
* :func:`fused_logprob_loss` -- the loss ``sum_t c_t logp_t + e_t H_t`` with per-token coefficients
  known up front (for k1.5 these are ``pmd_seq_grad`` broadcast over each response's tokens): the
  gradient is produced during the forward from ``[chunk, V]`` row chunks, so forward + backward cost 3
  matmuls, no recomputation.

Backends: ``"triton"`` runs the row kernels of ``k15sys.kernels.fused_logprobs`` (CUDA, or the CPU
interpreter when ``TRITON_INTERPRET=1``); ``"torch"`` runs the same tiled algorithm in plain torch
(fp32 math on one tile); ``"auto"`` picks triton on CUDA and torch elsewhere. With ``chunk=0`` the
Triton backend computes the forward statistics with the buffer-free fused kernel instead (logit tiles
never leave the chip; no buffer), for memory-critical no-grad passes.
Measurements and the design rationale: ``docs/fused_logprobs.md``.
"""
from __future__ import annotations

import torch

from k15sys.ops.backend import Backend, pick_backend


_DEFAULT_CHUNK_BYTES = 640 * 2**20  # budget for the [chunk, V] logits buffer


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
def _rows_torch(logits, labels, lse, ent, lp, g_lp, g_ent, *, inv_temp, ignore_index, stats, grad, col0=0,
                part=None) -> None:
    z = logits.float() * inv_temp
    valid = labels != ignore_index
    local = labels.long() - col0
    inside = valid & (local >= 0) & (local < z.shape[1])
    safe = torch.where(inside, local, torch.zeros_like(local))
    if stats and part is not None:  # this chunk's (m, s, t, z_label), see merge_partials
        m = z.max(dim=1).values
        e = torch.exp(z - m[:, None])
        part[0].copy_(m)
        part[1].copy_(e.sum(dim=1))
        part[2].copy_((e * z).sum(dim=1))
        part[3].copy_(torch.where(inside, z.gather(1, safe[:, None]).squeeze(1), 0.0))
        return
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
        d.scatter_add_(1, safe[:, None], torch.where(inside, gl, 0.0)[:, None])
        logits.copy_(d * inv_temp)


def _rows_triton(logits, labels, lse, ent, lp, g_lp, g_ent, **kw) -> None:
    from k15sys.kernels.fused_logprobs import launch_rows

    launch_rows(logits, labels, lse, ent, lp, g_lp, g_ent, **kw)


_ROWS = {"torch": _rows_torch, "triton": _rows_triton}


# ------------------------------------------------------------------ the fused loss: row chunks, gradient in the forward
def _loss_forward(hidden, weight, labels, lp_coef, ent_coef, *, inv_temp, ignore_index, backend, chunk):
    """Log-probs, entropy, d hidden and d weight of ``sum lp_coef * logprob + ent_coef * entropy``: per
    ``[chunk, V]`` row chunk one GEMM, one row pass (statistics, then the gradient in place), two GEMMs."""
    T, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    ent = torch.empty(T, dtype=torch.float32, device=dev)
    lp = torch.empty(T, dtype=torch.float32, device=dev)
    dh = torch.empty_like(hidden)
    dw = torch.empty_like(weight) if T else torch.zeros_like(weight)
    buf = torch.empty(min(chunk, T), V, dtype=hidden.dtype, device=dev)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        h = hidden[c0:c1]
        logits = torch.mm(h, weight.T, out=buf[: c1 - c0])
        _ROWS[backend](logits, labels[c0:c1], lse[c0:c1], ent[c0:c1], lp[c0:c1], lp_coef[c0:c1],
                       None if ent_coef is None else ent_coef[c0:c1], inv_temp=inv_temp, ignore_index=ignore_index,
                       stats=True, grad=True)
        torch.mm(logits, weight, out=dh[c0:c1])
        if c0 == 0:  # the first chunk writes d weight (no zero fill), the others accumulate
            torch.mm(logits.T, h, out=dw)
        else:
            dw.addmm_(logits.T, h)
    return lp, ent, dh, dw


# ------------------------------------------------------------------ the autograd path: [rows, vocab columns] tiles
def merge_partials(part: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(lse, entropy, logprob) [T] fp32 from per-chunk statistics ``part`` = fp32 [4, NCHUNK, T] holding each
    vocabulary chunk's row max ``m``, ``s = sum e^(z-m)``, ``t = sum e^(z-m) z`` and the label's logit (0 where
    the label lies outside the chunk)."""
    m, s, t, z_label = part
    mx = m.max(dim=0).values
    w = torch.exp(m - mx)
    s_tot = (s * w).sum(0)
    lse = mx + torch.log(s_tot)
    ent = lse - (t * w).sum(0) / s_tot
    valid = labels != ignore_index
    lp = z_label.sum(0) - lse
    return lse, torch.where(valid, ent, 0.0), torch.where(valid, lp, 0.0)


_ACC_BYTES = 256 * 2**20  # the fp32 d hidden accumulator of one row block


def _tiling(T: int, V: int, H: int, itemsize: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    """(rows, cols) of the [rows, cols] logits tile of the autograd path.

    Rows: as many as the fp32 ``d hidden`` accumulator of a row block fits in 256 MiB (all of T up to
    T = 16384 at H = 4096), so ``d weight`` is written once per vocabulary chunk with the whole row block as
    the GEMM's K. Columns: the 640 MiB logits budget over those rows, a multiple of 128 (aligned GEMMs)."""
    if rows is None:
        r = max(1, _ACC_BYTES // max(1, 4 * H))
        rows = min(max(T, 1), 1 << (r.bit_length() - 1))
    if cols is None:
        c = _DEFAULT_CHUNK_BYTES // max(1, rows * itemsize)
        cols = max(1, min(V, max(128, c // 128 * 128)))
    if rows < 1 or cols < 1:
        raise ValueError(f"chunk/vocab_chunk: must be >= 1, got {rows}/{cols}")
    return rows, cols


def _tiles(T: int, V: int, rows: int, cols: int):
    """(t0, t1, v0, v1, vocabulary chunk index) in forward order: row blocks outer, vocabulary chunks inner."""
    for t0 in range(0, T, rows):
        for j, v0 in enumerate(range(0, V, cols)):
            yield t0, min(T, t0 + rows), v0, min(V, v0 + cols), j


def _tile_view(flat: torch.Tensor, r: int, c: int) -> torch.Tensor:
    return flat[: r * c].view(r, c)  # contiguous [r, c], whatever the tile's width


def _tiled_stats(hidden, weight, labels, *, inv_temp, ignore_index, backend, rows, cols, keep_last):
    """(logprob, entropy, lse, logits buffer or None): every [rows, cols] logits tile by cuBLAS, its partial
    row statistics by the row kernel, merged over the vocabulary chunks at the end. With ``keep_last`` the
    buffer is returned: it still holds the last tile's logits."""
    T, V = hidden.shape[0], weight.shape[0]
    part = torch.empty(4, -(-V // cols), T, dtype=torch.float32, device=hidden.device)
    flat = torch.empty(min(rows, T) * min(cols, V), dtype=hidden.dtype, device=hidden.device)
    for t0, t1, v0, v1, j in _tiles(T, V, rows, cols):
        logits = torch.mm(hidden[t0:t1], weight[v0:v1].T, out=_tile_view(flat, t1 - t0, v1 - v0))
        _ROWS[backend](logits, labels[t0:t1], None, None, None, None, None, inv_temp=inv_temp,
                       ignore_index=ignore_index, stats=True, grad=False, col0=v0, part=part[:, j, t0:t1])
    lse, ent, lp = merge_partials(part, labels, ignore_index)
    return lp, ent, lse, (flat if keep_last else None)


class _Fp32Acc:
    """``acc (+)= a @ b`` in fp32 for 16-bit ``a``, ``b``: cuBLAS writes fp32 straight (``out_dtype``) where
    torch supports it; elsewhere (CPU, older torch) the product is upcast before the add."""

    native = True

    @classmethod
    def mm(cls, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
        if a.dtype == torch.float32:
            torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
            return
        if cls.native and a.is_cuda:
            try:
                if first:
                    torch.mm(a, b, out_dtype=torch.float32, out=acc)
                else:
                    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except (RuntimeError, TypeError):
                cls.native = False
        prod = torch.mm(a, b).float()
        acc.copy_(prod) if first else acc.add_(prod)


def _tiled_backward(hidden, weight, labels, lse, ent, g_lp, g_ent, held, *, inv_temp, ignore_index, backend,
                    rows, cols, need_dh, need_dw):
    """d hidden, d weight, tile by tile in the reverse of the forward's order, so the first tile is the one
    whose logits the forward's buffer ``held`` still holds (no recomputation for it). Per vocabulary chunk ``d weight`` is
    written once per row block (``dlogits^T h``, K = the row block) and ``d hidden`` accumulates in fp32."""
    T, H = hidden.shape
    V = weight.shape[0]
    dh = torch.empty_like(hidden) if need_dh else None
    dw = (torch.empty_like(weight) if T else torch.zeros_like(weight)) if need_dw else None
    if T == 0:
        return dh, dw
    acc = torch.empty(min(rows, T), H, dtype=torch.float32, device=hidden.device) if need_dh else None
    flat = held if held is not None else torch.empty(min(rows, T) * min(cols, V), dtype=hidden.dtype,
                                                     device=hidden.device)
    last_t0 = (T - 1) // rows * rows
    for n, (t0, t1, v0, v1, _) in enumerate(reversed(list(_tiles(T, V, rows, cols)))):
        h = hidden[t0:t1]
        if n == 0 and held is not None:
            logits = _tile_view(flat, t1 - t0, v1 - v0)
        else:
            logits = torch.mm(h, weight[v0:v1].T, out=_tile_view(flat, t1 - t0, v1 - v0))
        _ROWS[backend](logits, labels[t0:t1], lse[t0:t1], ent[t0:t1], None, g_lp[t0:t1],
                       None if g_ent is None else g_ent[t0:t1], inv_temp=inv_temp, ignore_index=ignore_index,
                       stats=False, grad=True, col0=v0)
        if need_dw:  # the last row block comes first: it writes, the others accumulate
            if t0 == last_t0:
                torch.mm(logits.T, h, out=dw[v0:v1])
            else:
                dw[v0:v1].addmm_(logits.T, h)
        if need_dh:  # a row block's chunks come last-first: the last chunk writes the accumulator
            _Fp32Acc.mm(acc[: t1 - t0], logits, weight[v0:v1], first=v1 == V)
            if v0 == 0:
                dh[t0:t1].copy_(acc[: t1 - t0])
    return dh, dw


def _stats(hidden, weight, labels, *, inv_temp, ignore_index, backend, rows, cols, keep_last):
    """(log-probs, entropy, lse, logits buffer holding the last tile, or None) of every row.

    ``rows == 0``: the buffer-free Triton kernel (logit tiles never leave the chip); otherwise the tiled
    path (cuBLAS logits tile + row statistics), which is faster (docs/fused_logprobs.md).
    """
    if rows == 0:
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty, empty, None
        from k15sys.kernels.fused_logprobs import launch_stats

        part = launch_stats(hidden, weight, labels, inv_temp=inv_temp)
        lse, ent, lp = merge_partials(part, labels, ignore_index)
        return lp, ent, lse, None
    return _tiled_stats(hidden, weight, labels, inv_temp=inv_temp, ignore_index=ignore_index, backend=backend,
                        rows=rows, cols=cols, keep_last=keep_last)


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temp, ignore_index, backend, fwd_rows, rows, cols, keep):
        lp, ent, lse, held = _stats(hidden, weight, labels, inv_temp=inv_temp, ignore_index=ignore_index,
                                    backend=backend, rows=fwd_rows, cols=cols, keep_last=keep)
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.held = held  # the logits buffer, holding the last tile (freed with the graph, or by the backward)
        ctx.cfg = (inv_temp, ignore_index, backend, rows, cols)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, backend, rows, cols = ctx.cfg
        held, ctx.held = ctx.held, None
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        dh, dw = _tiled_backward(hidden, weight, labels, lse, ent, g_lp.contiguous(),
                                 None if g_ent is None else g_ent.contiguous(), held, inv_temp=inv_temp,
                                 ignore_index=ignore_index, backend=backend, rows=rows, cols=cols,
                                 need_dh=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None, None, None, None, None


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
    vocab_chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[label]`` without materialising [T, V].

    The logits are computed in ``[chunk, vocab_chunk]`` tiles into one reused buffer (about 640 MiB); the
    backward recomputes them tile by tile, except the forward's last tile, which is kept for it: when a
    gradient is needed, the buffer lives from the forward until the backward starts (or the graph is freed).

    Args:
        hidden: [T, H] final hidden states (fp32, fp16 or bf16).
        weight: [V, H] LM-head weight, same dtype and device.
        labels: [T] int token ids; rows equal to ``ignore_index`` give log-prob 0, entropy 0 and no gradient.
        temperature: the sampling temperature of the rollout (divides the logits).
        return_entropy: also return the per-token entropy of the tempered distribution.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).
        chunk: rows per logits tile; default: as many as a 256 MiB fp32 ``d hidden`` accumulator holds (all of
            T up to 65536 / H). ``0`` (Triton backend only): the forward statistics come from the buffer-free
            fused kernel (no logits buffer at all, for memory-critical no-grad passes), and a backward, if any,
            uses the default tiles.
        vocab_chunk: vocabulary columns per logits tile; default: a multiple of 128 that fills 640 MiB.

    Returns:
        fp32 ``logprobs[T]`` (and fp32 ``entropy[T]``), differentiable w.r.t. ``hidden`` and ``weight``.
    """
    _validate(hidden, weight, labels, temperature)
    _check_label_range(labels, weight.shape[0], ignore_index)
    be = pick_backend(backend, hidden.device)
    if chunk == 0 and be != "triton":
        raise ValueError(f"chunk: 0 (buffer-free forward) needs the triton backend, got backend {be!r}")
    for name, val in (("chunk", chunk), ("vocab_chunk", vocab_chunk)):
        if val is not None and val < (0 if name == "chunk" else 1):
            raise ValueError(f"{name}: must be >= 1 (chunk 0: buffer-free forward), got {val}")
    T, H = hidden.shape
    rows, cols = _tiling(T, weight.shape[0], H, hidden.element_size(), None if chunk == 0 else chunk, vocab_chunk)
    keep = chunk != 0 and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lp, ent = _FusedLogprobs.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                                   1.0 / temperature, ignore_index, be, 0 if chunk == 0 else rows, rows, cols, keep)
    return (lp, ent) if return_entropy else lp


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, lp_coef, ent_coef, inv_temp, ignore_index, backend, chunk):
        lp, ent, dh, dw = _loss_forward(hidden, weight, labels, lp_coef, ent_coef, inv_temp=inv_temp,
                                        ignore_index=ignore_index, backend=backend, chunk=chunk)
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
    be = pick_backend(backend, hidden.device)
    n = _chunk_rows(T, weight.shape[0], hidden.element_size(), chunk)
    return _FusedLoss.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                            lp_coef.detach().float().contiguous(),
                            None if ent_coef is None else ent_coef.detach().float().contiguous(),
                            1.0 / temperature, ignore_index, be, n)
