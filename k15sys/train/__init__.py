"""The trainer and the main job (paper 2.3 and 2.6): ``k15 train`` = long-CoT SFT warm-up, then k1.5 RL.

From Python (what ``k15 train`` does, without its signal handling)::

    from k15sys.train import Trainer, load_config
    Trainer(load_config("configs/default.yaml", ["run.output_dir=runs/py", "rl.max_minutes=5"])).run()

``Trainer``, ``load_config``, ``Config`` and ``ConfigError`` are loaded on first use, so ``import
k15sys.train`` stays cheap. Modules, one idea each:

- ``config``        typed dataclasses, YAML + ``section.key=value`` overrides, validation naming the key
- ``trainer``       :class:`~k15sys.train.trainer.Trainer`: the RL loop, readable top to bottom
- ``sft``           long-CoT supervised warm-up (2.3.1)
- ``packing``       varlen sequence packing (no per-sample padding)
- ``policy``        packed forward -> per-token log-probs via ``k15sys.ops.fused_logprobs``
- ``evaluation``    held-out pass@1 / pass@k with the math verifier
- ``checkpoint``    atomic checkpoints of model, optimizer, sampler, replay buffer, RNG, iteration
- ``metrics``       JSONL + TensorBoard per iteration; ``plot`` renders PNG curves
- ``distributed``   torch.distributed glue: FSDP2 sharding, full state dicts, reductions
- ``model``         the small Qwen2-architecture model of the main job (built from a config)
- ``long2short_job`` the four long2short methods of 2.4 on a trained run
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Trainer": "trainer", "load_config": "config", "Config": "config", "ConfigError": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports (PEP 562): the trainer module imports torch and the models only when asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'k15sys.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"k15sys.train.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
