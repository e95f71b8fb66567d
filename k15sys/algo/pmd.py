"""Online policy mirror descent loss of Kimi k1.5 (paper section 2.3.2).

Iteration i uses the current policy as reference pi_i and solves
``max E[r] - tau * KL(pi_theta || pi_i)``, whose optimum is ``pi* = pi_i exp(r/tau) / Z``. The
surrogate the paper minimises, for the k samples y_1..y_k of one prompt x, is

    L(theta) = 1/k sum_j ( r_j - tau log Z - tau (log pi_theta(y_j|x) - log pi_i(y_j|x)) )^2

with ``tau log Z`` estimated by the group: ``baseline="mean"`` uses the mean reward r_bar (what the
paper uses), ``baseline="logmeanexp"`` the exact-sample estimate ``tau log(1/k sum_j exp(r_j/tau))``.
``log pi(y|x)`` is the sequence log-probability (sum over response tokens). There is no critic.

Gradient. Write ``delta_j = logp_j - ref_j`` and ``a_j = r_j - b``. Then

    dL/dlogp_j = -(2 tau / N) (a_j - tau delta_j)

so ``grad L = -(2 tau / N) sum_j [ a_j grad logp_j - (tau/2) grad delta_j^2 ]``: the paper's
gradient estimate (1/k) sum_j [ grad logp_j (r_j - r_bar) - tau/2 grad delta_j^2 ], summed over the
groups, scaled by ``-2 tau`` (a positive factor times the ascent direction, i.e. the same update
direction; fold ``1/(2 tau)`` into the learning rate to reproduce the paper's step exactly). The
baseline ``b`` is a constant of the rewards, so no gradient flows through it.
"""
from __future__ import annotations

from typing import Literal

import torch

from k15sys.algo._checks import as_1d, check_finite, check_group_size, check_same

Baseline = Literal["mean", "logmeanexp"]
TokenNorm = Literal["sum", "mean", "constant"]


def group_baseline(rewards: torch.Tensor, *, group_size: int, tau: float, baseline: Baseline = "mean") -> torch.Tensor:
    """Per-sample estimate of ``tau log Z`` (paper 2.3.2), broadcast back to every row of its group.

    ``"mean"``: the group's mean reward. ``"logmeanexp"``: ``tau * log(mean_j exp(r_j / tau))``.
    """
    r = as_1d("rewards", rewards)
    check_group_size(group_size, r.numel())
    _check_tau(tau)
    g = r.double().view(-1, group_size)
    if baseline == "mean":
        b = g.mean(dim=1)
    elif baseline == "logmeanexp":
        b = tau * (torch.logsumexp(g / tau, dim=1) - torch.log(torch.tensor(float(group_size), dtype=g.dtype)))
    else:
        raise ValueError(f"baseline: expected 'mean' or 'logmeanexp', got {baseline!r}")
    return b.repeat_interleave(group_size).to(r.dtype if r.is_floating_point() else torch.float32)


def pmd_loss(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    tau: float,
    baseline: Baseline = "mean",
) -> torch.Tensor:
    """The k1.5 surrogate loss on sequence log-probs (paper 2.3.2, the squared-error form).

    Args:
        seq_logp: [N] log pi_theta(y_j|x) (differentiable), N = number of prompts * group_size, the
            k samples of one prompt in consecutive rows.
        ref_seq_logp: [N] log pi_i(y_j|x) under the reference (rollout-time) policy; treated as constant.
        rewards: [N] rewards r_j (penalties already added).
        group_size: k, the samples per prompt.
        tau: the KL-regularisation strength, > 0.
        baseline: estimate of tau log Z: ``"mean"`` (paper default) or ``"logmeanexp"``.

    Returns:
        Scalar: mean over the N samples of ``(r_j - b - tau (seq_logp_j - ref_seq_logp_j))^2``.
    """
    seq_logp, ref, r = _validate(seq_logp, ref_seq_logp, rewards, group_size, tau)
    b = group_baseline(r, group_size=group_size, tau=tau, baseline=baseline).to(seq_logp.dtype)
    resid = r.to(seq_logp.dtype) - b - tau * (seq_logp - ref.detach().to(seq_logp.dtype))
    return resid.pow(2).mean()


def pmd_seq_grad(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    tau: float,
    baseline: Baseline = "mean",
) -> torch.Tensor:
    """``dL/dseq_logp`` of :func:`pmd_loss`, in closed form (no autograd): ``-(2 tau/N)(a_j - tau delta_j)``.

    Every response token of sequence j gets this coefficient on its ``grad log pi``; fused kernels use it
    to fold the loss into their backward pass (``k15sys.ops``).
    """
    seq_logp, ref, r = _validate(seq_logp, ref_seq_logp, rewards, group_size, tau)
    lp = seq_logp.detach().double()
    b = group_baseline(r, group_size=group_size, tau=tau, baseline=baseline).double()
    resid = r.double() - b - tau * (lp - ref.double())
    return (-2.0 * tau / lp.numel() * resid).to(torch.float32)


def sequence_logprobs(
    token_logp: torch.Tensor, response_mask: torch.Tensor, *, normalize: TokenNorm = "sum", max_len: int | None = None
) -> torch.Tensor:
    """Reduce per-token log-probs [B, L] over the response tokens to one value per sequence.

    ``"sum"`` is the paper's sequence log-prob. Documented deviations, for stability at long lengths:
    ``"mean"`` divides by each response's own length (length-normalised, biases towards long answers),
    ``"constant"`` divides by a fixed ``max_len`` (an unbiased rescaling of "sum", like scaling tau).
    """
    if token_logp.dim() != 2:
        raise ValueError(f"token_logp: expected [B, L], got shape {tuple(token_logp.shape)}")
    check_same(("token_logp", "response_mask"), (token_logp, response_mask))
    mask = response_mask.to(token_logp.dtype)
    total = (token_logp * mask).sum(dim=1)
    if normalize == "sum":
        return total
    if normalize == "mean":
        return total / mask.sum(dim=1).clamp_min(1.0)
    if normalize == "constant":
        if max_len is None or max_len < 1:
            raise ValueError(f"max_len: normalize='constant' needs a positive max_len, got {max_len!r}")
        return total / float(max_len)
    raise ValueError(f"normalize: expected 'sum', 'mean' or 'constant', got {normalize!r}")


def pmd_token_loss(
    token_logp: torch.Tensor,
    ref_token_logp: torch.Tensor,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    tau: float,
    baseline: Baseline = "mean",
    normalize: TokenNorm = "sum",
    max_len: int | None = None,
) -> torch.Tensor:
    """:func:`pmd_loss` from per-token log-probs [B, L] and a response mask [B, L] (1 on response tokens).

    The sequence log-probs are ``sum_t mask * logp`` (``normalize="sum"``, the paper); see
    :func:`sequence_logprobs` for the normalised variants.
    """
    check_same(("token_logp", "ref_token_logp"), (token_logp, ref_token_logp))
    empty = (response_mask.sum(dim=1) == 0) if response_mask.dim() == 2 else None
    if empty is not None and bool(empty.any()):
        raise ValueError(f"response_mask: {int(empty.sum())} row(s) have no response token")
    seq = sequence_logprobs(token_logp, response_mask, normalize=normalize, max_len=max_len)
    ref = sequence_logprobs(ref_token_logp.detach(), response_mask, normalize=normalize, max_len=max_len)
    return pmd_loss(seq, ref, rewards, group_size=group_size, tau=tau, baseline=baseline)


def _check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or not tau > 0 or tau != tau or tau == float("inf"):
        raise ValueError(f"tau: must be a finite number > 0, got {tau!r}")


def _validate(
    seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor, rewards: torch.Tensor, group_size: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = as_1d("seq_logp", seq_logp)
    ref = as_1d("ref_seq_logp", ref_seq_logp)
    r = as_1d("rewards", rewards)
    if not lp.is_floating_point():
        raise ValueError(f"seq_logp: expected a floating-point tensor, got {lp.dtype}")
    check_same(("seq_logp", "ref_seq_logp", "rewards"), (lp, ref, r))
    check_group_size(group_size, lp.numel())
    _check_tau(tau)
    for name, t in (("seq_logp", lp), ("ref_seq_logp", ref), ("rewards", r)):
        check_finite(name, t.detach())
    return lp, ref, r if r.is_floating_point() else r.float()
