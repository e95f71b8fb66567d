"""Shared by the sandbox tests: capability detection (skip loudly) and the process-leak check."""
from __future__ import annotations

import os

import pytest

from k15sys.sandbox import Sandbox, Status, bwrap_path


def sandbox_unavailable_reason() -> str | None:
    """None when the sandbox works here; else why not (the tests then skip with this reason)."""
    if bwrap_path() is None:
        return "bubblewrap (bwrap) is not installed: run scripts/install.sh as root"
    with Sandbox(workers=1) as sb:
        r = sb.run("print(1)")
    if r.status != Status.OK:
        return f"the sandbox cannot start here (user namespaces disabled?): {r.status.value}: {r.stderr[:300]}"
    return None


REASON = sandbox_unavailable_reason()
requires_sandbox = pytest.mark.skipif(REASON is not None, reason=f"SANDBOX UNAVAILABLE -- NOT TESTED: {REASON}")


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, command name) of every process on the host."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0], comm)
    return table


def container_processes(sb: Sandbox) -> dict[int, list[tuple[int, str, str]]]:
    """For each container: its processes (pid, state, name), bubblewrap included."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for c in sb._containers:
        todo, seen = [c.proc.pid], []
        while todo:
            pid = todo.pop()
            if pid in table:
                seen.append((pid, table[pid][1], table[pid][2]))
                todo.extend(children.get(pid, []))
        out[c.proc.pid] = seen
    return out


def assert_idle(sb: Sandbox) -> None:
    """Every container holds exactly its idle processes: bubblewrap, the zygote, its template and (once
    it has run a job) the one pre-started nested sandbox waiting for the next step; nothing else, no
    zombie."""
    for root, procs in container_processes(sb).items():
        names = sorted(name for _, _, name in procs)
        assert len(procs) in (3, 4) and all(state in "S" for _, state, _ in procs), (root, procs)
        assert names.count("bwrap") == 1, (root, procs)
