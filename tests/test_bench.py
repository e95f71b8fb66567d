"""Benchmarks as a user runs them: they write to the user's place, refuse GPU cases without a GPU, and end
with a summary and one JSON line (issue 23 items 2-3)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import benchlib  # noqa: E402


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def test_result_and_figure_paths():
    user = argparse.Namespace(out=None, update_results=False, quick=True)
    assert benchlib.result_path(user, "x.json") == Path("runs/bench/x.json")
    assert benchlib.figure_path(user, "x.png") == Path("runs/bench/x.png")
    mine = argparse.Namespace(out=Path("/tmp/mine/r.json"), update_results=True, quick=True)
    assert benchlib.result_path(mine, "x.json") == Path("/tmp/mine/r.json")
    assert benchlib.figure_path(mine, "x.png") == Path("/tmp/mine/x.png")
    shipped = argparse.Namespace(out=None, update_results=True, quick=False)
    assert benchlib.result_path(shipped, "x.json") == ROOT / "bench" / "results" / "x.json"
    assert benchlib.figure_path(shipped, "x.png") == ROOT / "docs" / "img" / "x.png"
    args = benchlib.parser("doc").parse_args([])
    assert args.out is None and not args.update_results and not args.quick


def test_require_gpus_exits_2_without_enough_gpus(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    benchlib.require_gpus(argparse.Namespace(quick=False), "one_gpu_bench")  # enough
    with pytest.raises(SystemExit) as e:
        benchlib.require_gpus(argparse.Namespace(quick=False), "two_gpu_bench", 2)
    assert e.value.code == 2 and "needs 2 GPU(s); found 1" in capsys.readouterr().err
    benchlib.require_gpus(argparse.Namespace(quick=True), "two_gpu_bench", 2)  # --quick runs on the CPU


GPU_BENCHES = ["attention.py", "fused_logprob.py", "determinism.py", "weight_sync.py", "rollout_engine.py",
               "colocation.py"]
_REFUSALS = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
codes = {}
for script in sys.argv[2:]:
    sys.argv = [script]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(f"{sys.path[0]}/{script}", run_name="__main__")
        codes[script] = [0, err.getvalue()]
    except SystemExit as e:
        codes[script] = [e.code, err.getvalue()]
print(json.dumps(codes))
"""


def test_gpu_benches_refuse_without_a_gpu(tmp_path):
    """Without --quick and without CUDA each GPU bench exits 2 and says why (one interpreter for all)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _REFUSALS, str(BENCH), *GPU_BENCHES], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    for script in GPU_BENCHES:
        code, err = codes[script]
        assert code == 2, (script, code, err)
        assert "--quick" in err and "GPU" in err, (script, err)
    assert not (tmp_path / "runs").exists()  # nothing measured, nothing written


def test_a_user_run_leaves_the_shipped_results_alone(tmp_path):
    shipped = BENCH / "results" / "repeat_detection_cpu.json"
    before = shipped.read_bytes()
    proc = _run("repeat_detection.py", "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    written = tmp_path / "runs" / "bench" / "repeat_detection_cpu.json"
    assert json.loads(lines[-1]) == json.loads(written.read_text())  # the last line is the JSON result
    assert lines[0].startswith("repeat_detection:") and any("written to" in line for line in lines[:-1])
    assert shipped.read_bytes() == before


def test_colocation_quick_moves_are_exact(tmp_path):
    """bench/colocation.py --quick (the host path, CPU standing in for the device): every round trip it times
    returns the same bits, and its JSON is the last line."""
    proc = _run("colocation.py", "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["quick"] and result["device"] == "cpu"
    assert result["trainer_bf16_adamw"]["bit_identical"] and result["trainer_fp32_master_weights"]["bit_identical"]
    assert result["engine"]["bit_identical_after_level1"]
