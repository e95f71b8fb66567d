"""PMD loss (paper 2.3.2): hand-computed values, gradients, properties, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k15sys.algo import group_baseline, pmd_loss, pmd_seq_grad, pmd_token_loss, sequence_logprobs


def test_hand_computed_mean_baseline() -> None:
    # one group of 2: r = (1, 0), b = 0.5; tau = 0.5; delta = (0.2, -0.4)
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.2, -1.6], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # residuals: 1-0.5-0.5*0.2 = 0.4 ; 0-0.5-0.5*(-0.4) = -0.3 ; mean of squares = (0.16+0.09)/2
    loss = pmd_loss(lp, ref, r, group_size=2, tau=0.5)
    assert loss.item() == pytest.approx(0.125, abs=1e-12)


def test_hand_computed_logmeanexp_baseline() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    tau = 0.25
    b = group_baseline(r, group_size=2, tau=tau, baseline="logmeanexp")
    expect = tau * math.log((math.exp(1 / tau) + 1.0) / 2)
    assert torch.allclose(b, torch.full((4,), expect, dtype=torch.float64))
    lp = torch.zeros(4, dtype=torch.float64)
    loss = pmd_loss(lp, lp, r, group_size=2, tau=tau, baseline="logmeanexp")
    assert loss.item() == pytest.approx(((1 - expect) ** 2 + expect**2) / 2, rel=1e-12)


def test_groups_are_independent() -> None:
    g = torch.Generator().manual_seed(0)
    lp, ref, r = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.randint(0, 2, (6,), generator=g).float()
    whole = pmd_loss(lp, ref, r, group_size=3, tau=0.1)
    a = pmd_loss(lp[:3], ref[:3], r[:3], group_size=3, tau=0.1)
    b = pmd_loss(lp[3:], ref[3:], r[3:], group_size=3, tau=0.1)
    assert torch.allclose(whole, (a + b) / 2)


@pytest.mark.parametrize("baseline", ["mean", "logmeanexp"])
def test_autograd_matches_closed_form_and_paper_gradient(baseline: str) -> None:
    g = torch.Generator().manual_seed(1)
    n, k, tau = 12, 4, 0.3
    lp = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(n, generator=g, dtype=torch.float64)
    r = torch.randint(0, 2, (n,), generator=g).double()
    pmd_loss(lp, ref, r, group_size=k, tau=tau, baseline=baseline).backward()
    closed = pmd_seq_grad(lp, ref, r, group_size=k, tau=tau, baseline=baseline).double()
    assert torch.allclose(lp.grad, closed, atol=1e-6)
    if baseline == "mean":
        # paper: (1/k) sum_j [grad lp_j (r_j - rbar) - tau/2 grad (lp_j - ref_j)^2], per group, as an
        # ascent direction; ours is -2 tau / (N/k) times that (N/k groups averaged).
        rbar = r.view(-1, k).mean(1).repeat_interleave(k)
        paper = ((r - rbar) - tau * (lp.detach() - ref)) / k
        assert torch.allclose(lp.grad, -2 * tau / (n / k) * paper, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    groups=st.integers(1, 4),
    k=st.integers(1, 6),
    tau=st.floats(0.01, 5.0),
    seed=st.integers(0, 10_000),
    baseline=st.sampled_from(["mean", "logmeanexp"]),
)
def test_loss_is_zero_at_the_closed_form_optimum(groups: int, k: int, tau: float, seed: int, baseline: str) -> None:
    g = torch.Generator().manual_seed(seed)
    n = groups * k
    ref = torch.randn(n, generator=g, dtype=torch.float64) * 10
    r = torch.randint(0, 2, (n,), generator=g).double()
    b = group_baseline(r, group_size=k, tau=tau, baseline=baseline)
    lp = ref + (r - b) / tau  # log pi* = log pi_i + (r - tau log Z) / tau
    assert pmd_loss(lp, ref, r, group_size=k, tau=tau, baseline=baseline).item() == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(pmd_seq_grad(lp, ref, r, group_size=k, tau=tau, baseline=baseline).double(),
                          torch.zeros(n, dtype=torch.float64), atol=1e-6)


def test_token_entry_point_sums_response_tokens() -> None:
    g = torch.Generator().manual_seed(2)
    tok = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 7)
    for i, ln in enumerate([1, 7, 3, 5]):
        mask[i, 7 - ln:] = 1
    r = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    loss = pmd_token_loss(tok, ref, mask, r, group_size=2, tau=0.2)
    expect = pmd_loss((tok * mask).sum(1), (ref * mask).sum(1), r, group_size=2, tau=0.2)
    assert torch.allclose(loss, expect)
    loss.backward()
    assert torch.all(tok.grad[mask == 0] == 0)
    mean = sequence_logprobs(tok.detach(), mask, normalize="mean")
    assert torch.allclose(mean, (tok.detach() * mask).sum(1) / mask.sum(1))
    const = sequence_logprobs(tok.detach(), mask, normalize="constant", max_len=10)
    assert torch.allclose(const, (tok.detach() * mask).sum(1) / 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_size=4), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(rewards=torch.tensor([1.0, float("nan"), 0.0])), "rewards"),
        (dict(seq_logp=torch.tensor([0.0, float("inf"), 0.0])), "seq_logp"),
        (dict(ref_seq_logp=torch.zeros(4)), "ref_seq_logp"),
        (dict(seq_logp=torch.zeros(0), ref_seq_logp=torch.zeros(0), rewards=torch.zeros(0)), "empty"),
        (dict(seq_logp=torch.zeros(3, 1)), "seq_logp"),
        (dict(baseline="median"), "baseline"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, match: str) -> None:
    args = dict(seq_logp=torch.zeros(3), ref_seq_logp=torch.zeros(3), rewards=torch.ones(3), group_size=3, tau=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pmd_loss(args.pop("seq_logp"), args.pop("ref_seq_logp"), args.pop("rewards"), **args)


def test_token_loss_rejects_empty_response() -> None:
    with pytest.raises(ValueError, match="response_mask"):
        pmd_token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), torch.ones(2),
                       group_size=2, tau=0.1)
    with pytest.raises(ValueError, match="max_len"):
        sequence_logprobs(torch.zeros(2, 3), torch.ones(2, 3), normalize="constant")
