"""Sequence packing for training (paper 2.6.3): variable-length samples back to back, no per-sample padding.

``pack`` lays prompt+response token lists end to end into rows of ``row_tokens`` tokens (first-fit in
order; ``row_tokens=0`` puts everything in one row). Position ids restart at 0 for every sample, which
is how attention keeps samples apart (transformers' packed-sequence mask from the position ids, or
``k15sys.ops.varlen_attention`` through ``cu_seqlens``). Only the tail of a row is padded, as its own
segment. Rows bound the cost of a dense packed mask (O(row_tokens^2)) when no varlen kernel is used.
``labels`` (flattened over rows) hold the next token when it is a response token of the same sample,
else ``ignore_index``, so log-probs and losses cover response tokens only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """Packed rows. Flattened-token tensors: ``labels``, ``seq_index`` (sample of each token, -1 on
    padding); ``cu_seqlens`` are the segment boundaries of the flattened stream (padding tails included)."""

    input_ids: torch.Tensor  # [R, Tr] int64
    position_ids: torch.Tensor  # [R, Tr] int64
    labels: torch.Tensor  # [R * Tr] int64
    seq_index: torch.Tensor  # [R * Tr] int64
    cu_seqlens: torch.Tensor  # [S + 1] int32
    num_seqs: int

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with every tensor on ``device``."""
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device),
                           self.seq_index.to(device), self.cu_seqlens.to(device), self.num_seqs)

    @property
    def num_tokens(self) -> int:
        return int((self.seq_index >= 0).sum())


def pack(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], *, row_tokens: int = 0, pad_id: int = 0,
         targets: Sequence[Sequence[bool]] | None = None) -> PackedBatch:
    """Pack ``sequences`` (prompt + response ids) whose first ``prompt_lens[i]`` tokens are the prompt.

    Every sample needs a prompt of >= 1 token and a response of >= 1 token (the first response token is
    predicted from the last prompt token). A sample longer than ``row_tokens`` gets a row of its own.
    ``targets[i][t]`` (optional, one flag per token of sample ``i``) False leaves response token ``t`` out
    of the labels, so a loss does not train on it while later tokens still see it as context.
    """
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"prompt_lens: length {len(prompt_lens)} does not match {len(sequences)} sequences")
    if targets is not None and (len(targets) != len(sequences)
                                or any(len(m) != len(s) for m, s in zip(targets, sequences))):
        raise ValueError("targets: need one flag per token of every sequence")
    if not sequences:
        raise ValueError("sequences: empty batch")
    if row_tokens < 0:
        raise ValueError(f"row_tokens: must be >= 0, got {row_tokens}")
    rows: list[list[int]] = [[]]
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        if not 1 <= p < len(seq):
            raise ValueError(f"prompt_lens: sample {i} has prompt length {p} and total length {len(seq)}; need 1 <= p < total")
        used = sum(len(sequences[j]) for j in rows[-1])
        if row_tokens and rows[-1] and used + len(seq) > row_tokens:
            rows.append([])
        rows[-1].append(i)
    width = max(sum(len(sequences[j]) for j in r) for r in rows)
    ids, pos, labels, owner, cu = [], [], [], [], [0]
    for r in rows:
        for i in r:
            seq, p, n = sequences[i], prompt_lens[i], len(sequences[i])
            ids.extend(int(t) for t in seq)
            pos.extend(range(n))
            keep = targets[i] if targets is not None else None
            labels.extend(int(seq[t + 1]) if p <= t + 1 < n and (keep is None or keep[t + 1]) else IGNORE_INDEX
                          for t in range(n))
            owner.extend([i] * n)
            cu.append(cu[-1] + n)
        tail = width - sum(len(sequences[j]) for j in r)
        if tail:
            ids.extend([pad_id] * tail)
            pos.extend(range(tail))
            labels.extend([IGNORE_INDEX] * tail)
            owner.extend([-1] * tail)
            cu.append(cu[-1] + tail)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).view(len(rows), width),
        position_ids=torch.tensor(pos, dtype=torch.long).view(len(rows), width),
        labels=torch.tensor(labels, dtype=torch.long),
        seq_index=torch.tensor(owner, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        num_seqs=len(sequences),
    )
