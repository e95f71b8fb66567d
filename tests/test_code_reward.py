"""Code reward (paper 2.3.5, 2.6.4): assert and stdin/stdout tests through the sandbox, on public data."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sandbox_support import requires_sandbox

from k15sys.rewards import code_reward, run_tests
from k15sys.sandbox import Sandbox, Status

pytestmark = requires_sandbox
DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2) as s:
        yield s


def test_assert_and_stdio_tests(sb):
    prog = "def add(a, b):\n    return a + b"
    t0 = time.perf_counter()
    score = code_reward(prog, ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "while True: pass"],
                        timeout_s=1.0, sandbox=sb)
    assert score == pytest.approx(1 / 3)
    assert time.perf_counter() - t0 < 5.0  # the looping test failed within its limit
    io = "print(sum(map(int, input().split())))"
    tests = [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": " 4 \n"}, {"input": "1 1", "output": "3"}]
    assert code_reward(io, tests, sandbox=sb) == pytest.approx(2 / 3)
    cpp = "#include <iostream>\nint main(){int a,b;std::cin>>a>>b;std::cout<<a+b<<'\\n';}"
    assert code_reward(cpp, tests, language="cpp", sandbox=sb) == pytest.approx(2 / 3)
    checker = lambda inp, exp, act: abs(float(act) - float(exp)) < 1e-3  # noqa: E731
    assert code_reward("print(1/3)", [{"input": "", "output": "0.3333"}], checker=checker, sandbox=sb) == 1.0
    statuses = [r.status for r in run_tests(io, tests, sandbox=sb)]
    assert statuses == [Status.OK, Status.OK, Status.WRONG_ANSWER]


def test_default_sandbox_is_shared():
    assert code_reward("print(input())", [{"input": "hi", "output": "hi"}]) == 1.0


def test_verl_labelled_sandbox_cases(sb):
    """verl's sandbox cases with per-test labels, and full programs with asserts (some hostile)."""
    verdict = {"success": True, "wrong_answer": False, "runtime_error": False, "timeout": False, "compile_error": False}
    checked = 0
    for r in _rows("code_sandbox_cases.jsonl"):
        if r["kind"] == "stdin_stdout" and r.get("expected_per_test") is not None and r.get("expected_status"):
            tests = [{"input": i, "output": o} for i, o in zip(r["tests"]["inputs"], r["tests"]["outputs"])]
            outs = run_tests(r["code"], tests, language=r["language"], timeout_s=float(r.get("timeout_s") or 3), sandbox=sb)
            assert [o.status == Status.OK for o in outs] == [verdict[s] for s in r["expected_status"][: len(outs)]], r["case_id"]
            checked += 1
        elif r["kind"] == "mbpp_full_program" and r.get("expected_pass") is not None:
            tests = [t for t in r["tests"].splitlines() if t.strip()]
            score = code_reward(r["code"], tests, timeout_s=3.0, sandbox=sb)
            assert (score == 1.0) == bool(r["expected_pass"]), r["case_id"]
            checked += 1
    assert checked >= 6


def test_mbpp_reference_solutions_pass_and_swapped_ones_fail(sb):
    rows = [r for r in _rows("mbpp_test.jsonl") if r["task_id"] != "367"][:30]  # 367 needs dropped setup code
    scores = [code_reward(r["solution"], r["tests"], timeout_s=3.0, sandbox=sb) for r in rows]
    assert scores == [1.0] * len(rows)
    swapped = [code_reward(rows[i - 1]["solution"], rows[i]["tests"], timeout_s=3.0, sandbox=sb) for i in range(1, 11)]
    assert all(s == 0.0 for s in swapped), swapped


def test_humaneval_canonical_solutions_pass(sb):
    rows = _rows("humaneval.jsonl")[:15]
    for r in rows:
        program = r["prompt"] + r["solution"]
        assert code_reward(program, [r["tests"] + f"\ncheck({r['entry_point']})"], sandbox=sb) == 1.0, r["task_id"]
        assert code_reward(r["prompt"] + "    return None\n", [r["tests"] + f"\ncheck({r['entry_point']})"],
                           sandbox=sb) == 0.0, r["task_id"]


def test_bad_input(sb):
    with pytest.raises(ValueError, match="tests"):
        code_reward("print(1)", [], sandbox=sb)
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        code_reward("print(1)", [42], sandbox=sb)
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        code_reward("int main(){}", ["assert True"], language="cpp", sandbox=sb)
    with pytest.raises(ValueError, match="timeout_s"):
        code_reward("print(1)", ["assert True"], timeout_s=0, sandbox=sb)
    assert code_reward("", ["assert True"], sandbox=sb) == 0.0
    with pytest.raises(ValueError, match="language: unknown 'cobol'"):
        code_reward("print(1)", [{"input": "", "output": "1"}], language="cobol", sandbox=sb)
    with pytest.raises(ValueError, match="language: unknown 'rust'"):  # the language, not the tests (issue 23)
        code_reward("fn add() {}", ["assert add(1, 2) == 3"], language="rust", sandbox=sb)
    assert code_reward("import sys\nsys.stdout.buffer.write(b'\\xff')", [{"input": "", "output": "x"}], sandbox=sb) == 0.0
