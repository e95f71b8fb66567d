"""One sandbox container and its pre-started zygote, seen from the host (paper 2.6.4).

A container is a long-lived bubblewrap process whose only child, pid 1 inside, is the zygote: new
user, pid, network, mount, ipc, uts and cgroup namespaces; a read-only root with only ``/usr`` from
the host (``/lib``, ``/bin`` as symlinks into it; no ``/etc``, no home directories, no host ``/tmp``);
read-only ``/dev``; a small ``/job`` directory for the program's source and binary; an empty
environment. When the host runs as root, the container runs as ``nobody``. Inside it,
``k15sys.sandbox.zygote`` waits for jobs and forks one nested sandbox per execution. The host talks
to it over two pipes (4-byte length + JSON, never pickle) and kills the whole container when it does
not answer in time. Where the host may create cgroups, the container also runs in its own cgroups,
nested under the caller's, with a 1-CPU, memory-limited group for the running execution
(``k15sys.sandbox.cgroup``).
"""
from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from k15sys.sandbox.cgroup import Cgroup, tree

NOBODY = 65534
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_MAX_REPLY = 256 << 20
_JUDGE_MODULE = "k15sys_sandbox_judge"  # the name zygote.py imports the judge by inside the container
_ZYGOTE_SOURCE = (
    f"import sys as _sys, types as _types\n_m = _types.ModuleType({_JUDGE_MODULE!r})\n"
    f"exec(compile({Path(__file__).with_name('judge.py').read_text()!r}, 'judge.py', 'exec'), _m.__dict__)\n"
    f"_sys.modules[{_JUDGE_MODULE!r}] = _m\ndel _m, _sys, _types\n"
    + Path(__file__).with_name("zygote.py").read_text()
)
_serial = itertools.count()


class SandboxUnavailable(RuntimeError):
    """The container could not start or stopped answering (reported as SANDBOX_ERROR)."""


def bwrap_path() -> str | None:
    """Path of bubblewrap, or None when it is not installed."""
    return shutil.which("bwrap") or ("/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else None)


def container_command(python: str, config: dict[str, Any]) -> list[str]:
    """The bubblewrap command line of one container running the zygote with interpreter ``python``
    (``config``: the zygote's settings, e.g. its request size limit and cgroup descriptors)."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxUnavailable("bwrap (bubblewrap) is not installed; run scripts/install.sh as root")
    return [
        bwrap, "--unshare-all", "--new-session", "--as-pid-1",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--tmpfs", "/tmp", "--tmpfs", "/job", "--remount-ro", "/",
        "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "TMPDIR", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--", python, "-I", "-c", _ZYGOTE_SOURCE, json.dumps(config),
    ]


class Container:
    """A running container with its zygote. Not thread-safe: one job at a time (the pool ensures it).

    With ``cgroup_limits`` = (memory bytes, max processes) it runs in its own cgroups (best effort, see
    ``k15sys.sandbox.cgroup``); ``cgroup_error`` says why not otherwise."""

    def __init__(self, python: str = "/usr/bin/python3", start_timeout_s: float = 30.0,
                 cgroup_limits: tuple[int, int] | None = None, max_request_bytes: int = 64 << 20) -> None:
        self.cgroup: Cgroup | None = None
        self.cgroup_error: str | None = None
        self._log = tempfile.TemporaryFile()
        exec_fds: dict[str, Any] = {}
        if cgroup_limits is not None:
            try:
                self.cgroup = Cgroup.create(f"{os.getpid()}-{next(_serial)}", *cgroup_limits)
                exec_fds = self.cgroup.open_exec_fds()
            except OSError as e:
                self.cgroup_error = f"no cgroup ({type(e).__name__}: {e}); rlimits only"
                if self.cgroup is not None:
                    self.cgroup.remove()
                self.cgroup = None
        passed = [fd for v in exec_fds.values() for fd in (v if isinstance(v, list) else [v])]
        config = {"max_request": max_request_bytes, "cgroup": exec_fds or None}
        root = os.getuid() == 0
        try:
            self.proc = subprocess.Popen(
                container_command(python, config), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                start_new_session=True, close_fds=True, pass_fds=passed,
                user=NOBODY if root else None, group=NOBODY if root else None, extra_groups=[] if root else None,
            )
        finally:
            for fd in passed:
                os.close(fd)
        hello = self._receive(time.monotonic() + start_timeout_s)
        if not hello.get("ready"):
            self.kill()
            raise SandboxUnavailable(f"the zygote did not start: {hello!r:.300}")
        self.python_version = str(hello.get("python"))
        if self.cgroup is not None:
            try:  # bubblewrap, its init, the zygote and the template: nothing else exists yet
                for pid in tree(self.proc.pid):
                    self.cgroup.add(pid)
            except OSError as e:
                self.kill()
                raise SandboxUnavailable(f"cannot move the container into its cgroup: {e}") from e

    def oom_kills(self) -> int:
        """OOM kills in this container's cgroup so far (0 without a cgroup)."""
        return self.cgroup.oom_kills() if self.cgroup is not None else 0

    def request(self, data: bytes, timeout_s: float) -> dict[str, Any]:
        """Send one encoded job; wait at most ``timeout_s`` for the answer, else kill the container and raise."""
        try:
            self.proc.stdin.write(struct.pack(">I", len(data)))  # type: ignore[union-attr]
            self.proc.stdin.write(data)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError as e:
            self.kill()
            raise SandboxUnavailable(f"the container is gone: {e}; {self.log_tail()}") from e
        return self._receive(time.monotonic() + timeout_s)

    def _receive(self, deadline: float) -> dict[str, Any]:
        try:
            head = self._read_exact(4, deadline)
            size = struct.unpack(">I", head)[0]
            if size > _MAX_REPLY:
                raise SandboxUnavailable(f"reply of {size} bytes")
            return json.loads(self._read_exact(size, deadline))
        except (SandboxUnavailable, ValueError, OSError) as e:
            self.kill()
            raise SandboxUnavailable(f"{e}; {self.log_tail()}") from e

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SandboxUnavailable("the container did not answer in time")
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise SandboxUnavailable("the container exited")
            buf += chunk
        return bytes(buf)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            self._log.seek(0)
            return "container log: " + self._log.read()[-800:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def close(self, grace_s: float = 2.0) -> None:
        """Close the job pipe (the zygote exits on end of input), then kill whatever is left."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=grace_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        """Kill the container (bubblewrap, the zygote, any execution) and reap it.

        The zygote is pid 1 of the container: killing it makes the kernel kill everything in its pid
        namespace, and bubblewrap reaps it and exits. The cgroup, where there is one, is emptied and
        removed."""
        if self.proc.poll() is None:
            for pid in tree(self.proc.pid)[1:2]:  # bubblewrap's only child: the zygote
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        if self.cgroup is not None:
            deadline = time.monotonic() + 5.0  # the kernel tears the pid namespace down asynchronously
            while time.monotonic() < deadline:
                left = self.cgroup.pids()
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                time.sleep(0.01)
            self.cgroup.remove()
            self.cgroup = None
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self._log.close()
