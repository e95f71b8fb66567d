"""kill -9 in the middle of an RL iteration, resume, and the run equals the uninterrupted one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k15sys.train.checkpoint import latest_checkpoint, load_checkpoint
from k15sys.train.metrics import read_metrics

TINY = [
    "sft.steps=8", "sft.batch_size=8", "rl.iterations=6", "rl.prompts_per_iteration=4", "rl.group_size=4",
    "rl.minibatch_size=8", "rl.max_new_tokens=40", "rl.token_budget=16", "rl.max_minutes=0", "rl.warmup_iterations=2",
    "rl.sampler=prioritized", "rl.truncated_reward=-0.5", "task.num_train=64", "task.num_eval=12", "eval.every=3",
    "run.checkpoint_every=2", "run.threads=1", "run.device=cpu", "run.progress=false", "run.tensorboard=false",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
]

KILLER = """
import os, signal, sys
from k15sys.train.config import load_config
from k15sys.train.trainer import Trainer
from k15sys.cli import DEFAULT_CONFIG
cfg = load_config(DEFAULT_CONFIG, sys.argv[1:])
def hook(it, where):
    if it == 3 and where == "step":  # after the optimizer step of iteration 4, before sync/metrics/checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(cfg, stop_after=hook).run()
"""


def _train(out: Path, *extra: str) -> None:
    args = [f"--set={o}" for o in TINY] + ["--output-dir", str(out), *extra]
    subprocess.run([sys.executable, "-m", "k15sys.cli", "train", *args], check=True, timeout=240)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def test_kill9_mid_iteration_then_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a)
    killed = subprocess.run([sys.executable, "-c", KILLER, *TINY, f"run.output_dir={b}"], timeout=240)
    assert killed.returncode == -9
    assert len(read_metrics(b / "metrics.jsonl")) == 4  # SFT row + iterations 1..3; iteration 4 died
    assert load_checkpoint(latest_checkpoint(b / "checkpoints"))["iteration"] == 2
    _train(b, "--resume")
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["iteration"] for r in rows_b] == list(range(7))
    assert _comparable(rows_a) == _comparable(rows_b)
    sa = load_checkpoint(latest_checkpoint(a / "checkpoints"))
    sb = load_checkpoint(latest_checkpoint(b / "checkpoints"))
    assert sa["iteration"] == sb["iteration"] == 6
    for name, t in sa["model"].items():
        assert torch.equal(t, sb["model"][name]), name
    assert sa["scheduler"] == sb["scheduler"]  # replay buffer + sampler state
    # partial rollouts really carried unfinished trajectories across iterations
    assert any(r["rl/replay_buffer"] > 0 for r in rows_a if "rl/replay_buffer" in r)
    # rl.skip_zero_advantage (default) really skipped groups and trained others: the tiny model scores 0, and
    # rl.truncated_reward=-0.5 makes the groups with both finished and truncated samples informative
    rl_rows = [r for r in rows_a if "rl/groups" in r]
    assert any(0 < r["rl/trained_groups"] < r["rl/groups"] for r in rl_rows)


def test_first_sigint_checkpoints_the_iteration_and_stops_then_resume_continues(tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM) during RL: the run finishes the iteration, saves it and exits; nothing
    done before the signal is lost and --resume continues from there."""
    import signal
    import time

    run = tmp_path / "run"
    opts = [f"--set={o}" for o in TINY] + ["--set=rl.iterations=400", "--set=eval.every=1000",
                                          "--set=run.checkpoint_every=1000", "--output-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "k15sys.cli", "train", *opts], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (
            (run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "--resume" in err
    rows = read_metrics(run / "metrics.jsonl")
    stopped = rows[-1]["iteration"]
    assert 2 <= stopped < 400 and [r["iteration"] for r in rows] == list(range(stopped + 1))
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"))["iteration"] == stopped  # not the every-1000 one
    resumed = subprocess.run([sys.executable, "-m", "k15sys.cli", "train", *opts[:-2], f"--set=rl.iterations={stopped + 2}",
                              "--output-dir", str(run), "--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == list(range(stopped + 3))


def test_stop_during_sft_checkpoints_the_warm_up_and_resume_ends_as_uninterrupted(tmp_path):
    """A stop request during the SFT warm-up (Ctrl-C, preemption) ends it at a step boundary with a checkpoint of
    its progress (step, AdamW state, trace RNG); --resume runs the remaining steps, and the run (weights and
    metrics) equals one that was never stopped."""
    from k15sys.train.config import load_config
    from k15sys.train.trainer import Trainer

    opts = [*TINY, "sft.steps=12", "rl.iterations=2"]
    plain = Trainer(load_config(None, [*opts, f"run.output_dir={tmp_path / 'plain'}"]))
    plain.run()
    cfg = load_config(None, [*opts, f"run.output_dir={tmp_path / 'stopped'}"])
    first = Trainer(cfg)
    scalar = first.metrics.scalar

    def stop_at_step_5(key, value, step):
        scalar(key, value, step)
        if step == 5:
            first.request_stop()

    first.metrics.scalar = stop_at_step_5
    first.run()
    state = load_checkpoint(latest_checkpoint(tmp_path / "stopped" / "checkpoints"))
    assert state["stage"] == "sft" and state["sft"]["step"] == 5 and state["iteration"] == 0
    assert not (tmp_path / "stopped" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    resumed = Trainer(cfg)
    resumed.run(resume=True)
    assert _comparable(read_metrics(tmp_path / "stopped" / "metrics.jsonl")) == _comparable(
        read_metrics(tmp_path / "plain" / "metrics.jsonl"))
    for (name, a), b in zip(plain.policy.lm.state_dict().items(), resumed.policy.lm.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(latest_checkpoint(tmp_path / "stopped" / "checkpoints"))["sft"] is None  # RL-stage checkpoints
    # a crash (here an exception) during the warm-up: with sft.checkpoint_every=4 the resume starts from step 4
    crash_cfg = load_config(None, [*opts, "sft.checkpoint_every=4", f"run.output_dir={tmp_path / 'crashed'}"])
    crashing = Trainer(crash_cfg)

    def crash_at_step_6(key, value, step):
        if step == 6:
            raise RuntimeError("simulated crash")

    crashing.metrics.scalar = crash_at_step_6
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    assert load_checkpoint(latest_checkpoint(tmp_path / "crashed" / "checkpoints"))["sft"]["step"] == 4
    crashing.close()
    again = Trainer(crash_cfg)
    again.run(resume=True)
    for (name, a), b in zip(plain.policy.lm.state_dict().items(), again.policy.lm.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_falls_back_past_damaged_checkpoints_and_never_silently_starts_over(tmp_path, capsys):
    """Issue 20 item 7: --resume with the newest checkpoint damaged (flipped bytes) or deleted (`latest` names a
    missing directory) continues from the newest intact one, says so on stderr, and ends as the undamaged run;
    with no intact checkpoint it stops with an error and leaves metrics.jsonl as it was (no fresh start)."""
    import shutil

    from k15sys.cli import main
    from k15sys.train.config import load_config
    from k15sys.train.trainer import Trainer

    opts = [*TINY, "rl.iterations=4"]
    run = tmp_path / "run"
    cfg = load_config(None, [*opts, f"run.output_dir={run}"])
    Trainer(cfg).run()
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_000002", "iter_000004"]
    expected = _comparable(read_metrics(run / "metrics.jsonl"))
    for damage in ("flip", "delete"):
        if damage == "flip":
            data = bytearray((ck / "iter_000004" / "state.pt").read_bytes())
            data[len(data) // 2] ^= 0x01
            (ck / "iter_000004" / "state.pt").write_bytes(bytes(data))
        else:
            shutil.rmtree(ck / "iter_000004")
        capsys.readouterr()
        Trainer(cfg).run(resume=True)
        err = capsys.readouterr().err
        assert "iter_000004" in err and "falling back to the newest intact checkpoint" in err and "iter_000002" in err
        assert _comparable(read_metrics(run / "metrics.jsonl")) == expected  # iterations 3, 4 redone, same rows
        assert load_checkpoint(latest_checkpoint(ck))["iteration"] == 4
        assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_000002", "iter_000004"]
    rows = (run / "metrics.jsonl").read_text()
    for name in ("iter_000002", "iter_000004"):
        (ck / name / "state.pt").write_bytes(b"")
    assert main(["train", "--output-dir", str(run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint error: no intact checkpoint" in err and "iter_000002" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == rows


SAVE_FAILS = r"""
import sys
from k15sys.train import distributed as du, trainer as tr
from k15sys.train.checkpoint import CheckpointError
from k15sys.train.config import load_config

du.init_from_env("cpu")
rank = du.rank_and_world()[0]
trainer = tr.Trainer(load_config(None, sys.argv[1:]))

def full_disk(root, *args, **kw):
    raise CheckpointError(28, f"checkpoint: {root} has 0.00 GiB free")

tr.save_checkpoint = full_disk
try:
    trainer.save()
except CheckpointError as e:
    print(f"rank {rank} raised: {e}", flush=True)
du.shutdown(barrier=True)
du.exit_rank(0)
"""


@pytest.mark.distributed
def test_a_failed_save_under_torchrun_stops_every_rank_with_the_message(tmp_path):
    """Only rank 0 writes checkpoints; when it cannot (a full disk), the other ranks used to wait in the barrier
    forever. Every rank now raises CheckpointError with rank 0's message."""
    script = tmp_path / "save_fails.py"
    script.write_text(SAVE_FAILS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *TINY, f"run.output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU, also on a machine with one GPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 raised: [Errno 28] checkpoint: " in proc.stdout
    assert "rank 1 raised: rank 0 could not save the checkpoint: [Errno 28] checkpoint: " in proc.stdout
