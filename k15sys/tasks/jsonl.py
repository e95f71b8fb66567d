"""A user's problems from JSONL files as a :class:`k15sys.tasks.base.Task` (paper 2.2 prompt sets, 2.3.5 rewards).

One problem per line, a JSON object:

- math: ``{"prompt": str, "answer": str}``, scored by :func:`k15sys.rewards.math_reward` on the decoded response;
- code: ``{"prompt": str, "tests": [...], "language": "python" | "cpp"}`` (language optional, default python),
  tests being assert statements (Python) or ``{"input": str, "output": str}`` stdin/stdout pairs, scored by the
  fraction of tests passed in the sandbox (:mod:`k15sys.sandbox`): the program is the last fenced code block
  of the response (else the whole response), and a batch's programs run at once across the sandbox's workers;
- optional ``"difficulty"`` (a number, default 1) orders the curriculum sampler (2.3.4); other keys are ignored.

SFT warm-up traces (2.3.1) are ``{"prompt": str, "response": str}`` rows. Every file is checked when loaded,
before any work: a missing file, a line that is not a JSON object, a missing or mistyped field, empty tests or
an unknown language raise :class:`DataError` naming the file and the line.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k15sys.rewards.code import pass_fraction, test_limits, to_test_cases
from k15sys.rewards.math import math_reward
from k15sys.sandbox import LANGUAGES, RunRequest, Sandbox, Status
from k15sys.tasks.base import SFTBatch, Tokenizer
from k15sys.train.config import ConfigError


class DataError(ConfigError):
    """A bad data file or row; the message names the config key, the file and the line."""


@dataclass(frozen=True)
class MathProblem:
    """A math row: the statement, the reference final answer, the difficulty label."""

    prompt: str
    answer: str
    difficulty: float = 1.0


@dataclass(frozen=True)
class CodeProblem:
    """A code row: the statement, its tests (assert strings or input/output dicts), the language, the difficulty."""

    prompt: str
    tests: tuple[Any, ...]
    language: str = "python"
    difficulty: float = 1.0


@dataclass(frozen=True)
class SFTTrace:
    """A warm-up row: the statement and the response to imitate."""

    prompt: str
    response: str


def _rows(path: str, key: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of ``path``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}: file not found: {p}")
    rows = []
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: cannot read {p}: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{key}: {p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{key}: {p}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    if not rows:
        raise DataError(f"{key}: {p} holds no rows")
    return rows


def _text(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise DataError(f"{where}: {field!r} is empty")
    return value


def _problem(row: dict[str, Any], where: str) -> MathProblem | CodeProblem:
    prompt = _text(row, "prompt", where)
    difficulty = row.get("difficulty", 1.0)
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not math.isfinite(difficulty):
        raise DataError(f"{where}: 'difficulty' must be a finite number, got {difficulty!r:.60}")
    if ("answer" in row) == ("tests" in row):
        raise DataError(f"{where}: a row needs either 'answer' (math) or 'tests' (code), "
                        f"{'not both' if 'answer' in row else 'found neither'}")
    if "answer" in row:
        return MathProblem(prompt, _text(row, "answer", where), float(difficulty))
    language = row.get("language", "python")
    if language not in LANGUAGES:
        raise DataError(f"{where}: 'language' must be one of {sorted(LANGUAGES)}, got {language!r:.60}")
    tests = row["tests"]
    try:
        to_test_cases(tests, language)  # the reward's own checks: a non-empty list, asserts only for Python
    except ValueError as e:
        raise DataError(f"{where}: 'tests': {e}") from None
    for i, t in enumerate(tests):
        if isinstance(t, dict) and not all(isinstance(t[k], str) for k in ("input", "output")):
            raise DataError(f"{where}: 'tests'[{i}]: 'input' and 'output' must be strings")
    return CodeProblem(prompt, tuple(tests), language, float(difficulty))


def load_problems(path: str, key: str = "data.train") -> list[MathProblem | CodeProblem]:
    """The problems of JSONL file ``path`` (``key`` names the setting in error messages); DataError on a bad row."""
    return [_problem(row, f"{key}: {path}:{n}") for n, row in _rows(path, key)]


def load_traces(path: str, key: str = "sft.data") -> list[SFTTrace]:
    """The ``{"prompt", "response"}`` warm-up rows of ``path``; DataError on a bad row."""
    return [SFTTrace(_text(row, "prompt", f"{key}: {path}:{n}"), _text(row, "response", f"{key}: {path}:{n}"))
            for n, row in _rows(path, key)]


_FENCE = re.compile(r"```[ \t]*([\w+#-]*)[^\n]*\n(.*?)```", re.DOTALL)
_FENCE_TAGS = {"python": ("python", "py", "python3"), "cpp": ("cpp", "c++", "cc", "cxx")}


def extract_program(response: str, language: str) -> str:
    """The program in ``response``: the last fenced block tagged for ``language`` (or untagged), else the last
    fenced block, else the whole response."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return response.strip()
    tagged = [code for tag, code in blocks if tag.lower() in _FENCE_TAGS.get(language, (language,)) or not tag]
    return (tagged or [code for _, code in blocks])[-1].strip()


class JsonlTask:
    """A :class:`k15sys.tasks.base.Task` over JSONL problems (module docstring).

    Args:
        train, eval: the training (RL prompts) and held-out problem files.
        tokenizer: renders prompts (its chat template) and decodes responses.
        sft: the warm-up traces file ("" = none: ``has_sft`` False).
        code_timeout_s: wall-clock limit per test of a code row.
        sandbox_workers: containers of the sandbox (started on the first code reward).
    """

    has_short_cot = False  # the traces have one style; long2short merge needs short-CoT ones

    def __init__(self, train: str, eval: str, tokenizer: Tokenizer, *, sft: str = "", code_timeout_s: float = 5.0,
                 sandbox_workers: int = 2) -> None:
        if not train:
            raise DataError("data.train: empty path")
        if not eval:
            raise DataError("data.eval: no held-out file; set data.eval to a JSONL of problems of the same form")
        if not code_timeout_s > 0:
            raise ValueError(f"code_timeout_s: must be > 0, got {code_timeout_s!r}")
        self.tokenizer = tokenizer
        self.train = load_problems(train, "data.train")
        self.eval = load_problems(eval, "data.eval")
        self.traces = load_traces(sft, "sft.data") if sft else []
        self.has_sft = bool(self.traces)
        self.limits = test_limits(code_timeout_s)
        self.sandbox_workers = sandbox_workers
        self._sandbox: Sandbox | None = None
        self._prompt_ids: dict[str, list[int]] = {}
        self._sft_ids = [(self.tokenizer.encode_prompt(t.prompt), self.tokenizer.encode(t.response, eos=True))
                         for t in self.traces]

    def prompt_ids(self, item: MathProblem | CodeProblem) -> list[int]:
        ids = self._prompt_ids.get(item.prompt)
        if ids is None:
            ids = self._prompt_ids[item.prompt] = self.tokenizer.encode_prompt(item.prompt)
        return ids

    def reward(self, items: Sequence[MathProblem | CodeProblem], responses: Sequence[Sequence[int]]) -> list[float]:
        if len(items) != len(responses):
            raise ValueError(f"responses: {len(responses)} for {len(items)} problems")
        texts = [self.tokenizer.decode(r) for r in responses]
        out = [math_reward(t, p.answer) if isinstance(p, MathProblem) else 0.0 for p, t in zip(items, texts)]
        code = [i for i, p in enumerate(items) if isinstance(p, CodeProblem)]
        if code:
            requests = [RunRequest(extract_program(texts[i], items[i].language), items[i].language,
                                   tuple(to_test_cases(items[i].tests, items[i].language)), self.limits) for i in code]
            batch = self.sandbox().run_batch(requests)  # all programs at once, spread over the sandbox's workers
            broken = [r for results in batch for r in results if r.status == Status.SANDBOX_ERROR]
            if len(broken) == sum(map(len, batch)):  # nothing ran: a broken sandbox must not read as wrong programs
                raise RuntimeError(f"code rewards: the sandbox ran none of {len(requests)} programs: "
                                   f"{broken[0].stderr[:300]} (docs/sandbox.md: bubblewrap and user namespaces)")
            for i, results in zip(code, batch):
                out[i] = pass_fraction(results)
        return out

    def sandbox(self) -> Sandbox:
        """The task's sandbox pool, started on first use."""
        if self._sandbox is None:
            self._sandbox = Sandbox(self.limits, workers=self.sandbox_workers)
        return self._sandbox

    def sft_examples(self, rng: random.Random, n: int) -> SFTBatch:
        if not self._sft_ids:
            raise ValueError("sft_examples: no warm-up traces (sft.data)")
        picked = [self._sft_ids[rng.randrange(len(self._sft_ids))] for _ in range(n)]
        return [p + r for p, r in picked], [len(p) for p, _ in picked], None

    def response_metrics(self, responses: Sequence[Sequence[int]]) -> dict[str, float]:
        return {}

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
