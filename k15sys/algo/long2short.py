"""long2short: transfer long-CoT ability into a short-CoT model (paper section 2.4).

- :func:`merge_state_dicts` -- model merging: average the weights of a long-CoT and a short-CoT model
  (same architecture, ideally the same initialisation).
- :func:`shortest_rejection_sample` -- of n samples of one problem (the paper uses n = 8), keep the
  shortest correct one as an SFT target.
- :func:`build_dpo_pairs` + :func:`dpo_loss` -- DPO with the shortest correct answer as the chosen
  sample, and as rejected samples every incorrect one and every correct one longer than
  ``length_ratio`` (1.5 in the paper) times the chosen one.
- long2short RL is the RL loop with the length penalty (:mod:`k15sys.algo.length_penalty`) switched on
  and a much smaller maximum rollout length; it needs no code of its own here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from k15sys.algo._checks import as_1d, check_finite, check_same


def merge_state_dicts(
    long_state: Mapping[str, torch.Tensor], short_state: Mapping[str, torch.Tensor], *, alpha: float = 0.5
) -> dict[str, torch.Tensor]:
    """``alpha * long + (1 - alpha) * short`` for every floating tensor (paper 2.4, model merging).

    Non-floating tensors (e.g. integer buffers) must be equal and are copied. Raises ValueError naming
    the tensor on a missing name, a shape or dtype mismatch.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
    if set(long_state) != set(short_state):
        diff = sorted(set(long_state) ^ set(short_state))
        raise ValueError(f"short_state: tensor names differ from long_state: {diff[:5]}")
    out = {}
    for name, a in long_state.items():
        b = short_state[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"short_state: {name} is {b.dtype}{tuple(b.shape)}, long_state has {a.dtype}{tuple(a.shape)}")
        if a.is_floating_point():
            out[name] = (alpha * a.double() + (1.0 - alpha) * b.double()).to(a.dtype)
        else:
            if not torch.equal(a, b):
                raise ValueError(f"short_state: non-floating tensor {name} differs between the models")
            out[name] = a.clone()
    return out


def _check_samples(lengths: Sequence[int], correct: Sequence[bool]) -> None:
    if len(lengths) != len(correct):
        raise ValueError(f"correct: length {len(correct)} does not match lengths length {len(lengths)}")
    if not lengths:
        raise ValueError("lengths: no samples")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths: must be >= 0, got {min(lengths)}")


def shortest_rejection_sample(lengths: Sequence[int], correct: Sequence[bool]) -> int | None:
    """Index of the shortest correct sample (first on ties), or None if none is correct (paper 2.4)."""
    _check_samples(lengths, correct)
    ok = [i for i, c in enumerate(correct) if c]
    return min(ok, key=lambda i: (lengths[i], i)) if ok else None


def build_dpo_pairs(lengths: Sequence[int], correct: Sequence[bool], *, length_ratio: float = 1.5) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of one problem's samples (paper 2.4, DPO).

    Chosen: the shortest correct sample. Rejected: each incorrect sample, and each correct sample longer
    than ``length_ratio`` x the chosen length. No correct sample -> no pairs.
    """
    if not length_ratio >= 1.0:
        raise ValueError(f"length_ratio: must be >= 1, got {length_ratio!r}")
    chosen = shortest_rejection_sample(lengths, correct)
    if chosen is None:
        return []
    limit = length_ratio * lengths[chosen]
    return [(chosen, j) for j, (n, c) in enumerate(zip(lengths, correct)) if j != chosen and (not c or n > limit)]


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """Mean DPO loss ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` over pairs (sequence log-probs)."""
    if not beta > 0 or beta != beta or beta == float("inf"):
        raise ValueError(f"beta: must be a finite number > 0, got {beta!r}")
    names = ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")
    ts = tuple(as_1d(n, t) for n, t in zip(names, (chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)))
    check_same(names, ts)
    for n, t in zip(names, ts):
        if not t.is_floating_point():
            raise ValueError(f"{n}: expected a floating-point tensor, got {t.dtype}")
        check_finite(n, t.detach())
    c, r, cr, rr = ts
    margin = (c - cr.detach()) - (r - rr.detach())
    return -F.logsigmoid(beta * margin).mean()
