"""The trainer and the main job (paper 2.3 and 2.6): ``k15 train`` = long-CoT SFT warm-up, then k1.5 RL.

Modules, one idea each (import them directly; this package imports nothing heavy):

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
