"""The examples in examples/ run as documented."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pmd_in_your_loop_runs_on_policy_and_keeps_the_engine_in_sync():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "pmd_in_your_loop.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Warning" not in out.stderr, out.stderr[-2000:]  # e.g. torch's float() of a tensor that requires grad
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in lines[:-1]] == [1, 2]
    summary = lines[-1]
    assert summary["steps"] == 2 and summary["engine_in_sync"] is True
    assert summary["max_logp_gap_to_engine"] < 1e-3  # the loss scores the samples under the policy that drew them
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "pmd_in_your_loop.py"), "--k", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--k" in bad.stderr
