"""The cgroups of one sandbox container (paper 2.6.4), cgroup v1 or v2, nested under the caller's own.

rlimits bound each process, not a tree of them: 60 processes of 1 GiB each are 60 GiB, 60 spinning
processes take every core. When the host process may create cgroups (root, on this machine and in CI),
each container gets a group ``K`` inside the caller's cgroup (so the caller is charged for it) with
``memory`` + ``pids`` limits for everything the container holds, and a child ``K/exec`` for the
execution that is running (one at a time per container):

- a 1-CPU quota (``cpu.cfs_quota_us`` / ``cpu.max``): whatever it forks, an execution cannot take
  more than one core from the other executions;
- its CPU time, orphans and daemons included (``cpuacct.usage`` / ``cpu.stat``), against ``cpu_s``;
- its memory limit (``memory.limit_in_bytes`` / ``memory.max`` = ``Limits.memory_mb``) and OOM-kill
  count (``memory.oom_control`` / ``memory.events``): a ``MEMORY`` status is an OOM kill seen there.

The host opens the few ``K/exec`` files the zygote needs and passes the descriptors into the container
(which has no ``/sys``); the kernel checks the opener's credentials, so the container's executions can
join ``K/exec`` and read their usage, and nothing else. Without permission this is skipped and said so
(``Sandbox.cgroup_error``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PREFIX = "k15sys-sandbox"
CPU_PERIOD_US = 100_000


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def own_cgroup(controller: str | None, proc_cgroup: str | None = None) -> str:
    """The calling process's cgroup path for a v1 ``controller`` (None: the v2 unified hierarchy)."""
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller in controllers.split(",")):
            return path
    raise OSError(f"no {controller or 'unified'} entry in /proc/self/cgroup")


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


class Cgroup:
    """One container's cgroups; :meth:`create` returns them, or raises OSError when not usable."""

    def __init__(self) -> None:
        self.tops: list[Path] = []     # K, one per hierarchy (deduplicated)
        self.execs: list[Path] = []    # K/exec
        self.home: Path | None = None  # where the container's own processes go (K, or K/zygote in v2)
        self.memory: Path | None = None
        self.cpu_usage: Path | None = None
        self.note: str | None = None   # why the groups are not below the caller's (v2 only)

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids_max: int) -> Cgroup:
        """``name`` is ``"<host pid>-<n>"``; empty groups of dead host processes are removed first."""
        remove_stale()
        group = cls()
        try:
            if is_v2():
                group._create_v2(name, memory_bytes, pids_max)
            else:
                group._create_v1(name, memory_bytes, pids_max)
        except OSError:
            group.remove()
            raise
        return group

    def _mkdir(self, d: Path, top: bool) -> Path:
        d.mkdir()
        (self.tops if top else self.execs).append(d)
        return d

    def _create_v2(self, name: str, memory_bytes: int, pids_max: int) -> None:
        own = ROOT / own_cgroup(None).lstrip("/")
        for parent in dict.fromkeys([own, ROOT]):
            if not {"memory", "pids", "cpu"} <= set((parent / "cgroup.controllers").read_text().split()):
                raise OSError(f"cgroup v2: {parent} lacks the memory, pids and cpu controllers")
            try:
                _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
                break
            except OSError as e:  # a non-root v2 cgroup holding processes cannot hand controllers down
                if parent == ROOT:
                    raise
                self.note = (f"cgroup v2: not nested under the caller's cgroup {own} ({e}: it holds processes); "
                             f"created under {ROOT}")
        k = self._mkdir(parent / f"{PREFIX}-{name}", True)
        _write(k / "memory.max", str(memory_bytes))
        if (k / "memory.swap.max").exists():
            _write(k / "memory.swap.max", "0")
        _write(k / "pids.max", str(pids_max))
        _write(k / "cgroup.subtree_control", "+memory +pids +cpu")
        self.home = self._mkdir(k / "zygote", False)
        e = self._mkdir(k / "exec", False)
        _write(e / "cpu.max", f"{CPU_PERIOD_US} {CPU_PERIOD_US}")
        self.memory, self.cpu_usage = e, e

    def _create_v1(self, name: str, memory_bytes: int, pids_max: int) -> None:
        dirs = {}
        for controller in ("memory", "pids", "cpu", "cpuacct"):
            base = (ROOT / controller).resolve() / own_cgroup(controller).lstrip("/")
            d = base / f"{PREFIX}-{name}"
            dirs[controller] = d if d in self.tops else self._mkdir(d, True)  # co-mounted: one directory
        _write(dirs["memory"] / "memory.limit_in_bytes", str(memory_bytes))
        if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
            _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no escape into swap
        _write(dirs["pids"] / "pids.max", str(pids_max))
        execs = {}
        for controller in ("memory", "cpu", "cpuacct"):
            d = dirs[controller] / "exec"
            execs[controller] = d if d in self.execs else self._mkdir(d, False)
        _write(execs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(execs["cpu"] / "cpu.cfs_quota_us", str(CPU_PERIOD_US))
        self.memory, self.cpu_usage = execs["memory"], execs["cpuacct"]

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the container's group (its later children are born there)."""
        for d in ([self.home] if self.home else self.tops):
            _write(d / "cgroup.procs", str(pid))

    def open_exec_fds(self) -> dict[str, int | list[int]]:
        """Descriptors of ``K/exec`` for the zygote: ``procs`` (write "0" to join), ``memory_limit``,
        ``oom``, ``cpu_usage``. The caller closes them once the container has inherited them."""
        assert self.memory is not None and self.cpu_usage is not None
        v2 = self.home is not None
        return {
            "procs": [os.open(d / "cgroup.procs", os.O_WRONLY) for d in self.execs],
            "memory_limit": os.open(self.memory / ("memory.max" if v2 else "memory.limit_in_bytes"), os.O_WRONLY),
            "oom": os.open(self.memory / ("memory.events" if v2 else "memory.oom_control"), os.O_RDONLY),
            "cpu_usage": os.open(self.cpu_usage / ("cpu.stat" if v2 else "cpuacct.usage"), os.O_RDONLY),
        }

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in the container so far (executions included)."""
        total = 0
        for d in self.tops if self.home else self.tops + self.execs:  # v2 counts hierarchically, v1 per group
            for name in ("memory.events", "memory.oom_control"):
                try:
                    m = re.search(r"^oom_kill (\d+)", (d / name).read_text(), re.MULTILINE)
                except OSError:
                    continue
                total += int(m.group(1)) if m else 0
        return total

    def pids(self) -> list[int]:
        """Every process in the container's groups."""
        out: set[int] = set()
        for d in self.execs + self.tops:
            try:
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(out)

    def remove(self) -> None:
        """Delete the groups (their processes must be gone)."""
        for d in self.execs + self.tops:
            try:
                os.rmdir(d)
            except OSError:
                pass
        self.execs, self.tops = [], []


def remove_stale() -> None:
    """Remove the empty groups that a killed host process (e.g. SIGKILLed) could not remove itself."""
    if is_v2():
        bases = [ROOT / own_cgroup(None).lstrip("/"), ROOT]
    else:
        bases = [(ROOT / c).resolve() / own_cgroup(c).lstrip("/") for c in ("memory", "pids", "cpu", "cpuacct")
                 if (ROOT / c).exists()]
    for base in set(bases):
        for d in base.glob(f"{PREFIX}-*-*"):
            host_pid = d.name.removeprefix(f"{PREFIX}-").split("-")[0]
            if host_pid.isdigit() and not os.path.exists(f"/proc/{host_pid}"):
                for leaf in ("exec", "zygote", ""):
                    try:
                        os.rmdir(d / leaf if leaf else d)
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
