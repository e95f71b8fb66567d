"""The sandbox API: languages, the pool of pre-started containers, run statuses (paper 2.6.4).

``Sandbox(limits, workers=N)`` starts N containers (``k15sys.sandbox.isolation``), each with a zygote
that forks a fresh nested sandbox per execution, so an execution pays neither container nor
interpreter start-up. ``run`` executes one program on one input; ``run_tests`` runs one program on
many inputs (C++ compiled once); ``run_batch`` spreads many programs over the pool. Every call returns
:class:`RunResult` objects with a :class:`Status`; nothing a program does raises in the caller.

Verdicts come from what the sandbox observed, never from the program's output: exit status, limits
the zygote enforced, OOM kills and CPU time of the execution's cgroup, and for assert tests the
judge's verdict carrying this run's secret token (docs/sandbox.md, threat model).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import queue
import secrets
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from k15sys.sandbox.isolation import Container, SandboxUnavailable
from k15sys.sandbox.limits import Limits, Status

Checker = Callable[[str, str, str], bool]  # (stdin, expected, actual stdout) -> accepted
# argv of the compile step and of the run step, per language ("python" = the zygote's interpreter).
LANGUAGES: dict[str, dict[str, list[str] | None]] = {
    "python": {"compile": None, "run": ["python"]},
    "cpp": {"compile": ["/usr/bin/g++", "-O2", "-std=c++17", "-pipe", "-o", "/job/main", "/job/main.cpp"],
            "run": ["/job/main"]},
}


@dataclass(frozen=True)
class TestCase:
    """One execution of a program: its stdin, the expected stdout (None: do not compare), and for
    Python a ``suffix``: assert-test code, run after the program's top level by the sandbox's judge
    (another process) against the program's names; it passes only if it runs to completion."""

    __test__ = False  # not a pytest test class

    stdin: str = ""
    expected: str | None = None
    suffix: str = ""


@dataclass(frozen=True)
class RunRequest:
    """One program with its tests, for :meth:`Sandbox.run_batch`."""

    program: str
    language: str = "python"
    tests: tuple[TestCase, ...] = (TestCase(),)
    limits: Limits | None = None


@dataclass
class RunResult:
    """Outcome of one execution. ``stdout``/``stderr`` are decoded as UTF-8 with replacement
    (``stdout_bytes`` keeps the raw bytes); ``exit_code`` is negative for a signal; ``cpu_s`` is the
    CPU time of the whole execution (every process, from its cgroup; without one, the waited-for
    processes only)."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    wall_s: float = 0.0
    stdout_bytes: bytes = field(default=b"", repr=False)
    cpu_s: float = 0.0


def outputs_match(actual: str, expected: str) -> bool:
    """Whitespace-tolerant comparison: the same tokens in the same order."""
    return actual.split() == expected.split()


def classify(fact: dict[str, Any]) -> Status:
    """The status of one execution from what the sandbox observed: the limit the zygote enforced,
    OOM kills in the execution's cgroup (``oom_kills``), CPU time over the limit (``cpu_over``), the
    exit status, and for an assert test (``token`` set) the judge's verdict carrying that token.
    Nothing the program prints is read. An OOM kill wins over a limit hit afterwards (the processes left
    may then time out)."""
    if fact.get("oom_kills"):
        return Status.MEMORY
    if fact.get("limit") in ("timeout", "cpu"):
        return Status.TIMEOUT
    if fact.get("limit") == "output":
        return Status.OUTPUT_LIMIT
    code = fact.get("exit_code")
    if code is None:
        return Status.SANDBOX_ERROR
    if fact.get("cpu_over", False):
        return Status.TIMEOUT  # RLIMIT_CPU (SIGXCPU, SIGKILL) after the CPU time was really spent
    if code != 0:
        return Status.RUNTIME_ERROR
    if fact.get("token") is not None:
        verdict = fact.get("verdict")
        passed = isinstance(verdict, dict) and verdict.get("passed") is True and verdict.get("token") == fact["token"]
        return Status.OK if passed else Status.RUNTIME_ERROR
    return Status.OK


def _cpu_over(fact: dict[str, Any], limits: Limits) -> bool:
    """The execution spent its CPU time (within the accounting's granularity: a process's RLIMIT_CPU
    and its cgroup's counter differ by a tick or two)."""
    return float(fact.get("cpu_s", 0.0)) >= 0.95 * limits.cpu_s


def _decoded(fact: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(fact.get(key) or "", validate=True)
    except (binascii.Error, ValueError):
        return b""


def _result(fact: dict[str, Any], status: Status | None = None) -> RunResult:
    out = _decoded(fact, "stdout_b64")
    err = _decoded(fact, "stderr_b64").decode("utf-8", "replace") or (fact.get("error") or "")
    verdict = fact.get("verdict")
    if fact.get("token") is not None and isinstance(verdict, dict) and verdict.get("message"):
        err += ("\n" if err else "") + "test failed (judge): " + str(verdict["message"])
    return RunResult(
        status=status or classify(fact),
        stdout=out.decode("utf-8", "replace"),
        stderr=err,
        exit_code=fact.get("exit_code"),
        wall_s=float(fact.get("wall_s", 0.0)),
        stdout_bytes=out,
        cpu_s=float(fact.get("cpu_s", 0.0)),
    )


def _judge(r: RunResult, test: TestCase, checker: Checker | None) -> RunResult:
    if r.status != Status.OK or test.expected is None:
        return r
    try:
        ok = checker(test.stdin, test.expected, r.stdout) if checker else outputs_match(r.stdout, test.expected)
    except Exception as e:  # a faulty checker fails the test, it does not crash the caller
        r.stderr += f"\nchecker raised {type(e).__name__}: {e}"
        ok = False
    if not ok:
        r.status = Status.WRONG_ANSWER
    return r


class Sandbox:
    """Secure execution of untrusted Python 3 / C++ programs on a pool of pre-started containers.

    Args:
        limits: default :class:`Limits` of every execution.
        workers: containers started up front (executions that can run at once).
        compile_limits: limits of the C++ compile step (default: 20 s wall, 2 GiB, 256 MiB scratch).
        python: interpreter inside the container, a path under /usr (default: /usr/bin/python3, else
            /usr/local/bin/python3).
        cgroup: put each container in its own memory + pids cgroup when the host allows it (root);
            ``cgroup_error`` says why not otherwise; ``cgroup_note`` says when they could not be nested
            under the caller's cgroup (cgroup v2, a caller's cgroup holding processes).
        container_memory_mb: memory of one container, all its processes together (default: twice the
            largest limit of ``limits`` / ``compile_limits`` + 256 MiB; raise it if calls pass larger
            ``limits``).
        max_request_bytes: largest job sent to a container (program + stdins + tests, encoded); a larger
            one is ``INVALID`` without reaching it.
    """

    def __init__(self, limits: Limits | None = None, *, workers: int = 2, compile_limits: Limits | None = None,
                 python: str | None = None, cgroup: bool = True, container_memory_mb: int | None = None,
                 max_request_bytes: int = 64 << 20) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be an int >= 1, got {workers!r}")
        if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes: must be an int >= 1024, got {max_request_bytes!r}")
        python = python or next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)),
                                "/usr/bin/python3")
        if not python.startswith("/usr/"):
            raise ValueError(f"python: must be an interpreter under /usr (the container's view), got {python!r}")
        self.limits = limits or Limits()
        self.compile_limits = compile_limits or Limits(wall_s=20.0, cpu_s=20, memory_mb=2048, file_size_mb=64,
                                                       scratch_mb=256)
        self.workers = workers
        self.python = python
        self.use_cgroup = cgroup
        self.container_memory_mb = container_memory_mb
        self.max_request_bytes = max_request_bytes
        self.cgroup_error: str | None = None
        self.cgroup_note: str | None = None
        self._idle: queue.Queue[Container | None] = queue.Queue()
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="k15-sandbox")
        self._containers: list[Container] = []
        self._closed = False
        self.start_error: str | None = None
        for c in self._threads.map(lambda _: self._start_container(), range(workers)):
            self._idle.put(c)
        self._finalizer = weakref.finalize(self, Sandbox._shutdown, self._containers, self._threads)

    def _start_container(self) -> Container | None:
        biggest = max((self.limits, self.compile_limits), key=lambda lim: lim.memory_mb)
        memory = (self.container_memory_mb or 2 * biggest.memory_mb + 256) << 20
        pids = 2 * max(self.limits.max_procs, self.compile_limits.max_procs) + 16
        try:
            c = Container(self.python, cgroup_limits=(memory, pids) if self.use_cgroup else None,
                          max_request_bytes=self.max_request_bytes)
        except (SandboxUnavailable, OSError) as e:
            self.start_error = f"{type(e).__name__}: {e}"
            return None
        self.cgroup_error = c.cgroup_error
        self.cgroup_note = c.cgroup.note if c.cgroup is not None else None
        self._containers.append(c)
        return c

    @staticmethod
    def _shutdown(containers: list[Container], threads: ThreadPoolExecutor) -> None:
        threads.shutdown(wait=False, cancel_futures=True)
        for c in list(containers):
            c.close()
        containers.clear()

    def close(self) -> None:
        """Stop every container (nothing is left running)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _job(self, program: str, language: str, tests: Sequence[TestCase], tokens: Sequence[str | None],
             limits: Limits) -> dict[str, Any]:
        spec = LANGUAGES[language]
        return {
            "language": language, "program": program, "compile": spec["compile"], "argv": spec["run"],
            "limits": asdict(limits), "compile_limits": asdict(self.compile_limits),
            "runs": [{"stdin_b64": base64.b64encode(t.stdin.encode("utf-8", "replace")).decode("ascii"),
                      "test": t.suffix if token else None, "token": token} for t, token in zip(tests, tokens)],
        }

    def _execute(self, program: str, language: str, tests: Sequence[TestCase], limits: Limits | None,
                 checker: Checker | None) -> list[RunResult]:
        def every(status: Status, why: str) -> list[RunResult]:
            return [RunResult(status, stderr=why) for _ in tests]

        lim = limits or self.limits
        if not isinstance(language, str) or language not in LANGUAGES:
            return every(Status.INVALID, f"language: unknown {language!r}; supported: {', '.join(LANGUAGES)}")
        if not isinstance(program, str) or not program.strip():
            return every(Status.INVALID, "program: empty")
        if language != "python" and any(t.suffix for t in tests):
            return every(Status.INVALID, f"tests: assert tests (suffix) need language='python', got {language!r}")
        size = len(program) + sum(len(t.stdin) + len(t.suffix) for t in tests)
        if size > self.max_request_bytes:
            return every(Status.INVALID, f"request: {size} characters of program and tests, over "
                                         f"max_request_bytes={self.max_request_bytes}")
        if self._closed:
            return every(Status.SANDBOX_ERROR, "the sandbox is closed")
        compiler = LANGUAGES[language]["compile"]
        if compiler and not os.path.exists(compiler[0]):
            return every(Status.SANDBOX_ERROR, f"{compiler[0]} is not installed (scripts/debian-packages.txt)")
        tokens = [secrets.token_hex(16) if t.suffix.strip() else None for t in tests]
        data = json.dumps(self._job(program, language, tests, tokens, lim)).encode()
        if len(data) > self.max_request_bytes:
            return every(Status.INVALID, f"request: {len(data)} bytes encoded, over "
                                         f"max_request_bytes={self.max_request_bytes}")
        container = self._idle.get()
        try:
            if container is None or not container.alive():
                if container is not None:
                    self._forget(container)
                container = self._start_container()
                if container is None:
                    return every(Status.SANDBOX_ERROR, f"the sandbox cannot start: {self.start_error}")
            compile_s = self.compile_limits.wall_s if compiler else 0.0
            budget = compile_s + len(tests) * (lim.wall_s + 1.0) + 10.0
            try:
                reply = container.request(data, budget)
            except SandboxUnavailable as e:
                self._forget(container)
                container = None
                return every(Status.SANDBOX_ERROR, str(e))
            if reply.get("closing"):  # its zygote can fork no more executions: a new one next time
                self._forget(container)
                container = None
        finally:
            self._idle.put(container)
        del data
        if "error" in reply:
            return every(Status.SANDBOX_ERROR, str(reply["error"]))
        facts = list(reply.get("results", []))
        if compiler:
            compiled = facts.pop(0)
            compiled["cpu_over"] = _cpu_over(compiled, self.compile_limits)
            if classify(compiled) != Status.OK:
                r = _result(compiled, Status.COMPILE_ERROR)
                return [RunResult(Status.COMPILE_ERROR, stderr=r.stderr, exit_code=r.exit_code, wall_s=r.wall_s)
                        for _ in tests]
        if len(facts) != len(tests):
            return every(Status.SANDBOX_ERROR, f"the container answered {len(facts)} results for {len(tests)} tests")
        for fact, token in zip(facts, tokens):
            fact["token"] = token  # the parent's copy: the verdict must carry it
            fact["cpu_over"] = _cpu_over(fact, lim)
        return [_judge(_result(f), t, checker) for f, t in zip(facts, tests)]

    def _forget(self, container: Container) -> None:
        container.kill()
        if container in self._containers:
            self._containers.remove(container)

    def run(self, program: str, *, language: str = "python", stdin: str = "", expected: str | None = None,
            limits: Limits | None = None, checker: Checker | None = None) -> RunResult:
        """Execute ``program`` once on ``stdin``; with ``expected``, a wrong output is WRONG_ANSWER."""
        if not isinstance(stdin, str):
            raise ValueError(f"stdin: must be a str, got {type(stdin).__name__}")
        if expected is not None and not isinstance(expected, str):
            raise ValueError(f"expected: must be a str or None, got {type(expected).__name__}")
        return self._execute(program, language, [TestCase(stdin, expected)], limits, checker)[0]

    def run_tests(self, program: str, tests: Sequence[TestCase], *, language: str = "python",
                  limits: Limits | None = None, checker: Checker | None = None) -> list[RunResult]:
        """Execute ``program`` once per test (one compile for C++); one :class:`RunResult` per test."""
        return self._execute(program, language, _checked_tests(tests, "tests"), limits, checker)

    def run_batch(self, requests: Sequence[RunRequest], *, checker: Checker | None = None) -> list[list[RunResult]]:
        """Run many programs on the pool at once; results in request order, one list per request."""
        tests = [_checked_tests(r.tests, f"requests[{i}].tests") for i, r in enumerate(requests)]
        futures = [self._threads.submit(self._execute, r.program, r.language, t, r.limits, checker)
                   for r, t in zip(requests, tests)]
        return [f.result() for f in futures]


def _checked_tests(tests: Sequence[TestCase], name: str) -> list[TestCase]:
    tests = list(tests)
    if not tests:
        raise ValueError(f"{name}: empty")
    for i, t in enumerate(tests):
        if not (isinstance(t, TestCase) and isinstance(t.stdin, str) and isinstance(t.suffix, str)
                and (t.expected is None or isinstance(t.expected, str))):
            raise ValueError(f"{name}[{i}]: expected a TestCase of str fields, got {t!r:.80}")
    return tests
