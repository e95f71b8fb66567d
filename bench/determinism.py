"""Run-to-run reproducibility of RL training, with and without ``run.deterministic``, and what it costs.

For each mode (default, deterministic) the main job is run twice from the same config: SFT, then
``--iterations`` RL iterations (paper 2.3-2.6). A pair is reproducible when every iteration's loss, grad norm,
KL and entropy and the final weights are bit-identical. The time per RL iteration, rollout and training phase
(medians over both runs) of the deterministic mode is reported relative to the default mode. The two modes
alternate (default, det, default, det) so load changes on the machine hit both alike. Deterministic mode is process-wide, so each run
is a subprocess.

``--quick`` runs a tiny model on the CPU (where both modes are reproducible); the full case runs the main
job's model on CUDA and refuses (exit 2) without a GPU. A short summary, then one JSON object on the last
line; the JSON goes to ``--out`` (default runs/bench/, ``--update-results``: bench/results/).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import benchlib

KEYS = ("rl/loss", "rl/grad_norm", "rl/kl_ref", "rl/entropy")
STAGES = ("iteration", "rollout", "train")


def one_run(out: str, overrides: list[str]) -> dict:
    """Child process: run the job, return its per-iteration figures, seconds per iteration and a weight hash."""
    from k15sys.train.config import load_config
    from k15sys.train.trainer import Trainer

    trainer = Trainer(load_config(None, [*overrides, f"run.output_dir={out}"]))
    trainer.run()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    digest = hashlib.sha256()
    for name, t in sorted(trainer.policy.lm.state_dict().items()):
        digest.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return {"rows": [{k: r.get(k) for k in KEYS} for r in rows],
            **{f"{stage}_s": [r[f"time/{stage}_s"] for r in rows] for stage in STAGES},
            "weights_sha256": digest.hexdigest()}


def main() -> None:
    ap = benchlib.parser(__doc__.splitlines()[0], quick_help="tiny model on the CPU")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--child", nargs=2, metavar=("OUT", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child[0], json.loads(args.child[1]))))
        return
    benchlib.require_gpus(args, "determinism")
    device = "cpu" if args.quick else "cuda"
    base = [f"rl.iterations={args.iterations}", "run.progress=false", "run.tensorboard=false", f"run.device={device}",
            "eval.every=1000", "run.checkpoint_every=1000", "sft.steps=300"]
    if args.quick:
        base += ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "rl.max_new_tokens=32",
                 "rl.prompts_per_iteration=8", "rl.minibatch_size=32", "rl.skip_zero_advantage=false",
                 "task.num_train=200", "task.num_eval=20", "sft.steps=10"]
    runs: dict[str, list[dict]] = {"default": [], "deterministic": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            for mode in runs:
                ov = [*base, f"run.deterministic={str(mode == 'deterministic').lower()}"]
                proc = subprocess.run([sys.executable, __file__, "--child", f"{tmp}/{mode}{i}", json.dumps(ov)],
                                      capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result: dict = {"bench": "determinism", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "iterations": args.iterations}
    for mode, (a, b) in runs.items():
        differ = [i + 1 for i, (x, y) in enumerate(zip(a["rows"], b["rows"])) if x != y]
        result[mode] = {"bit_identical": not differ and a["weights_sha256"] == b["weights_sha256"],
                        "first_differing_iteration": differ[0] if differ else None,
                        "loss_it1": [a["rows"][0]["rl/loss"], b["rows"][0]["rl/loss"]],
                        **{f"median_{st}_s": statistics.median(a[f"{st}_s"] + b[f"{st}_s"]) for st in STAGES}}
    for st in STAGES:
        key = f"median_{st}_s"
        result[f"deterministic_{st}_time_ratio"] = result["deterministic"][key] / result["default"][key]
    lines = [f"determinism on {result['device']}, {args.iterations} RL iterations, two runs per mode:"]
    for mode in runs:
        r = result[mode]
        same = "bit-identical" if r["bit_identical"] else f"differ from iteration {r['first_differing_iteration']}"
        lines.append(f"  {mode}: {same}; median iteration {r['median_iteration_s']:.3f} s")
    lines.append(f"  deterministic / default time per iteration: {result['deterministic_iteration_time_ratio']:.2f}x")
    name = "cpu_quick" if args.quick else result["device"].replace(" ", "_")
    benchlib.finish(result, benchlib.result_path(args, f"determinism_{name}.json"), lines)


if __name__ == "__main__":
    main()
