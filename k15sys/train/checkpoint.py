"""Atomic, checksummed checkpoints of everything that decides the next RL step (paper 2.6: resumable training).

A checkpoint is a directory ``checkpoints/iter_XXXXXX/`` holding ``state.pt`` (model, optimizer, sampler,
replay buffer, RNG states, iteration, stage, config), ``config.json`` (the config alone, so that reading a
run's settings does not load its weights) and ``manifest.json`` (size and sha256 of each of those files,
written after them). It is written under a temporary name, fsynced, then renamed; ``checkpoints/latest``
(a one-line file, replaced atomically) names the newest one. A run killed at any instant therefore leaves
the previous or the new checkpoint, never a torn one; a file damaged later (a truncated copy, flipped bytes)
fails its checksum.

:func:`latest_checkpoint` returns the newest checkpoint that passes its checksums, reporting every newer
one it skipped and why; it raises :class:`CheckpointError` when checkpoints exist but none is intact, so a
resume never silently starts over. :func:`save_checkpoint` removes what a crash left (``.tmp_iter_*``),
refuses to start when the file system cannot hold the tensors, names the directory and its free space when
a write fails, and never deletes the checkpoint it has just written.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
_NAME = re.compile(r"(\.old_)?iter_(\d+)")  # a checkpoint, or one being replaced by a checkpoint of the same iteration
_CHUNK = 1 << 22


class CheckpointError(OSError):
    """A checkpoint that cannot be written, or a checkpoint directory with no intact checkpoint to load."""


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# digests this process computed while verifying, by file identity and change times: `k15 train --resume` checks
# the same checkpoint several times (its config, the choice of checkpoint, the load). Only files last changed
# well before the hash are remembered, so a later rewrite gets other times even on file systems with coarse
# timestamps, and is hashed again.
_verified: dict[tuple[int, ...], str] = {}
_SETTLED_NS = 2 * 10**9


def _verified_sha256(path: Path) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _verified:
        return _verified[key]
    digest = _sha256(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
        if len(_verified) >= 64:
            _verified.clear()
        _verified[key] = digest
    return digest


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor and array storages reachable from ``obj`` (each storage once): a lower bound on the
    size of ``torch.save(obj)``."""
    seen: set[tuple[str, int]] = set()
    total, stack = 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = (str(x.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, np.ndarray):
            total += x.nbytes
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def _write_file(path: Path, write: Callable[[Any], None], mode: str) -> dict[str, Any]:
    with path.open(mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _remove_leftovers(root: Path, prefix: str) -> None:
    for p in root.glob(prefix + "*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _checkpoint_dirs(root: Path) -> list[tuple[int, bool, Path]]:
    """(iteration, is a replaced copy, path) of every checkpoint directory, newest first (a checkpoint before the
    copy it replaces)."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(2)), bool(m.group(1)), p))
    return sorted(found, key=lambda t: (-t[0], t[1]))


def save_checkpoint(root: str | Path, iteration: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``iteration`` under ``root`` atomically, with its checksums; keep the newest
    ``keep`` checkpoints up to this one.

    Leftovers of a crashed save (``.tmp_iter_*``) are removed first. Checkpoints of later iterations than
    ``iteration`` belong to a timeline the run has left (a resume fell back past them because they were
    damaged): they are moved to ``root/abandoned/``, not deleted. The checkpoint just written is always kept.

    Raises:
        CheckpointError: the file system has less free space than the state's tensors need, or a write failed
            (the message names the directory and its free space; the temporary directory is removed).
    """
    if keep < 1:
        raise ValueError(f"keep: must be >= 1, got {keep}")
    if iteration < 0:
        raise ValueError(f"iteration: must be >= 0, got {iteration}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root, ".tmp_iter_")
    need, free = tensor_bytes(state), shutil.disk_usage(root).free
    if need > free:
        raise CheckpointError(errno.ENOSPC, f"checkpoint: {root} has {_gib(free)} free, the checkpoint's tensors "
                              f"alone need {_gib(need)}; free space there or choose another run.output_dir")
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp_iter_{iteration:06d}_{os.getpid()}"
    tmp.mkdir()
    try:
        files = {"state.pt": _write_file(tmp / "state.pt", lambda f: torch.save(state, f), "wb")}
        if "config" in state:
            files["config.json"] = _write_file(tmp / "config.json", lambda f: json.dump(state["config"], f, indent=1), "w")
        # the manifest comes last: a directory whose manifest verifies holds complete files
        _write_file(tmp / MANIFEST, lambda f: json.dump({"format": 1, "iteration": iteration, "files": files}, f,
                                                        indent=1), "w")
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "enforce fail at inline_container.cc"
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(getattr(e, "errno", None) or errno.EIO,
                              f"checkpoint: writing {final.name} under {root} failed with "
                              f"{_gib(shutil.disk_usage(root).free)} free there: {e}") from e
    if final.exists():  # the same iteration again (warm-up checkpoints): keep the old copy until the new one is in
        old = root / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    _remove_leftovers(root, ".old_iter_")
    older = []
    for it, _, path in _checkpoint_dirs(root):
        if it > iteration:
            _set_aside(root, path)
        elif it < iteration:
            older.append(path)
    for path in older[keep - 1:]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _set_aside(root: Path, path: Path) -> None:
    dest = root / "abandoned" / path.name
    n = 1
    while dest.exists():
        dest, n = root / "abandoned" / f"{path.name}.{n}", n + 1
    dest.parent.mkdir(exist_ok=True)
    os.replace(path, dest)


def verify_checkpoint(path: str | Path) -> None:
    """Check checkpoint ``path`` against its manifest (every listed file present, of its size and sha256).

    Raises:
        CheckpointError: what is wrong (missing directory or manifest, truncated or damaged file).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing")
    try:
        files = {name: (int(meta["bytes"]), str(meta["sha256"]))
                 for name, meta in json.loads((path / MANIFEST).read_text())["files"].items()}
        if "state.pt" not in files:
            raise KeyError("state.pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete checkpoint, or one written before checksums)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({type(e).__name__}: {e})") from None
    for name, (size, digest) in files.items():
        _check_file(path, name, size, digest)


def _check_file(path: Path, name: str, size: int, digest: str) -> None:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"{path}: {name} is missing")
    if f.stat().st_size != size:
        raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, its manifest says {size} (truncated or "
                              "overwritten)")
    try:
        ok = _verified_sha256(f) == digest
    except OSError as e:  # e.g. EIO from a bad sector: as damaged as a wrong byte
        raise CheckpointError(f"{path}: {name} unreadable ({e})") from None
    if not ok:
        raise CheckpointError(f"{path}: {name} fails its sha256 checksum (damaged)")


def latest_checkpoint(root: str | Path, *, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact checkpoint directory under ``root`` (verified by :func:`verify_checkpoint`), or None
    when no checkpoint was ever completed there.

    Newer checkpoints that fail verification are skipped; ``log`` (e.g. a print to stderr) is told each one
    and why, and which checkpoint was chosen instead.

    Raises:
        CheckpointError: checkpoints exist under ``root`` (or ``latest`` names one) but none is intact.
    """
    root = Path(root)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    problems = []
    if named is not None and not named.is_dir():
        problems.append(f"{named}: missing (named by {pointer})")
    for _, _, path in _checkpoint_dirs(root):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems and log is not None:
            for p in problems:
                log(f"skipping a damaged checkpoint: {p}")
            log(f"falling back to the newest intact checkpoint, {path}")
        return path
    if problems:
        raise CheckpointError(f"no intact checkpoint under {root}: " + "; ".join(problems) +
                              " (start the run over with --overwrite, or restore a checkpoint)")
    return None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The state dict saved by :func:`save_checkpoint` (loaded on the CPU), checked against its manifest first
    unless ``verify`` is False (for a path :func:`latest_checkpoint` has just verified).

    Raises:
        ValueError: ``path`` holds no checkpoint.
        CheckpointError: the checkpoint is incomplete or damaged.
    """
    f = Path(path) / "state.pt"
    if not f.exists():
        raise ValueError(f"path: no checkpoint at {path}")
    if verify:
        verify_checkpoint(path)
    return torch.load(f, map_location="cpu", weights_only=False)


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The config saved with checkpoint ``path``, read from its ``config.json`` (checked against the manifest)
    without loading the weights.

    Raises:
        CheckpointError: ``config.json`` is missing or fails its checksum.
    """
    path = Path(path)
    try:
        meta = json.loads((path / MANIFEST).read_text())["files"]["config.json"]
        size, digest = int(meta["bytes"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no verifiable config.json ({type(e).__name__}: {e})") from None
    _check_file(path, "config.json", size, digest)
    return json.loads((path / "config.json").read_text())
