"""Time per RL iteration of ``k15 train`` on a transformers model, split by phase, next to TRL's GRPOTrainer.

One iteration = P prompts x G samples, responses up to L tokens (the random model never stops early, so every
response is L tokens long on both sides), then optimizer steps of 64 samples each over the whole batch.

- k15sys: ``Trainer.rl_iteration`` of a ``model.path`` run (``sft.steps=0``, every group trained,
  ``rl.token_budget=0``: no partial rollouts, every trajectory finishes in its iteration, as in TRL). Phases:
  rollout (generation), reward, reference log-probs (the PMD reference pi_i, one no-grad pass), training
  (minibatch PMD steps), weight sync, offload/onload (the hybrid deployment's moves, ``run.colocate``; on GPU).
- TRL: ``GRPOTrainer`` (transformers ``generate`` backend, ``beta=0``: no reference model) on the same model
  directory, prompts (chat template), group size, response length, temperature, gradient checkpointing and
  64-sample optimizer steps; its iteration = one generation round of P x G completions. Phases: generation
  (``model.generate``), reward, the rest (log-probs + training). Skipped with a message when ``trl`` does not import.

The model is ``--model-dir``, or one built here: a Qwen2.5-1.5B-shaped Qwen2 (28 layers, hidden 1536, 12 heads /
2 KV heads, MLP 8960, tied embeddings, vocabulary 151,936) with random weights, saved as a transformers directory
with a byte-level BPE tokenizer trained locally on the shipped GSM8K and MATH text. Prompts alternate GSM8K and
MATH-500 problems from data/.

    python bench/rl_iteration.py --quick                       # tiny CPU case, < 1 minute
    python bench/rl_iteration.py --max-new-tokens 1024 4096 --out $OUT/rl_iteration.json   # one GPU

Per case: seconds per iteration (first iteration separate: it includes compilation and autotuning), tokens/s
(generated tokens per second of iteration), peak GPU memory, and the iteration throughput ratio TRL / k15sys.
The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import benchlib
import torch

DATA = benchlib.ROOT / "data"
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                  vocab_size=151_936, max_position_embeddings=32_768, rope_theta=1_000_000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
STEP_SAMPLES = 64  # samples per optimizer step, both sides


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def problems(n: int) -> list[dict]:
    """``n`` math problems ``{"prompt", "answer"}``, GSM8K and MATH-500 alternately."""
    gsm = [{"prompt": r["question"], "answer": r["final_answer"]} for r in read_jsonl(DATA / "gsm8k_test.jsonl")]
    math = [{"prompt": r["problem"], "answer": r["answer"]} for r in read_jsonl(DATA / "math500_test.jsonl")]
    return [(gsm if i % 2 == 0 else math)[i // 2] for i in range(n)]


def build_model_dir(out: Path, quick: bool, device: str) -> Path:
    """A random Qwen2 (Qwen2.5-1.5B's shape, or tiny with ``quick``) + a BPE tokenizer trained on data/ text."""
    from k15sys.train.scratch_model import save_scratch_model, train_tokenizer

    texts = [r["question"] + "\n" + r["answer"] for r in read_jsonl(DATA / "gsm8k_test.jsonl")]
    texts += [r["problem"] + "\n" + r["solution"] for r in read_jsonl(DATA / "math500_test.jsonl")]
    tok = train_tokenizer(texts[:300] if quick else texts, vocab_size=600 if quick else 16_000)
    shape = TINY if quick else QWEN25_15B
    dtype = torch.float32 if quick else torch.bfloat16
    return save_scratch_model(out, tok, arch="qwen2", dtype=dtype, device=device, **shape)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timers:
    """Seconds spent inside wrapped callables, by name (CUDA synchronised around each call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, fn: Callable, name: str | Callable[[], str]) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self.seconds[name() if callable(name) else name] += time.perf_counter() - t0
        return timed


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_k15(model_dir: Path, data: Path, work: Path, *, prompts: int, group: int, max_new: int, iterations: int,
            gpu: bool) -> dict[str, Any]:
    """``iterations`` RL iterations of the trainer; per iteration its phases (seconds), tokens and peak memory."""
    from k15sys.train.config import load_config
    from k15sys.train.trainer import Trainer

    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.train={data}", f"data.eval={data}", "sft.steps=0",
        f"rl.prompts_per_iteration={prompts}", f"rl.group_size={group}", f"rl.max_new_tokens={max_new}",
        f"rl.minibatch_size={min(STEP_SAMPLES, prompts * group)}", "rl.temperature=1.0", "rl.skip_zero_advantage=false",
        "rl.lr=1e-6", "rl.decay_iterations=0", "rl.lr_min=0", "rl.max_minutes=0", "rl.token_budget=0",
        f"model.gradient_checkpointing={'true' if gpu else 'false'}", f"run.colocate={'true' if gpu else 'false'}",
        f"run.pack_row_tokens={8192 if gpu else 0}", "run.progress=false", "run.tensorboard=false",
        f"run.output_dir={work / 'k15_run'}", f"run.device={'cuda' if gpu else 'cpu'}",
    ])
    tr = Trainer(cfg)
    timers = Timers()
    policy_forward = tr.policy.forward
    tr.policy.forward = timers.wrap(policy_forward, lambda: "train" if torch.is_grad_enabled() else "ref_logprobs")
    # offload / onload / sleep happen inside the rollout phase, wake inside the weight sync
    for obj, name, phase in ((tr.offload, "offload", "rollout"), (tr.offload, "onload", "rollout"),
                             (tr.engine, "sleep", "rollout"), (tr.engine, "wake", "sync")):
        if hasattr(obj, name):
            setattr(obj, name, timers.wrap(getattr(obj, name), f"moves_in_{phase}"))
    tr.sync_weights()  # the engine starts with the policy's weights
    rows = []
    try:
        for _ in range(iterations):
            timers.seconds.clear()
            _peak_reset()
            t0 = time.perf_counter()
            row = tr.rl_iteration()
            total = time.perf_counter() - t0
            in_rollout, in_sync = timers.seconds["moves_in_rollout"], timers.seconds["moves_in_sync"]
            generated = tr.scheduler.last_stats.generated_tokens
            rows.append({
                "iteration_s": total,
                "rollout_s": row["time/rollout_s"] - in_rollout,
                "reward_s": row["time/reward_s"],
                "ref_logprobs_s": timers.seconds["ref_logprobs"],
                "train_s": row["time/train_s"] - timers.seconds["ref_logprobs"],
                "sync_s": row["time/sync_s"] - in_sync,
                "offload_onload_s": in_rollout + in_sync,
                "generated_tokens": generated,
                "train_tokens": row.get("rl/train_tokens", 0.0),
                "tokens_per_s": generated / total,
                "peak_gpu_gib": _peak_gib(),
            })
    finally:
        tr.close()
    return {"iterations": rows}


def run_trl(model_dir: Path, rows: list[dict], work: Path, *, group: int, max_new: int, iterations: int,
            gpu: bool) -> dict[str, Any]:
    """TRL GRPOTrainer on the same setting; per generation round: seconds, generation, reward, tokens, memory."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from k15sys.rewards import math_reward

    samples = len(rows) * group
    micro = 8 if gpu else min(4, samples)
    step = min(STEP_SAMPLES, samples)
    steps_per_round = samples // step
    timers = Timers()
    generated = [0]

    def reward(completions: list, answer: list, **_: Any) -> list[float]:
        t0 = time.perf_counter()
        out = [math_reward(c[0]["content"], a) for c, a in zip(completions, answer)]
        timers.seconds["reward"] += time.perf_counter() - t0
        return out

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    generate = model.generate
    eos = torch.tensor(sorted({tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}))

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        completion = out[:, kwargs["input_ids"].shape[1]:]
        stops = torch.isin(completion, eos.to(completion.device))  # tokens up to the first EOS, as k15sys counts
        lengths = torch.where(stops.any(1), stops.int().argmax(1) + 1, completion.shape[1])
        generated[0] += int(lengths.sum())
        return out

    model.generate = timers.wrap(counting_generate, "generation")
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync()
            marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step % steps_per_round == 0:
                _sync()
                marks.append(time.perf_counter())
                snapshots.append((dict(timers.seconds), generated[0], _peak_gib()))
                _peak_reset()

    snapshots: list[tuple[dict[str, float], int, float | None]] = [({}, 0, None)]
    args = GRPOConfig(
        output_dir=str(work / "trl_run"), per_device_train_batch_size=micro, gradient_accumulation_steps=step // micro,
        generation_batch_size=samples, num_generations=group, max_completion_length=max_new, temperature=1.0,
        learning_rate=1e-6, beta=0.0, num_iterations=1, max_steps=iterations * steps_per_round,
        gradient_checkpointing=gpu, bf16=gpu, use_cpu=not gpu, logging_steps=1000, save_strategy="no", report_to=[],
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Marks()])
    _peak_reset()
    trainer.train()
    out = []
    for i in range(1, len(marks)):
        (before, gen0, _), (after, gen1, peak) = snapshots[i - 1], snapshots[i]
        total = marks[i] - marks[i - 1]
        gen_s = after.get("generation", 0.0) - before.get("generation", 0.0)
        rew_s = after.get("reward", 0.0) - before.get("reward", 0.0)
        out.append({"iteration_s": total, "generation_s": gen_s, "reward_s": rew_s,
                    "logprobs_and_train_s": total - gen_s - rew_s, "generated_tokens": gen1 - gen0,
                    "tokens_per_s": (gen1 - gen0) / total, "peak_gpu_gib": peak})
    del trainer, model
    if gpu:
        torch.cuda.empty_cache()
    return {"iterations": out}


def steady(side: dict[str, Any]) -> dict[str, float] | None:
    """Mean of the iterations after the first (the first alone if there is only one)."""
    its = side.get("iterations") or []
    use = its[1:] or its[:1]
    if not use:
        return None
    return {k: sum(r[k] for r in use) / len(use) for k in use[0] if isinstance(use[0][k], (int, float))}


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="a tiny model on the CPU, 4 prompts x 4 samples, 16 tokens (< 1 minute)")
    ap.add_argument("--model-dir", type=Path, default=None, help="a transformers causal-LM directory (default: build "
                    "a Qwen2.5-1.5B-shaped random model)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per iteration (default 64; --quick 4)")
    ap.add_argument("--group", type=int, default=None, help="samples per prompt (default 8; --quick 4)")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=None, help="response lengths, one case each "
                    "(default 1024 4096; --quick 16)")
    ap.add_argument("--iterations", type=int, default=2, help="iterations per case and side (the first is reported "
                    "apart: compilation, autotuning)")
    ap.add_argument("--peer", choices=("both", "k15", "trl"), default="both", help="which side(s) to run")
    ap.add_argument("--work", type=Path, default=None, help="directory for the model, data and runs (default: a "
                    "temporary one)")
    args = ap.parse_args()
    benchlib.require_gpus(args, "rl_iteration")
    gpu = not args.quick and torch.cuda.is_available()
    prompts = args.prompts or (4 if args.quick else 64)
    group = args.group or (4 if args.quick else 8)
    lengths = args.max_new_tokens or ([16] if args.quick else [1024, 4096])
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if not gpu else torch.get_num_threads())
    work = args.work or Path(tempfile.mkdtemp(prefix="rl_iteration_"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = benchlib.result_path(args, f"rl_iteration_{'cpu_quick' if args.quick else 'gpu'}.json")
    t0 = time.perf_counter()
    model_dir = args.model_dir or build_model_dir(work / "model", args.quick, "cuda" if gpu else "cpu")
    rows = problems(prompts)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        import trl  # noqa: F401

        trl_missing = None
    except ImportError as e:
        trl_missing = f"TRL peer skipped: trl does not import ({e}); pip install trl datasets (docs/your_model.md)"
        print(trl_missing, file=sys.stderr)
    result: dict[str, Any] = {
        "bench": "rl_iteration", "quick": args.quick,
        "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
        "model_dir": str(model_dir), "built_model": args.model_dir is None,
        "prompts": prompts, "group_size": group, "samples_per_optimizer_step": min(STEP_SAMPLES, prompts * group),
        "trl": None if trl_missing else __import__("trl").__version__, "trl_skipped": trl_missing,
        "setup_s": time.perf_counter() - t0, "cases": [],
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    for max_new in lengths:
        case: dict[str, Any] = {"max_new_tokens": max_new}
        result["cases"].append(case)
        if args.peer in ("both", "k15"):
            case["k15sys"] = run_k15(model_dir, data, work / f"L{max_new}", prompts=prompts, group=group,
                                     max_new=max_new, iterations=args.iterations, gpu=gpu)
            case["k15sys"]["steady"] = steady(case["k15sys"])
            save()
        if args.peer in ("both", "trl") and not trl_missing:
            case["trl"] = run_trl(model_dir, rows, work / f"L{max_new}", group=group, max_new=max_new,
                                  iterations=args.iterations, gpu=gpu)
            case["trl"]["steady"] = steady(case["trl"])
            save()
        ours, peer = (case.get(k, {}).get("steady") for k in ("k15sys", "trl"))
        if ours and peer:
            case["throughput_ratio_vs_trl"] = peer["iteration_s"] / ours["iteration_s"]
        save()
    result["total_s"] = time.perf_counter() - t0

    def summary() -> list[str]:
        lines = [f"rl_iteration on {result['device']}: {prompts} prompts x {group} samples"]
        for c in result["cases"]:
            for side in ("k15sys", "trl"):
                s = c.get(side, {}).get("steady")
                if s:
                    lines.append(f"  L={c['max_new_tokens']:5d} {side:6s}: {s['iteration_s']:.2f} s/iteration, "
                                 f"{s['tokens_per_s']:.0f} generated tokens/s")
            if "throughput_ratio_vs_trl" in c:
                lines.append(f"  L={c['max_new_tokens']:5d} iteration throughput k15sys / TRL: "
                             f"{c['throughput_ratio_vs_trl']:.2f}x")
        if trl_missing:
            lines.append("  " + trl_missing)
        return lines

    benchlib.finish(result, out_path, summary())


if __name__ == "__main__":
    main()
