"""A memory + pids cgroup around one sandbox container (paper 2.6.4), cgroup v2 or v1.

rlimits bound each process (RLIMIT_AS) and each execution's process count (RLIMIT_NPROC), but not the
sum over a process tree: 60 processes of 1 GiB each are 60 GiB. When the host process may create
cgroups (root, on this machine and in CI), each container gets one with ``memory.max`` and ``pids.max``,
so whatever its programs do, one container cannot take more than that from the host; the kernel's OOM
killer acts inside the cgroup only (programs first: they run with oom_score_adj 1000). Without
permission this is skipped and said so (``Sandbox.cgroup_error``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "k15sys-sandbox"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroup:
    """One container's cgroup; :meth:`create` returns it, or raises OSError when cgroups are not usable."""

    def __init__(self, dirs: list[Path], oom_file: Path) -> None:
        self.dirs, self._oom_file = dirs, oom_file

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids_max: int) -> Cgroup:
        """``name`` is ``"<host pid>-<container pid>"``; empty groups of dead host processes are removed."""
        _remove_stale()
        if (ROOT / "cgroup.controllers").exists():  # v2 (unified)
            if not {"memory", "pids"} <= set((ROOT / "cgroup.controllers").read_text().split()):
                raise OSError("cgroup v2 without the memory and pids controllers")
            parent = ROOT / PARENT
            parent.mkdir(exist_ok=True)
            for d in (ROOT, parent):
                _write(d / "cgroup.subtree_control", "+memory +pids")
            d = parent / name
            d.mkdir()
            _write(d / "memory.max", str(memory_bytes))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(pids_max))
            return cls([d], d / "memory.events")
        mem, pids = ROOT / "memory" / f"{PARENT}-{name}", ROOT / "pids" / f"{PARENT}-{name}"  # v1
        mem.mkdir()
        try:
            pids.mkdir()
        except OSError:
            mem.rmdir()
            raise
        group = cls([mem, pids], mem / "memory.oom_control")
        try:
            _write(mem / "memory.limit_in_bytes", str(memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no escape into swap
            _write(pids / "pids.max", str(pids_max))
        except OSError:
            group.remove()
            raise
        return group

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the cgroup (its later children are born there)."""
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup so far."""
        try:
            m = re.search(r"^oom_kill (\d+)", self._oom_file.read_text(), re.MULTILINE)
        except OSError:
            return 0
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        """Delete the cgroup (its processes must be gone)."""
        for d in self.dirs:
            try:
                os.rmdir(d)
            except OSError:
                pass


def _remove_stale() -> None:
    """Remove the empty cgroups that a killed host process (e.g. SIGKILLed) could not remove itself."""
    candidates = list((ROOT / PARENT).glob("*-*")) + list(ROOT.glob(f"*/{PARENT}-*-*"))
    for d in candidates:
        host_pid = d.name.removeprefix(f"{PARENT}-").split("-")[0]
        if host_pid.isdigit() and not os.path.exists(f"/proc/{host_pid}"):
            try:
                os.rmdir(d)
            except OSError:
                pass


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out
