"""Long-CoT supervised fine-tuning, the warm-up before RL (paper 2.3.1).

Each step draws ``batch_size`` examples from the task (:meth:`k15sys.tasks.base.Task.sft_examples`: the
arithmetic task writes a fresh solution trace per problem, long-CoT traces re-checking steps at random so the
model sees varied lengths; a JSONL task draws ``sft.data`` traces), packs them without padding and minimises
the mean negative log-likelihood of the response tokens (``k15sys.ops.fused_logprobs``). :class:`WarmUp` runs
the steps and can be checkpointed between any two of them.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from k15sys.tasks.base import SFTBatch
from k15sys.train.config import SFTConfig
from k15sys.train.optim import build_optimizer
from k15sys.train.packing import pack
from k15sys.train.policy import PackedPolicy


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class WarmUp:
    """``cfg.steps`` SFT steps on ``examples(rng, n)`` batches (paper 2.3.1), resumable: iterate to run the remaining
    steps (each yields ``{"sft/step", "sft/loss", "sft/lr", "sft/tokens"}``); :meth:`state_dict` after any step holds
    what decides the next one (step, AdamW state, the example sampler's RNG), so a run stopped mid-way and
    resumed from it ends with the same weights as an uninterrupted one.

    Args:
        policy: the model being trained.
        examples: draws a batch (:meth:`k15sys.tasks.base.Task.sft_examples`) with the given RNG.
        cfg: steps, batch size and optimizer settings.
        seed: seed of the RNG handed to ``examples``.
        pad_id: padding id of packed rows; row_tokens: tokens per packed row (0 = one row).
        master_weights: step fp32 copies of bf16/fp16 parameters (:mod:`k15sys.train.optim`).
    """

    def __init__(self, policy: PackedPolicy, examples: Callable[[random.Random, int], SFTBatch], cfg: SFTConfig,
                 *, seed: int, pad_id: int = 0, row_tokens: int = 0, master_weights: bool = False) -> None:
        self.policy, self.examples, self.cfg = policy, examples, cfg
        self.pad_id, self.row_tokens = pad_id, row_tokens
        self.rng = random.Random(seed)
        self.opt = build_optimizer("adamw", policy, lr=cfg.lr, weight_decay=cfg.weight_decay, master_weights=master_weights)
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.opt.state_dict(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.opt.load_state_dict(state["optimizer"])
        self.rng.setstate(state["rng"])

    def __iter__(self) -> Iterator[dict[str, float]]:
        cfg = self.cfg
        self.policy.train()
        while self.step < cfg.steps:
            lr = cfg.lr * lr_factor(self.step, cfg.steps, cfg.warmup_steps)
            for group in self.opt.param_groups:
                group["lr"] = lr
            seqs, plens, targets = self.examples(self.rng, cfg.batch_size)
            out = self.policy(pack(seqs, plens, row_tokens=self.row_tokens, pad_id=self.pad_id, targets=targets))
            loss = -out.seq_logp.sum() / out.num_tokens.sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            yield {"sft/step": self.step, "sft/loss": float(loss.detach()), "sft/lr": lr,
                   "sft/tokens": float(out.num_tokens.sum())}
        self.opt.zero_grad(set_to_none=True)  # the RL stage starts without the warm-up's gradients in memory
