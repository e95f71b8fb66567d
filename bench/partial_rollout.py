"""Partial vs synchronous rollouts (paper 2.6.2), side by side in one run.

1. **Simulator** of an inference engine with ``slots`` concurrent sequences (continuous batching). A decode
   step costs ``t_step + t_seq * active + t_kv * sum(context)``; (re)starting a sequence costs a prefill of
   its context at ``t_prefill`` per token. Response lengths are lognormal with a tail to 128k tokens.
   *Synchronous*: an iteration ends when every trajectory of it has finished, so the slots drain while the
   tail finishes. *Partial*: every trajectory gets at most ``budget`` tokens per iteration, unfinished ones
   are parked (replay buffer) and re-prefilled next iteration; the slots stay full. Same new trajectories
   per iteration in both. Reports tokens/s, idle fraction (unused slot-time), the speedup, and a PNG of both
   timelines (active slots over time).
   A sweep varies the budget and the tail (lognormal sigma 0.7 / 1.0 / 1.3).
2. **Real, on the CPU**: ``PartialRolloutScheduler`` (2 workers) + ``TorchEngine`` on a tiny random Qwen2
   model whose lengths have a long tail (a rare stop token), with a budget equal to the max length
   (synchronous) vs a small budget (partial), until the same number of groups is emitted; tokens/s,
   groups/s, worker idle time, and a PNG of every engine call per worker.
``--quick`` takes a few seconds. A short summary, then one JSON object on the last line. The JSON and the
two PNGs go to runs/bench/ (``--out``: the JSON's path, PNGs beside it); ``--update-results`` writes the
shipped bench/results/partial_rollout_cpu.json and docs/img/partial_rollout_*.png.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import benchlib


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


def simulate(lengths_per_iter: list[np.ndarray], prompt_len: int, slots: int, budget: int | None, c: Cost,
             drain: bool = False) -> dict:
    """Run the engine model over the iterations; ``budget=None`` is the synchronous baseline. ``drain``:
    after the last new trajectories, keep iterating without new ones until every trajectory finished
    (the same work as the synchronous run, tail included)."""
    t = busy = 0.0
    tokens = finished = 0
    timeline = [(0.0, 0)]
    iteration_s = []
    parked: list[list[int]] = []  # [context, left_total]
    schedule = list(lengths_per_iter)
    while schedule:
        lengths = schedule.pop(0)
        start = t
        queue = parked + [[prompt_len, int(L)] for L in lengths]
        parked = []
        active: list[list[int]] = []  # [context, left_total, left_in_this_segment]
        while queue or active:
            while queue and len(active) < slots:
                ctx, left = queue.pop(0)
                dt = c.t_prefill * ctx  # the prompt, or prompt + response so far for a parked trajectory
                t += dt
                busy += dt * len(active)
                active.append([ctx, left, left if budget is None else min(left, budget)])
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
                    finished += 1
                elif a[2] == 0:
                    parked.append([a[0], a[1]])
                else:
                    still.append(a)
            active = still
        timeline.append((t, 0))
        iteration_s.append(t - start)
        if drain and not schedule and parked:
            schedule.append(np.zeros(0, dtype=int))
    return {"budget": budget, "tokens": tokens, "seconds": t, "tokens_per_s": tokens / t,
            "idle_fraction": 1 - busy / (slots * t), "iteration_s_mean": float(np.mean(iteration_s)),
            "iteration_s_max": float(np.max(iteration_s)), "trajectories_finished": finished,
            "finished_per_s": finished / t, "parked_at_end": len(parked), "iterations": len(iteration_s),
            "timeline": timeline}


def _lengths(rng: np.random.Generator, iters: int, per_iter: int, sigma: float) -> list[np.ndarray]:
    """Lognormal response lengths, median 4k tokens, clipped to [200, 128k]."""
    return [np.clip(rng.lognormal(np.log(4000), sigma, per_iter), 200, 131072).astype(int) for _ in range(iters)]


def run_simulation(quick: bool, png: Path | None) -> dict:
    iters = 6 if quick else 20
    per_iter = slots = 256  # 32 prompts x 8 samples, on an engine with 256 sequence slots
    c = Cost()
    lengths = _lengths(np.random.default_rng(0), iters, per_iter, 1.0)
    out = {"iterations": iters, "trajectories_per_iteration": per_iter, "slots": slots, "cost_model": vars(c),
           "length_sigma": 1.0, "length_p50": float(np.median(np.concatenate(lengths))),
           "length_p99": float(np.percentile(np.concatenate(lengths), 99)),
           "length_max": int(max(x.max() for x in lengths))}
    timelines = {}
    for name, budget, drain in (("synchronous", None, False), ("partial", 2048, False), ("partial_drained", 2048, True)):
        r = simulate(lengths, 512, slots, budget, c, drain)
        timelines[name] = r.pop("timeline")
        out[name] = r
    out["speedup_tokens_per_s"] = out["partial"]["tokens_per_s"] / out["synchronous"]["tokens_per_s"]
    # the same trajectories, every one finished (the partial run pays its own tail once, at the end)
    out["speedup_drained_time"] = out["synchronous"]["seconds"] / out["partial_drained"]["seconds"]
    # sensitivity: the budget, and a lighter / heavier tail (each against its own synchronous run)
    sweep = []
    for sigma, budget in ((1.0, 1024), (1.0, 4096), (1.0, 8192), (0.7, 2048), (1.3, 2048)):
        ls = lengths if sigma == 1.0 else _lengths(np.random.default_rng(1), iters, per_iter, sigma)
        sync = simulate(ls, 512, slots, None, c)
        part = simulate(ls, 512, slots, budget, c)
        sweep.append({"length_sigma": sigma, "budget": budget, "length_max": int(max(x.max() for x in ls)),
                      "speedup_tokens_per_s": part["tokens_per_s"] / sync["tokens_per_s"],
                      "idle_partial": part["idle_fraction"], "idle_synchronous": sync["idle_fraction"]})
    out["sweep"] = sweep
    if png is not None:
        _plot_simulation(timelines, out, png)
    return out


def _plot_simulation(timelines: dict, out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("synchronous", "partial", "partial_drained")
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 6.5), sharex=True)
    for ax, name in zip(axes, names):
        ts, ns = zip(*timelines[name])
        ax.step(np.array(ts) / 60, ns, where="post", lw=0.8)
        ax.set_ylabel("active slots")
        r = out[name]
        what = {"synchronous": f"{out['iterations']} iterations, every trajectory to its end",
                "partial": f"{out['iterations']} iterations, budget {r['budget']}",
                "partial_drained": "the same, then iterations without new prompts until all finished"}[name]
        ax.set_title(f"{name} ({what}): {r['tokens_per_s']:.0f} tok/s, idle {100 * r['idle_fraction']:.1f}%, "
                     f"iteration {r['iteration_s_mean'] / 60:.1f} min (mean)", fontsize=9)
    axes[-1].set_xlabel("minutes (simulated engine time)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


class _Recorder:
    """Wraps an engine and records every call (worker thread, start, end, prompts) on the clock of its own
    scheduler: ``own_time`` is that scheduler's elapsed time before the iteration that began at ``started``."""

    def __init__(self, engine):
        self.engine, self.calls, self.own_time, self.started = engine, [], 0.0, time.perf_counter()

    def generate(self, prompts, params):
        start = self.own_time + time.perf_counter() - self.started
        out = self.engine.generate(prompts, params)
        end = self.own_time + time.perf_counter() - self.started
        self.calls.append((threading.current_thread().name, start, end, len(prompts)))
        return out

    def update_weights(self, named_tensors):
        self.engine.update_weights(named_tensors)

    def sleep(self):
        self.engine.sleep()

    def wake(self):
        self.engine.wake()


class _Run:
    """One scheduler of the real comparison and its running totals."""

    def __init__(self, sched, recorder):
        self.sched, self.rec = sched, recorder
        self.tokens = self.groups = self.iters = 0
        self.secs = self.idle = 0.0

    def iteration(self) -> None:
        self.rec.started = time.perf_counter()
        emitted = self.sched.run_iteration(self.iters)
        st = self.sched.last_stats
        self.rec.own_time += st.seconds
        self.groups, self.tokens, self.secs = self.groups + len(emitted), self.tokens + st.generated_tokens, self.secs + st.seconds
        self.idle += st.idle_fraction * st.seconds
        self.iters += 1

    def row(self) -> dict:
        return {"budget": self.sched.budget, "tokens": self.tokens, "seconds": self.secs,
                "tokens_per_s": self.tokens / self.secs, "groups_emitted": self.groups,
                "groups_per_s": self.groups / self.secs, "iterations": self.iters,
                "iteration_s_mean": self.secs / self.iters, "worker_idle_fraction": self.idle / self.secs}


def run_real_cpu(quick: bool, png: Path | None) -> dict:
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
    torch.set_num_threads(1)  # one core per worker thread at most: the comparison, not the machine, is measured
    prompts = [[1 + (i % 60), 2 + (i % 50)] for i in range(64)]
    max_len = 160 if quick else 320
    iterations = 6 if quick else 16
    out = {"iterations": iterations, "max_len": max_len, "group_size": 4, "prompts_per_iteration": 4,
           "batch_size": 8, "num_workers": 2, "torch_threads": 1}
    runs = {}
    for name, budget in (("synchronous", max_len), ("partial", 32)):
        rec = _Recorder(TorchEngine(model, repeat_detector=None))
        runs[name] = _Run(PartialRolloutScheduler(
            rec, PrioritizedSampler(len(prompts), seed=0), prompts, group_size=4, prompts_per_iteration=4,
            budget_per_iteration=budget, max_total_len=max_len, batch_size=8, num_workers=2, repeat_detector=None,
            params=SamplingParams(1, temperature=1.0, stop_token_ids=(0,), seed=0)), rec)
    # interleaved iterations (alternating which goes first): both see the same load on this shared machine
    for it in range(iterations):
        for name in (("synchronous", "partial") if it % 2 == 0 else ("partial", "synchronous")):
            runs[name].iteration()
    for name, run in runs.items():
        out[name] = run.row()
    part = runs["partial"]  # the same prompts as the synchronous run: now finish what is left
    part.sched.prompts_per_iteration = 0
    while len(part.sched.buffer):
        part.iteration()
    out["partial_drained"] = part.row()
    out["speedup_tokens_per_s"] = out["partial"]["tokens_per_s"] / out["synchronous"]["tokens_per_s"]
    out["speedup_drained_tokens_per_s"] = out["partial_drained"]["tokens_per_s"] / out["synchronous"]["tokens_per_s"]
    out["speedup_drained_groups_per_s"] = out["partial_drained"]["groups_per_s"] / out["synchronous"]["groups_per_s"]
    if png is not None:
        _plot_real({name: run.rec.calls for name, run in runs.items()}, out, png)
    return out


def _plot_real(calls: dict, out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
    for ax, name in zip(axes, ("synchronous", "partial")):
        recs = calls[name]
        workers = sorted({w for w, *_ in recs})
        for w, start, end, n in recs:
            ax.barh(workers.index(w), end - start, left=start, height=0.7, color="tab:blue" if n > 4 else "tab:cyan",
                    edgecolor="white", lw=0.3)
        ax.set_yticks(range(len(workers)), [w.replace("k15-rollout-", "worker ") for w in workers])
        r = out[name]
        drained = ", then drained" if name == "partial" else ""
        ax.set_title(f"{name} (budget {r['budget']}{drained}): {r['tokens_per_s']:.0f} tok/s over the same iterations, "
                     f"worker idle {100 * r['worker_idle_fraction']:.0f}%", fontsize=10)
    axes[-1].set_xlabel("seconds (real TorchEngine on this CPU; a bar = one engine call)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="a few seconds")
    ap.add_argument("--no-png", action="store_true", help="no timeline figures")
    args = ap.parse_args()
    png = None if args.no_png else benchlib.figure_path(args, "partial_rollout_timeline.png")
    png_real = None if args.no_png else benchlib.figure_path(args, "partial_rollout_cpu_timeline.png")
    result = {"bench": "partial_rollout", "device": "cpu (simulated engine + real TorchEngine)",
              "simulation": run_simulation(args.quick, png), "real_cpu": run_real_cpu(args.quick, png_real)}
    sim, real = result["simulation"], result["real_cpu"]
    lines = ["partial_rollout: partial vs synchronous rollouts, tokens/s",
             f"  simulated engine ({sim['slots']} slots, lengths to {sim['length_max']} tokens): "
             f"{sim['speedup_tokens_per_s']:.2f}x, idle {100 * sim['synchronous']['idle_fraction']:.0f}% -> "
             f"{100 * sim['partial']['idle_fraction']:.0f}%",
             f"  real TorchEngine on this CPU ({real['num_workers']} workers): {real['speedup_tokens_per_s']:.2f}x "
             f"({real['speedup_drained_groups_per_s']:.2f}x groups/s, drained)"]
    if png is not None:
        lines.append(f"  timelines: {png}, {png_real}")
    benchlib.finish(result, benchlib.result_path(args, "partial_rollout_cpu.json"), lines)


if __name__ == "__main__":
    main()
