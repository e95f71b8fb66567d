"""The task of a configuration: the user's JSONL problems (``data.train``) or the shipped arithmetic task."""
from __future__ import annotations

from typing import Any

from k15sys.tasks.arithmetic import ArithmeticTask, make_splits
from k15sys.tasks.base import Task
from k15sys.tasks.jsonl import JsonlTask
from k15sys.train.config import Config, ConfigError


def build_task(cfg: Config, tokenizer: Any) -> Task:
    """:class:`JsonlTask` when ``data.train`` is set (it needs ``model.path``: a tokenizer for any text), else
    :class:`ArithmeticTask` from the ``task`` section (the built-in model's character tokenizer).

    Raises:
        ConfigError: an incomplete pairing of ``model.path`` / ``data.*`` / ``sft.data``.
        DataError: a bad data file or row (names the file and the line).
    """
    d = cfg.data
    if d.train or d.eval or cfg.sft.data:
        if not d.train:
            key = "data.eval" if d.eval else "sft.data"
            raise ConfigError(f"{key}: needs data.train (the RL problems)")
        if not cfg.model.path:
            raise ConfigError("data.train: needs model.path (a transformers model directory with a tokenizer for "
                              "your text; the built-in model only reads the arithmetic task's characters)")
        return JsonlTask(d.train, d.eval, tokenizer, sft=cfg.sft.data, code_timeout_s=d.code_timeout_s,
                         sandbox_workers=d.sandbox_workers)
    if cfg.model.path:
        raise ConfigError("model.path: needs data.train (JSONL problems; the arithmetic task is for the built-in "
                          "model, see docs/your_model.md)")
    t = cfg.task
    splits = make_splits(seed=t.seed, num_train=t.num_train, num_eval=t.num_eval, min_ops=t.min_ops,
                         max_ops=t.max_ops, max_operand=t.max_operand)
    return ArithmeticTask(splits, tokenizer, sft_max_ops=cfg.sft.max_ops, long_cot=cfg.sft.long_cot,
                          verify_prob=t.verify_prob, direct_prob=t.direct_prob, mistake_prob=t.mistake_prob)
