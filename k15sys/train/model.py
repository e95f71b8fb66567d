"""The main job's policy: a small Qwen2-architecture causal LM built from a transformers config.

Nothing is downloaded: the weights are initialised from ``ModelConfig.seed``. Any transformers causal
LM of the Llama/Qwen2 family works with the trainer; this builder only makes the shipped default.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.tasks import CharTokenizer
from k15sys.train.config import ModelConfig
from k15sys.train.distributed import load_full_state_dict


def qwen2_config(cfg: ModelConfig, vocab_size: int, *, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> Qwen2Config:
    """The transformers ``Qwen2Config`` of :class:`ModelConfig` for a tokenizer of ``vocab_size`` ids."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, vocab_size: int, *, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2ForCausalLM (fp32, CPU), deterministic in ``cfg.seed``."""
    hf = qwen2_config(cfg, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(hf)
    return model


def export_model(cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write the main job's policy weights as a transformers model directory.

    ``state`` is keyed as in the trainer's checkpoints (:func:`k15sys.train.distributed.full_state_dict`).
    The directory holds ``config.json`` + safetensors, loadable with ``Qwen2ForCausalLM.from_pretrained``
    (or served by vLLM), and ``k15_tokens.json``: the token of each id of :class:`k15sys.tasks.CharTokenizer`.
    """
    tok = CharTokenizer()
    model = build_model(cfg, tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    load_full_state_dict(model, state)
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / "k15_tokens.json").write_text(json.dumps(tok.tokens))
    return out
