"""Time per RL iteration of ``k15 train`` on a transformers model, split by phase, next to TRL's GRPOTrainer.

One iteration = P prompts x G samples, responses up to L tokens (the random model almost never stops early, so
responses are L tokens long on both sides), then optimizer steps of 64 samples each over the whole batch.

- k15sys: ``Trainer.rl_iteration`` of a ``model.path`` run (``sft.steps=0``, every group trained,
  ``rl.token_budget=0``: no partial rollouts, every trajectory finishes in its iteration, as in TRL). Phases:
  rollout (generation), reward, reference log-probs (the PMD reference pi_i, one no-grad pass), training
  (minibatch PMD steps), weight sync, offload/onload (the hybrid deployment's moves, ``run.colocate``; on GPU).
- TRL: ``GRPOTrainer`` (transformers ``generate`` backend, ``beta=0``: no reference model) on the same model
  directory, prompts (chat template), group size, response length, temperature, gradient checkpointing and
  64-sample optimizer steps; its iteration = one generation round of P x G completions (all in one ``generate``
  call, the fastest way TRL offers without vLLM). Phases: generation (``model.generate``), reward, the rest
  (old log-probs + training). Its reward function scores a response cut at the length limit 0 without parsing it,
  as k15sys does. On the GPU a one-step warm-up run (16 tokens) comes first, so a single timed TRL iteration is
  already steady (TRL has no compilation step). A TRL failure is recorded in the JSON and the k15sys side goes on.

The model is ``--model-dir``, or one built here: a Qwen2.5-1.5B-shaped Qwen2 (28 layers, hidden 1536, 12 heads /
2 KV heads, MLP 8960, tied embeddings, vocabulary 151,936) with random weights, saved as a transformers directory
with a byte-level BPE tokenizer trained locally on the shipped GSM8K and MATH text. Prompts alternate GSM8K and
MATH-500 problems from data/.

    python bench/rl_iteration.py --quick                       # tiny CPU case, < 1 minute
    python bench/rl_iteration.py --max-new-tokens 1024 4096 --out $OUT/rl_iteration.json   # one GPU
    python bench/rl_iteration.py --max-new-tokens 1024 4096 --trl-max-new-tokens 1024 --trl-iterations 1
                                                   # TRL at 1k only (TRL at 4k takes many minutes per iteration)

Installing the TRL peer beside an existing environment with ``pip install --target DIR``: DIR's path must contain
``site-packages`` (``bench/install_trl_peer.sh`` does this). ``datasets`` fingerprints every new Dataset with dill,
and dill pickles a module by reference only when its file lies under ``sys.prefix`` or in a ``site-packages``
folder; pyarrow from any other folder is pickled by value, which fails on pyarrow's ``MonthDayNano`` type.

Per case: seconds per iteration (first iteration separate: it includes compilation and autotuning), tokens/s
(generated tokens per second of iteration), peak GPU memory, and the iteration throughput ratio k15sys / TRL
(TRL's seconds per iteration over k15sys's). ``steady_from`` says which iterations a figure averages. The JSON is
rewritten after every iteration of either side, so a run cut short keeps what it measured.
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


Record = Callable[[dict[str, Any]], None]


def run_k15(model_dir: Path, data: Path, work: Path, *, prompts: int, group: int, max_new: int, iterations: int,
            gpu: bool, record: Record) -> None:
    """``iterations`` RL iterations of the trainer; ``record`` gets each one's phases (seconds), tokens and peak
    memory as soon as it ends."""
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
    for obj, name in ((tr.scheduler, "run_iteration"), (tr, "train_on")):  # progress lines for a run cut short
        setattr(obj, name, _announced(getattr(obj, name), f"[k15sys L={max_new}] {name}"))
    tr.sync_weights()  # the engine starts with the policy's weights
    try:
        for _ in range(iterations):
            timers.seconds.clear()
            _peak_reset()
            t0 = time.perf_counter()
            row = tr.rl_iteration()
            total = time.perf_counter() - t0
            in_rollout, in_sync = timers.seconds["moves_in_rollout"], timers.seconds["moves_in_sync"]
            generated = tr.scheduler.last_stats.generated_tokens
            record({
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


def _announced(fn: Callable, what: str) -> Callable:
    """``fn``, printing its duration to stderr when it returns."""
    def announced(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        print(f"  {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return out
    return announced


def _free_gpu() -> None:
    """Return the finished side's GPU memory (call after its objects went out of scope) and say what is left."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        print(f"  GPU memory after cleanup: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved", file=sys.stderr, flush=True)


def trl_problem() -> str | None:
    """Why the TRL peer cannot run here (``None`` if it can): trl missing, or ``datasets`` unable to fingerprint
    a Dataset (the pyarrow-outside-site-packages case of the module docstring)."""
    try:
        import trl  # noqa: F401
        from datasets import Dataset
    except ImportError as e:
        return f"trl does not import ({e}); pip install trl datasets, or source bench/install_trl_peer.sh"
    try:
        Dataset.from_list([{"prompt": "x", "answer": "1"}])
    except Exception as e:  # noqa: BLE001 - any failure here means the peer cannot start; say why and go on
        import pyarrow

        return (f"datasets cannot build a Dataset ({type(e).__name__}: {str(e)[:200]}); pyarrow is at "
                f"{pyarrow.__file__}: a `pip install --target` folder must have `site-packages` in its path "
                f"(dill pickles modules outside sys.prefix / site-packages by value); see bench/install_trl_peer.sh")
    return None


def trl_micro_batch(max_new: int, samples: int, gpu: bool) -> int:
    """TRL's per-device micro-batch: about 32k completion tokens per forward (a power of two, 1 to 16)."""
    if not gpu:
        return min(4, samples)
    micro = 16
    while micro > 1 and micro * max_new > 32_768:
        micro //= 2
    return min(micro, samples)


def run_trl(model_dir: Path, rows: list[dict], work: Path, *, group: int, max_new: int, iterations: int,
            gpu: bool, micro: int, warmup: bool, record: Record) -> dict[str, Any]:
    """TRL GRPOTrainer on the same setting; ``record`` gets each generation round's seconds (generation, reward,
    the rest), tokens and peak memory as soon as it ends. Returns the settings used (and the warm-up's seconds)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from k15sys.rewards import math_reward

    timers = Timers()
    generated = [0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    eos = torch.tensor(sorted({tok.eos_token_id, *eos_ids}))
    generate = model.generate

    def reward(completions: list, answer: list, completion_ids: list, **_: Any) -> list[float]:
        t0 = time.perf_counter()
        out = [0.0 if len(ids) >= max_new and ids[-1] not in eos else math_reward(c[0]["content"], a)  # cut: 0
               for c, a, ids in zip(completions, answer, completion_ids)]
        timers.seconds["reward"] += time.perf_counter() - t0
        return out

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        completion = out[:, kwargs["input_ids"].shape[1]:]
        stops = torch.isin(completion, eos.to(completion.device))  # tokens up to the first EOS, as k15sys counts
        lengths = torch.where(stops.any(1), stops.int().argmax(1) + 1, completion.shape[1])
        generated[0] += int(lengths.sum())
        print(f"  [trl L={max_new}] generate: {completion.shape[0]} sequences, {int(lengths.sum())} tokens in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return out

    model.generate = timers.wrap(counting_generate, "generation")

    def trainer(rows: list[dict], max_new: int, micro: int, steps: int, callbacks: list) -> Any:
        samples = len(rows) * group
        step = min(STEP_SAMPLES, samples)
        args = GRPOConfig(
            output_dir=str(work / "trl_run"), per_device_train_batch_size=micro,
            gradient_accumulation_steps=step // micro, generation_batch_size=samples, num_generations=group,
            max_completion_length=max_new, temperature=1.0, learning_rate=1e-6, beta=0.0, num_iterations=1,
            max_steps=steps, gradient_checkpointing=gpu, bf16=gpu, use_cpu=not gpu, logging_steps=1000,
            save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                for r in rows])
        return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                           callbacks=callbacks)

    warmup_s = None
    if warmup:  # CUDA context, cuBLAS handles, the allocator and the reward's imports, outside the timed run
        t0 = time.perf_counter()
        trainer(rows[:max(1, 8 // group)], 16, min(8, group), 1, []).train()
        _sync()
        warmup_s = time.perf_counter() - t0
        timers.seconds.clear()
        generated[0] = 0

    samples = len(rows) * group
    steps_per_round = samples // min(STEP_SAMPLES, samples)
    last = {"t": 0.0, "seconds": {}, "generated": 0}

    class Marks(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync()
            _peak_reset()
            last["t"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step % steps_per_round:
                return
            _sync()
            now, seconds = time.perf_counter(), dict(timers.seconds)
            total = now - last["t"]
            gen_s = seconds.get("generation", 0.0) - last["seconds"].get("generation", 0.0)
            rew_s = seconds.get("reward", 0.0) - last["seconds"].get("reward", 0.0)
            tokens = generated[0] - last["generated"]
            record({"iteration_s": total, "generation_s": gen_s, "reward_s": rew_s,
                    "logprobs_and_train_s": total - gen_s - rew_s, "generated_tokens": tokens,
                    "tokens_per_s": tokens / total, "peak_gpu_gib": _peak_gib()})
            _peak_reset()
            last.update(t=time.perf_counter(), seconds=dict(timers.seconds), generated=generated[0])

    tr = trainer(rows, max_new, micro, iterations * steps_per_round, [Marks()])
    try:
        tr.train()
    finally:
        del tr, model
    return {"micro_batch": micro, "gradient_accumulation": min(STEP_SAMPLES, samples) // micro,
            "generation_batch": samples, "warmup_s": warmup_s}


def steady(side: dict[str, Any]) -> tuple[dict[str, float] | None, str]:
    """Mean of the iterations after the first (the first alone if there is only one), and which ones those are."""
    its = side.get("iterations") or []
    use = its[1:] or its[:1]
    if not use:
        return None, "none"
    label = (f"iterations 2-{len(its)}" if len(its) > 1 else "iteration 1 only")
    return {k: sum(r[k] for r in use) / len(use) for k in use[0] if isinstance(use[0][k], (int, float))}, label


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="a tiny model on the CPU, 4 prompts x 4 samples, 16 tokens (< 1 minute)")
    ap.add_argument("--model-dir", type=Path, default=None, help="a transformers causal-LM directory (default: build "
                    "a Qwen2.5-1.5B-shaped random model)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per iteration (default 64; --quick 4)")
    ap.add_argument("--group", type=int, default=None, help="samples per prompt (default 8; --quick 4)")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=None, help="response lengths, one case each "
                    "(default 1024 4096; --quick 16)")
    ap.add_argument("--iterations", type=int, default=2, help="k15sys iterations per case (the first is reported "
                    "apart: compilation, autotuning)")
    ap.add_argument("--trl-iterations", type=int, default=None, help="TRL iterations per case (default: "
                    "--iterations; on the GPU a short warm-up run precedes them)")
    ap.add_argument("--trl-max-new-tokens", type=int, nargs="*", default=None, help="the response lengths at which "
                    "TRL runs too (default: all of --max-new-tokens); the JSON marks the others as not run")
    ap.add_argument("--trl-micro-batch", type=int, default=None, help="TRL per-device micro-batch (default: about "
                    "32k completion tokens, 16 at 1k and 8 at 4k tokens)")
    ap.add_argument("--peer", choices=("both", "k15", "trl"), default="both", help="which side(s) to run")
    ap.add_argument("--work", type=Path, default=None, help="directory for the model, data and runs (default: a "
                    "temporary one)")
    args = ap.parse_args()
    benchlib.require_gpus(args, "rl_iteration")
    gpu = not args.quick and torch.cuda.is_available()
    prompts = args.prompts or (4 if args.quick else 64)
    group = args.group or (4 if args.quick else 8)
    lengths = args.max_new_tokens or ([16] if args.quick else [1024, 4096])
    trl_lengths = set(lengths if args.trl_max_new_tokens is None else args.trl_max_new_tokens)
    trl_iterations = args.trl_iterations or args.iterations
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if not gpu else torch.get_num_threads())
    work = args.work or Path(tempfile.mkdtemp(prefix="rl_iteration_"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    out_path = benchlib.result_path(args, f"rl_iteration_{'cpu_quick' if args.quick else device.replace(' ', '_')}.json")
    t0 = time.perf_counter()
    trl_missing = trl_problem() if args.peer != "k15" else "not requested (--peer k15)"
    if trl_missing:
        print(f"TRL peer skipped: {trl_missing}", file=sys.stderr, flush=True)
    model_dir = args.model_dir or build_model_dir(work / "model", args.quick, "cuda" if gpu else "cpu")
    _free_gpu()
    rows = problems(prompts)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result: dict[str, Any] = {
        "bench": "rl_iteration", "quick": args.quick, "device": device, "torch": torch.__version__,
        "model_dir": str(model_dir), "built_model": args.model_dir is None,
        "prompts": prompts, "group_size": group, "samples_per_optimizer_step": min(STEP_SAMPLES, prompts * group),
        "trl": None if trl_missing else __import__("trl").__version__, "trl_skipped": trl_missing,
        "setup_s": time.perf_counter() - t0, "cases": [],
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    def recorder(case: dict[str, Any], side: str) -> Record:
        case[side] = {"iterations": []}

        def record(row: dict[str, Any]) -> None:
            case[side]["iterations"].append(row)
            case[side]["steady"], case[side]["steady_from"] = steady(case[side])
            print(f"  [{side} L={case['max_new_tokens']}] iteration {len(case[side]['iterations'])}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None), file=sys.stderr, flush=True)
            save()
        return record

    for max_new in lengths:
        case: dict[str, Any] = {"max_new_tokens": max_new}
        result["cases"].append(case)
        if args.peer in ("both", "k15"):
            k15_cases_before = sum("k15sys" in c for c in result["cases"][:-1])
            case["k15sys_kernels_compiled_by_an_earlier_case"] = k15_cases_before > 0
            run_k15(model_dir, data, work / f"L{max_new}", prompts=prompts, group=group, max_new=max_new,
                    iterations=args.iterations, gpu=gpu, record=recorder(case, "k15sys"))
            _free_gpu()
        if args.peer in ("both", "trl") and not trl_missing:
            if max_new not in trl_lengths:
                case["trl"] = {"not_run": "not requested at this length (--trl-max-new-tokens)"}
            else:
                micro = args.trl_micro_batch or trl_micro_batch(max_new, prompts * group, gpu)
                record = recorder(case, "trl")
                try:
                    case["trl"]["settings"] = run_trl(model_dir, rows, work / f"L{max_new}", group=group,
                                                      max_new=max_new, iterations=trl_iterations, gpu=gpu,
                                                      micro=micro, warmup=gpu, record=record)
                except Exception as e:  # noqa: BLE001 - the peer's failure is a result; the k15sys side goes on
                    import traceback

                    traceback.print_exc()
                    case["trl"]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                _free_gpu()
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
                                 f"{s['tokens_per_s']:.0f} generated tokens/s ({c[side]['steady_from']})")
                elif c.get(side, {}).get("error"):
                    lines.append(f"  L={c['max_new_tokens']:5d} {side:6s}: failed: {c[side]['error'][:200]}")
            if "throughput_ratio_vs_trl" in c:
                lines.append(f"  L={c['max_new_tokens']:5d} iteration throughput k15sys / TRL: "
                             f"{c['throughput_ratio_vs_trl']:.2f}x")
        if trl_missing:
            lines.append(f"  TRL peer skipped: {trl_missing}")
        return lines

    benchlib.finish(result, out_path, summary())


if __name__ == "__main__":
    main()
