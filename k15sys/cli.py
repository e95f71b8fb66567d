"""The ``k15`` command line (paper 2.3-2.6 as a runnable job).

    k15 train [--config configs/default.yaml] [--output-dir DIR] [--resume | --overwrite] [--set section.key=value ...]
    k15 eval DIR [--samples 8] [--model MODEL_DIR]
    k15 long2short merge|srs|dpo|rl DIR
    k15 plot DIR [--out curve.png]
    k15 export DIR --out MODEL_DIR

``k15 train --set model.path=DIR --set data.train=F.jsonl --set data.eval=G.jsonl`` trains your own model on your
problems (docs/your_model.md). ``k15 train`` with no arguments runs ``configs/default.yaml`` (the embedded default if the file is not
there). Configuration errors are reported before any work starts, naming the key.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from k15sys.train.config import ConfigError, describe, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set rl.lr=1e-3 (repeatable)")


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    overrides = list(args.overrides) + list(extra or [])
    if getattr(args, "output_dir", None):
        overrides.append(f"run.output_dir={args.output_dir}")
    return load_config(path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        print("\n".join(describe()))
        return 0
    cfg = _load(args)
    if cfg.run.progress and int(os.environ.get("RANK", "0")) == 0:  # the first seconds: imports, data, model, engine
        what = f"model {cfg.model.path}" if cfg.model.path else "the built-in model"
        print(f"k15: loading torch, the data and {what}, then building the rollout engine "
              f"(run.device={cfg.run.device})...", file=sys.stderr, flush=True)
    from k15sys.train import distributed
    from k15sys.train.checkpoint import latest_checkpoint
    from k15sys.train.progress import note
    from k15sys.train.trainer import Trainer, check_no_previous_run, remove_run

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    if args.resume and args.config is None and latest_checkpoint(Path(cfg.run.output_dir) / "checkpoints"):
        # the run's own settings (--set still applies on top); the trainer reports any damaged checkpoint it skips
        cfg = _load_cfg_for_run(args, cfg.run.output_dir, report=False)
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:  # before the ranks meet in init_from_env
        remove_run(cfg.run.output_dir)
    elif not args.resume:
        try:
            check_no_previous_run(cfg.run.output_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    distributed.init_from_env(cfg.run.device)
    world = distributed.rank_and_world()[1]
    trainer, finished, stopped_by = None, False, []

    def on_signal(signum: int, frame: object) -> None:
        # first SIGINT/SIGTERM: finish the iteration, checkpoint, stop; a second one aborts at once
        if trainer is None or trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()
        stopped_by.append(signum)
        unit = "SFT step" if trainer.stage == "sft" else "iteration"
        note(f"k15: {signal.Signals(signum).name}: stopping after this {unit} with a checkpoint "
             "(send it again to abort)")  # on its own line, above the progress bar

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer = Trainer(cfg)
        trainer.run(resume=args.resume)
        finished = True
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if trainer is not None:
            trainer.close()
        distributed.shutdown(barrier=finished)
    code = 128 + stopped_by[0] if stopped_by else 0
    if stopped_by:
        where = (f"SFT step {trainer.warmup.step} of {cfg.sft.steps}" if trainer.stage == "sft" and trainer.warmup
                 else f"iteration {trainer.iteration}")
        print(f"k15: stopped at {where}, checkpoint saved; continue with "
              f"k15 train --output-dir {cfg.run.output_dir} --resume", file=sys.stderr)
    elif distributed.rank_and_world()[0] == 0:
        print(_summary(Path(cfg.run.output_dir), trainer), file=sys.stderr)
    if world > 1:
        distributed.exit_rank(code)
    return code


def _summary(out: Path, trainer) -> str:
    """One line at the end of ``k15 train``: held-out pass@1 of the SFT model, the last and the best evaluation."""
    from k15sys.train.metrics import read_metrics

    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/pass@1" in r]
    first, last = evals[0], evals[-1]
    best = max(evals[1:] or evals, key=lambda r: r["eval/pass@1"])
    return (f"k15: done: {trainer.iteration} RL iterations in {trainer.rl_seconds / 60:.1f} min; held-out pass@1 "
            f"{first['eval/pass@1']:.3f} (SFT) -> {last['eval/pass@1']:.3f} (iteration {last['iteration']}), best "
            f"{best['eval/pass@1']:.3f} (iteration {best['iteration']}); metrics in {out / 'metrics.jsonl'}")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from k15sys.train.evaluation import evaluate
    from k15sys.train.long2short_job import _load
    from k15sys.train.trainer import generation_threads, intra_op_threads

    cfg = _load_cfg_for_run(args)
    tr = _load(cfg, Path(args.run_dir))
    row: dict = {"iteration": tr.iteration}
    if args.model:  # e.g. a long2short result: its weights, the run's task and evaluation settings
        from transformers import AutoModelForCausalLM

        from k15sys.weights import push_weights

        try:
            lm = AutoModelForCausalLM.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model: cannot load a transformers model from {args.model}: {e}") from None
        try:
            push_weights(tr.engine, dict(lm.named_parameters()))
        except ValueError as e:
            raise ConfigError(f"--model: {args.model} does not match the run's model: {e}") from None
        row = {"model": str(args.model)}
    with intra_op_threads(generation_threads(cfg)):
        scores = evaluate(tr.engine, tr.task, tr.task.eval, max_new_tokens=cfg.rl.max_new_tokens,
                       num_samples=args.samples, temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                       seed=cfg.run.seed)
    tr.close()
    print(json.dumps({**row, **scores}, sort_keys=True))
    return 0


def cmd_long2short(args: argparse.Namespace) -> int:
    import json

    from k15sys.train.long2short_job import long2short

    try:
        row = long2short(args.method, _load_cfg_for_run(args), args.run_dir)
    except ValueError as e:  # nothing to train on (no correct sample, no preference pair), no checkpoint
        if isinstance(e, ConfigError):
            raise
        print(f"k15: long2short {args.method}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(row, sort_keys=True))
    return 0


def _load_cfg_for_run(args: argparse.Namespace, run_dir: str | None = None, *, report: bool = True):
    """The run's own config (saved in its checkpoints) unless --config is given; --set applies on top. ``report``:
    name on stderr the damaged checkpoints skipped on the way."""
    if args.config is None:
        from k15sys.train.checkpoint import checkpoint_config
        from k15sys.train.config import config_from_dict, parse_override

        run_dir = run_dir or args.run_dir
        data = checkpoint_config(_latest_checkpoint(run_dir, report=report))
        for text in [*args.overrides, f"run.output_dir={run_dir}"]:
            keys, value = parse_override(text)
            node = data
            for k in keys[:-1]:
                if not isinstance(node.get(k), dict):
                    raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
                node = node[k]
            node[keys[-1]] = value
        return config_from_dict(data)
    return _load(args)


def _latest_checkpoint(run_dir: str, *, report: bool = True) -> Path:
    """The run's newest intact checkpoint directory (damaged newer ones named on stderr when ``report``); a config
    error if there is none."""
    from k15sys.train.checkpoint import latest_checkpoint

    say = (lambda msg: print(f"k15: {msg}", file=sys.stderr)) if report else None
    ck = latest_checkpoint(Path(run_dir) / "checkpoints", log=say)
    if ck is None:
        raise ConfigError(f"run_dir: no checkpoint under {run_dir}/checkpoints")
    return ck


def cmd_export(args: argparse.Namespace) -> int:
    from k15sys.train.checkpoint import load_checkpoint
    from k15sys.train.config import config_from_dict
    from k15sys.train.model import export_model

    state = load_checkpoint(_latest_checkpoint(args.run_dir))
    out = export_model(config_from_dict(state["config"]).model, state["model"], args.out)
    print(out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from k15sys.train.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out, keys=args.keys)
    except ValueError as e:  # no metrics.jsonl, unknown --keys: the user's input, not a bug
        raise ConfigError(str(e)) from None
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k15", description="Kimi k1.5 RL system (arXiv 2501.12599)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="long-CoT SFT warm-up, then k1.5 RL")
    _config_args(p)
    p.add_argument("--output-dir", default=None, help="run directory (overrides run.output_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run directory, with the config saved in it "
                        "(--set overrides apply on top; --config replaces it)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run in the run directory (metrics.jsonl, checkpoints/, tensorboard/) first")
    p.add_argument("--help-config", action="store_true", help="print every config option and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out pass@1 (greedy) and pass@k of a run's latest checkpoint")
    p.add_argument("run_dir")
    _config_args(p)
    p.add_argument("--samples", type=int, default=1, help="k for pass@k (sampled at eval.temperature)")
    p.add_argument("--model", default=None,
                   help="evaluate this transformers model directory (k15 export, RUN/long2short/<method>) instead of "
                        "the run's latest checkpoint, with the run's task and evaluation settings")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("long2short", help="long2short methods of paper 2.4 on a trained run")
    p.add_argument("method", choices=["merge", "srs", "dpo", "rl"])
    p.add_argument("run_dir")
    _config_args(p)
    p.set_defaults(func=cmd_long2short)

    p = sub.add_parser("export", help="write a run's latest policy as a transformers model directory")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="directory for config.json, model.safetensors and the tokenizer (model.path's own; "
                        "k15_tokens.json for the built-in model)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="render PNG curves from a run's metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    p.add_argument("--keys", nargs="*", default=None, help="metrics to plot (default: pass@1, share of direct answers, accuracy, length, KL, entropy, time)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``k15`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"k15: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no intact checkpoint to resume, evaluate or export; a checkpoint write failed
        from k15sys.train.checkpoint import CheckpointError  # (torch is imported only by the commands that need it)

        if not isinstance(e, CheckpointError):
            raise
        print(f"k15: checkpoint error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
