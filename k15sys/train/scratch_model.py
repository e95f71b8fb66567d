"""A transformers model directory made from nothing but local text: for tests, examples and benchmarks.

Nothing may be downloaded here, yet ``model.path`` runs need what a user brings: a causal-LM directory with
its tokenizer. :func:`train_tokenizer` trains a byte-level BPE tokenizer with the ``tokenizers`` library on
given texts and wraps it as a transformers ``PreTrainedTokenizerFast`` with a ChatML chat template
(``<|im_start|>`` / ``<|im_end|>`` turns, as Qwen's); :func:`save_scratch_model` saves it next to a randomly
initialised Qwen2 or Llama model, loadable with ``AutoTokenizer`` / ``AutoModelForCausalLM``.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + IM_END + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens trained on ``texts``: EOS ``<|im_end|>``
    (ends an assistant turn), pad ``<|endoftext|>``, no BOS, a ChatML chat template. Any text encodes (byte
    fallback through the 256 byte symbols)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size: must be >= 300 (256 byte symbols + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE)


def scratch_lm(*, arch: str = "qwen2", vocab_size: int, hidden_size: int = 64, intermediate_size: int = 128,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 2048,
               seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", **config_kwargs: Any) -> Any:
    """A randomly initialised ``arch`` causal LM ("qwen2": tied embeddings, as the small Qwen2.5 models; "llama":
    untied) of the given shape, seeded with ``seed`` without touching the caller's RNG, initialised on ``device``
    (a GPU initialises billion-parameter models in seconds). ``config_kwargs`` go to the transformers config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch: expected 'qwen2' or 'llama', got {arch!r}")
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                        max_position_embeddings=max_position_embeddings, tie_word_embeddings=arch == "qwen2",
                        **config_kwargs)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return model_cls(config).to(dtype)


def save_scratch_model(out_dir: str | Path, tokenizer: Any, *, arch: str = "qwen2", vocab_size: int | None = None,
                       **shape: Any) -> Path:
    """Save :func:`scratch_lm` (``shape``: its keyword arguments) and ``tokenizer`` into ``out_dir``.
    ``vocab_size`` (default: the tokenizer's size) may exceed the tokenizer, as Qwen's 151,936-row embedding does;
    the model's EOS / pad ids are the tokenizer's."""
    vocab = vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size: {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    model = scratch_lm(arch=arch, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
