"""``k15 long2short merge|srs|dpo|rl``: the four long2short methods of paper 2.4 on a trained run.

Each method starts from the run's latest checkpoint (the long-CoT RL model), produces a shorter-CoT
model and evaluates it on the held-out split next to the starting model. One JSON row per method is
appended to ``RUN/long2short.jsonl``: pass@1 and mean response tokens before and after, and the token
reduction; the shorter model is written to ``RUN/long2short/<method>/`` as a transformers model directory
(:func:`k15sys.train.model.export_model`). The methods:

- ``merge``: SFT a short-CoT model (same init, short traces), average its weights with the long one.
- ``srs``: sample ``num_samples`` responses per training problem, keep the shortest correct one, SFT.
- ``dpo``: the same samples; shortest correct = chosen, wrong or > ``dpo_length_ratio`` x longer = rejected.
- ``rl``: more RL iterations with the length penalty on and a much smaller max rollout length.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from k15sys.algo.long2short import build_dpo_pairs, dpo_loss, merge_state_dicts, shortest_rejection_sample
from k15sys.rollout import SamplingParams
from k15sys.train import distributed as dist_utils
from k15sys.train.config import Config, ConfigError
from k15sys.train.evaluation import evaluate, score_completions
from k15sys.train.model import export_model
from k15sys.train.optim import build_optimizer
from k15sys.train.packing import pack
from k15sys.train.trainer import Trainer, intra_op_threads

METHODS = ("merge", "srs", "dpo", "rl")


def _load(cfg: Config, run_dir: Path) -> Trainer:
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(run_dir), tensorboard=False))
    tr = Trainer(cfg)
    if not tr._resume():
        raise ValueError(f"run_dir: no checkpoint under {run_dir / 'checkpoints'}; run `k15 train` first")
    return tr


def _eval(tr: Trainer) -> dict[str, float]:
    e = evaluate(tr.engine, tr.task, tr.task.eval, max_new_tokens=tr.cfg.rl.max_new_tokens,
                 batch_size=tr.cfg.eval.batch_size, seed=tr.cfg.run.seed)
    return {"pass@1": e["eval/pass@1"], "response_len": e["eval/response_len"]}


def _samples(tr: Trainer) -> list[tuple[list[int], list[list[int]], list[bool]]]:
    """(prompt ids, n responses, correctness) for ``num_problems`` training problems."""
    c = tr.cfg.long2short
    rng = random.Random(tr.cfg.run.seed)
    problems = rng.sample(list(tr.task.train), min(c.num_problems, len(tr.task.train)))
    params = SamplingParams(tr.cfg.rl.max_new_tokens, temperature=tr.cfg.rl.temperature,
                            stop_token_ids=tr.tokenizer.stop_token_ids, seed=tr.cfg.run.seed + 17)
    prompts = [tr.task.prompt_ids(p) for p in problems for _ in range(c.num_samples)]
    comps = tr.engine.generate(prompts, params)
    ok = score_completions(tr.task, [p for p in problems for _ in range(c.num_samples)], comps)
    n = c.num_samples
    return [(prompts[i * n], [comps[j].token_ids for j in range(i * n, (i + 1) * n)], [r >= 1.0 for r in ok[i * n : (i + 1) * n]])
            for i in range(len(problems))]


def _optimizer(tr: Trainer, lr: float) -> Any:
    return build_optimizer("adamw", tr.policy, lr=lr, master_weights=tr.cfg.model.master_weights == "fp32")


def run_merge(tr: Trainer) -> dict[str, Any]:
    if not tr.task.has_short_cot:
        raise ConfigError("long2short merge: this run's task has no short-CoT warm-up traces to train the short model "
                          "on (a data.train run); use srs, dpo or rl")
    long_state = dist_utils.full_state_dict(tr.policy.lm)
    short_cfg = dataclasses.replace(tr.cfg, sft=dataclasses.replace(tr.cfg.sft, long_cot=False),
                                    run=dataclasses.replace(tr.cfg.run, output_dir=str(Path(tr.cfg.run.output_dir) / "short_sft")))
    short = Trainer(short_cfg)
    short.sft()
    short_eval = _eval(short)
    merged = merge_state_dicts(long_state, dist_utils.full_state_dict(short.policy.lm), alpha=tr.cfg.long2short.merge_alpha)
    dist_utils.load_full_state_dict(tr.policy.lm, merged)
    tr.sync_weights()
    return {"short_model/pass@1": short_eval["pass@1"], "short_model/response_len": short_eval["response_len"]}


def run_srs(tr: Trainer) -> dict[str, Any]:
    c, data = tr.cfg.long2short, []
    for prompt, resps, ok in _samples(tr):
        best = shortest_rejection_sample([len(r) for r in resps], ok)
        if best is not None:
            data.append((prompt, resps[best]))
    if not data:
        raise ValueError("long2short.num_problems: no problem had a correct sample; nothing to train on")
    opt, rng = _optimizer(tr, c.lr), random.Random(tr.cfg.run.seed)
    tr.policy.train()
    for _ in range(c.steps):
        batch = [data[rng.randrange(len(data))] for _ in range(c.batch_size)]
        out = tr.policy(pack([p + r for p, r in batch], [len(p) for p, _ in batch], row_tokens=tr.cfg.run.pack_row_tokens))
        loss = -out.seq_logp.sum() / out.num_tokens.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tr.sync_weights()
    return {"train_examples": len(data)}


def run_dpo(tr: Trainer) -> dict[str, Any]:
    c, pairs = tr.cfg.long2short, []
    for prompt, resps, ok in _samples(tr):
        for i, j in build_dpo_pairs([len(r) for r in resps], ok, length_ratio=c.dpo_length_ratio):
            pairs.append((prompt, resps[i], resps[j]))
    if not pairs:
        raise ValueError("long2short.num_problems: no preference pair could be built")
    rows = tr.cfg.run.pack_row_tokens

    def logps(batch: list[tuple[list[int], list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [p + a for p, a, _ in batch] + [p + b for p, _, b in batch]
        out = tr.policy(pack(seqs, [len(p) for p, _, _ in batch] * 2, row_tokens=rows)).seq_logp
        return out[: len(batch)], out[len(batch):]

    with torch.no_grad():  # the reference is the long-CoT model itself
        ref = [logps(pairs[i : i + 64]) for i in range(0, len(pairs), 64)]
    ref_c, ref_r = torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])
    opt, rng = _optimizer(tr, c.dpo_lr), random.Random(tr.cfg.run.seed)
    tr.policy.train()
    for _ in range(c.steps):
        idx = [rng.randrange(len(pairs)) for _ in range(c.batch_size)]
        ch, rj = logps([pairs[i] for i in idx])
        loss = dpo_loss(ch, rj, ref_c[idx], ref_r[idx], beta=c.dpo_beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tr.sync_weights()
    return {"pairs": len(pairs)}


def run_rl(tr: Trainer) -> dict[str, Any]:
    c = tr.cfg.long2short
    rl = dataclasses.replace(tr.cfg.rl, length_penalty_weight=c.rl_length_penalty_weight, length_penalty_warmup=0,
                             max_new_tokens=c.rl_max_new_tokens, warmup_iterations=0)
    tr.cfg = dataclasses.replace(tr.cfg, rl=rl)
    tr.length_weight = type(tr.length_weight)(rl.length_penalty_weight, 0)
    tr.scheduler.budget = rl.max_new_tokens
    tr.scheduler.max_total_len = max(map(len, tr.prompts)) + rl.max_new_tokens
    tr.scheduler.max_response_len = rl.max_new_tokens
    tr.scheduler.buffer.groups.clear()  # trajectories of the long-CoT run do not carry over
    for _ in range(c.rl_iterations):
        tr.rl_iteration()
    tr.cfg = dataclasses.replace(tr.cfg, rl=dataclasses.replace(rl, max_new_tokens=tr.cfg.rl.max_new_tokens))
    return {"iterations": c.rl_iterations}


def long2short(method: str, cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run one long2short ``method`` on the run in ``run_dir``; returns (and appends) its result row."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    run_dir = Path(run_dir)
    with intra_op_threads(cfg.run.threads):
        tr = _load(cfg, run_dir)
        base = _eval(tr)
        t0 = time.perf_counter()
        extra = {"merge": run_merge, "srs": run_srs, "dpo": run_dpo, "rl": run_rl}[method](tr)
        seconds = time.perf_counter() - t0
        after = _eval(tr)
        model_dir = export_model(tr.cfg.model, dist_utils.full_state_dict(tr.policy.lm), run_dir / "long2short" / method)
    row = {
        "method": method,
        "long/pass@1": base["pass@1"], "long/response_len": base["response_len"],
        "pass@1": after["pass@1"], "response_len": after["response_len"],
        "token_reduction": 1.0 - after["response_len"] / max(base["response_len"], 1e-9),
        "accuracy_change": after["pass@1"] - base["pass@1"],
        "seconds": seconds,
        "model_dir": str(model_dir),
        **extra,
    }
    with (run_dir / "long2short.jsonl").open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    tr.close()
    return row
