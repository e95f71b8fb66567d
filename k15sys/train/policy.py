"""Per-token log-probs of packed samples under a causal LM (paper 2.3.2: log pi(y|x) of a response).

:class:`PackedPolicy` wraps a transformers causal LM so that one module call runs the decoder on a
packed row and turns hidden states into log-probs of the labels with ``k15sys.ops.fused_logprobs``
(never materialising ``[T, V]`` logits). Being one module, it is also the unit FSDP2 shards at the
root (``k15sys.train.distributed``), so the embedding / LM head are gathered around this call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from k15sys.ops import fused_logprobs
from k15sys.train.packing import IGNORE_INDEX, PackedBatch


@dataclass
class PackedLogprobs:
    """``token_logp[T]`` (0 off the responses), ``entropy[T]`` or None, ``seq_logp[B]`` (sum per sample)."""

    token_logp: torch.Tensor
    entropy: torch.Tensor | None
    seq_logp: torch.Tensor
    num_tokens: torch.Tensor  # [B] response tokens per sample


class PackedPolicy(nn.Module):
    """``forward(batch) -> PackedLogprobs`` for a transformers causal LM with ``.model`` and ``.lm_head``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        if not hasattr(lm, "model") or not hasattr(lm, "lm_head"):
            raise ValueError(f"lm: expected a transformers *ForCausalLM with .model and .lm_head, got {type(lm).__name__}")
        self.lm = lm

    def forward(self, batch: PackedBatch, *, return_entropy: bool = False,  # type: ignore[override]
                temperature: float = 1.0) -> PackedLogprobs:
        """Log-probs (and entropies) of the labelled tokens under ``softmax(logits / temperature)``: pass the
        rollout temperature to score samples under the distribution they were drawn from."""
        batch = batch.to(self.lm.get_input_embeddings().weight.device)
        hidden = self.lm.model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state.flatten(0, 1)
        weight = self.lm.lm_head.weight
        if hasattr(weight, "full_tensor"):  # a DTensor left sharded (lm_head tied into the root group)
            weight = weight.full_tensor()
        out = fused_logprobs(hidden, weight, batch.labels, return_entropy=return_entropy, ignore_index=IGNORE_INDEX,
                             temperature=temperature)
        logp, ent = out if return_entropy else (out, None)
        mask = (batch.labels != IGNORE_INDEX).to(logp.dtype)
        owner = batch.seq_index.clamp_min(0)  # padding has mask 0, so it adds nothing to sample 0
        seq = torch.zeros(batch.num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, owner, logp * mask)
        count = torch.zeros(batch.num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, owner, mask)
        return PackedLogprobs(token_logp=logp * mask, entropy=None if ent is None else ent * mask, seq_logp=seq, num_tokens=count)
