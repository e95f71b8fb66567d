"""Training layout <-> inference layout of the weights (paper 2.6.3).

- :class:`ModelLayout` (``hf``, ``fsdp``, ``megatron``, ``vllm``) with ``shard`` / ``unshard``
- :func:`plan_reshard` -> :class:`ReshardPlan` with ``execute`` / ``execute_into`` (C++ thread pool on the host)
- :class:`CheckpointEngine` -- versioned, bucketed, pipelined broadcast from trainer rank(s) to inference ranks
- :class:`WeightGroup` -- a process group of its own for it (rollout workers beside a torchrun job)
- :func:`push_weights` -- the single-process path (trainer and engine in one process)
"""
from k15sys.weights.checkpoint_engine import CheckpointEngine, WeightSyncError
from k15sys.weights.group import WeightGroup, free_port
from k15sys.weights.layout import ModelLayout, hf_shapes
from k15sys.weights.local import push_weights
from k15sys.weights.reshard import ReshardPlan, plan_reshard

__all__ = ["CheckpointEngine", "ModelLayout", "ReshardPlan", "WeightGroup", "WeightSyncError", "free_port",
           "hf_shapes", "plan_reshard", "push_weights"]
