"""A tokenizer built locally for the shipped arithmetic task (no download; paper 2.2 data, scaled down).

Character-level over the task's alphabet, plus one multi-character token for ``\\boxed{`` (the answer
marker the math verifier reads, paper 2.3.5) and three specials: ``<pad>``, ``<bos>``, ``<eos>``.
Encoding is greedy longest-match, so ``decode(encode(s)) == s`` for every string over the alphabet.
"""
from __future__ import annotations

from collections.abc import Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>")
BOXED = "\\boxed{"
ALPHABET = "0123456789+-*=;[]}? "


class CharTokenizer:
    """Minimal tokenizer: ``encode(text) -> list[int]``, ``decode(ids) -> str``, fixed special ids."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"alphabet: must be non-empty with unique characters, got {alphabet!r}")
        self.tokens: list[str] = [*SPECIALS, BOXED, *alphabet]
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.boxed_token_id = self._ids[BOXED]  # opens the answer: a response starting with it has no working
        self.stop_token_ids = (self.eos_token_id,)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (optionally wrapped in ``<bos>`` / ``<eos>``); ValueError on unknown chars."""
        ids = [self.bos_token_id] if bos else []
        i = 0
        while i < len(text):
            if text.startswith(BOXED, i):
                ids.append(self._ids[BOXED])
                i += len(BOXED)
                continue
            tid = self._ids.get(text[i])
            if tid is None or tid < len(SPECIALS):
                raise ValueError(f"text: character {text[i]!r} at position {i} is not in the vocabulary")
            ids.append(tid)
            i += 1
        if eos:
            ids.append(self.eos_token_id)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A problem's prompt: ``<bos>`` + its characters."""
        return self.encode(text, bos=True)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; specials are dropped unless ``skip_special=False``."""
        out = []
        for t in ids:
            t = int(t)
            if not 0 <= t < len(self.tokens):
                raise ValueError(f"ids: token id {t} outside [0, {len(self.tokens)})")
            if t < len(SPECIALS) and skip_special:
                continue
            out.append(self.tokens[t])
        return "".join(out)
