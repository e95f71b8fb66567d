"""Per-token log-probs of packed samples under a causal LM (paper 2.3.2: log pi(y|x) of a response).

:class:`PackedPolicy` wraps a transformers causal LM so that one module call runs the decoder on a
packed row and turns hidden states into log-probs of the labels with ``k15sys.ops.fused_logprobs``
(never materialising ``[T, V]`` logits). Being one module, it is also the unit FSDP2 shards at the
root (``k15sys.train.distributed``), so the embedding / LM head are gathered around this call.

When the loss's gradient per sample is known before the forward (``seq_coef``: ``dL/dlog pi(y_j|x)``, e.g.
the PMD loss at ``pi_theta = pi_i``, paper 2.3.2), the call returns that loss through
``k15sys.ops.fused_logprob_loss`` instead: the LM head's gradient is computed during the forward (one
pass over the vocabulary fewer than autograd's backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from k15sys.ops.logprobs import fused_logprob_loss, fused_logprobs
from k15sys.train.packing import IGNORE_INDEX, PackedBatch


@dataclass
class PackedLogprobs:
    """``token_logp[T]`` (0 off the responses), ``entropy[T]`` or None, ``seq_logp[B]`` (sum per sample);
    ``loss`` (differentiable scalar ``sum_j seq_coef_j * seq_logp_j``) when ``seq_coef`` was given, and then
    the log-probs and entropies are detached."""

    token_logp: torch.Tensor
    entropy: torch.Tensor | None
    seq_logp: torch.Tensor
    num_tokens: torch.Tensor  # [B] response tokens per sample
    loss: torch.Tensor | None = None


class PackedPolicy(nn.Module):
    """``forward(batch) -> PackedLogprobs`` for a transformers causal LM with ``.model`` and ``.lm_head``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        if not hasattr(lm, "model") or not hasattr(lm, "lm_head"):
            raise ValueError(f"lm: expected a transformers *ForCausalLM with .model and .lm_head, got {type(lm).__name__}")
        self.lm = lm

    def forward(self, batch: PackedBatch, *, return_entropy: bool = False,  # type: ignore[override]
                temperature: float = 1.0, seq_coef: torch.Tensor | None = None) -> PackedLogprobs:
        """Log-probs (and entropies) of the labelled tokens under ``softmax(logits / temperature)``: pass the
        rollout temperature to score samples under the distribution they were drawn from.

        ``seq_coef`` ([B], constants): return ``loss = sum_j seq_coef[j] * seq_logp[j]`` through the fused
        loss op (its backward hands out the gradient computed in the forward); entropies come with it."""
        if seq_coef is not None and tuple(seq_coef.shape) != (batch.num_seqs,):
            raise ValueError(f"seq_coef: expected shape ({batch.num_seqs},), got {tuple(seq_coef.shape)}")
        batch = batch.to(self.lm.get_input_embeddings().weight.device)
        hidden = self.lm.model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state.flatten(0, 1)
        weight = self.lm.lm_head.weight
        if hasattr(weight, "full_tensor"):  # a DTensor left sharded (lm_head tied into the root group)
            weight = weight.full_tensor()
        owner = batch.seq_index.clamp_min(0)  # padding has mask 0, so it adds nothing to sample 0
        loss = None
        if seq_coef is None:
            out = fused_logprobs(hidden, weight, batch.labels, return_entropy=return_entropy,
                                 ignore_index=IGNORE_INDEX, temperature=temperature)
            logp, ent = out if return_entropy else (out, None)
        else:  # ignored labels get no gradient from the op, so the coefficient of padding does not matter
            coef = seq_coef.detach().to(device=hidden.device, dtype=torch.float32)[owner]
            loss, logp, ent = fused_logprob_loss(hidden, weight, batch.labels, coef, ignore_index=IGNORE_INDEX,
                                                 temperature=temperature)
        mask = (batch.labels != IGNORE_INDEX).to(logp.dtype)
        seq = torch.zeros(batch.num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, owner, logp * mask)
        count = torch.zeros(batch.num_seqs, dtype=logp.dtype, device=logp.device).index_add(0, owner, mask)
        return PackedLogprobs(token_logp=logp * mask, entropy=None if ent is None else ent * mask, seq_logp=seq,
                              num_tokens=count, loss=loss)
