"""Length penalty against overthinking (paper section 2.3.3).

Within the k responses of one prompt, with min_len / max_len their shortest / longest length:

    lambda_j     = 0.5 - (len_j - min_len) / (max_len - min_len)
    len_reward_j = lambda_j            if response j is correct
                   min(0, lambda_j)    otherwise

and 0 for every response of a group whose lengths are all equal. The length reward is added to the
task reward with a weight; the paper warms the weight up from 0 (``LengthPenaltySchedule``) because
the penalty slows training early on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from k15sys.algo._checks import as_1d, check_group_size, check_same


def length_penalty(lengths: torch.Tensor, correct: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """Per-response length reward of paper 2.3.3, in [-0.5, 0.5].

    Args:
        lengths: [N] response lengths in tokens (the k samples of a prompt in consecutive rows).
        correct: [N] bool (or 0/1) correctness of each response.
        group_size: k.

    Returns:
        [N] float32 length rewards (unweighted).
    """
    ln = as_1d("lengths", lengths)
    ok = as_1d("correct", correct)
    check_same(("lengths", "correct"), (ln, ok))
    check_group_size(group_size, ln.numel())
    if ln.is_floating_point() and not bool(torch.isfinite(ln).all()):
        raise ValueError("lengths: contains NaN/inf")
    if bool((ln < 0).any()):
        raise ValueError(f"lengths: must be >= 0, got min {ln.min().item()}")
    g = ln.double().view(-1, group_size)
    lo = g.min(dim=1, keepdim=True).values
    hi = g.max(dim=1, keepdim=True).values
    span = hi - lo
    lam = torch.where(span > 0, 0.5 - (g - lo) / span.clamp_min(1e-12), torch.zeros_like(g)).view(-1)
    is_correct = ok.bool() if ok.dtype == torch.bool else ok != 0
    return torch.where(is_correct, lam, lam.clamp(max=0.0)).to(torch.float32)


@dataclass(frozen=True)
class LengthPenaltySchedule:
    """Weight of the length reward per RL iteration: 0 during warm-up, then ``weight`` (paper 2.3.3)."""

    weight: float
    warmup_iterations: int = 0

    def __post_init__(self) -> None:
        if not self.weight >= 0 or self.weight != self.weight:
            raise ValueError(f"weight: must be >= 0, got {self.weight!r}")
        if self.warmup_iterations < 0:
            raise ValueError(f"warmup_iterations: must be >= 0, got {self.warmup_iterations!r}")

    def __call__(self, iteration: int) -> float:
        return 0.0 if iteration < self.warmup_iterations else float(self.weight)
