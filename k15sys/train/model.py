"""The main job's policy and tokenizer: a user's transformers model (``model.path``) or the built-in one.

:func:`build_tokenizer` and :func:`build_lm` are the factory the trainer and the rollout workers use:
with ``model.path``, ``AutoTokenizer`` / ``AutoModelForCausalLM`` load the directory (any causal LM of the
Llama/Qwen2 family the packed policy can run: ``.model`` + ``.lm_head``), in ``model.dtype``; without it, a
small Qwen2-architecture model is built from :class:`ModelConfig` (nothing is downloaded: the weights are
initialised from ``ModelConfig.seed``) with the arithmetic task's :class:`CharTokenizer`.
:func:`export_model` writes trained weights back as a transformers directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.tasks import CharTokenizer
from k15sys.tasks.hf_tokenizer import HFTokenizer
from k15sys.train.config import ConfigError, ModelConfig
from k15sys.train.distributed import load_full_state_dict

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``model.dtype``; ``auto`` is bfloat16 for a ``model.path`` model on a GPU and float32 otherwise (the
    built-in model keeps float32 everywhere unless asked)."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    return torch.bfloat16 if cfg.path and device.type == "cuda" else torch.float32


def build_tokenizer(cfg: ModelConfig) -> CharTokenizer | HFTokenizer:
    """The tokenizer of ``model.path`` (:class:`HFTokenizer`; the generation config's EOS ids also stop responses),
    or the built-in :class:`CharTokenizer`.

    Raises:
        ConfigError: ``model.path`` is not a directory transformers can load a tokenizer from.
    """
    if not cfg.path:
        return CharTokenizer()
    if not Path(cfg.path).is_dir():
        raise ConfigError(f"model.path: not a directory: {cfg.path}")
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(cfg.path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model.path: cannot load a tokenizer from {cfg.path}: {e}") from None
    try:
        eos = GenerationConfig.from_pretrained(cfg.path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    try:
        return HFTokenizer(tok, extra_stop_ids=[] if eos is None else [eos] if isinstance(eos, int) else eos)
    except ValueError as e:
        raise ConfigError(f"model.path: {cfg.path}: {e}") from None


def build_lm(cfg: ModelConfig, tok: CharTokenizer | HFTokenizer, device: torch.device) -> Any:
    """The policy's causal LM for ``tok`` (on the CPU, in :func:`model_dtype` for ``device``): ``model.path``'s
    weights, or the built-in model initialised from ``cfg.seed``; gradient checkpointing if asked.

    Raises:
        ConfigError: ``model.path`` does not load, or its embedding table is smaller than the tokenizer.
    """
    dtype = model_dtype(cfg, device)
    if cfg.path:
        from transformers import AutoModelForCausalLM

        try:
            lm = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot load a causal LM from {cfg.path}: {e}") from None
        rows = lm.get_input_embeddings().weight.shape[0]
        if rows < tok.vocab_size:
            raise ConfigError(f"model.path: {cfg.path}: the embedding table has {rows} rows, the tokenizer "
                              f"{tok.vocab_size} tokens")
    else:
        lm = build_model(cfg, tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
        if dtype != torch.float32:
            lm = lm.to(dtype)
    if cfg.gradient_checkpointing:  # transformers >= 5.24 names it activation checkpointing
        enable = getattr(lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


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


def check_context_length(lm: Any, longest: int) -> None:
    """ConfigError when ``longest`` (the longest prompt + ``rl.max_new_tokens``) exceeds the model's
    ``max_position_embeddings``: positions past it were never trained (RoPE models would run, and degrade)."""
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ConfigError(f"rl.max_new_tokens: the longest prompt plus rl.max_new_tokens is {longest} tokens, more than "
                          f"the model's max_position_embeddings={limit}; lower rl.max_new_tokens or shorten the prompts")


def export_model(cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write the main job's policy weights as a transformers model directory.

    ``state`` is keyed as in the trainer's checkpoints (:func:`k15sys.train.distributed.full_state_dict`).
    The directory holds ``config.json`` + safetensors, loadable with ``AutoModelForCausalLM.from_pretrained``
    (or served by vLLM), and the tokenizer: ``model.path``'s own (``AutoTokenizer.from_pretrained`` loads it),
    or for the built-in model ``k15_tokens.json``, the token of each id of :class:`k15sys.tasks.CharTokenizer`.
    """
    tok = build_tokenizer(cfg)
    if cfg.path:
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = next(iter(state.values())).dtype
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), dtype=dtype)
    else:
        model = build_model(cfg, tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    load_full_state_dict(model, state)
    out = Path(out_dir)
    model.save_pretrained(out)
    if isinstance(tok, HFTokenizer):
        tok.save_pretrained(out)
    else:
        (out / "k15_tokens.json").write_text(json.dumps(tok.tokens))
    return out
