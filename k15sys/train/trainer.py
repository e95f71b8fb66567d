"""The k1.5 main job: long-CoT SFT warm-up, then RL iterations (paper 2.3, 2.6), readable top to bottom.

One RL iteration (``Trainer.rl_iteration``):

1. partial rollouts: the scheduler opens ``prompts_per_iteration`` new groups of k samples from the
   sampler (curriculum / prioritized) and continues unfinished trajectories from the replay buffer;
2. rewards: the task's verifier (math answers, code tests in the sandbox), a repeat penalty for looping trajectories, the length penalty (2.3.3);
3. the complete groups are packed (varlen, no padding) and scored under the reference policy pi_i
   (the current weights) once, without grad;
4. minibatch steps on the PMD loss (2.3.2) through ``k15sys.ops.fused_logprobs``;
5. the new weights go to the rollout engine; metrics are logged, evaluation and checkpoint follow.

The task (the shipped arithmetic, or a user's JSONL problems) and the model (built-in, or ``model.path``)
come from factories (:func:`k15sys.tasks.factory.build_task`, :mod:`k15sys.train.model`); the trainer names
neither. Everything that decides the next step (model, optimizer, sampler, replay buffer, RNG, iteration) is
checkpointed, so ``--resume`` after a kill continues exactly where the last checkpoint left off.
Under torchrun every rank rolls out and trains on its share of the groups (FSDP2 shards the model, see
:mod:`k15sys.train.distributed`); rank 0 writes metrics and checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from k15sys.algo import CurriculumSampler, LengthPenaltySchedule, PrioritizedSampler, length_penalty, penalize_repeats, pmd_loss, pmd_seq_grad
from k15sys.integrations.transformers_attention import register
from k15sys.rollout import Group, PartialRolloutScheduler, RemoteEngine, ReplayBuffer, SamplingParams
from k15sys.rollout.paged_engine import PagedEngine, make_rollout_engine
from k15sys.tasks.base import Tokenizer
from k15sys.tasks.factory import build_task
from k15sys.train import distributed as dist_utils
from k15sys.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                     set_rng_state)
from k15sys.train.config import Config, RLConfig, check_config, to_dict
from k15sys.train.evaluation import evaluate, score
from k15sys.train.hybrid import TrainerOffload
from k15sys.train.metrics import MetricsLog
from k15sys.train.model import build_lm, build_tokenizer, check_context_length
from k15sys.train.optim import MasterWeights, build_optimizer
from k15sys.train.packing import pack
from k15sys.train.policy import PackedPolicy
from k15sys.train.progress import expected_iterations, progress_bar
from k15sys.train.sft import WarmUp
from k15sys.weights import WeightSync


def informative_groups(trajs: list, rewards: torch.Tensor, group_size: int) -> tuple[list, torch.Tensor]:
    """The groups (k consecutive samples) whose rewards are not all equal (paper 2.3.2: with the mean baseline a
    group of equal rewards has ``r_j - r_bar = 0``, and at ``pi_theta = pi_i`` the tau term's gradient is zero too)."""
    if not trajs:
        return trajs, rewards
    spread = rewards.view(-1, group_size)
    keep = (spread.max(dim=1).values > spread.min(dim=1).values).repeat_interleave(group_size)
    return [t for t, m in zip(trajs, keep.tolist()) if m], rewards[keep]


def rl_learning_rate(cfg: RLConfig, iteration: int) -> float:
    """The RL learning rate of ``iteration`` (0-based): linear warm-up over ``warmup_iterations``, cosine decay
    from ``lr`` to ``lr_min`` over ``decay_iterations`` (then ``lr_min``); constant ``lr`` when both are 0."""
    lr = cfg.lr
    if cfg.decay_iterations:
        frac = min(1.0, iteration / cfg.decay_iterations)
        lr = cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.warmup_iterations:
        lr *= min(1.0, (iteration + 1) / cfg.warmup_iterations)
    return lr


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads (0 = leave the count as it is), then restore it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generation_threads(cfg: Config) -> int:
    """Torch intra-op threads while generating (rollouts, evaluation, rollout workers): ``run.rollout_threads``,
    or ``run.threads`` when that is 0."""
    return cfg.run.rollout_threads or cfg.run.threads


def use_deterministic_algorithms() -> None:
    """Make this process's GPU training bit-reproducible (``run.deterministic``): deterministic kernels where torch
    has a choice (e.g. ``index_add`` sums without atomics) and a fixed cuBLAS workspace. k15sys's own Triton
    kernels use no atomics, so they are deterministic either way. Torch's NaN-filling of every new uninitialised
    tensor (on by default with deterministic algorithms, a guard against kernels that read memory they never wrote)
    is turned off: it adds a kernel launch per allocation, which dominates small models' steps."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def build_rollout_engine(cfg: Config) -> Any:
    """A rollout worker's engine (run in the worker process): the policy's architecture on ``run.device``;
    its weights arrive with the first weight sync."""
    if cfg.run.deterministic:  # the mode is per process
        use_deterministic_algorithms()
    threads = generation_threads(cfg)  # the worker only generates
    if threads:
        torch.set_num_threads(threads)
    tok = build_tokenizer(cfg.model)
    device = dist_utils.resolve_device(cfg.run.device)
    lm = build_lm(cfg.model, tok, device)
    if device.type == "cuda":  # the GPU RemoteEngine made current for this worker
        device = torch.device("cuda", torch.cuda.current_device())
    return make_rollout_engine(cfg.run.engine, lm, device, pad_token_id=tok.pad_token_id)


RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard")


def check_no_previous_run(output_dir: str | Path) -> None:
    """Raise ValueError if a run left its metrics.jsonl or checkpoints/ in ``output_dir``."""
    out = Path(output_dir)
    found = [name for name in RUN_FILES[:2] if (out / name).exists()]
    if found:
        raise ValueError(f"run.output_dir: {out} already holds a run ({', '.join(found)}); continue it with --resume "
                         "(Trainer.run(resume=True)), delete it with --overwrite, or choose another output directory")


def remove_run(output_dir: str | Path) -> None:
    """Delete a previous run's metrics.jsonl, checkpoints/ and tensorboard/ (``k15 train --overwrite``)."""
    out = Path(output_dir)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class Trainer:
    """Builds every component from a :class:`Config` and runs ``sft -> eval -> RL iterations``.

    Args:
        cfg: the validated configuration.
        stop_after: test hook, called with the iteration number at named points of an iteration
            (``"rollout"``, ``"step"``); it may raise or kill the process to simulate a crash.
    """

    def __init__(self, cfg: Config, *, stop_after: Callable[[int, str], None] | None = None) -> None:
        check_config(cfg)  # a Config built in Python skipped load_config's checks
        self.cfg = cfg
        if cfg.run.deterministic:
            use_deterministic_algorithms()
        self.stop_after = stop_after or (lambda it, where: None)
        self.rank, self.world = dist_utils.rank_and_world()
        self.out = Path(cfg.run.output_dir)
        # the data first: a bad file or row fails before the model loads
        self.tokenizer: Tokenizer = build_tokenizer(cfg.model)
        self.task = build_task(cfg, self.tokenizer)
        self.prompts = [self.task.prompt_ids(p) for p in self.task.train]
        tok = self.tokenizer
        self.device = dist_utils.resolve_device(cfg.run.device)
        lm = build_lm(cfg.model, tok, self.device)
        if cfg.model.path:
            check_context_length(lm, max(map(len, self.prompts)) + cfg.rl.max_new_tokens)
        # the rollout engine holds its own copy of the weights (decoding with a KV cache through SDPA),
        # refreshed after every step (weight sync): in this process, or in worker processes
        if cfg.run.rollout_workers:  # a weight group of their own per trainer rank: works under torchrun too
            n = cfg.run.rollout_workers
            gpus = None
            if self.device.type == "cuda":  # one process: spread over the GPUs; torchrun: on this rank's GPU
                gpus = [w % torch.cuda.device_count() if self.world == 1 else self.device.index for w in range(n)]
            self.engine: Any = RemoteEngine(functools.partial(build_rollout_engine, cfg), n, cuda_devices=gpus)
        else:
            self.engine = make_rollout_engine(cfg.run.engine, copy.deepcopy(lm), self.device,
                                              pad_token_id=tok.pad_token_id)
        if self.device.type == "cuda":  # packed training rows: the Triton varlen kernel, no [T, T] mask
            lm.set_attn_implementation(register())
        self.policy = dist_utils.shard(PackedPolicy(lm.to(self.device)))
        self.weight_sync = WeightSync(self.policy.lm, self.engine)
        masters = cfg.model.master_weights == "fp32"  # fp32 copies stepped for bf16 parameters (k15sys.train.optim)
        self.optimizer: Any = build_optimizer(cfg.rl.optimizer, self.policy, lr=cfg.rl.lr, master_weights=masters)
        # hybrid deployment: the trainer's memory (plain or FSDP2-sharded) goes to the host while the engine generates
        self.offload = TrainerOffload(self.policy, self.optimizer, self.device)
        sft_cfg = cfg.sft if self.task.has_sft else dataclasses.replace(cfg.sft, steps=0)  # no traces: no warm-up
        self.warmup: WarmUp | None = WarmUp(self.policy, self.task.sft_examples, sft_cfg, seed=cfg.run.seed,
                                            pad_id=tok.pad_token_id, row_tokens=cfg.run.pack_row_tokens,
                                            master_weights=masters)
        self.scheduler = PartialRolloutScheduler(
            self.engine, self._make_sampler(), self.prompts,
            group_size=cfg.rl.group_size,
            prompts_per_iteration=self._my_share(cfg.rl.prompts_per_iteration),
            budget_per_iteration=cfg.rl.token_budget or cfg.rl.max_new_tokens,
            max_total_len=max(map(len, self.prompts)) + cfg.rl.max_new_tokens,
            max_response_len=cfg.rl.max_new_tokens,
            params=SamplingParams(cfg.rl.max_new_tokens, temperature=cfg.rl.temperature, stop_token_ids=tok.stop_token_ids),
            batch_size=256,
            buffer=ReplayBuffer(),
        )
        self.length_weight = LengthPenaltySchedule(cfg.rl.length_penalty_weight, cfg.rl.length_penalty_warmup)
        self.metrics = MetricsLog(self.out, tensorboard=cfg.run.tensorboard, enabled=self.rank == 0,
                                  loggers=cfg.run.loggers, config=to_dict(cfg))
        self.iteration = 0  # RL iterations done
        self.stage = "init"
        self.rl_seconds = 0.0
        self._closed = False
        self._stop_requested = False

    # ------------------------------------------------------------------ the job
    def run(self, *, resume: bool = False) -> None:
        """SFT warm-up + its evaluation row, then RL iterations until ``rl.iterations`` or ``rl.max_minutes``.

        A fresh start (``resume`` False) refuses a directory that already holds a run, so a repeated command
        cannot mix two runs' metrics or replace their checkpoints. A stop request during the warm-up checkpoints
        its progress (also every ``sft.checkpoint_every`` steps), and ``resume`` runs the remaining steps;
        ``resume`` with no checkpoint yet (a crash early in SFT) starts over, dropping the attempt's rows.
        """
        if not resume:
            check_no_previous_run(self.out)
        if not (resume and self._resume()):
            self.metrics.truncate(-1)
            self.stage = "sft"
        if self.stage == "sft":
            if not self.sft():  # stopped by request_stop: the warm-up's progress is in the checkpoint
                self.save()
                self.close()
                return
            self.stage = "rl"
            row = {"iteration": self.iteration, "stage": "sft", **self._evaluate()}
            self.metrics.log(row)
            if self.cfg.run.progress and self.rank == 0:
                print(f"k15: SFT model: held-out pass@1 {row['eval/pass@1']:.3f}", file=sys.stderr, flush=True)
            self.save()
        cfg = self.cfg.rl
        bar = progress_bar(range(self.iteration, cfg.iterations), self.cfg.run.progress and self.rank == 0, desc="rl",
                           initial=self.iteration,
                           total=expected_iterations(self.iteration, self.rl_seconds, cfg.iterations, cfg.max_minutes))
        stop = self._stop_agreed()  # asked during the SFT evaluation
        shown: dict[str, float | None] = {}
        for _ in bar:
            if stop or (cfg.max_minutes and self.rl_seconds >= 60.0 * cfg.max_minutes):
                break
            start = time.perf_counter()
            row = self.rl_iteration()
            self.rl_seconds += time.perf_counter() - start
            row["time/rl_elapsed_s"] = self.rl_seconds
            last = self.iteration == cfg.iterations or (cfg.max_minutes and self.rl_seconds >= 60.0 * cfg.max_minutes)
            if self.iteration % self.cfg.eval.every == 0 or last:
                row.update(self._evaluate())
            self.metrics.log(row)
            if hasattr(bar, "set_postfix"):  # the figures a user watches, on the progress bar
                # total and ETA: the real stop, rl.iterations or rl.max_minutes at the pace so far
                bar.total = expected_iterations(self.iteration, self.rl_seconds, cfg.iterations, cfg.max_minutes)
                shown = {"reward": row["rl/reward"], "pass@1": row.get("eval/pass@1", shown.get("pass@1"))}
                bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)
            stop = self._stop_agreed()
            if self.iteration % self.cfg.run.checkpoint_every == 0 or last or stop:
                self.save()
        self.close()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called in this process."""
        return self._stop_requested

    def request_stop(self) -> None:
        """Ask the run to stop at the next iteration boundary, after checkpointing it (what ``k15 train`` does
        on the first SIGINT/SIGTERM, e.g. Ctrl-C or a scheduler's preemption); ``--resume`` continues it."""
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (ranks must leave the loop at the same iteration)."""
        return bool(dist_utils.max_int(int(self._stop_requested)))

    def close(self) -> None:
        """Flush the metrics, stop the scheduler and any rollout worker processes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.metrics.close()
        self.scheduler.close()
        self.task.close()
        if isinstance(self.engine, RemoteEngine):
            self.engine.close()

    def sft(self) -> bool:
        """Long-CoT warm-up (paper 2.3.1) on the training problems (the remaining steps, after a resume); then
        the engine gets the weights. Returns False if :meth:`request_stop` ended it early (at a step boundary
        agreed by all ranks; :meth:`save` then keeps its progress)."""
        with intra_op_threads(self.cfg.run.threads):
            return self._sft()

    def _sft(self) -> bool:
        c, w = self.cfg, self.warmup
        if w is None:
            raise RuntimeError("sft: the warm-up already ran")
        for row in progress_bar(w, c.run.progress and self.rank == 0, desc="sft", initial=w.step, total=c.sft.steps):
            self.metrics.scalar("sft/loss", row["sft/loss"], int(row["sft/step"]))
            if w.step < c.sft.steps and self._stop_agreed():
                return False
            if c.sft.checkpoint_every and w.step % c.sft.checkpoint_every == 0 and w.step < c.sft.steps:
                self.save()
        self.warmup = None  # its AdamW moments are not needed by RL
        if isinstance(self.optimizer, MasterWeights):  # the warm-up moved the parameters past RL's fp32 copies
            self.optimizer.sync_masters()
        self.sync_weights()
        return True

    def rl_iteration(self) -> dict[str, float]:
        """One k1.5 RL iteration; returns its metrics row. Training runs on ``run.threads`` torch threads and
        generation on ``run.rollout_threads``; the caller's thread count is restored afterwards."""
        with intra_op_threads(self.cfg.run.threads):
            return self._rl_iteration()

    def _rl_iteration(self) -> dict[str, float]:
        cfg, it, times = self.cfg.rl, self.iteration, {}
        # 1. partial rollouts (new groups + continued trajectories); the seed makes the run reproducible
        t0 = time.perf_counter()
        self.scheduler.params = SamplingParams(cfg.max_new_tokens, temperature=cfg.temperature,
                                               stop_token_ids=self.tokenizer.stop_token_ids,
                                               seed=self.cfg.run.seed * 1_000_003 + it * 7919 + self.rank)
        if self.cfg.run.colocate:  # the engine gets the accelerator's memory while it generates
            self.offload.offload()
        with intra_op_threads(generation_threads(self.cfg)):
            groups = self.scheduler.run_iteration(policy_version=it)
        if self.cfg.run.colocate:  # and hands it back to the trainer
            if isinstance(self.engine, PagedEngine):  # a weight sync follows its wake: drop the weights (level 2)
                self.engine.sleep(level=2)
            else:
                self.engine.sleep()
            self.offload.onload()
        times["time/rollout_s"] = time.perf_counter() - t0
        generated = self.scheduler.last_stats.generated_tokens
        self.stop_after(it, "rollout")
        # 2. rewards: verifier + repeat penalty + length penalty, per complete group
        t0 = time.perf_counter()
        trajs = [t for g in groups for t in g.trajectories]
        correct, rewards, info = self.rewards(groups, it)
        times["time/reward_s"] = time.perf_counter() - t0
        self.scheduler.sampler.update(*dist_utils.gather_sampler_feedback(groups, correct.tolist()))
        # 3-4. pack, reference log-probs once, minibatch steps on the PMD loss
        t0 = time.perf_counter()
        train_trajs, train_rewards = (informative_groups(trajs, rewards, cfg.group_size) if cfg.skip_zero_advantage
                                      else (trajs, rewards))
        stats = self.train_on(train_trajs, train_rewards)
        times["time/train_s"] = time.perf_counter() - t0
        self.stop_after(it, "step")
        # 5. weight sync to the rollout engine
        t0 = time.perf_counter()
        self.sync_weights()
        times["time/sync_s"] = time.perf_counter() - t0
        self.iteration += 1
        lengths = [len(t.response_ids) for t in trajs]
        local = {
            "n": float(len(trajs)), "correct": float(correct.sum()), "reward": float(rewards.sum()),
            "len": float(sum(lengths)), "len_max": float(max(lengths, default=0)), "truncated": info["truncated"],
            "repeat": info["repeat"], "generated": float(generated), "trained": float(len(train_trajs)),
        }
        tot = dist_utils.sum_dict(local)
        n = max(tot["n"], 1.0)
        total_time = sum(times.values())
        return {
            "iteration": self.iteration,
            "rl/groups": tot["n"] / cfg.group_size,
            "rl/trained_groups": tot["trained"] / cfg.group_size,
            "rl/reward": tot["reward"] / n,
            "rl/accuracy": tot["correct"] / n,
            "rl/response_len": tot["len"] / n,
            "rl/response_len_max": tot["len_max"],
            "rl/truncation_rate": tot["truncated"] / n,
            "rl/repeat_rate": tot["repeat"] / n,
            "rl/length_penalty_weight": self.length_weight(it),
            "rl/replay_buffer": float(len(self.scheduler.buffer)),
            **stats,
            **times,
            "perf/rollout_tokens_per_s": tot["generated"] / max(times["time/rollout_s"], 1e-9),
            "perf/train_tokens_per_s": stats.get("rl/train_tokens", 0.0) * self.world / max(times["time/train_s"], 1e-9),
            "time/iteration_s": total_time,
        }

    def rewards(self, groups: list[Group], iteration: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Correctness [N] and shaped rewards [N] of the complete groups (paper 2.3.3, 2.3.5, 2.6.2)."""
        cfg = self.cfg.rl
        trajs = [t for g in groups for t in g.trajectories]
        if not trajs:
            return torch.zeros(0), torch.zeros(0), {"truncated": 0.0, "repeat": 0.0}
        problems = [self.task.train[g.prompt_index] for g in groups for _ in g.trajectories]
        cut = [t.finish_reason == "length" for t in trajs]  # a cut response is not verified: correctness 0
        correct = torch.tensor(score(self.task, problems, [t.response_ids for t in trajs], cut), dtype=torch.float32)
        truncated = torch.tensor(cut)
        repeated = torch.tensor([t.finish_reason == "repeat" for t in trajs])
        rewards = torch.where(truncated, torch.full_like(correct, cfg.truncated_reward), correct)
        rewards = penalize_repeats(rewards, repeated, penalty=cfg.repeat_penalty)
        weight = self.length_weight(iteration)
        if weight > 0:
            lengths = torch.tensor([len(t.response_ids) for t in trajs], dtype=torch.float32)
            rewards = rewards + weight * length_penalty(lengths, correct > 0, group_size=cfg.group_size)
        return correct, rewards, {"truncated": float(truncated.sum()), "repeat": float(repeated.sum())}

    def train_on(self, trajs: list, rewards: torch.Tensor) -> dict[str, float]:
        """Reference log-probs once (no grad), then ``epochs`` passes of minibatch PMD steps. Log-probs are taken
        at ``rl.temperature`` (``rl.tempered_logprobs``), the distribution the rollouts were drawn from.

        Under FSDP every rank must run the same number of forward/backward passes; a rank with fewer
        complete groups this iteration (partial rollouts) joins the extra steps with a zero-weight pass.
        """
        cfg, k = self.cfg.rl, self.cfg.rl.group_size
        seqs = [t.prompt_ids + t.response_ids for t in trajs]
        plens = [len(t.prompt_ids) for t in trajs]
        mb_groups = cfg.minibatch_size // k
        num_groups = len(trajs) // k
        chunks = [list(range(g * k, min(num_groups, g + mb_groups) * k)) for g in range(0, num_groups, mb_groups)]
        steps = dist_utils.max_int(len(chunks))
        if steps == 0:
            return {}

        temp = cfg.temperature if cfg.tempered_logprobs and cfg.temperature > 0 else 1.0

        def forward(idx: list[int], *, entropy: bool = False, seq_coef: torch.Tensor | None = None) -> Any:
            if not idx:  # a zero-weight pass that only keeps this rank in step with the others
                batch = pack([[self.tokenizer.eos_token_id] * 2], [1])
            else:
                batch = pack([seqs[i] for i in idx], [plens[i] for i in idx], row_tokens=self.cfg.run.pack_row_tokens,
                             pad_id=self.tokenizer.pad_token_id)
            return self.policy(batch, return_entropy=entropy, temperature=temp, seq_coef=seq_coef)

        with torch.no_grad():
            refs = [self._seq_logp(forward(chunks[c] if c < len(chunks) else [])) for c in range(steps)]
            ref = torch.cat(refs[: len(chunks)]) if chunks else torch.zeros(0)
        lr = rl_learning_rate(cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 31 + self.iteration)
        losses, norms, kls, ents, toks = [], [], [], [], 0.0
        fused = cfg.logprob_path == "fused" or (cfg.logprob_path == "auto" and self.device.type == "cuda")
        self.policy.train()
        for epoch in range(cfg.epochs):
            order = torch.randperm(num_groups, generator=gen).tolist()
            for step in range(steps):
                idx = [g * k + j for g in order[step * mb_groups : (step + 1) * mb_groups] for j in range(k)]
                coef = None  # the first step: weights still pi_i, each sample's dL/dlogp known up front (fused op)
                if fused and epoch == 0 and step == 0:
                    coef = self._first_step_coef([len(seqs[i]) - plens[i] for i in idx], ref[idx], rewards[idx])
                out = forward(idx, entropy=True, seq_coef=coef)
                seq_logp = self._seq_logp(out)
                if idx:
                    loss = pmd_loss(seq_logp, ref[idx], rewards[idx].to(seq_logp.device), group_size=k, tau=cfg.tau,
                                    baseline=cfg.baseline)
                else:
                    loss = 0.0 * seq_logp.sum()
                self.optimizer.zero_grad(set_to_none=True)
                (loss if coef is None else out.loss).backward()  # the fused path: `loss` is its value, detached
                norm = dist_utils.clip_grad_norm(self.policy, cfg.grad_clip)
                self.optimizer.step()
                norms.append(norm)
                if idx:
                    ntok = float(out.num_tokens.sum())
                    losses.append(float(loss.detach()))
                    kls.append(float((ref[idx] - seq_logp.detach()).mean()))
                    ents.append(float(out.entropy.detach().sum()) / max(ntok, 1.0))
                    toks += ntok
        self.optimizer.zero_grad(set_to_none=True)  # no gradient memory held through the rollouts
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        return {"rl/loss": mean(losses), "rl/grad_norm": mean(norms), "rl/kl_ref": mean(kls), "rl/entropy": mean(ents),
                "rl/train_tokens": toks, "rl/lr": lr}

    def _first_step_coef(self, lengths: list[int], ref: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """``dL/d(sum of the response's log-probs)`` of each sample of the iteration's first step (paper 2.3.2).
        No update has happened since the reference pass, so log pi_theta = log pi_i and ``pmd_seq_grad`` needs no
        forward (delta = 0); rl.normalize's sequence log-prob divides it by the length (or the constant)."""
        cfg = self.cfg.rl
        if not lengths:
            return torch.zeros(1)  # the zero-weight pass's one placeholder sample
        grad = pmd_seq_grad(ref, ref, rewards.to(ref.device), group_size=cfg.group_size, tau=cfg.tau,
                            baseline=cfg.baseline)
        return self._normalized(grad, torch.tensor(lengths, dtype=grad.dtype, device=grad.device))

    def _seq_logp(self, out: Any) -> torch.Tensor:
        return self._normalized(out.seq_logp, out.num_tokens)

    def _normalized(self, per_seq: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """``per_seq`` (a sequence log-prob, or the loss's gradient w.r.t. it) under ``rl.normalize``: as is (paper
        'sum'), divided by each response's token count ('mean') or by ``rl.max_new_tokens`` ('constant')."""
        norm = self.cfg.rl.normalize
        if norm == "mean":
            return per_seq / num_tokens.clamp_min(1.0)
        if norm == "constant":
            return per_seq / float(self.cfg.rl.max_new_tokens)
        return per_seq

    def sync_weights(self) -> None:
        """Trainer -> rollout engine, one version (``k15sys.weights.WeightSync``): into an in-process engine's own
        tensors on their device (FSDP2 shards gathered one tensor at a time), or through the checkpoint engine
        to rollout workers; checked before anything changes, applied all-or-nothing."""
        if self.cfg.run.colocate:
            self.engine.wake()
        self.weight_sync.push()

    # ------------------------------------------------------------------ evaluation / state
    def _evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        t0 = time.perf_counter()
        row = {}
        if self.rank == 0:
            with intra_op_threads(generation_threads(self.cfg)):
                row = evaluate(self.engine, self.task, self.task.eval, max_new_tokens=self.cfg.rl.max_new_tokens,
                               num_samples=e.num_samples, temperature=e.temperature, batch_size=e.batch_size,
                               seed=self.cfg.run.seed)
        row = dist_utils.broadcast_object(row)
        row["time/eval_s"] = time.perf_counter() - t0
        return row

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "stage": self.stage,
            "rl_seconds": self.rl_seconds,
            "model": dist_utils.full_state_dict(self.policy.lm),
            "optimizer": dist_utils.full_optimizer_state_dict(self.policy, self.optimizer),
            "scheduler": dist_utils.all_gather_objects(self.scheduler.state_dict()),  # per rank: buffer + sampler
            "rng": dist_utils.all_gather_objects(rng_state()),
            "config": to_dict(self.cfg),
            "world_size": self.world,
            "sft": self.warmup.state_dict() if self.stage == "sft" and self.warmup else None,  # stopped mid-way
        }

    def save(self) -> None:
        state = self.state_dict()
        error = None
        if self.rank == 0:
            try:
                save_checkpoint(self.out / "checkpoints", self.iteration, state, keep=self.cfg.run.keep_checkpoints)
            except CheckpointError as e:  # e.g. a full disk: every rank stops with the message, none waits for rank 0
                error = e
        message = dist_utils.broadcast_object(None if error is None else str(error))  # also the ranks' barrier
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(f"rank 0 could not save the checkpoint: {message}")

    def _resume(self) -> bool:
        # the newest checkpoint that passes its checksums; damaged newer ones are named on stderr, and checkpoints
        # that exist but are all damaged raise CheckpointError rather than start the run over
        say = (lambda msg: print(f"k15: --resume: {msg}", file=sys.stderr, flush=True)) if self.rank == 0 else None
        path = latest_checkpoint(self.out / "checkpoints", log=say)
        if path is None:
            if say:
                say(f"no checkpoint under {self.out / 'checkpoints'} yet; starting the run from the beginning")
            return False
        state = load_checkpoint(path, verify=False)  # just verified
        if state["world_size"] != self.world:
            raise ValueError(f"--resume: checkpoint {path} was written by {state['world_size']} ranks, this run has {self.world}")
        dist_utils.load_full_state_dict(self.policy.lm, state["model"])
        dist_utils.load_full_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"][self.rank])
        set_rng_state(state["rng"][self.rank])
        self.iteration, self.stage, self.rl_seconds = state["iteration"], state["stage"], state["rl_seconds"]
        if state.get("sft"):
            self.warmup.load_state_dict(state["sft"])
        self.metrics.truncate(self.iteration)
        self.sync_weights()
        return True

    def _make_sampler(self) -> Any:
        cfg, seed = self.cfg.rl, self.cfg.run.seed
        if cfg.sampler == "prioritized":
            return PrioritizedSampler(len(self.task.train), seed=seed + self.rank)
        ramp = cfg.curriculum_ramp if cfg.sampler == "curriculum" else 0
        return CurriculumSampler([p.difficulty for p in self.task.train], ramp_iterations=ramp, seed=seed + self.rank)

    def _my_share(self, n: int) -> int:
        share = n // self.world + (1 if self.rank < n % self.world else 0)
        if share < 1:
            raise ValueError(f"rl.prompts_per_iteration: {n} is fewer than the {self.world} ranks")
        return share

