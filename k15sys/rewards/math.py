"""Verifiable math reward (paper 2.3.5): final-answer extraction + equivalence via math-verify.

``math_reward(response, gold)`` is 1.0 when the response's final answer equals the reference, else 0.0.
Extraction order: a caller's final-answer pattern, the last ``\\boxed{...}`` (nested braces), the last
"the answer is ..." / "final answer: ...", the last "#### ...", and as a last resort the last number in
the text (GSM8K-style "A: 18" endings). Equality: normalised string match, numeric match, then
math-verify's symbolic ``parse``/``verify`` in a worker process that is killed at the time limit
(``k15sys.rewards.bounded``): sympy can hang in C code where no signal reaches it. Nothing here raises
on malformed text; only bad settings (a non-positive timeout) raise ValueError.
"""
from __future__ import annotations

import math
import re

from k15sys.rewards.bounded import BoundedCall

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:answer\s+is|final\s+answer\s*:|answer\s*:)\s*", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
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
    for m in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[m.end() : i - 1].strip()
    return None


def extract_answer(text: str, *, pattern: str | None = None) -> str | None:
    """The final answer stated in ``text``, or None (paper 2.3.5).

    Args:
        text: a model response (anything else gives None).
        pattern: optional regex whose first group (or whole match) is the answer; its last match wins.
    """
    if not isinstance(text, str) or not text:
        return None
    if pattern:
        matches = list(re.finditer(pattern, text))
        if matches:
            m = matches[-1]
            return (m.group(1) if m.groups() else m.group(0)).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    said = list(_ANSWER_IS.finditer(text))
    if said:
        rest = text[said[-1].end() :].split("\n", 1)[0].strip()
        rest = re.sub(r"\.\s.*$", "", rest).rstrip(".").strip("$* ")  # up to the end of the sentence
        if rest:
            return rest
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas as thousands separators allowed), or None."""
    if not isinstance(text, str):
        return None
    nums = _NUMBER.findall(text)
    return nums[-1].rstrip(".,") if nums else None


def normalize_answer(s: str) -> str:
    """Cheap canonical form: no $ / spaces / \\left \\right / \\text{} / trailing period, \\dfrac -> \\frac,
    degree and percent signs dropped, 1,000 -> 1000, unambiguous decimal commas (0,111 / 1000,99) -> points."""
    s = s.strip().strip("$").strip()
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
