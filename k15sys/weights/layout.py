"""Parallel layouts of a Llama/Qwen2-family model's weights (paper 2.6.3: training vs inference layouts).

A layout says, for every rank, which tensors it holds (in the layout's own names) and how each is
assembled from rectangles of the full Hugging Face tensors. Four layouts:

* ``hf``: the full tensors, one rank, HF names.
* ``fsdp(world_size)``: every tensor split on dim 0 like FSDP2 (``torch.chunk`` sizes), HF names.
* ``megatron(tp)``: Megatron-style tensor parallel: QKV fused per KV group (``linear_qkv``), gate/up fused
  (``linear_fc1``), column-parallel on dim 0, row-parallel on dim 1 (``linear_proj``, ``linear_fc2``),
  vocab-parallel embedding/head padded to a multiple of 128 * tp, norms replicated.
* ``vllm(tp)``: vLLM's parameter names and sharding: ``qkv_proj`` = [q; k; v] of the rank (k/v heads
  replicated when tp > num_kv_heads), ``gate_up_proj`` = [gate; up], ``o_proj``/``down_proj`` split on dim 1,
  vocabulary padded to a multiple of 64 then split evenly (padding rows are zero), no ``lm_head`` when tied.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """Rows [r0, r1) x cols [c0, c1) of HF tensor ``src`` (None = zero padding) placed at (lr, lc) locally."""

    src: str | None
    r0: int
    r1: int
    c0: int
    c1: int
    lr: int
    lc: int


@dataclass
class LocalTensor:
    shape: Shape
    pieces: list[Piece] = field(default_factory=list)


def _dims(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return dict(H=config.hidden_size, V=config.vocab_size, I=config.intermediate_size, L=config.num_hidden_layers,
                nh=heads, nkv=getattr(config, "num_key_value_heads", None) or heads, hd=head_dim)


def hf_shapes(config: Any) -> dict[str, Shape]:
    """Names and shapes of the HF state dict of a Llama/Qwen2 config."""
    d = _dims(config)
    H, V, I, hd, nh, nkv = d["H"], d["V"], d["I"], d["hd"], d["nh"], d["nkv"]
    bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
    o_bias = bool(getattr(config, "attention_bias", False)) and config.model_type != "qwen2"  # Llama: o_proj too
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    out: dict[str, Shape] = {"model.embed_tokens.weight": (V, H)}
    for i in range(d["L"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (nh * hd, H)
        out[p + "self_attn.k_proj.weight"] = (nkv * hd, H)
        out[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
        if bias:
            out[p + "self_attn.q_proj.bias"] = (nh * hd,)
            out[p + "self_attn.k_proj.bias"] = (nkv * hd,)
            out[p + "self_attn.v_proj.bias"] = (nkv * hd,)
        out[p + "self_attn.o_proj.weight"] = (H, nh * hd)
        if o_bias:
            out[p + "self_attn.o_proj.bias"] = (H,)
        out[p + "mlp.gate_proj.weight"] = (I, H)
        out[p + "mlp.up_proj.weight"] = (I, H)
        out[p + "mlp.down_proj.weight"] = (H, I)
        if mlp_bias:
            out[p + "mlp.gate_proj.bias"] = (I,)
            out[p + "mlp.up_proj.bias"] = (I,)
            out[p + "mlp.down_proj.bias"] = (H,)
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
    out["model.norm.weight"] = (H,)
    if not getattr(config, "tie_word_embeddings", False):
        out["lm_head.weight"] = (V, H)
    return out


def _cols(shape: Shape) -> int:
    return shape[1] if len(shape) == 2 else 1


class _Builder:
    """Assembles one rank's tensors piece by piece."""

    def __init__(self, full: dict[str, Shape]) -> None:
        self.full = full
        self.tensors: dict[str, LocalTensor] = {}

    def rows(self, name: str, parts: list[tuple[str | None, int, int]], width: int | None = None) -> None:
        """Local tensor = vertical stack of row ranges (src, r0, r1); src None = zero rows."""
        lr = 0
        pieces = []
        for src, r0, r1 in parts:
            w = _cols(self.full[src]) if src is not None else width
            pieces.append(Piece(src, r0, r1, 0, w, lr, 0))
            lr += r1 - r0
        w = pieces[0].c1
        ref = next((p.src for p in pieces if p.src is not None), None)
        two_d = ref is None or len(self.full[ref]) == 2
        self.tensors[name] = LocalTensor((lr, w) if two_d else (lr,), pieces)

    def cols(self, name: str, src: str, c0: int, c1: int) -> None:
        rows = self.full[src][0]
        self.tensors[name] = LocalTensor((rows, c1 - c0), [Piece(src, 0, rows, c0, c1, 0, 0)])

    def whole(self, name: str, src: str) -> None:
        shape = self.full[src]
        self.tensors[name] = LocalTensor(shape, [Piece(src, 0, shape[0], 0, _cols(shape), 0, 0)])


def _check_tp(kind: str, tp: int, d: dict[str, int], vocab_multiple: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp: must be a positive int, got {tp!r}")
    if d["nh"] % tp:
        raise ValueError(f"tp: {kind} tensor parallel {tp} does not divide num_attention_heads={d['nh']}")
    if d["I"] % tp:
        raise ValueError(f"tp: {kind} tensor parallel {tp} does not divide intermediate_size={d['I']}")
    if kind == "megatron" and d["nkv"] % tp:
        raise ValueError(f"tp: megatron tensor parallel {tp} does not divide num_key_value_heads={d['nkv']}")
    if kind == "vllm" and tp > d["nkv"] and tp % d["nkv"]:
        raise ValueError(f"tp: vllm tensor parallel {tp} is not a multiple of num_key_value_heads={d['nkv']}")
    if kind == "vllm" and tp <= d["nkv"] and d["nkv"] % tp:
        raise ValueError(f"tp: vllm tensor parallel {tp} does not divide num_key_value_heads={d['nkv']}")
    padded = _pad(d["V"], vocab_multiple)
    if padded % tp:
        raise ValueError(f"tp: {kind} tensor parallel {tp} does not divide the padded vocabulary {padded} "
                         f"(vocab_size={d['V']} padded to a multiple of {vocab_multiple})")


def _pad(v: int, multiple: int) -> int:
    return (v + multiple - 1) // multiple * multiple


class ModelLayout:
    """Where every weight of a model lives in one parallel layout (see the module docstring)."""

    def __init__(self, kind: str, config: Any, world_size: int, ranks: list[dict[str, LocalTensor]]) -> None:
        self.kind = kind
        self.config = config
        self.world_size = world_size
        self.ranks = ranks
        self.full_shapes = hf_shapes(config)

    def __repr__(self) -> str:
        return f"ModelLayout({self.kind}, world_size={self.world_size}, tensors/rank={len(self.ranks[0])})"

    def shapes(self) -> list[dict[str, Shape]]:
        return [{n: t.shape for n, t in r.items()} for r in self.ranks]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def hf(cls, config: Any) -> "ModelLayout":
        full = hf_shapes(config)
        b = _Builder(full)
        for name in full:
            b.whole(name, name)
        return cls("hf", config, 1, [b.tensors])

    @classmethod
    def fsdp(cls, config: Any, world_size: int) -> "ModelLayout":
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: must be a positive int, got {world_size!r}")
        full = hf_shapes(config)
        ranks = []
        for r in range(world_size):
            b = _Builder(full)
            for name, shape in full.items():
                step = -(-shape[0] // world_size)  # torch.chunk sizes
                r0, r1 = min(shape[0], r * step), min(shape[0], (r + 1) * step)
                b.rows(name, [(name, r0, r1)])
            ranks.append(b.tensors)
        return cls("fsdp", config, world_size, ranks)

    @classmethod
    def megatron(cls, config: Any, tp: int) -> "ModelLayout":
        d = _dims(config)
        mult = 128 * tp
        _check_tp("megatron", tp, d, mult)
        full = hf_shapes(config)
        Vp, hd = _pad(d["V"], mult), d["hd"]
        q_per_kv, kv_r = d["nh"] // d["nkv"], d["nkv"] // tp
        I_r = d["I"] // tp
        ranks = []
        for r in range(tp):
            b = _Builder(full)
            vr0, vr1 = r * Vp // tp, (r + 1) * Vp // tp
            _vocab_rows(b, "embedding.word_embeddings.weight", "model.embed_tokens.weight", vr0, vr1, d)
            for i in range(d["L"]):
                p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
                for kind in ("weight", "bias"):
                    if p + f"self_attn.q_proj.{kind}" not in full:
                        continue
                    parts = []
                    for g in range(r * kv_r, (r + 1) * kv_r):  # per KV group: its q heads, then k, then v
                        parts.append((p + f"self_attn.q_proj.{kind}", g * q_per_kv * hd, (g + 1) * q_per_kv * hd))
                        parts.append((p + f"self_attn.k_proj.{kind}", g * hd, (g + 1) * hd))
                        parts.append((p + f"self_attn.v_proj.{kind}", g * hd, (g + 1) * hd))
                    b.rows(m + f"self_attention.linear_qkv.{kind}", parts)
                qc = d["nh"] * hd // tp
                b.cols(m + "self_attention.linear_proj.weight", p + "self_attn.o_proj.weight", r * qc, (r + 1) * qc)
                b.rows(m + "mlp.linear_fc1.weight", [(p + "mlp.gate_proj.weight", r * I_r, (r + 1) * I_r),
                                                     (p + "mlp.up_proj.weight", r * I_r, (r + 1) * I_r)])
                b.cols(m + "mlp.linear_fc2.weight", p + "mlp.down_proj.weight", r * I_r, (r + 1) * I_r)
                _outer_biases(b, p, m + "self_attention.linear_proj.bias", m + "mlp.linear_fc1.bias",
                              m + "mlp.linear_fc2.bias", r * I_r, (r + 1) * I_r)
                b.whole(m + "input_layernorm.weight", p + "input_layernorm.weight")
                b.whole(m + "pre_mlp_layernorm.weight", p + "post_attention_layernorm.weight")
            b.whole("decoder.final_layernorm.weight", "model.norm.weight")
            if "lm_head.weight" in full:
                _vocab_rows(b, "output_layer.weight", "lm_head.weight", vr0, vr1, d)
            ranks.append(b.tensors)
        return cls("megatron", config, tp, ranks)

    @classmethod
    def vllm(cls, config: Any, tp: int) -> "ModelLayout":
        d = _dims(config)
        _check_tp("vllm", tp, d, 64)
        full = hf_shapes(config)
        Vp, hd, nkv = _pad(d["V"], 64), d["hd"], d["nkv"]
        q_r, I_r = d["nh"] // tp, d["I"] // tp
        ranks = []
        for r in range(tp):
            b = _Builder(full)
            vr0, vr1 = r * Vp // tp, (r + 1) * Vp // tp
            _vocab_rows(b, "model.embed_tokens.weight", "model.embed_tokens.weight", vr0, vr1, d)
            kv_heads = range(r * nkv // tp, (r + 1) * nkv // tp) if tp <= nkv else [r * nkv // tp]
            for i in range(d["L"]):
                p = f"model.layers.{i}."
                for kind in ("weight", "bias"):
                    if p + f"self_attn.q_proj.{kind}" not in full:
                        continue
                    parts = [(p + f"self_attn.q_proj.{kind}", r * q_r * hd, (r + 1) * q_r * hd)]
                    parts += [(p + f"self_attn.k_proj.{kind}", h * hd, (h + 1) * hd) for h in kv_heads]
                    parts += [(p + f"self_attn.v_proj.{kind}", h * hd, (h + 1) * hd) for h in kv_heads]
                    b.rows(p + f"self_attn.qkv_proj.{kind}", parts)
                b.cols(p + "self_attn.o_proj.weight", p + "self_attn.o_proj.weight", r * q_r * hd, (r + 1) * q_r * hd)
                b.rows(p + "mlp.gate_up_proj.weight", [(p + "mlp.gate_proj.weight", r * I_r, (r + 1) * I_r),
                                                       (p + "mlp.up_proj.weight", r * I_r, (r + 1) * I_r)])
                b.cols(p + "mlp.down_proj.weight", p + "mlp.down_proj.weight", r * I_r, (r + 1) * I_r)
                _outer_biases(b, p, p + "self_attn.o_proj.bias", p + "mlp.gate_up_proj.bias", p + "mlp.down_proj.bias",
                              r * I_r, (r + 1) * I_r)
                b.whole(p + "input_layernorm.weight", p + "input_layernorm.weight")
                b.whole(p + "post_attention_layernorm.weight", p + "post_attention_layernorm.weight")
            b.whole("model.norm.weight", "model.norm.weight")
            if "lm_head.weight" in full:
                _vocab_rows(b, "lm_head.weight", "lm_head.weight", vr0, vr1, d)
            ranks.append(b.tensors)
        return cls("vllm", config, tp, ranks)

    # ------------------------------------------------------------------ conversions
    def shard(self, full_state_dict: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Split full HF tensors into this layout (one dict per rank, this layout's names)."""
        from k15sys.weights.reshard import plan_reshard

        return plan_reshard(ModelLayout.hf(self.config), self).execute([full_state_dict])

    def unshard(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Reassemble full HF tensors from this layout's shards (padding dropped)."""
        from k15sys.weights.reshard import plan_reshard

        return plan_reshard(self, ModelLayout.hf(self.config)).execute(shards)[0]


def _outer_biases(b: _Builder, p: str, o_name: str, fc1_name: str, fc2_name: str, i0: int, i1: int) -> None:
    """Llama's optional biases outside QKV (``attention_bias`` on o_proj, ``mlp_bias``): the row-parallel
    ones (o_proj, down_proj) are replicated on every rank, gate/up ones split and fused like their rows."""
    if p + "self_attn.o_proj.bias" in b.full:
        b.whole(o_name, p + "self_attn.o_proj.bias")
    if p + "mlp.gate_proj.bias" in b.full:
        b.rows(fc1_name, [(p + "mlp.gate_proj.bias", i0, i1), (p + "mlp.up_proj.bias", i0, i1)])
        b.whole(fc2_name, p + "mlp.down_proj.bias")


def _vocab_rows(b: _Builder, name: str, src: str, vr0: int, vr1: int, d: dict[str, int]) -> None:
    real = (src, min(vr0, d["V"]), min(vr1, d["V"]))
    parts = [real] if real[2] > real[1] else []
    if vr1 > max(vr0, d["V"]):
        parts.append((None, max(vr0, d["V"]), vr1))
    b.rows(name, parts, width=d["H"])
