"""Long-CoT supervised fine-tuning, the warm-up before RL (paper 2.3.1).

Each step draws ``batch_size`` training problems, writes a fresh solution trace for each (long-CoT
traces re-check steps at random, so the model sees varied lengths), packs them without padding and
minimises the mean negative log-likelihood of the response tokens (``k15sys.ops.fused_logprobs``).
:class:`WarmUp` runs the steps and can be checkpointed between any two of them; :func:`warmup_problems`
chooses the warm-up set.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from k15sys.tasks import CharTokenizer, Problem, direct_answer, solution_segments
from k15sys.train.config import SFTConfig
from k15sys.train.packing import pack
from k15sys.train.policy import PackedPolicy


def sft_examples(
    problems: Sequence[Problem], tokenizer: CharTokenizer, *, rng: random.Random, verify_prob: float, n: int,
    direct_prob: float = 0.0, mistake_prob: float = 0.0,
) -> tuple[list[list[int]], list[int], list[list[bool]]]:
    """``n`` random (prompt + solution) token sequences, their prompt lengths and per-token target flags
    (False on the slips of self-correcting traces, which SFT must not imitate; see
    :func:`k15sys.tasks.solution_segments`); a ``direct_prob`` share of the responses are the answer with
    no working (:func:`k15sys.tasks.direct_answer`)."""
    seqs, plens, targets = [], [], []
    for _ in range(n):
        p = problems[rng.randrange(len(problems))]
        prompt = tokenizer.encode(p.prompt, bos=True)
        if rng.random() < direct_prob:
            segs = [(direct_answer(p), True)]
        else:
            segs = solution_segments(p, rng=rng, verify_prob=verify_prob, mistake_prob=mistake_prob)
        seq, keep = list(prompt), [True] * len(prompt)
        for text, imitate in segs:
            ids = tokenizer.encode(text)
            seq += ids
            keep += [imitate] * len(ids)
        seqs.append(seq + [tokenizer.eos_token_id])
        targets.append(keep + [True])
        plens.append(len(prompt))
    return seqs, plens, targets


def warmup_problems(problems: Sequence[Problem], max_ops: int) -> list[Problem]:
    """The warm-up set (paper 2.3.1): the problems with at most ``max_ops`` operations (0 = all of them).

    A warm-up on the easier problems only leaves the harder ones to RL, whose curriculum (2.3.4) moves
    from easy to hard."""
    if max_ops < 0:
        raise ValueError(f"max_ops: must be >= 0, got {max_ops}")
    chosen = [p for p in problems if not max_ops or p.difficulty <= max_ops]
    if problems and not chosen:
        raise ValueError(f"max_ops={max_ops}: no training problem has that few operations")
    return chosen


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class WarmUp:
    """``cfg.steps`` SFT steps on ``problems`` (paper 2.3.1), resumable: iterate to run the remaining steps
    (each yields ``{"sft/step", "sft/loss", "sft/lr", "sft/tokens"}``); :meth:`state_dict` after any step holds
    what decides the next one (step, AdamW state, the trace sampler's RNG), so a run stopped mid-way and
    resumed from it ends with the same weights as an uninterrupted one."""

    def __init__(self, policy: PackedPolicy, problems: Sequence[Problem], tokenizer: CharTokenizer, cfg: SFTConfig,
                 *, verify_prob: float, seed: int, direct_prob: float = 0.0, mistake_prob: float = 0.0,
                 row_tokens: int = 0) -> None:
        if not problems:
            raise ValueError("problems: empty SFT set")
        self.policy, self.problems, self.tokenizer, self.cfg = policy, problems, tokenizer, cfg
        long_cot = cfg.long_cot
        self.verify_prob, self.mistake_prob = (verify_prob, mistake_prob) if long_cot else (0.0, 0.0)
        self.direct_prob, self.row_tokens = direct_prob, row_tokens
        self.rng = random.Random(seed)
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
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
            seqs, plens, targets = sft_examples(self.problems, self.tokenizer, rng=self.rng, verify_prob=self.verify_prob,
                                                n=cfg.batch_size, direct_prob=self.direct_prob,
                                                mistake_prob=self.mistake_prob)
            out = self.policy(pack(seqs, plens, row_tokens=self.row_tokens, pad_id=self.tokenizer.pad_token_id,
                                   targets=targets))
            loss = -out.seq_logp.sum() / out.num_tokens.sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            yield {"sft/step": self.step, "sft/loss": float(loss.detach()), "sft/lr": lr,
                   "sft/tokens": float(out.num_tokens.sum())}
        self.opt.zero_grad(set_to_none=True)  # the RL stage starts without the warm-up's gradients in memory
