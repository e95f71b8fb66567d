"""The ``k15`` command line: config errors before work, train/eval/plot on a tiny run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from k15sys.cli import main

K15 = [sys.executable, "-m", "k15sys.cli"]
TINY = ["sft.steps=6", "sft.batch_size=8", "rl.iterations=2", "rl.prompts_per_iteration=4", "rl.group_size=4",
        "rl.skip_zero_advantage=false",
        "rl.minibatch_size=8", "rl.max_new_tokens=32", "task.num_train=48", "task.num_eval=8", "eval.every=1",
        "run.threads=1", "run.device=cpu", "run.progress=false", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2"]


def test_bad_config_fails_before_work_naming_the_key(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--output-dir", str(out), "--set", "rl.group_sise=4"]) == 2
    assert "rl.group_sise" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--set", "rl.tau=-1"]) == 2
    assert "rl.tau" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 0\n")
    assert main(["train", "--config", str(bad), "--output-dir", str(out)]) == 2
    assert "model.num_layers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--output-dir", str(out), "--set", "run.device=cuda"]) == 2
        assert "run.device" in capsys.readouterr().err
    assert not out.exists()


def test_help_config_lists_every_option(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("rl.tau", "rl.group_size", "sft.steps", "task.max_ops", "run.output_dir", "long2short.dpo_beta"):
        assert key in text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    subprocess.run([*K15, "train", "--output-dir", str(run), *[f"--set={o}" for o in TINY]], check=True, timeout=240)
    return run


def test_train_writes_sft_row_then_rl_rows(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "sft" and rows[0]["iteration"] == 0 and "eval/pass@1" in rows[0]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for key in ("rl/reward", "rl/accuracy", "rl/response_len", "rl/response_len_max", "rl/truncation_rate",
                "rl/repeat_rate", "rl/trained_groups", "rl/entropy", "rl/kl_ref", "rl/grad_norm", "perf/rollout_tokens_per_s",
                "time/rollout_s", "time/train_s", "eval/pass@1"):
        assert key in rows[1], key
    assert all(r["rl/trained_groups"] == r["rl/groups"] for r in rows[1:])  # rl.skip_zero_advantage=false
    assert (tiny_run / "checkpoints" / "latest").exists()
    assert any((tiny_run / "tensorboard").iterdir())


def test_eval_and_plot(tiny_run, tmp_path):
    out = subprocess.run([*K15, "eval", str(tiny_run), "--samples", "3"], capture_output=True, text=True, timeout=120, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["iteration"] == 2 and 0 <= row["eval/pass@1"] <= 1 and 0 <= row["eval/pass@3"] <= 1
    png = tmp_path / "c.png"
    assert main(["plot", str(tiny_run), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["plot", str(tmp_path / "no_run")]) == 2  # a message, not a traceback
    assert main(["plot", str(tiny_run), "--keys", "no/such_metric"]) == 2


def test_export_writes_a_transformers_model_of_the_latest_checkpoint(tiny_run, tmp_path):
    from transformers import Qwen2ForCausalLM

    from k15sys.tasks import CharTokenizer
    from k15sys.train.checkpoint import latest_checkpoint, load_checkpoint

    assert main(["export", str(tiny_run), "--out", str(tmp_path / "model")]) == 0
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "model")
    saved = load_checkpoint(latest_checkpoint(tiny_run / "checkpoints"))["model"]
    own = dict([*model.named_parameters(), *model.named_buffers()])
    assert saved.keys() == own.keys() and all(torch.equal(own[k], saved[k]) for k in saved)
    assert json.loads((tmp_path / "model" / "k15_tokens.json").read_text()) == CharTokenizer().tokens
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "m2")]) == 2
    # k15 eval --model: the exported weights score exactly what the checkpoint scores
    runs = [subprocess.run([*K15, "eval", str(tiny_run), *extra], capture_output=True, text=True, timeout=120)
            for extra in ([], ["--model", str(tmp_path / "model")], ["--model", str(tmp_path / "no_model")])]
    assert runs[0].returncode == runs[1].returncode == 0, runs[1].stderr[-2000:]
    own, exported = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs[:2])
    assert exported.pop("model") == str(tmp_path / "model") and own.pop("iteration") == 2
    assert own == exported
    assert runs[2].returncode == 2 and "--model" in runs[2].stderr


def test_train_into_a_previous_run_needs_resume_or_overwrite(tmp_path, capsys):
    """A repeated command must not mix two runs' metrics or replace their checkpoints by accident."""
    run = tmp_path / "run"
    short = [f"--set={o}" for o in TINY] + ["--set=rl.iterations=1", "--set=run.tensorboard=false"]
    assert main(["train", "--output-dir", str(run), *short, "--set=run.progress=true"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    err = capsys.readouterr().err
    assert "pass@1=" in err  # the progress bar shows the last evaluation
    summary = err.strip().splitlines()[-1]  # the last line says how the run went
    assert summary.startswith("k15: done: 1 RL iterations") and f"{rows[0]['eval/pass@1']:.3f} (SFT)" in summary
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--output-dir", str(run), *short]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert main(["train", "--output-dir", str(run), "--resume", "--overwrite", *short]) == 2
    assert main(["train", "--output-dir", str(run), "--overwrite", "--set=sft.steps=3", *short[1:]]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000000", "iter_000001", "latest"]


def test_trainer_refuses_a_previous_run_and_resume_without_checkpoint_starts_over(tmp_path):
    from k15sys.train.config import load_config
    from k15sys.train.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0, "stage": "sft", "eval/pass@1": 0.5}\n')  # stopped during SFT
    cfg = load_config(None, [*TINY, "rl.iterations=1", "run.tensorboard=false", f"run.output_dir={run}"])
    with pytest.raises(ValueError, match="run.output_dir"):
        Trainer(cfg).run()
    Trainer(cfg).run(resume=True)  # no checkpoint yet: starts over, dropping the stopped attempt's row
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and "time/eval_s" in rows[0]  # the real SFT row, not the stale one


def test_resume_uses_the_runs_own_config(tmp_path, monkeypatch):
    """`k15 train --resume` without the original --set options continues the run as it was configured (model size,
    learning rate), not with the defaults; --set still applies on top. The weights are read once (the config comes
    from the checkpoint's config.json)."""
    from k15sys.train import checkpoint, trainer
    from k15sys.train.config import load_config
    from k15sys.train.trainer import rl_learning_rate

    run = tmp_path / "run"
    first = [f"--set={o}" for o in TINY] + ["--set=run.tensorboard=false", "--set=rl.lr=3e-5", "--set=rl.iterations=1"]
    assert main(["train", "--output-dir", str(run), *first]) == 0
    loads, load = [], checkpoint.load_checkpoint
    counted = lambda path, **kw: loads.append(path) or load(path, **kw)  # noqa: E731
    monkeypatch.setattr(checkpoint, "load_checkpoint", counted)
    monkeypatch.setattr(trainer, "load_checkpoint", counted)
    assert main(["train", "--output-dir", str(run), "--resume", "--set=rl.iterations=2"]) == 0
    assert len(loads) == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    cfg = load_config(None, [*TINY, "rl.lr=3e-5"])
    assert rows[2]["rl/lr"] == rl_learning_rate(cfg.rl, 1) and rows[2]["rl/lr"] != rl_learning_rate(load_config(None, []).rl, 1)


def test_deterministic_mode_runs_on_the_cpu_and_gives_the_same_run(tmp_path):
    """`run.deterministic` switches torch to deterministic algorithms; every op of the CPU path has one, and the run
    equals the default run (the CPU path is deterministic already). The bit-identical GPU runs are a GPU test."""
    rows = {}
    try:
        for det in ("false", "true"):
            run = tmp_path / det
            assert main(["train", "--output-dir", str(run), *[f"--set={o}" for o in TINY],
                         "--set=run.tensorboard=false", f"--set=run.deterministic={det}"]) == 0
            rows[det] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    keys = ("rl/loss", "rl/grad_norm", "rl/reward", "eval/pass@1")
    assert [{k: r.get(k) for k in keys} for r in rows["false"]] == [{k: r.get(k) for k in keys} for r in rows["true"]]
