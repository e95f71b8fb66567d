"""Partial vs synchronous rollouts (paper 2.6.2), side by side in one run.

1. **Simulator** of an inference engine with ``slots`` concurrent sequences (continuous batching). A decode
   step costs ``t_step + t_seq * active + t_kv * sum(context)``; (re)starting a sequence costs a prefill of
   its context at ``t_prefill`` per token. Response lengths are lognormal with a tail to 128k tokens.
   *Synchronous*: an iteration ends when every trajectory of it has finished, so the slots drain while the
   tail finishes. *Partial*: every trajectory gets at most ``budget`` tokens per iteration, unfinished ones
   are parked (replay buffer) and re-prefilled next iteration; the slots stay full. Same new trajectories
   per iteration in both. Reports tokens/s, idle fraction (unused slot-time), the speedup, and a PNG of both
   timelines (active slots over time).
2. **Real, on the CPU**: ``PartialRolloutScheduler`` + ``TorchEngine`` on a tiny random Qwen2 model whose
   lengths have a long tail (a rare stop token), with a budget equal to the max length (synchronous) vs a
   small budget (partial); tokens/s for both.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Cost:
    t_step: float = 15e-3     # fixed cost of a decode step (s)
    t_seq: float = 5e-5       # per active sequence per step
    t_kv: float = 4e-8        # per context token read per step (KV cache traffic)
    t_prefill: float = 1e-5   # per prompt/context token of a (re)start


def _advance(active: list[list[int]], k: int, c: Cost) -> float:
    """Time for k decode steps of all active sequences; each entry is [context, left_total, left_segment]."""
    n = len(active)
    ctx = sum(a[0] for a in active)
    # sum over steps i=0..k-1 of (t_step + t_seq*n + t_kv*(ctx + i*n))
    return k * (c.t_step + c.t_seq * n + c.t_kv * ctx) + c.t_kv * n * k * (k - 1) / 2


def simulate(lengths_per_iter: list[np.ndarray], prompt_len: int, slots: int, budget: int | None, c: Cost):
    """Returns (tokens, seconds, busy slot-seconds, timeline[(t, active)])."""
    t = 0.0
    busy = 0.0
    tokens = 0
    timeline = [(0.0, 0)]
    parked: list[list[int]] = []  # [context, left_total]
    for lengths in lengths_per_iter:
        queue = parked + [[prompt_len, int(L)] for L in lengths]
        parked = []
        active: list[list[int]] = []
        while queue or active:
            while queue and len(active) < slots:
                ctx, left = queue.pop(0)
                seg = left if budget is None else min(left, budget)
                dt = c.t_prefill * ctx
                t += dt
                busy += dt * len(active)
                active.append([ctx, left, seg])
            k = min(a[2] for a in active)
            dt = _advance(active, k, c)
            t += dt
            busy += dt * len(active)
            tokens += k * len(active)
            timeline.append((t, len(active)))
            still = []
            for a in active:
                a[0] += k
                a[1] -= k
                a[2] -= k
                if a[1] == 0:
                    continue
                if a[2] == 0:
                    parked.append([a[0], a[1]])
                else:
                    still.append(a)
            active = still
        timeline.append((t, 0))
    return tokens, t, busy, timeline


def run_simulation(quick: bool, png: Path | None) -> dict:
    rng = np.random.default_rng(0)
    iters = 6 if quick else 20
    per_iter = 256  # 32 prompts x 8 samples
    slots = 256
    lengths = [np.clip(rng.lognormal(np.log(4000), 1.0, per_iter), 200, 131072).astype(int) for _ in range(iters)]
    c = Cost()
    out = {"iterations": iters, "trajectories_per_iteration": per_iter, "slots": slots,
           "length_p50": float(np.median(np.concatenate(lengths))), "length_max": int(max(x.max() for x in lengths))}
    timelines = {}
    for name, budget in (("synchronous", None), ("partial", 2048)):
        tok, secs, busy, tl = simulate(lengths, 512, slots, budget, c)
        out[name] = {"budget": budget, "tokens": tok, "seconds": secs, "tokens_per_s": tok / secs,
                     "idle_fraction": 1 - busy / (slots * secs)}
        timelines[name] = tl
    out["speedup_tokens_per_s"] = out["partial"]["tokens_per_s"] / out["synchronous"]["tokens_per_s"]
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
        for ax, name in zip(axes, ("synchronous", "partial")):
            ts, ns = zip(*timelines[name])
            ax.step(np.array(ts) / 60, ns, where="post", lw=0.8)
            ax.set_ylabel("active slots")
            r = out[name]
            ax.set_title(f"{name}: {r['tokens_per_s']:.0f} tok/s, idle {100 * r['idle_fraction']:.1f}%", fontsize=10)
        axes[-1].set_xlabel("minutes (simulated engine time)")
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        plt.close(fig)
    return out


def run_real_cpu(quick: bool) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from k15sys.algo import PrioritizedSampler
    from k15sys.rollout import PartialRolloutScheduler, SamplingParams, TorchEngine

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # token 0 as the stop token, about 1 in 64: geometric-like lengths, a long tail
        model.lm_head.weight[0].zero_()
    torch.set_num_threads(1)  # both variants on one core: the comparison, not the machine, is measured
    prompts = [[1 + (i % 60), 2 + (i % 50)] for i in range(64)]
    max_len = 160 if quick else 320
    target_groups = 6 if quick else 12
    out = {"target_groups": target_groups, "max_len": max_len}
    for name, budget in (("synchronous", max_len), ("partial", 32)):
        engine = TorchEngine(model, repeat_detector=None)
        sched = PartialRolloutScheduler(engine, PrioritizedSampler(len(prompts), seed=0), prompts, group_size=4,
                                        prompts_per_iteration=2, budget_per_iteration=budget, max_total_len=max_len,
                                        params=SamplingParams(1, temperature=1.0, stop_token_ids=(0,), seed=0),
                                        batch_size=8)
        t0 = time.perf_counter()
        tokens = groups = iters = 0
        while groups < target_groups:  # same work for both: until this many complete groups are emitted
            emitted = sched.run_iteration(iters)
            groups += len(emitted)
            tokens += sched.last_stats.generated_tokens
            iters += 1
        secs = time.perf_counter() - t0
        out[name] = {"budget": budget, "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
                     "groups_emitted": groups, "groups_per_s": groups / secs, "iterations": iters}
        sched.close()
    out["speedup_tokens_per_s"] = out["partial"]["tokens_per_s"] / out["synchronous"]["tokens_per_s"]
    out["speedup_groups_per_s"] = out["partial"]["groups_per_s"] / out["synchronous"]["groups_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/results/partial_rollout_cpu.json")
    ap.add_argument("--png", default="docs/img/partial_rollout_timeline.png")
    args = ap.parse_args()
    result = {"bench": "partial_rollout", "device": "cpu (simulated engine + real TorchEngine)",
              "simulation": run_simulation(args.quick, Path(args.png) if args.png else None),
              "real_cpu": run_real_cpu(args.quick)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
