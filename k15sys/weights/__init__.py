"""Training layout <-> inference layout of the weights (paper 2.6.3).

- :class:`ModelLayout` (``hf``, ``fsdp``, ``megatron``, ``vllm``) with ``shard`` / ``unshard``
- :func:`plan_reshard` -> :class:`ReshardPlan` with ``execute`` / ``execute_into`` (C++ thread pool on the host)
- :class:`CheckpointEngine` -- versioned, bucketed, pipelined broadcast from trainer rank(s) to inference ranks
- :class:`WeightGroup` -- a process group of its own for it (rollout workers beside a torchrun job)
- :func:`push_weights` -- a checked version of full (or layout-sharded) tensors to an engine's ``update_weights``
- :class:`WeightSync` -- the trainer's one path: its module's tensors (plain or FSDP2) to its rollout engine
"""
from k15sys.weights.checkpoint_engine import CheckpointEngine, WeightSyncError
from k15sys.weights.group import WeightGroup, free_port
from k15sys.weights.layout import ModelLayout, hf_shapes
from k15sys.weights.local import push_weights
from k15sys.weights.reshard import ReshardPlan, plan_reshard
from k15sys.weights.sync import WeightSync

__all__ = ["CheckpointEngine", "ModelLayout", "ReshardPlan", "WeightGroup", "WeightSyncError", "free_port",
           "WeightSync", "hf_shapes", "plan_reshard", "push_weights"]
