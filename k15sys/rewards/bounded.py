"""Calls that a timeout really stops: a function run in a worker process that is killed on timeout.

math-verify bounds sympy with ``signal.alarm``, which works only on the main thread and cannot interrupt
C code (a huge integer power, a factorisation): such a call can hang its caller for minutes. Here the
function runs in a separate worker process (``python -c``, so the caller's ``__main__`` is never
re-imported); past the deadline the worker is SIGKILLed and replaced and the caller gets a default
value. Arguments and results travel as JSON lines. Used by the math reward (paper 2.3.5); thread-safe.
"""
from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any


def serve(module: str, name: str) -> None:
    """Worker side: answer JSON lines ``[args...]`` with ``["ok", result]`` or ``["error", message]``."""
    fn = getattr(importlib.import_module(module), name)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of the function must not corrupt the protocol
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        try:
            reply = ["ok", fn(*json.loads(line))]
        except Exception as e:  # the function's own error travels back; the worker goes on
            reply = ["error", f"{type(e).__name__}: {e}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class BoundedCall:
    """``BoundedCall("pkg.mod", "fn")(*args, timeout_s=2, default=False)`` runs ``pkg.mod.fn(*args)`` in a
    worker process and returns its result, or ``default`` on timeout or error. Calls are serialised;
    the worker starts on first use (within ``start_timeout_s``, which covers heavy imports)."""

    def __init__(self, module: str, name: str, *, start_timeout_s: float = 120.0) -> None:
        self.module, self.name, self.start_timeout_s = module, name, start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.timeouts = 0

    def _readline(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _start(self) -> None:
        code = f"from k15sys.rewards.bounded import serve; serve({self.module!r}, {self.name!r})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, close_fds=True)
        self._buf = b""
        if self._readline(time.monotonic() + self.start_timeout_s) != b'"ready"':
            self._stop()
            raise RuntimeError(f"the worker for {self.module}.{self.name} did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()  # type: ignore[union-attr]
        self._proc = None

    def __call__(self, *args: Any, timeout_s: float, default: Any = None) -> Any:
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                self._proc.stdin.write(json.dumps(args).encode() + b"\n")  # type: ignore[union-attr]
                self._proc.stdin.flush()  # type: ignore[union-attr]
                line = self._readline(time.monotonic() + timeout_s)
                if line is None:
                    self.timeouts += 1
                    self._stop()
                    return default
                kind, value = json.loads(line)
            except (OSError, ValueError, RuntimeError):
                self._stop()
                return default
            return value if kind == "ok" else default

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        with self._lock:
            self._stop()
