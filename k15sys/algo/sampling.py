"""Prompt sampling strategies of paper section 2.3.4: curriculum and prioritized sampling.

Both samplers return problem indices, are seeded, and checkpoint their full state
(``state_dict`` / ``load_state_dict``), so a resumed run draws exactly the prompts the uninterrupted
run would have drawn.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class PromptSampler(Protocol):
    """What the trainer needs from a sampler."""

    def sample(self, n: int) -> list[int]: ...

    def update(self, indices: Sequence[int], rewards: Sequence[float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive int, got {n!r}")


class CurriculumSampler:
    """Easy-to-hard sampling by a difficulty label (paper 2.3.4, curriculum sampling).

    Problems are ordered by ``difficulties`` (higher = harder; ties keep index order). At iteration t
    (the number of ``sample`` calls so far) the sampler draws uniformly from the easiest
    ``f(t) = start_fraction + (1 - start_fraction) * min(1, t / ramp_iterations)`` share of the
    problems, so the whole pool is open after ``ramp_iterations``. Draws are without replacement
    inside one call while the open pool is large enough.
    """

    def __init__(
        self,
        difficulties: Sequence[float],
        *,
        ramp_iterations: int = 100,
        start_fraction: float = 0.3,
        seed: int = 0,
    ) -> None:
        d = np.asarray(list(difficulties), dtype=np.float64)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"difficulties: expected a non-empty 1-D sequence, got shape {d.shape}")
        if not np.isfinite(d).all():
            raise ValueError("difficulties: contains NaN/inf")
        if not isinstance(ramp_iterations, int) or ramp_iterations < 0:
            raise ValueError(f"ramp_iterations: must be an int >= 0, got {ramp_iterations!r}")
        if not 0.0 < start_fraction <= 1.0:
            raise ValueError(f"start_fraction: must be in (0, 1], got {start_fraction!r}")
        self._order = np.argsort(d, kind="stable")
        self.ramp_iterations = ramp_iterations
        self.start_fraction = float(start_fraction)
        self.iteration = 0
        self._rng = np.random.default_rng(seed)

    def open_fraction(self, iteration: int | None = None) -> float:
        """Share of the (difficulty-sorted) pool open at ``iteration`` (default: the current one)."""
        t = self.iteration if iteration is None else iteration
        if self.ramp_iterations == 0:
            return 1.0
        return self.start_fraction + (1.0 - self.start_fraction) * min(1.0, t / self.ramp_iterations)

    def sample(self, n: int) -> list[int]:
        _check_n(n)
        size = max(1, math.ceil(self.open_fraction() * len(self._order)))
        pool = self._order[:size]
        picks = self._rng.choice(pool, size=n, replace=n > size)
        self.iteration += 1
        return [int(i) for i in picks]

    def update(self, indices: Sequence[int], rewards: Sequence[float]) -> None:
        """The curriculum follows its schedule, not rewards; accepted for the common interface."""
        if len(indices) != len(rewards):
            raise ValueError(f"rewards: length {len(rewards)} does not match indices length {len(indices)}")

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self._rng.bit_generator.state = state["rng"]


class PrioritizedSampler:
    """Sample problem i with probability proportional to ``1 - s_i`` (paper 2.3.4, prioritized sampling).

    ``s_i`` is problem i's running success rate, fed by :meth:`update` with per-sample rewards clipped to
    [0, 1] (pass correctness, not penalty-shaped rewards). ``decay=None`` keeps the plain mean over all
    attempts; ``decay=d`` an exponential moving average ``s <- d*s + (1-d)*r``, which forgets old
    attempts as the policy improves. Unseen problems start at ``initial_success``. A problem solved
    every time keeps weight ``floor`` (> 0 by default) so it is still re-checked now and then.
    """

    def __init__(
        self,
        num_problems: int,
        *,
        seed: int = 0,
        decay: float | None = None,
        initial_success: float = 0.0,
        floor: float = 1e-3,
    ) -> None:
        if not isinstance(num_problems, int) or num_problems < 1:
            raise ValueError(f"num_problems: must be a positive int, got {num_problems!r}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1) or None, got {decay!r}")
        if not 0.0 <= initial_success <= 1.0:
            raise ValueError(f"initial_success: must be in [0, 1], got {initial_success!r}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor: must be in [0, 1], got {floor!r}")
        self.decay = decay
        self.floor = float(floor)
        self.success = np.full(num_problems, float(initial_success))
        self.attempts = np.zeros(num_problems, dtype=np.int64)
        self._rng = np.random.default_rng(seed)

    def probabilities(self) -> np.ndarray:
        w = np.maximum(1.0 - self.success, self.floor)
        total = w.sum()
        if total <= 0:  # every problem solved and floor == 0: fall back to uniform
            return np.full_like(w, 1.0 / w.size)
        return w / total

    def sample(self, n: int) -> list[int]:
        _check_n(n)
        return [int(i) for i in self._rng.choice(self.success.size, size=n, replace=True, p=self.probabilities())]

    def update(self, indices: Sequence[int], rewards: Sequence[float]) -> None:
        idx = np.asarray(list(indices), dtype=np.int64)
        r = np.asarray(list(rewards), dtype=np.float64)
        if idx.shape != r.shape:
            raise ValueError(f"rewards: length {r.size} does not match indices length {idx.size}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.success.size):
            raise ValueError(f"indices: out of range [0, {self.success.size}): {idx.min()}..{idx.max()}")
        if not np.isfinite(r).all():
            raise ValueError("rewards: contains NaN/inf")
        r = np.clip(r, 0.0, 1.0)
        for i, ri in zip(idx.tolist(), r.tolist()):  # sequential: repeated indices update in order
            self.attempts[i] += 1
            if self.decay is None:
                self.success[i] += (ri - self.success[i]) / self.attempts[i]
            else:
                self.success[i] = self.decay * self.success[i] + (1.0 - self.decay) * ri

    def state_dict(self) -> dict[str, Any]:
        return {
            "success": self.success.tolist(),
            "attempts": self.attempts.tolist(),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        success = np.asarray(state["success"], dtype=np.float64)
        if success.shape != self.success.shape:
            raise ValueError(f"state: holds {success.size} problems, this sampler has {self.success.size}")
        self.success = success
        self.attempts = np.asarray(state["attempts"], dtype=np.int64)
        self._rng.bit_generator.state = state["rng"]
