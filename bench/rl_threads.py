"""Thread split of an RL iteration on the CPU (paper 2.6: rollout and training phases), side by side.

The main job runs generation (rollouts, evaluation) on ``run.rollout_threads`` torch threads and
training on ``run.threads``. This benchmark builds one :class:`k15sys.train.trainer.Trainer` per setting,
gives all of them the same SFT weights, and runs their RL iterations interleaved (A, B, C, A, B, C, ...),
so load changes on the machine hit every setting alike. It reports the median seconds per iteration,
per rollout and per training phase of each setting, and each setting's speed relative to one thread
for both phases.

``--quick`` uses a tiny model and a few iterations (seconds); the default uses the main job's model after
``--sft-steps`` SFT steps. A short summary, then one JSON object on the last line (written to runs/bench/
by default; ``--update-results``: bench/results/).
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

import benchlib
from k15sys.train.config import load_config
from k15sys.train.trainer import Trainer

SETTINGS = ((1, 1), (2, 2), (2, 1))  # (run.threads, run.rollout_threads)


def _config(out: str, threads: int, rollout_threads: int, quick: bool, sft_steps: int) -> list[str]:
    ov = [f"run.threads={threads}", f"run.rollout_threads={rollout_threads}", "run.progress=false",
          "run.tensorboard=false", f"run.output_dir={out}", f"sft.steps={sft_steps}"]
    if quick:
        ov += ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "rl.max_new_tokens=32",
               "rl.prompts_per_iteration=8", "rl.minibatch_size=32", "rl.skip_zero_advantage=false",
               "task.num_train=200", "task.num_eval=20"]
    return ov


def main() -> None:
    ap = benchlib.parser(__doc__.splitlines()[0], quick_help="tiny model, a few iterations")
    ap.add_argument("--iterations", type=int, default=None, help="RL iterations per setting (default 40; quick 4)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT steps before RL (default 525; quick 5)")
    args = ap.parse_args()
    if args.iterations is not None and args.iterations < 1:
        ap.error(f"--iterations: must be >= 1, got {args.iterations}")
    if args.sft_steps is not None and args.sft_steps < 0:
        ap.error(f"--sft-steps: must be >= 0, got {args.sft_steps}")
    iters = args.iterations or (4 if args.quick else 40)
    sft_steps = args.sft_steps if args.sft_steps is not None else (5 if args.quick else 525)
    tmp = tempfile.mkdtemp(prefix="k15_rl_threads_")
    trainers = [Trainer(load_config(None, _config(f"{tmp}/{t}_{r}", t, r, args.quick, sft_steps))) for t, r in SETTINGS]
    trainers[0].sft()  # one SFT, the same weights for every setting
    weights = trainers[0].policy.lm.state_dict()
    for tr in trainers[1:]:
        tr.policy.lm.load_state_dict(weights)
        tr.sync_weights()
    times: list[dict[str, list[float]]] = [{"iteration": [], "rollout": [], "train": []} for _ in SETTINGS]
    for _ in range(iters):
        for tr, rec in zip(trainers, times):
            t0 = time.perf_counter()
            row = tr.rl_iteration()
            rec["iteration"].append(time.perf_counter() - t0)
            rec["rollout"].append(row["time/rollout_s"])
            rec["train"].append(row["time/train_s"])
    for tr in trainers:
        tr.close()
    runs = []
    for (t, r), rec in zip(SETTINGS, times):
        runs.append({"threads": t, "rollout_threads": r, "iterations": iters,
                     **{f"median_{k}_s": round(statistics.median(v), 4) for k, v in rec.items()}})
    base = runs[0]["median_iteration_s"]
    for run in runs:
        run["speedup_vs_1_1"] = round(base / run["median_iteration_s"], 3)
    result = {
        "bench": "rl_threads", "quick": args.quick, "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "sft_steps": sft_steps, "runs": runs,
        "split_vs_both_2": round(runs[1]["median_iteration_s"] / runs[2]["median_iteration_s"], 3),
    }
    lines = [f"rl_threads: median seconds per RL iteration over {iters} iterations (threads/rollout threads)"]
    for run in runs:
        lines.append(f"  {run['threads']}/{run['rollout_threads']}: {run['median_iteration_s']:.3f} s "
                     f"(rollout {run['median_rollout_s']:.3f}, train {run['median_train_s']:.3f}), "
                     f"{run['speedup_vs_1_1']:.2f}x 1/1")
    benchlib.finish(result, benchlib.result_path(args, f"rl_threads_cpu{'_quick' if args.quick else ''}.json"), lines)


if __name__ == "__main__":
    main()
