"""The sandbox's cgroup layout (k15sys.sandbox.cgroup) on a fake cgroup v2 tree: no root, no sandbox
needed. The v1 layout is exercised for real by tests/test_sandbox_adversarial.py on this machine."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from k15sys.sandbox import cgroup


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    own = tmp_path / "user.slice" / "session-1"
    own.mkdir(parents=True)
    for d in (tmp_path, tmp_path / "user.slice", own):
        (d / "cgroup.controllers").write_text("cpu memory pids io\n")
    monkeypatch.setattr(cgroup, "ROOT", tmp_path)
    monkeypatch.setattr(cgroup, "own_cgroup", lambda controller: "/user.slice/session-1")
    real_write = cgroup._write

    def write(path: Path, value: str) -> None:
        if path.parent == own and path.name == "cgroup.subtree_control" and (tmp_path / "busy").exists():
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_write(path, value)
        if path.name == "cgroup.subtree_control":
            (path.parent / "cgroup.controllers").write_text("cpu memory pids\n")  # children get them

    monkeypatch.setattr(cgroup, "_write", write)
    return tmp_path, own


def test_v2_groups_nest_under_the_callers(fake_v2):
    root, own = fake_v2
    g = cgroup.Cgroup.create("123-0", 1 << 30, 100)
    k = own / "k15sys-sandbox-123-0"
    assert g.tops == [k] and g.home == k / "zygote" and g.note is None
    assert (k / "memory.max").read_text() == str(1 << 30) and (k / "pids.max").read_text() == "100"
    assert (k / "exec" / "cpu.max").read_text() == "100000 100000"  # one core per execution
    assert "+cpu" in (own / "cgroup.subtree_control").read_text()


def test_v2_caller_holding_processes_falls_back_to_the_top_and_says_so(fake_v2):
    root, own = fake_v2
    (root / "busy").touch()
    g = cgroup.Cgroup.create("123-1", 1 << 30, 100)
    assert g.tops == [root / "k15sys-sandbox-123-1"]
    assert g.note is not None and str(own) in g.note and "holds processes" in g.note


def test_own_cgroup_reads_v1_and_v2_lines():
    text = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/user.slice\n"
    assert cgroup.own_cgroup("memory", text) == "/process_api/abc"
    assert cgroup.own_cgroup("cpuacct", text) == "/x"
    assert cgroup.own_cgroup(None, text) == "/user.slice"
    with pytest.raises(OSError, match="pids"):
        cgroup.own_cgroup("pids", text)
