"""Typed configuration of the main job (paper 2.3 / 2.6): dataclasses, YAML files, CLI overrides.

Every option is a dataclass field with a ``help`` string (``k15 train --help-config`` prints them all).
``load_config(path, overrides)`` reads YAML, applies ``section.key=value`` overrides and validates the
whole tree before any work starts: an unknown key, a wrong type or a bad value raises
:class:`ConfigError` naming the key (e.g. ``rl.group_size``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message starts with the dotted key at fault."""


def _opt(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, min: float | None = None,
         max: float | None = None, above: float | None = None, why: str = "", max_text: str = "") -> Any:
    """A config field: ``min``/``max`` bound it (inclusive), ``above`` strictly from below; ``why`` ends the
    message of a value out of range (what would silently go wrong); ``max_text`` shows a machine-dependent
    ``max`` in the reference."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max, "above": above,
                                            "why": why, "max_text": max_text})


# more torch threads or rollout processes than this is a typo (100000 threads segfault), not a setting
_MAX_THREADS = 4 * (os.cpu_count() or 1)
_MAX_WORKERS = os.cpu_count() or 1


@dataclass
class TaskConfig:
    """The shipped arithmetic task (k15sys.tasks)."""

    seed: int = _opt(1234, "seed of the problem generator (train/eval splits)")
    num_train: int = _opt(4000, "RL/SFT training problems", min=1)
    num_eval: int = _opt(200, "held-out evaluation problems (disjoint from train)", min=1)
    min_ops: int = _opt(2, "fewest operations per problem (difficulty label = #operations)", min=1)
    max_ops: int = _opt(5, "most operations per problem", min=1)
    max_operand: int = _opt(9, "operands are drawn from [1, max_operand]", min=1)
    verify_prob: float = _opt(0.7, "long-CoT traces: probability of a check after each step", min=0.0, max=1.0)
    mistake_prob: float = _opt(0.0, "long-CoT traces: share of checked steps first written wrong, exposed by the "
                               "check and redone after '?' (self-correction); SFT trains on the check and the "
                               "redo, not on the slip", min=0.0, max=1.0)
    direct_prob: float = _opt(0.35, "SFT data: share of direct answers (the boxed answer, no working) mixed in, as in "
                              "warm-up data of mixed styles; RL then learns that working first pays (eval/direct_share; "
                              "docs/main_job.md)", min=0.0, max=1.0)


@dataclass
class ModelConfig:
    """A small Qwen2-architecture model built from a transformers Qwen2Config (no download)."""

    hidden_size: int = _opt(96, "hidden size", min=8)
    intermediate_size: int = _opt(256, "MLP intermediate size", min=8)
    num_layers: int = _opt(3, "decoder layers", min=1)
    num_heads: int = _opt(4, "attention heads", min=1)
    num_kv_heads: int = _opt(2, "key/value heads (GQA); must divide num_heads", min=1)
    max_position_embeddings: int = _opt(256, "longest prompt + response", min=16)
    seed: int = _opt(0, "initialisation seed", min=0)
    path: str = _opt("", "a transformers causal-LM directory (AutoModelForCausalLM + AutoTokenizer) to train instead of "
                     "the built-in model; the size options above are then unused; needs data.train "
                     "(docs/your_model.md)")
    dtype: str = _opt("auto", "parameter dtype: auto = bfloat16 for model.path on a GPU, else float32",
                      choices=("auto", "float32", "bfloat16"))
    gradient_checkpointing: bool = _opt(False, "recompute decoder layers in the backward pass (less activation memory)")
    master_weights: str = _opt("fp32", "optimizer steps on fp32 copies of bfloat16 parameters, which then take the rounded "
                               "result (bf16 alone drops updates below 1/256 of a weight); none = step the bf16 "
                               "parameters directly (less memory); no effect on float32 models",
                               choices=("fp32", "none"))


@dataclass
class DataConfig:
    """Your own problems (JSONL, one per line; docs/your_model.md) instead of the arithmetic task."""

    train: str = _opt("", "RL prompts: math rows {\"prompt\", \"answer\"} or code rows {\"prompt\", \"tests\", "
                      "\"language\"}, optional \"difficulty\" for the curriculum; needs model.path")
    eval: str = _opt("", "held-out rows of the same form (greedy pass@1, eval.num_samples for pass@k); needs data.train")
    code_timeout_s: float = _opt(5.0, "code rows: wall-clock limit per test in the sandbox", min=0.1)
    sandbox_workers: int = _opt(2, "code rows: sandbox containers that run programs at once", min=1)


@dataclass
class SFTConfig:
    """Long-CoT supervised warm-up (paper 2.3.1) before RL."""

    steps: int = _opt(700, "optimizer steps (a light warm-up: the model knows the format and most steps, RL has room "
                      "to sharpen it; see docs/main_job.md for weaker and stronger starts)", min=0)
    batch_size: int = _opt(64, "sequences per step", min=1)
    lr: float = _opt(3e-3, "peak AdamW learning rate (linear warm-up, cosine decay)", min=0.0)
    warmup_steps: int = _opt(20, "learning-rate warm-up steps", min=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", min=0.0)
    long_cot: bool = _opt(True, "train on long-CoT traces (with checks); false = short traces")
    checkpoint_every: int = _opt(0, "also checkpoint the warm-up every this many steps, so a crash loses less of it "
                                 "(0 = only when stopped by SIGINT/SIGTERM); --resume continues from the step", min=0)
    data: str = _opt("", "JSONL {\"prompt\", \"response\"} traces for the warm-up of a data.train run (loss on the "
                     "response tokens); empty = no warm-up there")
    max_ops: int = _opt(0, "warm-up set: only the training problems with at most this many operations (0 = all); RL and "
                        "evaluation still cover task.min_ops..task.max_ops (docs/main_job.md: RL does not extend the "
                        "model to longer chains than the warm-up showed)", min=0)


@dataclass
class RLConfig:
    """k1.5 RL iterations (paper 2.3.2-2.3.4, 2.6.2)."""

    iterations: int = _opt(1000, "RL iterations (rl.max_minutes usually stops the run first)", min=0)
    max_minutes: float = _opt(15.0, "stop RL after this wall time (minutes, 0 = no limit)", min=0.0)
    prompts_per_iteration: int = _opt(32, "prompts sampled per iteration", min=1)
    group_size: int = _opt(8, "k: samples per prompt (the group of the mean baseline)", min=2,
                           why="a group of one sample is its own mean baseline: zero advantage, no gradient; paper 2.3.2")
    tau: float = _opt(0.02, "KL-regularisation strength tau of mirror descent", above=0.0)
    baseline: str = _opt("mean", "estimate of tau log Z", choices=("mean", "logmeanexp"))
    normalize: str = _opt("sum", "sequence log-prob: paper 'sum', or 'mean'/'constant' (deviations)",
                          choices=("sum", "mean", "constant"))
    lr: float = _opt(1e-5, "learning rate (AdamW: small, the SFT model is sharp; see docs/main_job.md)", above=0.0,
                     why="a zero learning rate trains nothing; rl.iterations=0 runs the warm-up alone")
    optimizer: str = _opt("adamw", "RL optimizer: adamw, or sgd (momentum 0.9; steps proportional to the gradient)",
                          choices=("adamw", "sgd"))
    warmup_iterations: int = _opt(0, "linear learning-rate warm-up over the first RL iterations", min=0)
    decay_iterations: int = _opt(450, "cosine decay of the learning rate from rl.lr to rl.lr_min over the first this "
                                 "many RL iterations, then rl.lr_min (0 = constant rl.lr); 450 ~ the iterations of "
                                 "15 minutes on a 2-core CPU", min=0)
    lr_min: float = _opt(2e-6, "learning rate at the end of the decay (rl.decay_iterations)", min=0.0)
    minibatch_size: int = _opt(64, "sequences per optimizer step (a multiple of group_size)", min=1)
    epochs: int = _opt(1, "passes over each iteration's batch", min=1)
    skip_zero_advantage: bool = _opt(True, "train only on groups whose k rewards differ: a group of equal rewards has "
                                     "zero advantage and, on-policy, zero PMD gradient (saves its forward/backward)")
    grad_clip: float = _opt(1.0, "max global grad norm (0 = off)", min=0.0)
    temperature: float = _opt(0.5, "sampling temperature of rollouts (below 1 the samples stay near the greedy "
                              "decisions that evaluation scores; see docs/main_job.md)", above=0.0,
                              why="rollouts must sample: greedy groups give k equal answers, zero advantage, no "
                              "gradient; paper 2.3.2")
    tempered_logprobs: bool = _opt(True, "log-probs of the PMD loss (policy and reference) under softmax(logits / "
                                   "rl.temperature), the distribution the rollouts were drawn from, so the samples are "
                                   "on-policy for what is trained; false = untempered logits")
    logprob_path: str = _opt("auto", "log-probs of the PMD steps: 'fused' = the iteration's first step (weights still "
                             "pi_i, so each sample's loss gradient is known before the forward) through "
                             "fused_logprob_loss, the later steps through autograd fused_logprobs; 'autograd' = every "
                             "step through autograd; 'auto' = fused on CUDA, autograd on the CPU (docs/weights.md)",
                             choices=("auto", "fused", "autograd"))
    max_new_tokens: int = _opt(96, "max response length (tokens); longer ones are truncated", min=1)
    token_budget: int = _opt(0, "partial rollouts: tokens per trajectory per iteration (0 = max_new_tokens)", min=0)
    sampler: str = _opt("curriculum", "prompt sampler", choices=("curriculum", "prioritized", "uniform"))
    curriculum_ramp: int = _opt(20, "curriculum: iterations until the whole pool is open", min=0)
    length_penalty_weight: float = _opt(0.0, "weight of the length reward (2.3.3)", min=0.0)
    length_penalty_warmup: int = _opt(0, "iterations with the length reward off", min=0)
    repeat_penalty: float = _opt(-1.0, "reward added to trajectories stopped for repeating (<= 0)", max=0.0)
    truncated_reward: float = _opt(0.0, "reward of a response cut at max_new_tokens (0 = counts as wrong)")


@dataclass
class EvalConfig:
    """Held-out evaluation (greedy pass@1, sampled pass@k)."""

    every: int = _opt(5, "evaluate every this many RL iterations (and after the last)", min=1)
    num_samples: int = _opt(1, "samples per problem for pass@k (1 = greedy pass@1 only)", min=1)
    temperature: float = _opt(1.0, "sampling temperature for pass@k", min=0.0)
    batch_size: int = _opt(200, "problems per generate call", min=1)


@dataclass
class Long2ShortConfig:
    """long2short methods (paper 2.4), run by ``k15 long2short merge|srs|dpo|rl`` on a trained run."""

    merge_alpha: float = _opt(0.5, "merge: weight of the long-CoT model (1 - alpha for the short-CoT one)", min=0.0,
                              max=1.0)
    num_problems: int = _opt(256, "srs/dpo: training problems sampled from the long-CoT model", min=1)
    num_samples: int = _opt(8, "srs/dpo: samples per problem (the paper uses 8)", min=2)
    steps: int = _opt(60, "srs/dpo: optimizer steps", min=1)
    batch_size: int = _opt(32, "srs: sequences per step; dpo: pairs per step", min=1)
    lr: float = _opt(3e-5, "srs: AdamW learning rate", above=0.0, why="a zero learning rate trains nothing")
    dpo_beta: float = _opt(0.1, "dpo: beta", above=0.0, why="with beta 0 the DPO loss is constant")
    dpo_lr: float = _opt(3e-6, "dpo: AdamW learning rate (DPO moves the sharp SFT/RL model fast)", above=0.0,
                         why="a zero learning rate trains nothing")
    dpo_length_ratio: float = _opt(1.5, "dpo: correct samples longer than this x the chosen are rejected", min=1.0)
    rl_iterations: int = _opt(20, "rl: RL iterations with the length penalty", min=1)
    rl_max_new_tokens: int = _opt(64, "rl: the (much smaller) max rollout length", min=1)
    rl_length_penalty_weight: float = _opt(1.0, "rl: weight of the length reward (no warm-up)", min=0.0)


@dataclass
class RunConfig:
    """Run-level options."""

    output_dir: str = _opt("runs/default", "directory for metrics.jsonl, tensorboard/, checkpoints/")
    device: str = _opt("auto", "where policy and rollout engine run: auto (cuda when available; one GPU per rank "
                       "under torchrun), cpu or cuda; on cuda the policy's attention is k15sys varlen_attention",
                       choices=("auto", "cpu", "cuda"))
    engine: str = _opt("auto", "rollout engine: paged (k15sys.rollout.PagedEngine: paged KV cache, continuous batching, "
                       "CUDA graphs; Qwen2/Qwen3/Llama), torch (TorchEngine, any transformers LM) or auto (paged on "
                       "cuda, torch on cpu)", choices=("auto", "torch", "paged"))
    seed: int = _opt(0, "seed of sampling, rollouts and minibatch order", min=0)
    threads: int = _opt(2, "torch intra-op threads of training (0 = torch default); a fixed count keeps runs "
                        "bit-reproducible on one machine", min=0, max=_MAX_THREADS,
                        max_text="4 x CPUs", why=f"{os.cpu_count()} CPUs here")
    rollout_threads: int = _opt(1, "torch intra-op threads while generating (rollouts, evaluation, rollout "
                                "workers); 0 = run.threads. Decoding's small matmuls run fastest on one thread "
                                "on the CPU", min=0, max=_MAX_THREADS, max_text="4 x CPUs",
                                why=f"{os.cpu_count()} CPUs here")
    deterministic: bool = _opt(False, "bit-reproducible GPU runs: torch.use_deterministic_algorithms(True) and a fixed "
                               "cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG), for the whole process; somewhat slower. "
                               "The CPU path is reproducible without it")
    checkpoint_every: int = _opt(10, "save a checkpoint every this many RL iterations", min=1)
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk", min=1)
    pack_row_tokens: int = _opt(256, "sequence packing: tokens per packed row (0 = one row)", min=0)
    rollout_workers: int = _opt(0, "rollout engines in their own processes (k15sys.rollout.RemoteEngine), weights "
                                "sent through the checkpoint engine; 0 = one engine in the trainer process. "
                                "Under torchrun each rank has its own workers (on its GPU)", min=0, max=_MAX_WORKERS,
                                max_text="CPUs", why=f"one process per engine, {os.cpu_count()} CPUs here")
    colocate: bool = _opt(False, "hybrid deployment (GPU colocation): the trainer's parameters and optimizer state go to host "
                          "memory while the engine generates, then engine.sleep() during training and wake() before "
                          "the weight sync (also for the FSDP2-sharded trainer under torchrun)")
    tensorboard: bool = _opt(True, "also write TensorBoard event files")
    loggers: str = _opt("", "also log every metrics row to Weights & Biases and/or MLflow (must be installed; "
                        "WANDB_PROJECT, MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME as usual); "
                        "the run is named after run.output_dir",
                        choices=("", "wandb", "mlflow", "wandb,mlflow"))
    progress: bool = _opt(True, "show tqdm progress bars")


@dataclass
class Config:
    """The whole main job: ``k15 train --config configs/default.yaml``."""

    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    long2short: Long2ShortConfig = field(default_factory=Long2ShortConfig)


def _check_value(key: str, f: dataclasses.Field, value: Any) -> Any:
    typ = f.type if not isinstance(f.type, str) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if typ is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        except ValueError:
            pass
    if typ is bool and not isinstance(value, bool) or typ is not bool and (isinstance(value, bool) or not isinstance(value, typ)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    m = f.metadata
    choices, why = m.get("choices"), f" ({m['why']})" if m.get("why") else ""
    if choices and value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    for bad, text in ((m.get("min") is not None and value < m["min"], f">= {m.get('min')}"),
                      (m.get("above") is not None and value <= m["above"], f"> {m.get('above')}"),
                      (m.get("max") is not None and value > m["max"], f"<= {m.get('max')}")):
        if bad:
            raise ConfigError(f"{key}: must be {text}, got {value!r}{why}")
    return value


def _is_section(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        if _is_section(f):
            kwargs[name] = _build(f.default_factory, data[name], key + ".")
        else:
            kwargs[name] = _check_value(key, f, data[name])
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    if cfg.task.max_ops < cfg.task.min_ops:
        raise ConfigError(f"task.max_ops: must be >= task.min_ops={cfg.task.min_ops}, got {cfg.task.max_ops}")
    if cfg.sft.max_ops and cfg.sft.max_ops < cfg.task.min_ops:
        raise ConfigError(f"sft.max_ops: must be 0 (all) or >= task.min_ops={cfg.task.min_ops}, got {cfg.sft.max_ops}")
    if cfg.model.num_heads % cfg.model.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads: {cfg.model.num_kv_heads} does not divide model.num_heads={cfg.model.num_heads}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size: {cfg.model.hidden_size} is not a multiple of model.num_heads={cfg.model.num_heads}")
    if cfg.rl.minibatch_size % cfg.rl.group_size:
        raise ConfigError(f"rl.minibatch_size: {cfg.rl.minibatch_size} is not a multiple of rl.group_size={cfg.rl.group_size}")
    if cfg.rl.token_budget > cfg.rl.max_new_tokens:
        raise ConfigError(f"rl.token_budget: {cfg.rl.token_budget} exceeds rl.max_new_tokens={cfg.rl.max_new_tokens}")
    if cfg.rl.decay_iterations and cfg.rl.lr_min > cfg.rl.lr:
        raise ConfigError(f"rl.lr_min: {cfg.rl.lr_min} exceeds rl.lr={cfg.rl.lr} (the decay goes down to it)")
    # settings that would run and quietly do nothing
    if cfg.sft.steps and cfg.sft.lr == 0:
        raise ConfigError(f"sft.lr: must be > 0 with sft.steps={cfg.sft.steps} (a zero learning rate trains nothing; "
                          "sft.steps=0 skips the warm-up)")
    if cfg.eval.num_samples > 1 and cfg.eval.temperature == 0:
        raise ConfigError(f"eval.temperature: must be > 0 with eval.num_samples={cfg.eval.num_samples} (greedy samples "
                          "are all the same answer: pass@k would be pass@1)")
    if cfg.rl.length_penalty_weight and cfg.rl.length_penalty_warmup >= cfg.rl.iterations:
        raise ConfigError(f"rl.length_penalty_warmup: {cfg.rl.length_penalty_warmup} >= rl.iterations="
                          f"{cfg.rl.iterations}, so the length reward (weight {cfg.rl.length_penalty_weight}) never "
                          "applies")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping."""
    cfg = _build(Config, data or {}, "")
    _cross_checks(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Validate a :class:`Config` built in Python (dataclass constructors and ``dataclasses.replace`` check nothing)
    exactly as :func:`load_config` validates files; raises :class:`ConfigError`."""
    config_from_dict(to_dict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rl.lr=1e-3"`` -> (["rl", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read YAML (or start from the defaults), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config: {p} must hold a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node[keys[-1]] = value
    return config_from_dict(data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def _range(m: dict[str, Any]) -> str:
    """The allowed values of a numeric field, e.g. ``>= 2``, ``> 0``, ``in [0, 1]``."""
    lo = f"[{m['min']}" if m.get("min") is not None else f"({m['above']}" if m.get("above") is not None else None
    hi = m.get("max_text") or m.get("max")
    if lo and hi is not None:
        return f"in {lo}, {hi}]"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return f"<= {hi}" if hi is not None else ""


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per option: ``key (type, default, range or choices): help``."""
    lines = []
    for f in dataclasses.fields(cls):
        if _is_section(f):
            lines.append(f"[{prefix}{f.name}] {f.default_factory.__doc__}")
            lines += describe(f.default_factory, prefix + f.name + ".")
        else:
            choices, allowed = f.metadata.get("choices"), _range(f.metadata)
            extra = f", one of {list(choices)}" if choices else f", {allowed}" if allowed else ""
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            lines.append(f"  {prefix}{f.name} ({typ}, default {f.default!r}{extra}): {f.metadata.get('help', '')}")
    return lines

