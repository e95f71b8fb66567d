"""A transformers tokenizer behind the :class:`k15sys.tasks.base.Tokenizer` protocol (``model.path`` runs).

Prompts go through the tokenizer's chat template when it has one (the problem as the user turn, then the
assistant header the model answers after; paper 2.1's prompts are chat turns), else they are the plain
text after the tokenizer's BOS token, if it has one. The EOS token (and any extra stop ids, e.g. a
generation config's ``eos_token_id`` list) ends a response; padding uses the pad token, or EOS when there
is none.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class HFTokenizer:
    """Wraps ``tok`` (a transformers ``PreTrainedTokenizer[Fast]``).

    Args:
        tok: the tokenizer; it must have an EOS token.
        extra_stop_ids: more token ids that end a response (besides EOS).
    """

    def __init__(self, tok: Any, extra_stop_ids: Iterable[int] = ()) -> None:
        if getattr(tok, "eos_token_id", None) is None:
            raise ValueError("tok: the tokenizer has no eos_token (set one, e.g. tokenizer.eos_token = '<|im_end|>', "
                             "and save it again): responses need a token that ends them")
        self.tok = tok
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self.stop_token_ids = tuple(dict.fromkeys([self.eos_token_id, *(int(i) for i in extra_stop_ids)]))
        self.has_chat_template = bool(getattr(tok, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        """Token ids in use (the model's embedding table may have more rows)."""
        return len(self.tok)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` with no special tokens added, optionally after BOS (if any) / before EOS."""
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids + [self.eos_token_id] if eos else ids

    def encode_prompt(self, text: str) -> list[int]:
        """The chat template's user turn + assistant header (as text, then encoded), or BOS + ``text``."""
        if not self.has_chat_template:
            return self.encode(text, bos=True)
        rendered = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
        return list(self.tok.encode(rendered, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the wrapped tokenizer's files (``k15 export``)."""
        self.tok.save_pretrained(str(out_dir))
