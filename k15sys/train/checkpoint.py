"""Atomic checkpoints of everything that decides the next RL step (paper 2.6: resumable training).

A checkpoint is a directory ``checkpoints/iter_XXXXXX/`` holding ``state.pt`` (model, optimizer,
sampler, replay buffer, RNG states, iteration, stage, config) and ``config.json`` (the config alone, so
that reading a run's settings does not load its weights). It is written under a temporary name,
fsynced, then renamed; ``checkpoints/latest`` (a one-line file, replaced atomically) names the newest
complete one. A run killed at any instant therefore leaves either the previous or the new checkpoint,
never a torn one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU) RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, iteration: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``iteration`` under ``root`` atomically; keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep: must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp_iter_{iteration:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with (tmp / "state.pt").open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if "config" in state:
        with (tmp / "config.json").open("w") as f:
            json.dump(state["config"], f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or None."""
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state dict saved by :func:`save_checkpoint` (loaded on the CPU)."""
    f = Path(path) / "state.pt"
    if not f.exists():
        raise ValueError(f"path: no checkpoint at {path}")
    return torch.load(f, map_location="cpu", weights_only=False)


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The config saved with checkpoint ``path``, read from its ``config.json`` without loading the weights
    (from ``state.pt`` for checkpoints written before the sidecar existed)."""
    f = Path(path) / "config.json"
    if f.exists():
        return json.loads(f.read_text())
    return load_checkpoint(path)["config"]
