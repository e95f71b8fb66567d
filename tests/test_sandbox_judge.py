"""The judge of assert tests and its plain-data protocol (k15sys.sandbox.judge), in-process: no
sandbox needed. The same code runs in the container (tests/test_sandbox_adversarial.py)."""
from __future__ import annotations

import collections
import json
import socket
import threading

import pytest

from k15sys.sandbox import judge


def _roundtrip(value, handles=None):
    return judge.decode(json.loads(json.dumps(judge.encode(value, handles))), judge.Remote)


def test_plain_data_roundtrips_with_exact_types():
    value = {"a": [1, 2.5, (3, b"\xff")], 4: {5, 6}, "n": None, "t": True, (1, 2): frozenset({"x"}), "s": "é\udce9"}
    back = _roundtrip(value)
    assert back == value and type(back["a"][2]) is tuple and type(back[4]) is set and type(back[(1, 2)]) is frozenset
    assert _roundtrip(10 ** 100) == 10 ** 100 and _roundtrip(float("inf")) == float("inf")


def test_program_side_reads_subclasses_as_plain_values_and_keeps_objects_behind_handles():
    class Liar(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    handles: dict[int, object] = {}
    back = _roundtrip([Liar(7), collections.Counter("aab"), collections.OrderedDict(a=1)], handles)
    assert back == [7, {"a": 2, "b": 1}, {"a": 1}] and type(back[0]) is int and back[0] != 8
    obj = object()
    enc = judge.encode({"k": obj}, handles)
    assert enc == {"d": [["k", {"h": 1}]]} and handles[1] is obj


def test_judge_side_sends_plain_data_only_and_decode_is_strict():
    with pytest.raises(TypeError, match="plain data"):
        judge.encode([lambda: 1])
    with pytest.raises(TypeError, match="plain data"):
        judge.encode(bytearray(b"x"))
    for bad in ({"x": 1}, {"t": "no"}, {"t": [], "s": []}, {"h": "1"}, {"b": "***"}):
        with pytest.raises(ValueError):
            judge.decode(bad, judge.Remote)
    deep: list = []
    for _ in range(judge.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        judge.encode(deep)
    with pytest.raises(TypeError):
        judge.decode({"s": [[1]]}, judge.Remote)  # unhashable set element


def test_channel_bounds_message_size(monkeypatch):
    a, b = socket.socketpair()
    monkeypatch.setattr(judge, "MAX_MESSAGE", 64)
    with pytest.raises(ValueError, match="limit 64"):
        judge.Channel(a).send("x" * 100)
    a.sendall(b"\x00\x00\x10\x00")  # a header announcing 4096 bytes
    with pytest.raises(ValueError, match="limit 64"):
        judge.Channel(b).recv()
    a.close()
    b.close()


def _judged(program_names: dict, test: str, failure: str | None = None) -> tuple[bool, str]:
    """The judge on one end of a socket pair, the program's server on the other (in a thread)."""
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=lambda: (judge.serve(program_names, failure, theirs), theirs.close()))
    server.start()
    try:
        return judge.run_test(test, ours)
    finally:
        ours.close()
        server.join(5)


def test_judge_runs_the_test_against_the_programs_names():
    import math

    class Box:
        def __init__(self, v):
            self.v = v

        def get(self):
            return self.v

    def boom():
        raise ValueError("bad")

    names = {"add": lambda a, b: a + b, "Box": Box, "boom": boom, "math": math, "TABLE": [1, 2]}
    assert _judged(names, "assert add(1, 2) == 3 and Box(4).get() == 4 and TABLE == [1, 2]") == (True, "")
    assert _judged(names, "assert math.isclose(add(0.1, 0.2), 0.3)")[0]
    assert _judged(names, "try:\n    boom()\nexcept ValueError as e:\n    assert str(e) == 'bad'")[0]
    passed, message = _judged(names, "x = 1\nassert add(1, 1) == 3")
    assert not passed and message.startswith("test line 2: assert add(1, 1) == 3") and "AssertionError" in message
    assert _judged(names, "assert True", failure="the program raised KeyError before its tests ran") == \
        (False, "the program raised KeyError before its tests ran")


def test_always_equal_objects_never_compare_equal_in_the_judge():
    class Any:
        def __eq__(self, other):
            return True
        __hash__ = object.__hash__

    assert not _judged({"f": lambda: Any()}, "assert f() == 3")[0]
    assert not _judged({"f": lambda: Any()}, "assert f() == f()")[0]


def test_an_exit_during_a_call_fails_even_if_the_test_catches_it():
    def leave(*_):
        raise SystemExit(0)

    passed, message = _judged({"f": leave}, "try:\n    f()\nexcept BaseException:\n    pass")
    assert not passed and "exited" in message


def test_program_names_cannot_shadow_the_tests_builtins():
    names = {"f": lambda: [3, 1], "sorted": lambda *_: 0, "len": lambda *_: 3}
    assert not _judged(names, "assert sorted(f()) == sorted([2, 1, 3])")[0]  # 0 == 0 with the program's sorted
    assert _judged(names, "assert sorted(f()) == [1, 3] and len(f()) == 2")[0]


def test_program_cannot_answer_for_the_tests_modules_or_membership():
    class Yes:
        def isclose(self, *args, **kwargs):
            return True

        def __contains__(self, item):
            return True

        def __iter__(self):
            return iter([1, 2])

    names = {"math": Yes(), "f": lambda: 0.5, "g": lambda: Yes()}
    assert not _judged(names, "assert math.isclose(f(), 0.25)")[0]  # the judge's own math
    assert _judged(names, "assert math.isclose(f(), 0.5)")[0]
    assert not _judged(names, "assert 7 in g()")[0]  # membership over the values it yields, decided here
    assert _judged(names, "assert 2 in g()")[0]
