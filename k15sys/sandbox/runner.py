"""Running untrusted programs: the supervisor, languages and the worker pool (paper 2.6.4).

``Sandbox.run`` executes one program (compiling it first for C++) in a fresh container
(``k15sys.sandbox.isolation``) and always returns a :class:`RunResult` with a :class:`Status`; it never
raises on anything the program does. Containers are launched by a pool of pre-started worker
processes; each worker is a child subreaper, so every process a container leaves behind (bubblewrap's
own init included) is re-parented to it and reaped there, never left as a zombie on the host, and the
caller's process is not touched. ``Sandbox.run_batch`` spreads many executions over the pool.
"""
from __future__ import annotations

import multiprocessing
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from k15sys.sandbox.isolation import NOBODY, container_command, limit_and_drop
from k15sys.sandbox.limits import Limits, Status

LANGUAGES = ("python", "cpp")
_MEMORY_MARKERS = (b"MemoryError", b"std::bad_alloc", b"Cannot allocate memory", b"out of memory")


@dataclass
class RunResult:
    """Outcome of one execution. ``stdout``/``stderr`` are decoded as UTF-8 with replacement
    (``stdout_bytes`` keeps the raw bytes); ``exit_code`` is negative for a signal."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    wall_s: float = 0.0
    stdout_bytes: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RunRequest:
    program: str
    language: str = "python"
    stdin: str = ""
    limits: Limits | None = None


def _supervise(argv: list[str], scratch: str, stdin: bytes, limits: Limits) -> tuple[Status | None, bytes, bytes, int | None, float]:
    """Run ``argv`` in a container; enforce wall time and output size. Returns (status or None, out, err, code, s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        container_command(argv, scratch),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=limit_and_drop(limits), start_new_session=True, close_fds=True,
    )
    status: Status | None = None
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}  # type: ignore[union-attr]
    total = 0
    sel = selectors.DefaultSelector()
    try:
        try:
            proc.stdin.write(stdin)  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            pass
        proc.stdin.close()  # type: ignore[union-attr]
        for f in (proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)  # type: ignore[union-attr]
            sel.register(f, selectors.EVENT_READ)  # type: ignore[arg-type]
        deadline = t0 + limits.wall_s
        while sel.get_map():
            left = deadline - time.perf_counter()
            if left <= 0:
                status = Status.TIMEOUT
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                total += len(data)
            if total > limits.output_bytes:
                status = Status.OUTPUT_LIMIT
                break
        if status is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                status = Status.TIMEOUT
    finally:
        sel.close()
        if proc.poll() is None:
            _kill_container(proc)
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()  # type: ignore[union-attr]
    out = b"".join(chunks[next(iter(chunks))])
    err = b"".join(list(chunks.values())[1])
    return status, out[: limits.output_bytes], err[: limits.output_bytes], proc.returncode, time.perf_counter() - t0


def _kill_container(proc: subprocess.Popen) -> None:
    """Kill the container's init first (the kernel then kills everything in its pid namespace and the
    outer bubblewrap reaps it), then the whole session if anything is still there."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            inner = [int(p) for p in f.read().split()]
    except OSError:
        inner = []
    for pid in inner:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_of(code: int | None) -> int | None:
    """The signal that ended the program: bubblewrap reports a child killed by signal s as 128 + s."""
    if code is None:
        return None
    if code < 0:
        return -code
    return code - 128 if code > 128 else None


def _classify(status: Status | None, err: bytes, code: int | None) -> Status:
    if status is not None:
        return status
    if code == 0:
        return Status.OK
    if _signal_of(code) == signal.SIGXCPU:
        return Status.TIMEOUT
    if any(m in err for m in _MEMORY_MARKERS):
        return Status.MEMORY
    return Status.RUNTIME_ERROR


def _become_subreaper() -> None:
    """Pool-worker initializer: orphans of the containers we start are re-parented to this process."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_orphans(grace_s: float = 2.0) -> None:
    """Reap every child of this worker. After an execution its only children are the container's
    remnants, which die with the pid namespace: wait (briefly) until none is left."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)


def _execute(program: str, language: str, stdin: str, lim: Limits, compile_lim: Limits) -> RunResult:
    """Runs in a pool worker: one execution in a fresh container with its own scratch directory."""
    scratch = tempfile.mkdtemp(prefix="k15sbx-")
    try:
        if os.getuid() == 0:
            os.chown(scratch, NOBODY, NOBODY)
        os.chmod(scratch, 0o700)
        return _run_in(scratch, program, language, stdin, lim, compile_lim)
    except Exception as e:  # the sandbox itself failed (bwrap missing, fork refused...)
        return RunResult(Status.SANDBOX_ERROR, stderr=f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _reap_orphans()


def _run_in(scratch: str, program: str, language: str, stdin: str, lim: Limits, compile_lim: Limits) -> RunResult:
    if language == "python":
        _write_for_nobody(os.path.join(scratch, "main.py"), program)
        argv = ["/usr/bin/python3", "-I", "main.py"]
    else:
        _write_for_nobody(os.path.join(scratch, "main.cpp"), program)
        status, out, err, code, dt = _supervise(
            ["/usr/bin/g++", "-O2", "-std=c++17", "-pipe", "-o", "main", "main.cpp"], scratch, b"", compile_lim)
        if _classify(status, err, code) != Status.OK:  # any failure of the compiler, its limits included
            return RunResult(Status.COMPILE_ERROR, stderr=err.decode("utf-8", "replace"), exit_code=code, wall_s=dt)
        argv = ["./main"]
    status, out, err, code, dt = _supervise(argv, scratch, stdin.encode("utf-8", "replace"), lim)
    return RunResult(
        _classify(status, err, code),
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        exit_code=code,
        wall_s=dt,
        stdout_bytes=out,
    )


class Sandbox:
    """Secure execution of untrusted Python 3 / C++ programs.

    Args:
        limits: default :class:`Limits` of every execution.
        workers: pre-started worker processes (executions that can run at once).
        compile_limits: limits of the C++ compile step (defaults: 20 s wall, 2 GiB).
    """

    def __init__(self, limits: Limits | None = None, *, workers: int = 2, compile_limits: Limits | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers!r}")
        self.limits = limits or Limits()
        self.compile_limits = compile_limits or Limits(wall_s=20.0, cpu_s=20, memory_mb=2048, max_procs=64)
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = self._start_pool()

    def _start_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_become_subreaper)
        for f in [pool.submit(_reap_orphans) for _ in range(self.workers)]:  # start the workers now
            f.result()
        return pool

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, program: str, language: str, stdin: str, limits: Limits | None) -> Future | RunResult:
        lim = limits or self.limits
        if language not in LANGUAGES:
            return RunResult(Status.INVALID, stderr=f"language: unknown {language!r}; supported: {', '.join(LANGUAGES)}")
        if not isinstance(program, str) or not program.strip():
            return RunResult(Status.INVALID, stderr="program: empty")
        with self._lock:
            try:
                return self._pool.submit(_execute, program, language, stdin, lim, self.compile_limits)
            except BrokenProcessPool:  # a worker died: replace the pool, nothing queued is lost
                self._pool = self._start_pool()
                return self._pool.submit(_execute, program, language, stdin, lim, self.compile_limits)

    @staticmethod
    def _result(f: Future | RunResult) -> RunResult:
        if isinstance(f, RunResult):
            return f
        try:
            return f.result()
        except Exception as e:
            return RunResult(Status.SANDBOX_ERROR, stderr=f"{type(e).__name__}: {e}")

    def run(self, program: str, *, language: str = "python", stdin: str = "", limits: Limits | None = None) -> RunResult:
        """Execute ``program`` with ``stdin``; never raises for anything the program does."""
        return self._result(self._submit(program, language, stdin, limits))

    def run_batch(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        """Run many requests on the worker pool; results come back in request order."""
        futures = [self._submit(r.program, r.language, r.stdin, r.limits) for r in requests]
        return [self._result(f) for f in futures]


def _write_for_nobody(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", errors="replace") as f:
        f.write(text)
    if os.getuid() == 0:
        os.chown(path, NOBODY, NOBODY)
