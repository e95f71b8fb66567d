"""Rollout engines and partial rollouts with a replay buffer (paper 2.6.2).

- :class:`SamplingParams`, :class:`Completion` -- the user-facing types
- :class:`RolloutEngine` -- the protocol; :class:`TorchEngine` -- the transformers-based default;
  :class:`PagedEngine` -- paged KV cache, continuous batching, CUDA-graph decoding (Qwen2/Qwen3/Llama);
  :class:`VLLMEngine` -- vLLM's offline LLM (optional extra ``[vllm]``, imported only when constructed)
- :class:`RemoteEngine` -- rollout workers in their own processes, weights through the checkpoint engine
- :class:`PartialRolloutScheduler`, :class:`ReplayBuffer`, :class:`Trajectory`, :class:`Group`
"""
from k15sys.rollout.engine import RolloutEngine
from k15sys.rollout.paged_engine import PagedEngine
from k15sys.rollout.partial import IterationStats, PartialRolloutScheduler
from k15sys.rollout.remote_engine import RemoteEngine
from k15sys.rollout.replay_buffer import Group, ReplayBuffer, Segment, Trajectory
from k15sys.rollout.torch_engine import TorchEngine
from k15sys.rollout.types import Completion, SamplingParams
from k15sys.rollout.vllm_engine import VLLMEngine

__all__ = [
    "Completion",
    "Group",
    "IterationStats",
    "PagedEngine",
    "PartialRolloutScheduler",
    "RemoteEngine",
    "ReplayBuffer",
    "RolloutEngine",
    "SamplingParams",
    "Segment",
    "TorchEngine",
    "Trajectory",
    "VLLMEngine",
]
