"""Per-iteration metrics (paper 2.6): one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard and,
when asked for (``run.loggers``) and installed, to Weights & Biases and/or MLflow.

Rows are flushed and fsynced as they are written, so a killed run leaves a valid prefix. On resume,
:meth:`MetricsLog.truncate` drops rows written after the checkpoint being resumed, so the file of a
resumed run equals the file of an uninterrupted one (timings aside). The mirrors get every numeric value of a
row (not ``iteration`` itself) at step ``row["iteration"]``; the JSONL file stays the record.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

LOGGERS = ("wandb", "mlflow")


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"run.loggers: {name} is not installed (pip install {name}), or leave it out of "
                         f"run.loggers") from None


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _Wandb:
    """One W&B run per output directory (named after it; project from ``WANDB_PROJECT``, default "k15sys").

    W&B's own step only grows, so the RL iteration and the SFT step travel as x-axis metrics of their own."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        wandb = _import("wandb")
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "k15sys"), name=run_dir.name,
                               dir=str(run_dir), config=config)
        self._run.define_metric("sft/step")
        self._run.define_metric("sft/*", step_metric="sft/step")
        self._run.define_metric("iteration")
        for prefix in ("rl/*", "eval/*", "time/*"):
            self._run.define_metric(prefix, step_metric="iteration")

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        self._run.log({**scalars, axis: step})

    def close(self) -> None:
        self._run.finish()


class _Mlflow:
    """One MLflow run (named after the output directory; tracking URI and experiment from MLflow's own
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``), the flattened config as its parameters."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self._mlflow = _import("mlflow")
        self._mlflow.start_run(run_name=run_dir.name)
        self._mlflow.log_params(_flatten(config))

    @staticmethod
    def key(name: str) -> str:
        """MLflow keys allow letters, digits, ``_ - . /`` and spaces: ``eval/pass@1`` -> ``eval/pass_at_1``."""
        return re.sub(r"[^\w\-. /]", "_", name.replace("@", "_at_"))

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        self._mlflow.log_metrics({self.key(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


_SINKS = {"wandb": _Wandb, "mlflow": _Mlflow}


def parse_loggers(loggers: str) -> list[str]:
    """``run.loggers`` ("", "wandb", "mlflow" or "wandb,mlflow") as a list; anything else is a ValueError."""
    names = [n.strip() for n in loggers.split(",") if n.strip()] if isinstance(loggers, str) else None
    if names is None or any(n not in LOGGERS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"run.loggers: expected a comma-separated subset of {list(LOGGERS)}, got {loggers!r}")
    return names


class MetricsLog:
    """Append-only JSONL metrics with mirrors: TensorBoard (``tensorboard``, the default) and the optional
    ``loggers`` (``"wandb"``, ``"mlflow"`` or both, comma-separated), which must be installed. ``config`` (a plain
    dict) is recorded by the optional loggers as the run's config / parameters."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True, loggers: str = "",
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        names = parse_loggers(loggers)
        self._sinks: list[Any] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            classes = ([_TensorBoard] if tensorboard else []) + [_SINKS[n] for n in names]
            for cls in classes:
                self._sinks.append(cls(self.path.parent, dict(config or {})))

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` (must hold an int ``"iteration"``)."""
        if "iteration" not in row:
            raise ValueError(f"row: needs an 'iteration' key, got keys {sorted(row)}")
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = _scalars(row)
        for sink in self._sinks:
            sink.log(scalars, row["iteration"], "iteration")

    def scalar(self, key: str, value: float, step: int) -> None:
        """A mirror-only scalar (e.g. the SFT loss curve, which has no JSONL row), on the ``sft/step`` axis."""
        for sink in self._sinks:
            sink.log({key: value}, step, "sft/step")

    def truncate(self, last_iteration: int) -> None:
        """Keep only rows with ``iteration <= last_iteration`` (atomic rewrite; the mirrors keep what they got)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in read_metrics(self.path) if line["iteration"] <= last_iteration]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Close every mirror (idempotent)."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
