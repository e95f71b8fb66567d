"""The isolation layer: bubblewrap namespaces + rlimits + an unprivileged user (paper 2.6.4).

Every execution runs in a fresh bubblewrap container: new user, pid, network, mount, ipc, uts and
cgroup namespaces; a read-only view of ``/usr`` only (no ``/etc``, no home directories, no host
``/tmp``); a private writable scratch directory mounted at ``/work``; an empty environment; the
unprivileged uid ``nobody`` outside the namespace, so RLIMIT_NPROC bounds processes. The supervisor
starts bubblewrap in a new session, so a timeout kills the whole tree, and the pid namespace makes
the kernel kill anything left (daemons, zombies) when the container's init exits.
"""
from __future__ import annotations

import os
import resource
import shutil
from collections.abc import Callable, Sequence

from k15sys.sandbox.limits import Limits

NOBODY = 65534
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def container_command(argv: Sequence[str], scratch: str) -> list[str]:
    """The bubblewrap command line that runs ``argv`` inside a container with ``scratch`` at /work."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise FileNotFoundError("bwrap (bubblewrap) is not installed; run scripts/install.sh as root")
    cmd = [
        bwrap, "--unshare-all", "--die-with-parent",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--bind", scratch, "/work", "--chdir", "/work",
        "--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/work",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--",
    ]
    return cmd + list(argv)


def limit_and_drop(limits: Limits) -> Callable[[], None]:
    """A ``preexec_fn``: set the rlimits, then become ``nobody`` (only when started as root)."""

    def apply() -> None:
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb, limits.file_size_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_procs, limits.max_procs))

    return apply
