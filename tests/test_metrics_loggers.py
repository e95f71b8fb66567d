"""Optional metric mirrors: Weights & Biases and MLflow through fake modules (no network; issue 23 item 9)."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from k15sys.train.config import ConfigError, load_config
from k15sys.train.metrics import MetricsLog, parse_loggers, read_metrics


class _FakeWandbRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data: dict) -> None:
        self.calls.append(("log", data))

    def finish(self) -> None:
        self.calls.append(("finish",))


@pytest.fixture
def fakes(monkeypatch):
    calls: dict[str, list] = {"wandb": [], "mlflow": []}
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: calls["wandb"].append(("init", kw)) or _FakeWandbRun(calls["wandb"])
    mlflow = types.ModuleType("mlflow")
    mlflow.start_run = lambda **kw: calls["mlflow"].append(("start_run", kw))
    mlflow.log_params = lambda params: calls["mlflow"].append(("log_params", params))
    mlflow.log_metrics = lambda metrics, step: calls["mlflow"].append(("log_metrics", metrics, step))
    mlflow.end_run = lambda: calls["mlflow"].append(("end_run",))
    for fake in (wandb, mlflow):  # a spec, as an installed module has: accelerate asks find_spec("wandb")
        fake.__spec__ = importlib.machinery.ModuleSpec(fake.__name__, loader=None)
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
    return calls


def test_rows_reach_wandb_and_mlflow(tmp_path, fakes):
    log = MetricsLog(tmp_path / "myrun", tensorboard=False, loggers="wandb,mlflow", config={"rl": {"lr": 1e-5}})
    log.log({"iteration": 3, "rl/reward": 0.5, "eval/pass@1": 0.7, "stage": "rl", "flag": True})
    log.scalar("sft/loss", 1.25, 7)
    log.close()
    log.close()  # idempotent
    init = fakes["wandb"][0]
    assert init[0] == "init" and init[1]["name"] == "myrun" and init[1]["config"] == {"rl": {"lr": 1e-5}}
    logged = [c[1] for c in fakes["wandb"] if c[0] == "log"]
    assert logged == [{"rl/reward": 0.5, "eval/pass@1": 0.7, "iteration": 3}, {"sft/loss": 1.25, "sft/step": 7}]
    assert ("define_metric", "rl/*", "iteration") in fakes["wandb"] and fakes["wandb"][-1] == ("finish",)
    assert fakes["mlflow"] == [("start_run", {"run_name": "myrun"}), ("log_params", {"rl.lr": 1e-5}),
                               ("log_metrics", {"rl/reward": 0.5, "eval/pass_at_1": 0.7}, 3),
                               ("log_metrics", {"sft/loss": 1.25}, 7), ("end_run",)]
    assert read_metrics(tmp_path / "myrun" / "metrics.jsonl")[0]["eval/pass@1"] == 0.7  # the JSONL stays the record


def test_nothing_is_started_on_other_ranks_or_by_default(tmp_path, fakes):
    MetricsLog(tmp_path, tensorboard=False, loggers="wandb", enabled=False).log({"iteration": 0, "x": 1.0})
    MetricsLog(tmp_path, tensorboard=False).log({"iteration": 0, "x": 1.0})
    assert fakes == {"wandb": [], "mlflow": []}


def test_missing_or_unknown_loggers_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(ValueError, match=r"run.loggers: mlflow is not installed \(pip install mlflow\)"):
        MetricsLog(tmp_path, tensorboard=False, loggers="mlflow")
    for bad in ("neptune", "wandb,wandb", "wandb;mlflow", 3):
        with pytest.raises(ValueError, match="run.loggers"):
            parse_loggers(bad)
    assert parse_loggers("") == [] and parse_loggers(" mlflow , wandb ") == ["mlflow", "wandb"]
    with pytest.raises(ConfigError, match="run.loggers"):
        load_config(None, ["run.loggers=neptune"])
    assert load_config(None, ["run.loggers=wandb,mlflow"]).run.loggers == "wandb,mlflow"


def test_the_trainer_hands_its_config_to_the_loggers(tmp_path, fakes):
    from k15sys.train import Trainer

    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                             "task.num_train=50", "task.num_eval=10", "run.tensorboard=false", "run.progress=false",
                             "run.loggers=wandb", f"run.output_dir={tmp_path / 'job'}"])
    trainer = Trainer(cfg)
    trainer.close()
    init = fakes["wandb"][0][1]
    assert init["name"] == "job" and init["config"]["run"]["loggers"] == "wandb"
    assert fakes["wandb"][-1] == ("finish",)
