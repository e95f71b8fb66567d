"""Length penalty (2.3.3), samplers (2.3.4) and repeat detection (2.6.2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k15sys.algo import (
    CurriculumSampler,
    LengthPenaltySchedule,
    PrioritizedSampler,
    RepeatDetector,
    find_repeat,
    length_penalty,
    penalize_repeats,
)


# ---------------------------------------------------------------- length penalty
def test_length_penalty_hand_values() -> None:
    lengths = torch.tensor([100, 200, 300, 400, 50, 50])
    correct = torch.tensor([True, False, True, False, True, False])
    out = length_penalty(lengths, correct, group_size=2)
    # group 1: min 100 max 200 -> lambda (0.5, -0.5); group 2: (0.5, -0.5); group 3: equal lengths -> 0
    assert torch.allclose(out, torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0, 0.0]))
    out = length_penalty(torch.tensor([10, 20, 30]), torch.tensor([0, 0, 1]), group_size=3)
    # lambdas 0.5, 0, -0.5; wrong answers keep only the negative part
    assert torch.allclose(out, torch.tensor([0.0, 0.0, -0.5]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=8), st.data())
def test_length_penalty_properties(lengths: list[int], data: st.DataObject) -> None:
    correct = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    out = length_penalty(torch.tensor(lengths), torch.tensor(correct), group_size=len(lengths))
    assert bool(((out >= -0.5) & (out <= 0.5)).all())
    assert bool((out[~torch.tensor(correct)] <= 0).all())  # wrong answers are never rewarded
    if len(set(lengths)) > 1:
        shortest = int(np.argmin(lengths))
        if correct[shortest]:
            assert out[shortest].item() == pytest.approx(0.5)
    else:
        assert bool((out == 0).all())


def test_length_penalty_bad_input_and_schedule() -> None:
    with pytest.raises(ValueError, match="group_size"):
        length_penalty(torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]), group_size=2)
    with pytest.raises(ValueError, match="correct"):
        length_penalty(torch.tensor([1, 2]), torch.tensor([1, 1, 1]), group_size=2)
    with pytest.raises(ValueError, match="lengths"):
        length_penalty(torch.tensor([-1, 2]), torch.tensor([1, 1]), group_size=2)
    sched = LengthPenaltySchedule(weight=0.3, warmup_iterations=5)
    assert [sched(i) for i in (0, 4, 5, 100)] == [0.0, 0.0, 0.3, 0.3]
    with pytest.raises(ValueError, match="weight"):
        LengthPenaltySchedule(weight=-1.0)


# ---------------------------------------------------------------- samplers
def test_curriculum_goes_easy_to_hard_and_resumes() -> None:
    difficulty = list(range(100))[::-1]  # index 99 is the easiest
    s = CurriculumSampler(difficulty, ramp_iterations=10, start_fraction=0.2, seed=3)
    first = s.sample(10)
    assert all(i >= 80 for i in first)  # only the easiest 20% at iteration 0
    for _ in range(10):
        s.sample(10)
    assert s.open_fraction() == 1.0
    state = s.state_dict()
    a = [s.sample(5) for _ in range(3)]
    t = CurriculumSampler(difficulty, ramp_iterations=10, start_fraction=0.2, seed=999)
    t.load_state_dict(state)
    assert [t.sample(5) for _ in range(3)] == a
    late = [i for _ in range(50) for i in s.sample(10)]
    assert min(late) < 20  # hard problems appear once the pool is open


def test_prioritized_frequencies_converge_to_one_minus_success() -> None:
    s = PrioritizedSampler(4, seed=0, floor=0.0)
    s.update([0, 1, 2, 3, 0, 1], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # s = (0.5, 0.5, 0, 0)
    assert np.allclose(s.success, [0.5, 0.5, 0.0, 0.0])
    counts = np.bincount(s.sample(60_000), minlength=4) / 60_000
    expect = np.array([0.5, 0.5, 1.0, 1.0]) / 3.0
    assert np.allclose(counts, expect, atol=0.01)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6), st.integers(0, 1000))
def test_prioritized_probabilities_property(success: list[float], seed: int) -> None:
    s = PrioritizedSampler(len(success), seed=seed, floor=0.0, decay=0.0)
    s.update(list(range(len(success))), success)  # decay 0: s_i = last reward
    w = 1 - np.asarray(success)
    p = s.probabilities()
    if w.sum() > 0:
        assert np.allclose(p, w / w.sum())
    else:
        assert np.allclose(p, 1 / len(success))


def test_prioritized_state_and_errors() -> None:
    s = PrioritizedSampler(5, seed=1, decay=0.5)
    s.update([1, 1], [1.0, 1.0])
    assert s.success[1] == pytest.approx(0.75)
    st_ = s.state_dict()
    a = s.sample(20)
    t = PrioritizedSampler(5, seed=2, decay=0.5)
    t.load_state_dict(st_)
    assert t.sample(20) == a
    with pytest.raises(ValueError, match="indices"):
        s.update([7], [1.0])
    with pytest.raises(ValueError, match="rewards"):
        s.update([1], [float("nan")])
    with pytest.raises(ValueError, match="n"):
        s.sample(0)
    with pytest.raises(ValueError, match="num_problems"):
        PrioritizedSampler(0)
    with pytest.raises(ValueError, match="state"):
        PrioritizedSampler(3).load_state_dict(st_)


# ---------------------------------------------------------------- repeat detection
def _brute_force_first_detection(tokens: list[int], min_repeats: int, min_span: int, max_period: int) -> int | None:
    """Smallest prefix length whose tail is periodic enough (exact definition, O(n^3))."""
    for end in range(1, len(tokens) + 1):
        t = tokens[:end]
        for p in range(1, min(max_period, end) + 1):
            need = max(min_repeats * p, min_span)
            if need <= end and all(t[end - 1 - j] == t[end - 1 - j - p] for j in range(need - p)):
                return end
    return None


def test_repeat_detector_basic() -> None:
    assert find_repeat(list(range(200))) is None
    m = find_repeat([9, 8, 7] + [1, 2, 3, 4, 5] * 10, min_repeats=4, min_span=16)
    assert m is not None and m.period == 5 and m.end <= 3 + 5 * 4 + 4
    det = RepeatDetector(min_repeats=3, min_span=6)
    fired = [det.push(t) for t in [1, 2, 1, 2, 1, 2, 1]]
    assert fired[-1] and det.period == 2 and det.detected


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 5), max_size=30),
    block=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    reps=st.integers(1, 12),
)
def test_repeat_detector_sound_and_eventually_complete(prefix: list[int], block: list[int], reps: int) -> None:
    tokens = prefix + block * reps
    kw = dict(min_repeats=3, min_span=8, max_period=16)
    m = find_repeat(tokens, key_len=2, **kw)
    exact = _brute_force_first_detection(tokens, **kw)
    if m is not None:  # never a false alarm: the tail really is periodic at that point
        t = tokens[: m.end]
        assert m.span >= max(3 * m.period, 8)
        assert all(t[-1 - j] == t[-1 - j - m.period] for j in range(m.span - m.period))
        assert exact is not None and exact <= m.end
    # and a loop that keeps going is always caught (possibly a few tokens late)
    long_tail = tokens + block * 12
    assert find_repeat(long_tail, key_len=2, **kw) is not None


def test_penalize_repeats() -> None:
    r = penalize_repeats(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([False, True, True]), penalty=-0.5)
    assert torch.allclose(r, torch.tensor([1.0, -0.5, 0.5]))
    with pytest.raises(ValueError, match="penalty"):
        penalize_repeats(torch.zeros(2), torch.zeros(2, dtype=torch.bool), penalty=1.0)
