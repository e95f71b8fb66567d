"""Differentiable kernels with backend dispatch (Triton on CUDA, memory-bounded torch elsewhere).

- :func:`fused_logprobs`: hidden states -> per-token log-probs (and entropy) without [T, V] logits.
- :func:`varlen_attention`: causal attention over packed variable-length sequences, GQA.
"""
from k15sys.ops.attention import varlen_attention
from k15sys.ops.logprobs import fused_logprobs

__all__ = ["fused_logprobs", "varlen_attention"]
