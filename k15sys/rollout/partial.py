"""Partial rollouts (paper 2.6.2): a per-iteration token budget per trajectory and a replay buffer.

Each iteration the scheduler (1) samples new prompts and opens a group of ``group_size`` trajectories
for each, (2) gives every unfinished trajectory -- new ones and those continued from the buffer -- at
most ``budget_per_iteration`` new tokens (continuing means generating from prompt + response so far),
spread over ``num_workers`` workers in parallel, (3) emits the groups whose k trajectories have all
finished. A trajectory finishes on a stop token, on a repeat loop (``finish_reason="repeat"``, for the
penalty), or at ``max_total_len`` (``"length"``). A worker that fails leaves its trajectories untouched
in the buffer: they are simply continued next time, never lost.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from k15sys.algo.sampling import PromptSampler
from k15sys.rollout.engine import RolloutEngine
from k15sys.rollout.replay_buffer import Group, ReplayBuffer, Segment, Trajectory
from k15sys.rollout.types import SamplingParams


@dataclass
class IterationStats:
    new_groups: int = 0
    continued: int = 0
    generated_tokens: int = 0
    emitted_groups: int = 0
    failed_batches: int = 0
    errors: list[str] = field(default_factory=list)


class PartialRolloutScheduler:
    """Drives a :class:`RolloutEngine` (or one engine per worker) with partial rollouts.

    Args:
        engines: one engine, or a list with one engine per worker.
        sampler: picks prompt indices (``k15sys.algo`` samplers).
        prompts: token ids of every prompt of the pool.
        group_size: k samples per prompt (>= 1).
        prompts_per_iteration: new prompts opened each iteration.
        budget_per_iteration: max new tokens per trajectory per iteration (>= 1).
        max_total_len: prompt + response cap; a longer prompt is an error.
        params: sampling parameters (its ``max_new_tokens`` is replaced by the budget).
        batch_size: trajectories per engine call.
        buffer: a (possibly restored) :class:`ReplayBuffer`; saved after every iteration if it has a path.
    """

    def __init__(
        self,
        engines: RolloutEngine | Sequence[RolloutEngine],
        sampler: PromptSampler,
        prompts: Sequence[Sequence[int]],
        *,
        group_size: int,
        prompts_per_iteration: int,
        budget_per_iteration: int,
        max_total_len: int,
        params: SamplingParams,
        batch_size: int = 64,
        buffer: ReplayBuffer | None = None,
    ) -> None:
        self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        if not self.engines:
            raise ValueError("engines: at least one engine is needed")
        if group_size < 1:
            raise ValueError(f"group_size: must be >= 1, got {group_size!r}")
        if budget_per_iteration < 1:
            raise ValueError(f"budget_per_iteration: must be >= 1, got {budget_per_iteration!r}")
        if prompts_per_iteration < 0:
            raise ValueError(f"prompts_per_iteration: must be >= 0, got {prompts_per_iteration!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size!r}")
        if not prompts:
            raise ValueError("prompts: empty prompt pool")
        for i, p in enumerate(prompts):
            if len(p) == 0 or len(p) >= max_total_len:
                raise ValueError(f"prompts[{i}]: length {len(p)} must be in [1, max_total_len={max_total_len})")
        self.sampler = sampler
        self.prompts = [list(p) for p in prompts]
        self.group_size = group_size
        self.prompts_per_iteration = prompts_per_iteration
        self.budget = budget_per_iteration
        self.max_total_len = max_total_len
        self.params = params
        self.batch_size = batch_size
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="k15-rollout")
        self._lock = threading.Lock()
        self.last_stats = IterationStats()

    def run_iteration(self, policy_version: int) -> list[Group]:
        """One iteration of partial rollouts; returns the groups completed in it (all k finished)."""
        stats = IterationStats()
        stats.continued = len(self.buffer.unfinished())
        if self.prompts_per_iteration:
            for idx in self.sampler.sample(self.prompts_per_iteration):
                self.buffer.add_group(idx, self.prompts[idx], self.group_size)
                stats.new_groups += 1
        todo = self.buffer.unfinished()
        # longest-remaining first, so the long tail starts early; contiguous batches per worker
        todo.sort(key=lambda t: -t.total_len)
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        futures = [self._pool.submit(self._run_batch, self.engines[i % len(self.engines)], b, policy_version)
                   for i, b in enumerate(batches)]
        for f in futures:
            err = f.exception()
            if err is not None:
                stats.failed_batches += 1
                stats.errors.append(f"{type(err).__name__}: {err}")
            else:
                stats.generated_tokens += f.result()
        groups = self.buffer.pop_complete()
        stats.emitted_groups = len(groups)
        if self.buffer.path is not None:
            self.buffer.save()
        self.last_stats = stats
        return groups

    def _run_batch(self, engine: RolloutEngine, batch: list[Trajectory], version: int) -> int:
        # budgets differ near max_total_len: group by budget so each engine call has one max_new_tokens
        by_budget: dict[int, list[Trajectory]] = {}
        for t in batch:
            by_budget.setdefault(min(self.budget, self.max_total_len - t.total_len), []).append(t)
        produced = 0
        for budget, trajs in by_budget.items():
            outs = engine.generate([t.prompt_ids + t.response_ids for t in trajs], self.params.with_budget(budget))
            if len(outs) != len(trajs):
                raise RuntimeError(f"engine returned {len(outs)} completions for {len(trajs)} prompts")
            with self._lock:  # apply only after the whole call succeeded: a failure changes nothing
                for t, c in zip(trajs, outs):
                    start = len(t.response_ids)
                    t.response_ids.extend(c.token_ids)
                    t.logprobs.extend(c.logprobs)
                    t.segments.append(Segment(version, start, len(t.response_ids)))
                    if c.finish_reason in ("stop", "repeat"):
                        t.finish_reason = c.finish_reason
                    elif t.total_len >= self.max_total_len:
                        t.finish_reason = "length"
                    produced += len(c.token_ids)
        return produced

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
