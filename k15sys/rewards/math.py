"""Verifiable math reward (paper 2.3.5): final-answer extraction + equivalence via math-verify.

``math_reward(response, gold)`` is 1.0 when the response's final answer equals the reference, else 0.0.
Extraction order: a caller's final-answer pattern, the last ``\\boxed{...}`` (nested braces), the last
final-answer phrase in English, Chinese or another language of the data ("the answer is ...",
"答案是 ...", "La respuesta es ...", "Ответ: ..."; :data:`ANSWER_PHRASES`), the last "#### ...", and as a
last resort the last number in the text (GSM8K-style "A: 18" endings). Full-width digits, letters and
colons are read as their ASCII forms. Extraction is linear in the text's length (one backward pass for
the braces, regexes without nested quantifiers), so a degenerate response costs milliseconds per
megabyte. Equality: normalised string match, numeric match, then math-verify's symbolic
``parse``/``verify`` in a worker process that is killed at the time limit (``k15sys.rewards.bounded``):
sympy can hang in C code where no signal reaches it. Nothing here raises on malformed text; only bad
settings (a non-positive timeout, a pattern that is not a regex) raise ValueError.
"""
from __future__ import annotations

import functools
import math
import re

from k15sys.rewards.bounded import BoundedCall

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RUN = re.compile(r"\{+|\}+")
# Final-answer phrases, one alternation (matched case-insensitively, last match wins). Each is a literal
# phrase with optional words around it; none has a quantified group that can match the same text twice.
ANSWER_PHRASES: dict[str, str] = {
    "en": r"answer\s+is\b|final\s+answer\s*:|answer\s*:",
    "zh": r"答案\s*(?:应该|應該|应|應)?\s*(?:是|为|為)\s*[:：]?|答案\s*[:：]",
    "ja": r"答え\s*(?:は|[:：])",
    "ko": r"정답\s*(?:은|[:：])|답\s*(?:은|[:：])",
    "es": r"respuesta\s+(?:final\s+)?es\b\s*:?|respuesta(?:\s+final)?\s*:",
    "pt": r"resposta\s+(?:final\s+)?é\s*:?|resposta(?:\s+final)?\s*:",
    "fr": r"r[ée]ponse\s+(?:finale\s+)?est\b\s*:?|r[ée]ponse(?:\s+finale)?\s*:",
    "de": r"antwort\s+(?:ist|lautet)\b\s*:?|antwort\s*:",
    "it": r"risposta\s+(?:finale\s+)?è\s*:?|risposta(?:\s+finale)?\s*:",
    "ru": r"ответ\s*(?:равен\b|будет\b|[:—])",
}
_ANSWER_IS = re.compile("(?:" + "|".join(ANSWER_PHRASES.values()) + r")\s*", re.IGNORECASE)
# The stated answer runs to the end of its sentence: ". ", a final ".", or CJK sentence punctuation.
_SENTENCE_END = re.compile(r"\.(?:\s|$)|[。，；]")
_TRAILING_WORDS = ("です", "입니다", "이다")  # "答えは 42 です", "정답은 42입니다"
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Full-width ASCII (U+FF01-U+FF5E) and the ideographic space read as ASCII; the full-width comma stays
# CJK punctuation (it ends a sentence, it never separates thousands).
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F) if c != 0xFF0C} | {0x3000: 0x20}
_HAS_FULL_WIDTH = re.compile("[\uff01-\uff0b\uff0d-\uff5e\u3000]")


def _ascii_width(text: str) -> str:
    """``text`` with full-width ASCII read as ASCII (a cheap scan when there is none)."""
    return text.translate(_FULL_WIDTH) if _HAS_FULL_WIDTH.search(text) else text
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
# 0,111 and 1000,99 can only be decimal commas; 1,22 or 3,5 stay lists (1,234 is a thousands separator)
_DECIMAL_COMMA = re.compile(r"^-?(0|\d{4,}),\d+$")
_MATH_DELIMITED = ("$", "\\(", "\\[", "\\boxed")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_REPLACE = (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", ""), ("\\,", ""),
            ("\\;", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""))
MAX_SYMBOLIC_CHARS = 50_000  # longer inputs are compared as strings only

_symbolic = BoundedCall("k15sys.rewards.math", "symbolic_equal")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{`` whose brace is closed, in one backward pass over runs of braces.

    Scanning from the end, unmatched ``}`` wait on a stack (as runs: leftmost position, count) for the
    ``{`` that close their pairs; the first box met whose ``{`` finds a partner is the last closed box.
    Backward and forward pairing give the same pairs, so this equals "the last box whose braces balance".
    A box's ``{`` follows ``boxed`` or a space, so it is always the leftmost brace of its run.
    """
    opens = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not opens:
        return None
    closers: list[list[int]] = []  # runs of unmatched "}", top = the leftmost (it pairs first)
    last = len(text) - 1
    for m in _BRACE_RUN.finditer(text[::-1]):  # runs of braces from the end, streamed
        left, n = last - (m.end() - 1), m.end() - m.start()
        if text[left] == "}":
            closers.append([left, n])
            continue
        while n and closers:  # n "{" pair with closers from the top, the run's rightmost first
            top = closers[-1]
            take = min(n, top[1])
            if take == n and left in opens:  # the run's leftmost "{" pairs with this closer
                return text[left + 1 : top[0] + take - 1].strip()
            top[0], top[1], n = top[0] + take, top[1] - take, n - take
            if not top[1]:
                closers.pop()
    return None


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern: not a valid regular expression ({e}): {pattern!r}") from None


def _stated_answer(text: str) -> str | None:
    said = None
    for said in _ANSWER_IS.finditer(text):
        pass
    if said is None:
        return None
    rest = text[said.end() :].partition("\n")[0]
    end = _SENTENCE_END.search(rest)
    rest = (rest[: end.start()] if end else rest).strip().rstrip(".").strip("$* ")
    for word in _TRAILING_WORDS:
        rest = rest.removesuffix(word).rstrip()
    return rest or None


def extract_answer(text: str, *, pattern: str | None = None) -> str | None:
    """The final answer stated in ``text``, or None (paper 2.3.5).

    Linear in ``len(text)``. Full-width characters are read as ASCII (``答案：４２`` gives ``42``).

    Args:
        text: a model response (anything else gives None).
        pattern: optional regex whose first group (or whole match) is the answer; its last match wins.
            A pattern that does not compile is a ValueError (the caller's regex runs as given: its own
            backtracking is the caller's).
    """
    if pattern is not None and not isinstance(pattern, str):
        raise ValueError(f"pattern: must be a regex string or None, got {type(pattern).__name__}")
    compiled = _compile(pattern) if pattern else None
    if not isinstance(text, str) or not text:
        return None
    text = _ascii_width(text)
    if compiled is not None:
        m = None
        for m in compiled.finditer(text):
            pass
        if m is not None:
            return (m.group(1) if m.groups() else m.group(0)).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    stated = _stated_answer(text)
    if stated is not None:
        return stated
    m = None
    for m in _HASHES.finditer(text):
        pass
    return m.group(1).strip() if m is not None else None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas as thousands separators allowed), or None."""
    if not isinstance(text, str):
        return None
    m = None
    for m in _NUMBER.finditer(_ascii_width(text)):
        pass
    return m.group(0).rstrip(".,") if m is not None else None


def normalize_answer(s: str) -> str:
    """Cheap canonical form: no $ / spaces / \\left \\right / \\text{} / trailing period, \\dfrac -> \\frac,
    degree and percent signs dropped, 1,000 -> 1000, unambiguous decimal commas (0,111 / 1000,99) -> points."""
    s = _ascii_width(s).strip().strip("$").strip()
    s = _TEXT.sub(r"\1", s)
    for a, b in _REPLACE:
        s = s.replace(a, b)
    s = s.rstrip(".").replace(" ", "")
    if _THOUSANDS.match(s) and not s.lstrip("-").startswith("0"):
        s = s.replace(",", "")
    elif _DECIMAL_COMMA.match(s):
        s = s.replace(",", ".")
    return s


def _as_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _delimited(s: str) -> str:
    """Text that already has math delimiters (or a box) goes to math-verify as is; a bare answer in $...$."""
    return s if any(d in s for d in _MATH_DELIMITED) else f"${s}$"


def symbolic_equal(pred: str, gold: str, timeout_s: int) -> bool:
    """math-verify's ``verify(parse(gold), parse(pred))``; runs in the bounded worker process."""
    from math_verify import parse, verify

    g = parse(_delimited(gold), parsing_timeout=timeout_s)
    p = parse(_delimited(pred), parsing_timeout=timeout_s)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout_s))


def math_equal(pred: str | None, gold: str | None, *, timeout_s: float = 5.0) -> bool:
    """Whether ``pred`` and ``gold`` denote the same mathematical answer (paper 2.3.5).

    Returns False on anything malformed or when the symbolic check does not finish within ``timeout_s``
    (its worker process is then killed). Safe to call from any thread.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a == b:
        return True
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return math.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-9)
    if len(pred) > MAX_SYMBOLIC_CHARS or len(gold) > MAX_SYMBOLIC_CHARS:
        return False
    inner = max(1, math.floor(timeout_s))  # math-verify's own (signal) bound inside the worker
    return bool(_symbolic(pred, gold, inner, timeout_s=timeout_s + 1.0, default=False))


def math_reward(response: str, gold: str, *, pattern: str | None = None, timeout_s: float = 5.0) -> float:
    """1.0 if the response's final answer equals ``gold``, else 0.0 (paper 2.3.5).

    Without an explicit final answer (see :func:`extract_answer`) the last number in the response is used.
    """
    answer = extract_answer(response, pattern=pattern)
    if answer is None:
        answer = last_number(response)
    return 1.0 if math_equal(answer, gold, timeout_s=timeout_s) else 0.0
