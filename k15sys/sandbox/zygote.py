"""The zygote: a pre-started Python process inside each sandbox container (paper 2.6.4).

Runs as ``python3 -I -c <this source>``, pid 1 of a bubblewrap container (standard library only: it
never imports k15sys). It reads jobs from fd 0 and answers on fd 1 (4-byte big-endian length + JSON).
A job is one program (``language``, ``program``) and a list of runs (``stdin``, ``suffix`` appended to
a Python program, e.g. assert tests); C++ is compiled once first.

Every step runs in a fresh nested sandbox, prepared ahead of time, so nothing survives from one
execution to the next:

    zygote (pid 1 of the container, subreaper, not dumpable)
      └─ A: setsid; unshare(user, pid, mount, ipc); maps its own uid; forks B, reports B's pid, exits
         └─ B: pid 1 of the new pid namespace; mounts a fresh /proc; waits for the step; then a sized
            │  tmpfs on /tmp and /dev/shm, /job (source, binary) re-bound read-only for runs
            └─ C: drops every capability, sets rlimits, stdin/stdout/stderr, cwd /tmp; then executes
               the Python program in this pre-initialised interpreter (no interpreter start-up) or
               execve's the compiled binary / the compiler. B reports C's wait status on a pipe.

The zygote enforces wall time and output size and kills B at the limit: the kernel then kills every
process in B's pid namespace (daemons, zombies, threads). Programs cannot see or signal the zygote
(separate pid namespace, own session), cannot open its or B's descriptors through /proc (not
dumpable, no capabilities), and inherit none of their descriptors.
"""
import ctypes
import gc
import json
import os
import select
import signal
import struct
import sys
import time

LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x20000, 0x08000000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 36, 38
# Modules many programs import, loaded once here so a run does not pay for them.
PRELOAD = ("collections", "itertools", "functools", "math", "re", "heapq", "bisect", "string", "typing",
           "random", "fractions", "decimal", "threading", "traceback", "io", "atexit", "builtins", "types",
           "resource")
JOB_DIR = "/job"


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(LIBC.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount " + dst)


def _drop_capabilities():
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all zero
    _check(LIBC.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
    _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _set_limits(lim):
    import resource

    mib = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                       (resource.RLIMIT_AS, (lim["memory_mb"] * mib,) * 2),
                       (resource.RLIMIT_FSIZE, (lim["file_size_mb"] * mib,) * 2),
                       (resource.RLIMIT_NOFILE, (lim["open_files"],) * 2),
                       (resource.RLIMIT_NPROC, (lim["max_procs"],) * 2),
                       (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(res, value)


def _exit_code_of(exc):
    """Python's own rule for ``SystemExit(code)``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(str(code) + "\n")
    except Exception:
        pass
    return 1


def _run_python(path):
    """In C: run the program as ``__main__`` the way ``python3 path`` would, then exit the process."""
    import atexit
    import io
    import threading
    import traceback
    import types

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                                   encoding="utf-8")
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                                   encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.argv = [path]
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    code = 0
    try:
        with open(path, "rb") as f:
            source = f.read()
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit as e:
        code = _exit_code_of(e)
    except BaseException as e:  # the program's error: print its traceback without this frame
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        code = 1
    try:
        threading._shutdown()  # join non-daemon threads, as interpreter exit does
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_code_of(e)
    except BaseException:
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120
    os._exit(code)


def _child(step, fds):
    """C: the program itself. Never returns."""
    try:
        _drop_capabilities()
        _set_limits(step["limits"])
        stdin = os.open(os.path.join(JOB_DIR, "stdin"), os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(fds["out"], 1)
        os.dup2(fds["err"], 2)
        for fd in (0, 1, 2):
            os.set_inheritable(fd, True)
        os.closerange(3, 1 << 16)
        os.chdir("/tmp")
        if step["argv"] == ["python"]:
            _run_python(os.path.join(JOB_DIR, "main.py"))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execv(step["argv"][0], step["argv"])
    except BaseException as e:
        try:
            os.write(2, ("sandbox: cannot start the program: %r\n" % (e,)).encode())
        except BaseException:
            pass
    os._exit(127)


def _enter_namespaces():
    """In A: new user, pid, mount and ipc namespaces, with our own uid and gid mapped."""
    uid, gid = os.getuid(), os.getgid()
    _check(LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")  # else /proc/self/* is not ours
    with open("/proc/self/oom_score_adj", "w") as f:  # inherited: under memory pressure, programs die first
        f.write("1000")
    _check(LIBC.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)), ("gid_map", "%d %d 1" % (gid, gid))):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    # B inherits this: the program (C, without capabilities) cannot open B's descriptors through /proc
    _check(LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")


def _fresh_mounts(step):
    """In B, once the step is known: sized private tmpfs on /tmp and /dev/shm, /job read-only for runs."""
    scratch_kib = step["limits"]["scratch_mb"] * 1024
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dk,mode=0700" % scratch_kib)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=%dk,mode=0700" % scratch_kib)
    if not step["write_job"]:
        _mount(JOB_DIR, JOB_DIR, None, MS_BIND)
        _mount(None, JOB_DIR, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _read_all(fd):
    chunks = []
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _init(fds):
    """B: pid 1 of the execution's pid namespace, started ahead of time. Never returns."""
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        request = _read_all(fds["go"])  # blocks until the zygote has a step (or closes: no step)
        if not request:
            os._exit(0)
        step = json.loads(request)
        _fresh_mounts(step)
        c = os.fork()
        if c == 0:
            _child(step, fds)
        for fd in (fds["out"], fds["err"]):
            os.close(fd)
        while True:
            pid, status = os.wait()
            if pid == c:
                os.write(fds["status"], b"status %d\n" % status)
                break
    except BaseException as e:
        os.write(fds["status"], ("error init: %r\n" % (e,)).encode())
    os._exit(0)


def _launch(fds):
    """A: enter new namespaces, start B, report B's pid. Never returns."""
    try:
        os.closerange(0, 3)
        os.setsid()  # out of the zygote's session and process group: kill(0, ...) cannot reach it
        _enter_namespaces()
        b = os.fork()
        if b == 0:
            _init(fds)
        os.write(fds["status"], b"pid %d\n" % b)
    except BaseException as e:
        os.write(fds["status"], ("error setup: %r\n" % (e,)).encode())
    os._exit(0)


class Chain:
    """A nested sandbox prepared ahead of time: B waits in its namespaces for one step."""

    def __init__(self):
        go_r, self.go = os.pipe()
        self.out, out_w = os.pipe()
        self.err, err_w = os.pipe()
        self.status, st_w = os.pipe()
        a = os.fork()
        if a == 0:
            for fd in (self.go, self.out, self.err, self.status):
                os.close(fd)
            _launch({"go": go_r, "out": out_w, "err": err_w, "status": st_w})
        for fd in (go_r, out_w, err_w, st_w):
            os.close(fd)
        os.waitpid(a, 0)  # B is now our child (we are a subreaper)
        self.b, report = None, b""
        while b"\n" not in report:  # A wrote one line before it exited
            data = os.read(self.status, 4096)
            if not data:
                break
            report += data
        first, _, self.report = report.partition(b"\n")
        if first.startswith(b"pid "):
            self.b = int(first.split()[1])
        else:
            self.report = report

    def execute(self, step):
        """Run ``step`` in this chain (used up); returns the facts for the host."""
        lim = step["limits"]
        t0 = time.monotonic()
        try:
            os.write(self.go, json.dumps(step).encode())  # a few hundred bytes: one write
        except OSError:
            pass
        os.close(self.go)
        chunks = {self.out: [], self.err: [], self.status: [self.report]}
        total, limit_hit = 0, None
        deadline = t0 + lim["wall_s"]
        open_fds = [self.out, self.err, self.status] if self.b is not None else []
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                limit_hit = "timeout"
                break
            for fd in select.select(open_fds, [], [], left)[0]:
                data = os.read(fd, 1 << 16)
                if not data:
                    open_fds.remove(fd)
                    continue
                chunks[fd].append(data)
                if fd != self.status:
                    total += len(data)
            if total > lim["output_bytes"]:
                limit_hit = "output"
                break
        cpu = 0.0
        if self.b is not None:
            if limit_hit:
                os.kill(self.b, signal.SIGKILL)  # B is pid 1 there: the kernel kills its whole namespace
            usage = os.wait4(self.b, 0)[2]  # includes C, which B waited for
            cpu = usage.ru_utime + usage.ru_stime
        wall = time.monotonic() - t0
        for fd in (self.out, self.err, self.status):
            os.close(fd)
        status, error = None, None
        for line in b"".join(chunks[self.status]).decode("latin-1").splitlines():
            if line.startswith("status "):
                status = int(line.split()[1])
            elif line.startswith("error "):
                error = line[6:]
        cap = lim["output_bytes"]
        return {
            "exit_code": os.waitstatus_to_exitcode(status) if status is not None else None,
            "limit": limit_hit,
            "error": (error or "no status from the sandbox") if limit_hit is None and status is None else None,
            "stdout": b"".join(chunks[self.out])[:cap].decode("latin-1"),
            "stderr": b"".join(chunks[self.err])[:cap].decode("latin-1"),
            "wall_s": wall,
            "cpu_over": cpu >= lim["cpu_s"],
        }

    def discard(self):
        os.close(self.go)  # B reads end of input and exits
        if self.b is not None:
            os.waitpid(self.b, 0)
        for fd in (self.out, self.err, self.status):
            os.close(fd)


def _write_text(path, text):
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


class Zygote:
    """Runs jobs one at a time, with the next nested sandbox always prepared."""

    def __init__(self):
        self.ready = None

    def prepare(self):
        if self.ready is None:
            self.ready = Chain()

    def step(self, argv, stdin, limits, write_job):
        with open(os.path.join(JOB_DIR, "stdin"), "wb") as f:
            f.write(stdin.encode("latin-1"))
        self.prepare()
        chain, self.ready = self.ready, None
        return chain.execute({"argv": argv, "limits": limits, "write_job": write_job})

    def job(self, job):
        results = []
        try:
            src = os.path.join(JOB_DIR, "main.py" if job["language"] == "python" else "main.cpp")
            if job.get("compile"):
                _write_text(src, job["program"])
                compiled = self.step(job["compile"], "", job["compile_limits"], True)
                results.append(compiled)
                if compiled["limit"] or compiled["exit_code"] != 0:
                    return results
            for run in job["runs"]:
                if job["language"] == "python":
                    _write_text(src, job["program"] + run.get("suffix", ""))
                results.append(self.step(job["argv"], run["stdin"], job["limits"], False))
            return results
        finally:
            for name in os.listdir(JOB_DIR):
                os.unlink(os.path.join(JOB_DIR, name))


def _read_exact(n):
    buf = b""
    while len(buf) < n:
        data = os.read(0, n - len(buf))
        if not data:
            return None
        buf += data
    return buf


def _send(obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(1, data):]


def main():
    _check(LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    _check(LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    for name in PRELOAD:
        __import__(name)
    gc.freeze()  # a forked execution's garbage collector then leaves the zygote's pages shared
    # Nothing is forked before the first job: the host moves this container into its cgroup meanwhile.
    _send({"ready": True, "python": sys.version.split()[0]})
    zygote = Zygote()
    while True:
        head = _read_exact(4)
        body = _read_exact(struct.unpack(">I", head)[0]) if head else None
        if body is None:
            if zygote.ready is not None:
                zygote.ready.discard()
            return
        try:
            reply = {"results": zygote.job(json.loads(body))}
        except Exception as e:  # a fault of the sandbox itself, reported as such
            reply = {"error": "%s: %s" % (type(e).__name__, e)}
        _send(reply)
        zygote.prepare()  # the next nested sandbox, while the host is busy with this answer


if __name__ == "__main__":
    main()
