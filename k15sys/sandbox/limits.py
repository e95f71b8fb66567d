"""Resource limits and run statuses of the code sandbox (paper 2.6.4)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    """How one sandboxed execution ended."""

    OK = "OK"                        # exit code 0 within every limit, the expected output if given, and for an
    #                                  assert test the judge's verdict (with this run's token) that it held
    WRONG_ANSWER = "WRONG_ANSWER"    # ran fine, but the output is not the expected one
    RUNTIME_ERROR = "RUNTIME_ERROR"  # non-zero exit or killed by a signal
    TIMEOUT = "TIMEOUT"              # wall-clock or CPU-time limit (CPU time really spent, not a self-sent SIGXCPU)
    MEMORY = "MEMORY"                # an OOM kill in the execution's cgroup (needs cgroups; never read from output)
    OUTPUT_LIMIT = "OUTPUT_LIMIT"    # stdout + stderr exceeded the cap
    COMPILE_ERROR = "COMPILE_ERROR"  # the compile step failed (C++)
    INVALID = "INVALID"              # bad request: unknown language, empty program
    SANDBOX_ERROR = "SANDBOX_ERROR"  # the sandbox itself could not run the program


@dataclass(frozen=True)
class Limits:
    """Per-execution limits; each is enforced by the kernel (cgroups, rlimits, tmpfs size) or by the zygote.

    Attributes:
        wall_s: wall-clock limit; the whole process tree is killed when it passes.
        cpu_s: CPU-time limit of the whole execution, every process together (its cgroup's CPU time, read
            by the zygote; RLIMIT_CPU per process as well). Each execution gets at most one core.
        memory_mb: memory of the whole execution, every process together (its cgroup's limit; an OOM kill
            there is MEMORY); RLIMIT_AS is twice this per process. Without cgroups: RLIMIT_AS = this, per
            process.
        max_procs: processes/threads of one execution (RLIMIT_NPROC, counted in the execution's own user
            namespace, so concurrent executions do not share it): stops fork bombs.
        file_size_mb: largest file the program may write (RLIMIT_FSIZE).
        open_files: file descriptors (RLIMIT_NOFILE).
        output_bytes: stdout + stderr kept; more ends the run with OUTPUT_LIMIT.
        scratch_mb: size of the private writable tmpfs (/tmp, the working directory; also /dev/shm).
    """

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 1024
    max_procs: int = 64
    file_size_mb: int = 16
    open_files: int = 64
    output_bytes: int = 1 << 20
    scratch_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_procs", "file_size_mb", "open_files", "output_bytes",
                     "scratch_mb"):
            value = getattr(self, name)
            kinds = (int, float) if name == "wall_s" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
                raise ValueError(f"{name}: must be a positive {'number' if name == 'wall_s' else 'int'}, got {value!r}")
