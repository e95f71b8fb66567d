"""One sandbox container and its pre-started zygote, seen from the host (paper 2.6.4).

A container is a long-lived bubblewrap process whose only child, pid 1 inside, is the zygote: new
user, pid, network, mount, ipc, uts and cgroup namespaces; a read-only root with only ``/usr`` from
the host (``/lib``, ``/bin`` as symlinks into it; no ``/etc``, no home directories, no host ``/tmp``);
read-only ``/dev``; a small ``/job`` directory for the program's source and binary; an empty
environment. When the host runs as root, the container runs as ``nobody``. Inside it,
``k15sys.sandbox.zygote`` waits for jobs and forks one nested sandbox per execution. The host talks
to it over two pipes (4-byte length + JSON, never pickle) and kills the whole container when it does
not answer in time. Where the host may create cgroups, the container also runs in its own memory +
pids cgroup (``k15sys.sandbox.cgroup``).
"""
from __future__ import annotations

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
_ZYGOTE_SOURCE = (Path(__file__).with_name("zygote.py")).read_text()


class SandboxUnavailable(RuntimeError):
    """The container could not start or stopped answering (reported as SANDBOX_ERROR)."""


def bwrap_path() -> str | None:
    """Path of bubblewrap, or None when it is not installed."""
    return shutil.which("bwrap") or ("/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else None)


def container_command(python: str) -> list[str]:
    """The bubblewrap command line of one container running the zygote with interpreter ``python``."""
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
        "--", python, "-I", "-c", _ZYGOTE_SOURCE,
    ]


class Container:
    """A running container with its zygote. Not thread-safe: one job at a time (the pool ensures it)."""

    def __init__(self, python: str = "/usr/bin/python3", start_timeout_s: float = 30.0,
                 cgroup_limits: tuple[int, int] | None = None) -> None:
        self.cgroup: Cgroup | None = None
        self.cgroup_error: str | None = None
        self._log = tempfile.TemporaryFile()
        root = os.getuid() == 0
        self.proc = subprocess.Popen(
            container_command(python), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, close_fds=True,
            user=NOBODY if root else None, group=NOBODY if root else None, extra_groups=[] if root else None,
        )
        hello = self._receive(time.monotonic() + start_timeout_s)
        if not hello.get("ready"):
            self.kill()
            raise SandboxUnavailable(f"the zygote did not start: {hello!r:.300}")
        self.python_version = str(hello.get("python"))
        if cgroup_limits is not None:
            self._enter_cgroup(*cgroup_limits)

    def _enter_cgroup(self, memory_bytes: int, pids_max: int) -> None:
        """Best effort: bubblewrap, its init and the zygote (nothing else exists yet) join a new cgroup."""
        try:
            self.cgroup = Cgroup.create(f"{os.getpid()}-{self.proc.pid}", memory_bytes, pids_max)
            for pid in tree(self.proc.pid):
                self.cgroup.add(pid)
        except OSError as e:
            self.cgroup_error = f"no cgroup ({type(e).__name__}: {e}); rlimits only"
            if self.cgroup is not None:
                self.kill()
                raise SandboxUnavailable(f"cannot move the container into its cgroup: {e}") from e

    def oom_kills(self) -> int:
        """OOM kills in this container's cgroup so far (0 without a cgroup)."""
        return self.cgroup.oom_kills() if self.cgroup is not None else 0

    def request(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one job; wait at most ``timeout_s`` for the answer, else kill the container and raise."""
        data = json.dumps(job).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(data)) + data)  # type: ignore[union-attr]
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
                left = [int(p) for p in (self.cgroup.dirs[0] / "cgroup.procs").read_text().split()]
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
