"""Partial rollouts (paper 2.6.2): a per-iteration token budget per trajectory and a replay buffer.

Each iteration the scheduler (1) samples new prompts and opens a group of ``group_size`` trajectories
for each, (2) gives every unfinished trajectory -- those continued from the buffer and the new ones -- at
most ``budget_per_iteration`` new tokens (continuing is generating from prompt + response so far),
(3) emits the groups whose k trajectories have all finished. The work of step 2 is a queue of tasks
(one engine call each, at most ``batch_size`` trajectories) pulled by ``num_workers`` threads, so some
workers continue the long trajectories while others start new prompts.

A trajectory finishes on a stop token, on a repeat loop (``finish_reason="repeat"``, for the penalty),
or at ``max_total_len`` / ``max_response_len`` (``"length"``). A task whose engine call raises is applied nowhere and goes
back to the queue for another worker; nothing is lost.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from k15sys.algo.repeat import RepeatDetector
from k15sys.algo.sampling import PromptSampler
from k15sys.rollout.engine import RolloutEngine
from k15sys.rollout.replay_buffer import FINISH_REASONS, Group, ReplayBuffer, Segment, Trajectory
from k15sys.rollout.types import Completion, SamplingParams


@dataclass
class IterationStats:
    """What one :meth:`PartialRolloutScheduler.run_iteration` did (timings are not part of any state)."""

    new_groups: int = 0
    continued: int = 0  # unfinished trajectories carried over from earlier iterations
    generated_tokens: int = 0
    emitted_groups: int = 0
    tasks: int = 0
    retries: int = 0  # re-queues after a failed engine call
    failed_tasks: int = 0  # tasks given up this iteration: their trajectories wait in the buffer
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    busy_seconds: float = 0.0  # summed over workers: time spent inside engine calls
    num_workers: int = 0

    @property
    def idle_fraction(self) -> float:
        """Share of the workers' time not spent in engine calls (waiting for the last tasks)."""
        capacity = self.seconds * self.num_workers
        return max(0.0, 1.0 - self.busy_seconds / capacity) if capacity > 0 else 0.0


@dataclass
class _Task:
    trajectories: list[Trajectory]
    budget: int
    seed: int | None
    attempts: int = 0


class PartialRolloutScheduler:
    """Drives rollout engines with partial rollouts (paper 2.6.2); see ``docs/partial_rollouts.md``.

    Args:
        engines: one engine, or a list; worker i drives ``engines[i % len(engines)]``.
        sampler: picks prompt indices (``k15sys.algo`` samplers).
        prompts: token ids of every prompt of the pool.
        group_size: k samples per prompt (>= 1).
        budget_per_iteration: max new tokens per trajectory per iteration (>= 1).
        max_total_len: prompt + response cap; a prompt of this length or longer is an error.
        max_response_len: response cap per trajectory (None: ``max_total_len`` alone caps), so that prompts of
            different lengths get the same response budget, as ``max_new_tokens`` gives in one-shot sampling.
        prompts_per_iteration: new prompts (groups) opened each iteration (>= 0).
        params: sampling parameters; ``max_new_tokens`` is replaced by the budget, and a ``seed`` by one
            derived per task, so results do not depend on which worker runs which task.
        batch_size: trajectories per engine call.
        num_workers: worker threads (default: one per engine).
        max_attempts: a failed task is re-queued until it has failed this often; a worker retires
            after this many failures in a row. If every worker retires, ``run_iteration`` raises.
        repeat_detector: factory of the detector run over each segment and the tokens before it
            (catches loops across segment boundaries and behind engines without a detector); None: off.
        buffer: a (possibly restored) :class:`ReplayBuffer`; saved after every iteration if it has a path.
    """

    def __init__(
        self,
        engines: RolloutEngine | Sequence[RolloutEngine],
        sampler: PromptSampler,
        prompts: Sequence[Sequence[int]],
        *,
        group_size: int,
        budget_per_iteration: int,
        max_total_len: int,
        prompts_per_iteration: int,
        max_response_len: int | None = None,
        params: SamplingParams | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        max_attempts: int = 3,
        repeat_detector: Callable[[], RepeatDetector] | None = RepeatDetector,
        buffer: ReplayBuffer | None = None,
    ) -> None:
        self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        if not self.engines:
            raise ValueError("engines: at least one engine is needed")
        for name, value, low in (("group_size", group_size, 1), ("budget_per_iteration", budget_per_iteration, 1),
                                 ("max_total_len", max_total_len, 2), ("prompts_per_iteration", prompts_per_iteration, 0),
                                 ("batch_size", batch_size, 1), ("max_attempts", max_attempts, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
        if max_response_len is not None and (not isinstance(max_response_len, int) or max_response_len < 1):
            raise ValueError(f"max_response_len: must be None or an int >= 1, got {max_response_len!r}")
        num_workers = len(self.engines) if num_workers is None else num_workers
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: must be an int >= 1, got {num_workers!r}")
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
        self.max_response_len = max_response_len
        self.params = params if params is not None else SamplingParams(1)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_attempts = max_attempts
        self.repeat_detector = repeat_detector
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self.buffer.check(num_prompts=len(self.prompts), group_size=group_size)  # e.g. read from another run's path
        self.last_stats = IterationStats()

    # ------------------------------------------------------------------ one iteration
    def run_iteration(self, policy_version: int) -> list[Group]:
        """One iteration of partial rollouts with the policy ``policy_version``; returns the groups that
        became complete (all k trajectories finished), in group-id order."""
        if not isinstance(policy_version, int) or policy_version < 0:
            raise ValueError(f"policy_version: must be an int >= 0, got {policy_version!r}")
        start = time.perf_counter()
        stats = IterationStats(num_workers=self.num_workers, continued=len(self.buffer.unfinished()))
        if self.prompts_per_iteration:
            for idx in self.sampler.sample(self.prompts_per_iteration):
                idx = int(idx)
                if not 0 <= idx < len(self.prompts):
                    raise ValueError(f"sampler: returned prompt index {idx}, outside [0, {len(self.prompts)})")
                self.buffer.add_group(idx, self.prompts[idx], self.group_size)
                stats.new_groups += 1
        tasks = self._make_tasks(policy_version)
        stats.tasks = len(tasks)
        left, all_retired = self._run_tasks(tasks, policy_version, stats)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        if left or all_retired:  # keep everything (complete groups too) in the buffer, then fail loudly
            if self.buffer.path is not None:
                self.buffer.save()
            raise RuntimeError(f"run_iteration: every rollout worker failed; {left} tasks were not run "
                               f"(their trajectories are kept in the replay buffer). Errors: {stats.errors[-3:]}")
        groups = self.buffer.pop_complete()
        stats.emitted_groups = len(groups)
        if self.buffer.path is not None:
            self.buffer.save()
        return groups

    def _make_tasks(self, version: int) -> list[_Task]:
        """Continued trajectories first (longest first: they are the slowest), then the new ones in group
        order, cut into engine calls of at most ``batch_size`` trajectories with one budget each."""
        todo = self.buffer.unfinished()
        old = sorted((t for t in todo if t.segments), key=lambda t: (-t.total_len, t.group_id, t.sample_index))
        new = [t for t in todo if not t.segments]
        tasks = []
        for part in (old, new):
            by_budget: dict[int, list[Trajectory]] = {}
            for t in part:
                budget = min(self.budget, self._room(t))
                if budget <= 0:  # a cap was lowered after this trajectory grew past it
                    t.finish_reason = "length"
                else:
                    by_budget.setdefault(budget, []).append(t)
            for budget, trajs in by_budget.items():
                for i in range(0, len(trajs), self.batch_size):
                    chunk = trajs[i : i + self.batch_size]
                    tasks.append(_Task(chunk, budget, self._task_seed(version, chunk[0])))
        return tasks

    def _room(self, t: Trajectory) -> int:
        """New tokens ``t`` may still take under ``max_total_len`` and ``max_response_len``."""
        room = self.max_total_len - t.total_len
        if self.max_response_len is not None:
            room = min(room, self.max_response_len - len(t.response_ids))
        return room

    def _task_seed(self, version: int, first: Trajectory) -> int | None:
        if self.params.seed is None:
            return None
        key = [self.params.seed, version, first.group_id, first.sample_index, len(first.response_ids)]
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def _run_tasks(self, tasks: list[_Task], version: int, stats: IterationStats) -> tuple[int, bool]:
        """Run the queue on ``num_workers`` threads; returns (tasks left unrun, whether every worker retired)."""
        queue = deque(tasks)
        cond = threading.Condition()
        in_flight = retired = 0

        def worker(w: int) -> None:
            nonlocal in_flight, retired
            engine = self.engines[w % len(self.engines)]
            failures_in_a_row = 0
            while True:
                with cond:
                    while not queue and in_flight:
                        cond.wait()
                    if not queue:
                        return
                    task = queue.popleft()
                    in_flight += 1
                t0 = time.perf_counter()
                try:
                    outs = engine.generate([t.prompt_ids + t.response_ids for t in task.trajectories],
                                           self.params.with_budget(task.budget, task.seed))
                    segments = self._segments(task, outs)
                    error = None
                except Exception as e:  # a dead worker: its task goes back to the queue, applied nowhere
                    error = e
                busy = time.perf_counter() - t0
                produced = self._apply(task, segments, version) if error is None else 0
                with cond:
                    in_flight -= 1
                    stats.busy_seconds += busy
                    stats.generated_tokens += produced
                    if error is None:
                        failures_in_a_row = 0
                    else:
                        failures_in_a_row += 1
                        task.attempts += 1
                        stats.errors.append(f"worker {w}, task of {len(task.trajectories)} trajectories, attempt "
                                            f"{task.attempts}: {type(error).__name__}: {error}")
                        if task.attempts < self.max_attempts:
                            queue.append(task)
                            stats.retries += 1
                        else:
                            stats.failed_tasks += 1
                    cond.notify_all()
                    if failures_in_a_row >= self.max_attempts:
                        retired += 1
                        return  # this worker retires; the others take the queue

        threads = [threading.Thread(target=worker, args=(w,), name=f"k15-rollout-{w}", daemon=True)
                   for w in range(min(self.num_workers, max(1, len(tasks))))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return len(queue), retired == len(threads)

    def _segments(self, task: _Task, outs: list[Completion]) -> list[tuple[list[int], list[float], str, int]]:
        """Validate the engine's completions and turn them into (ids, logprobs, reason, generated) per
        trajectory, cutting repeat loops; changes nothing, so a failure here is a failed task."""
        if len(outs) != len(task.trajectories):
            raise RuntimeError(f"engine returned {len(outs)} completions for {len(task.trajectories)} prompts")
        result = []
        for t, c in zip(task.trajectories, outs):
            ids, lps, reason = [int(x) for x in c.token_ids], [float(x) for x in c.logprobs], c.finish_reason
            if len(ids) != len(lps) or len(ids) > task.budget or reason not in FINISH_REASONS:
                raise RuntimeError(f"engine returned a malformed completion ({len(ids)} tokens, {len(lps)} logprobs, "
                                   f"budget {task.budget}, reason {reason!r})")
            if not all(map(math.isfinite, lps)):
                raise RuntimeError(f"engine returned non-finite log-probs ({[x for x in lps if not math.isfinite(x)][:3]})")
            generated = len(ids)
            if reason == "length" and self.repeat_detector is not None:
                cut = self._repeat_cut(t.response_ids, ids)
                if cut is not None:
                    ids, lps, reason = ids[:cut], lps[:cut], "repeat"
            result.append((ids, lps, reason, generated))
        return result

    def _apply(self, task: _Task, segments: list, version: int) -> int:
        """Append each new segment (a task's trajectories belong to it alone: no lock needed)."""
        produced = 0
        for t, (ids, lps, reason, generated) in zip(task.trajectories, segments):
            start = len(t.response_ids)
            t.response_ids.extend(ids)
            t.logprobs.extend(lps)
            t.segments.append(Segment(version, start, len(t.response_ids)))
            if reason != "length":
                t.finish_reason = reason
            elif self._room(t) <= 0:
                t.finish_reason = "length"
            produced += generated
        return produced

    def _repeat_cut(self, before: list[int], segment: list[int]) -> int | None:
        """Where a loop is first seen in ``segment``, looking back far enough to see loops that began in
        earlier segments; None if there is none."""
        det = self.repeat_detector()
        if det.extend(before[-max(det.min_repeats * det.max_period, det.min_span):]):
            return 0
        for i, tok in enumerate(segment):
            if det.push(tok):
                return i + 1
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Replay buffer + sampler, plain Python (JSON-able): put it in the trainer's checkpoint."""
        return {"buffer": self.buffer.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"], num_prompts=len(self.prompts), group_size=self.group_size,
                                    source="checkpoint's replay buffer")
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        """Save the buffer if it has a path (worker threads live only inside ``run_iteration``)."""
        if self.buffer.path is not None:
            self.buffer.save()
