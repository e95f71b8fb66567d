"""Verifiable math reward (paper 2.3.5 / 2.6.4): answer extraction + equivalence via math-verify.

``math_reward(response, gold)`` is 1.0 when the response's final answer equals the reference, else 0.0.
Extraction order: a caller's final-answer pattern, the last ``\\boxed{...}`` (nested braces), "the
answer is ...", "#### ...", and as a last resort the last number in the text (GSM8K-style endings).
Equality: normalised string match, numeric match, then math-verify's symbolic ``verify``. Every check
is bounded in time (sympy can hang) and never raises on garbage.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import re
import threading

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)(?:\.\s*$|\.\s+|\n|$)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def extract_answer(text: str, *, pattern: str | None = None) -> str | None:
    """The final answer stated in ``text``, or None.

    Args:
        text: a model response.
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
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip().rstrip(".").strip("$ ")
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas as thousands separators allowed)."""
    if not isinstance(text, str):
        return None
    nums = _NUMBER.findall(text)
    return nums[-1].rstrip(".") if nums else None


def normalize_answer(s: str) -> str:
    """Cheap canonical form: no $ / spaces / \\left \\right / trailing period, \\dfrac -> \\frac, 1,000 -> 1000."""
    s = s.strip().strip("$").strip()
    s = _TEXT.sub(r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", ""),
                 ("\\,", ""), ("\\;", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    s = s.rstrip(".").replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _as_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _symbolic_equal(pred: str, gold: str, timeout_s: int) -> bool:
    from math_verify import parse, verify

    g = parse(f"${gold}$", parsing_timeout=timeout_s)
    p = parse(f"${pred}$", parsing_timeout=timeout_s)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout_s))


_pool_lock = threading.Lock()
_pool: cf.ProcessPoolExecutor | None = None


def _symbolic_in_worker(pred: str, gold: str, timeout_s: float) -> bool:
    """Off the main thread math-verify's signal timeouts cannot work: use a worker process we can kill."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool = _pool
    fut = pool.submit(_symbolic_equal, pred, gold, max(1, math.ceil(timeout_s)))
    try:
        return fut.result(timeout=timeout_s + 5.0)  # + start-up of a fresh worker
    except cf.TimeoutError:
        with _pool_lock:
            if _pool is pool:
                _pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        return False


def math_equal(pred: str | None, gold: str | None, *, timeout_s: float = 5.0) -> bool:
    """Whether ``pred`` and ``gold`` denote the same mathematical answer; False on anything malformed."""
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    try:
        a, b = normalize_answer(pred), normalize_answer(gold)
        if a == b:
            return True
        fa, fb = _as_float(a), _as_float(b)
        if fa is not None and fb is not None:
            return math.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-9)
        if threading.current_thread() is threading.main_thread():
            return _symbolic_equal(pred, gold, max(1, math.ceil(timeout_s)))
        return _symbolic_in_worker(pred, gold, timeout_s)
    except Exception:  # math-verify / sympy errors and timeouts count as "not equal"
        return False


def math_reward(response: str, gold: str, *, pattern: str | None = None, timeout_s: float = 5.0) -> float:
    """1.0 if the response's final answer equals ``gold`` (paper 2.3.5), else 0.0."""
    answer = extract_answer(response, pattern=pattern)
    if answer is None:
        answer = last_number(response)
    return 1.0 if math_equal(answer, gold, timeout_s=timeout_s) else 0.0
