"""The zygote: a pre-started Python process inside each sandbox container (paper 2.6.4).

Runs as ``python3 -I -c <judge.py registered as a module + this source> <config JSON>``, pid 1 of a
bubblewrap container (standard library only: it never imports k15sys there). It reads jobs from fd 0
and answers on fd 1 (4-byte big-endian length + JSON; program outputs and stdin travel
base64-encoded). A job is one program and a list of runs (``stdin``; for Python assert tests, the
``test`` code and a per-run ``token``); C++ is compiled once first.

Every step runs in a fresh nested sandbox, so nothing survives from one execution to the next, and
nothing of any job reaches an execution's memory:

    zygote (pid 1 of the container, subreaper, not dumpable)
      ├─ F, the template: forked at start-up, before any job is read; it never sees job data and
      │  forks one chain per request (its pipes go to the zygote over a unix socket)
      │  └─ A: setsid; unshare(user, pid, mount, ipc); maps its own uid; forks B, reports B, exits
      └─ B (reparented to the zygote): pid 1 of the new pid namespace; fresh /proc; waits for the
         │  step (argv and limits only); then a sized tmpfs on /tmp and /dev/shm, /job read-only
         ├─ D, the judge (assert tests only, ``judge.py``): no capability, not dumpable; receives the
         │  test code and the token from the zygote on its own pipe, runs the test against the
         │  program over a socket (plain data only) and sends the verdict with the token on a pipe
         │  only it holds
         └─ C: drops every capability, sets rlimits, stdin/stdout/stderr, cwd /tmp; runs the Python
            program in this pre-initialised interpreter (then serves D's calls) or execve's the
            binary / compiler. B reports C's wait status on a pipe.

With cgroups, the template sits in the execution's group (1-CPU quota, memory limit), so A, B, C and D
are born there. The zygote enforces wall time, output size and the CPU time of the whole execution,
read from that group, and kills B at a limit: the kernel then kills every process in B's pid namespace.
Programs cannot see or signal the zygote (separate pid namespace, own session), cannot open its, B's
or D's descriptors through /proc (not dumpable, no capabilities), and inherit none of their descriptors.
"""
import base64
import ctypes
import gc
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import time
import types

try:  # in the container the launcher registers judge.py's source under this name (stdlib only there)
    import k15sys_sandbox_judge as judge
except ImportError:  # on the host
    from k15sys.sandbox import judge

LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x20000, 0x08000000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 36, 38
# Modules many programs import, loaded once here so a run does not pay for them.
PRELOAD = ("collections", "itertools", "functools", "math", "re", "heapq", "bisect", "string", "typing",
           "random", "fractions", "decimal", "threading", "traceback", "io", "atexit", "builtins", "types",
           "resource")
JOB_DIR = "/job"
RPC_FD = 3  # the program's end of the judge's socket
CHAIN_FDS = ("go", "out", "err", "status", "judge", "verdict")  # zygote-side ends, in this order


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


def _set_limits(lim, address_space_mb):
    import resource

    mib = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                       (resource.RLIMIT_AS, (address_space_mb * mib,) * 2),
                       (resource.RLIMIT_FSIZE, (lim["file_size_mb"] * mib,) * 2),
                       (resource.RLIMIT_NOFILE, (lim["open_files"],) * 2),
                       (resource.RLIMIT_NPROC, (lim["max_procs"],) * 2),
                       (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(res, value)


def _close_all_but(keep):
    """Close every descriptor >= 3 except ``keep``."""
    low = 3
    for fd in sorted(set(k for k in keep if k >= 3)) + [1 << 16]:
        os.closerange(low, fd)
        low = fd + 1


def _read_all(fd, limit=None):
    chunks, total = [], 0
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            return b"".join(chunks)
        total += len(data)
        if limit is None or total <= limit:
            chunks.append(data)


def _read_exact(fd, n):
    """``n`` bytes from ``fd`` into one preallocated buffer (linear time), or None at end of input."""
    buf = bytearray(n)
    view, pos = memoryview(buf), 0
    while pos < n:
        got = os.readv(fd, [view[pos:]])
        if not got:
            return None
        pos += got
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------
# D, the judge, and C, the program.

def _run_judge(step, fds, sock):
    """D (``judge.run_test``): no capability, the program's rlimits, no descriptor but its pipes and
    socket; the verdict carries the token only the zygote gave it. Never returns."""
    try:
        _close_all_but([fds["judge"], fds["verdict"], sock.fileno()])
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir("/")
        _drop_capabilities()
        _set_limits(step["limits"], step["address_space_mb"])
        payload = json.loads(_read_all(fds["judge"], judge.MAX_MESSAGE))
        passed, message = judge.run_test(payload["test"], sock)
        verdict = {"token": payload["token"], "passed": passed, "message": message}
        os.write(fds["verdict"], json.dumps(verdict).encode())
    except BaseException:
        pass
    os._exit(0)


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


def _run_python(path, judged):
    """In C: run the program as ``__main__`` the way ``python3 path`` would (then, for assert tests,
    serve the judge), then exit the process."""
    import atexit
    import io
    import threading
    import traceback

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                                   encoding="utf-8")
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                                   encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.argv = [path]
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    code, failure = 0, None
    try:
        with open(path, "rb") as f:
            source = f.read()
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit as e:
        code = _exit_code_of(e)
        failure = "the program exited (SystemExit) before its tests ran"
    except BaseException as e:  # the program's error: print its traceback without this frame
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        code = 1
        failure = "the program raised %s before its tests ran" % type(e).__name__
    if judged:
        try:
            judge.serve(main.__dict__, failure, socket.socket(fileno=RPC_FD))
        except BaseException:
            code = code or 1
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


def _child(step, fds, rpc):
    """C: the program itself. Never returns."""
    try:
        _drop_capabilities()
        _set_limits(step["limits"], step["address_space_mb"])
        stdin = os.open(os.path.join(JOB_DIR, "stdin"), os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(fds["out"], 1)
        os.dup2(fds["err"], 2)
        if rpc is not None:
            os.dup2(rpc.fileno(), RPC_FD)
        for fd in (0, 1, 2):
            os.set_inheritable(fd, True)
        os.closerange(RPC_FD + 1 if rpc is not None else 3, 1 << 16)
        os.chdir("/tmp")
        if step["argv"] == ["python"]:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in python3 (B reset it)
            _run_python(os.path.join(JOB_DIR, "main.py"), rpc is not None)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execv(step["argv"][0], step["argv"])
    except BaseException as e:
        try:
            os.write(2, ("sandbox: cannot start the program: %r\n" % (e,)).encode())
        except BaseException:
            pass
    os._exit(127)


# ---------------------------------------------------------------------------------------------------
# A and B: the nested sandbox of one execution.

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


def _init(fds):
    """B: pid 1 of the execution's pid namespace, started ahead of time. Never returns."""
    try:
        # An init gets only the signals it handles: with default dispositions, nothing the program
        # sends from inside (SIGINT, SIGTERM, ...) reaches this process.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        request = _read_all(fds["go"])  # blocks until the zygote has a step (or closes: no step)
        if not request:
            os._exit(0)
        step = json.loads(request)
        _fresh_mounts(step)
        judge_pid, rpc = None, None
        if step["judged"]:
            rpc, theirs = socket.socketpair()
            judge_pid = os.fork()
            if judge_pid == 0:
                rpc.close()
                _run_judge(step, fds, theirs)
            theirs.close()
        c = os.fork()
        if c == 0:
            _child(step, fds, rpc)
        for fd in (fds["out"], fds["err"], fds["judge"], fds["verdict"]):
            os.close(fd)
        if rpc is not None:
            rpc.close()
        waiting, status = {c} | ({judge_pid} if judge_pid else set()), None
        while waiting:
            pid, st = os.wait()
            if pid == c:
                status = st
            waiting.discard(pid)
        os.write(fds["status"], b"status %d\n" % status)
    except BaseException as e:
        os.write(fds["status"], ("error init: %r\n" % (e,)).encode())
    os._exit(0)


def _launch(fds):
    """A: enter new namespaces, start B, report B's pid. Never returns."""
    try:
        _close_all_but(list(fds.values()))
        os.setsid()  # out of the zygote's session and process group: kill(0, ...) cannot reach it
        _enter_namespaces()
        b = os.fork()
        if b == 0:
            _init(fds)
        os.write(fds["status"], b"pid %d\n" % b)
    except BaseException as e:
        os.write(fds["status"], ("error setup: %r\n" % (e,)).encode())
    os._exit(0)


def _template(sock):
    """F: forks one nested sandbox per request from a state that never held any job. Never returns."""
    try:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _close_all_but([sock.fileno()])
        while sock.recv(1):
            ours, theirs = {}, {}
            for name in CHAIN_FDS:
                r, w = os.pipe()
                ours[name], theirs[name] = (w, r) if name in ("go", "judge") else (r, w)
            a = os.fork()
            if a == 0:
                sock.close()
                for fd in ours.values():
                    os.close(fd)
                _launch(theirs)
            for fd in theirs.values():
                os.close(fd)
            os.waitpid(a, 0)  # B is now the zygote's child (it is the subreaper)
            socket.send_fds(sock, [b"c"], [ours[name] for name in CHAIN_FDS])
            for fd in ours.values():
                os.close(fd)
    except BaseException:
        pass
    os._exit(0)


class ExecCgroup:
    """The execution's cgroup, through descriptors the host opened (the container cannot open them)."""

    def __init__(self, fds):
        self.fds = fds

    def _read(self, name):
        return os.pread(self.fds[name], 4096, 0).decode()

    def cpu_s(self):
        text = self._read("cpu_usage")
        m = re.search(r"usage_usec (\d+)", text)
        return int(m.group(1)) * 1e-6 if m else int(text.split()[0]) * 1e-9

    def oom_kills(self):
        m = re.search(r"oom_kill (\d+)", self._read("oom"))
        return int(m.group(1)) if m else 0

    def join(self, pid):
        """Move ``pid`` into the execution's group; everything it forks is born there (cgroup migration
        is slow: done once, for the template, not per execution)."""
        for fd in self.fds["procs"]:
            os.write(fd, str(pid).encode())

    def set_memory(self, nbytes):
        try:
            os.pwrite(self.fds["memory_limit"], str(nbytes).encode(), 0)
        except OSError:
            pass  # charges above the new limit (v1 EBUSY): the previous limit stays


class Chain:
    """A nested sandbox prepared ahead of time by the template: B waits in its namespaces for one step."""

    def __init__(self, fds):
        for name, fd in zip(CHAIN_FDS, fds):
            setattr(self, name, fd)
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

    def execute(self, step, judge_payload, cgroup):
        """Run ``step`` in this chain (used up); returns the facts for the host."""
        lim = step["limits"]
        cpu0 = cgroup.cpu_s() if cgroup else 0.0
        ooms0 = cgroup.oom_kills() if cgroup else 0
        if cgroup:
            cgroup.set_memory(lim["memory_mb"] << 20)
        t0 = time.monotonic()
        try:
            os.write(self.go, json.dumps(step).encode())  # a few hundred bytes: one write
        except OSError:
            pass
        os.close(self.go)
        pending = memoryview(judge_payload or b"")
        if pending:
            os.set_blocking(self.judge, False)
        else:
            os.close(self.judge)
        chunks = {self.out: [], self.err: [], self.status: [self.report], self.verdict: []}
        total, limit_hit = 0, None
        deadline = t0 + lim["wall_s"]
        open_fds = [self.out, self.err, self.status, self.verdict] if self.b is not None else []
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                limit_hit = "timeout"
                break
            ready, writable, _ = select.select(open_fds, [self.judge] if pending else [], [],
                                               min(left, 0.05) if cgroup else left)
            if writable:
                try:
                    pending = pending[os.write(self.judge, pending[:1 << 16]):]
                except OSError:  # the judge is gone: no verdict
                    pending = pending[:0]
                if not pending:
                    os.close(self.judge)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    open_fds.remove(fd)
                    continue
                chunks[fd].append(data)
                if fd in (self.out, self.err):
                    total += len(data)
            if total > lim["output_bytes"]:
                limit_hit = "output"
                break
            if cgroup and cgroup.cpu_s() - cpu0 > lim["cpu_s"]:
                limit_hit = "cpu"
                break
        if pending:
            os.close(self.judge)
        cpu = 0.0
        if self.b is not None:
            if limit_hit:
                os.kill(self.b, signal.SIGKILL)  # B is pid 1 there: the kernel kills its whole namespace
            usage = os.wait4(self.b, 0)[2]  # includes C, which B waited for
            cpu = usage.ru_utime + usage.ru_stime
        wall = time.monotonic() - t0
        if cgroup:  # every process of the execution, orphans included, is dead and counted now
            cpu = cgroup.cpu_s() - cpu0
        for fd in (self.out, self.err, self.status, self.verdict):
            os.close(fd)
        status, error = None, None
        for line in b"".join(chunks[self.status]).decode("latin-1").splitlines():
            if line.startswith("status "):
                status = int(line.split()[1])
            elif line.startswith("error "):
                error = line[6:]
        verdict = None
        if judge_payload is not None:
            try:
                verdict = json.loads(b"".join(chunks[self.verdict])[:1 << 20])
            except ValueError:
                verdict = None
        cap = lim["output_bytes"]
        b64 = lambda fd: base64.b64encode(b"".join(chunks[fd])[:cap]).decode("ascii")  # noqa: E731
        return {
            "exit_code": os.waitstatus_to_exitcode(status) if status is not None else None,
            "limit": limit_hit,
            "error": (error or "no status from the sandbox") if limit_hit is None and status is None else None,
            "stdout_b64": b64(self.out),
            "stderr_b64": b64(self.err),
            "wall_s": wall,
            "cpu_s": cpu,
            "cpu_source": "cgroup" if cgroup else "rusage",
            "oom_kills": (cgroup.oom_kills() - ooms0) if cgroup else None,
            "verdict": verdict,
        }


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


class Zygote:
    """Runs jobs one at a time; the template prepares the next nested sandbox while one runs."""

    def __init__(self, config):
        self.config = config
        self.cgroup = ExecCgroup(config["cgroup"]) if config.get("cgroup") else None
        self.sock, theirs = socket.socketpair()
        self.template = os.fork()
        if self.template == 0:
            self.sock.close()
            _template(theirs)
        theirs.close()
        self.asked = 0
        self.template_in_cgroup = False

    def ask(self):
        if self.cgroup and not self.template_in_cgroup:
            self.cgroup.join(self.template)
            self.template_in_cgroup = True
        if not self.asked:
            self.sock.send(b"c")
            self.asked = 1

    def take(self):
        self.ask()
        _, fds, _, _ = socket.recv_fds(self.sock, 16, len(CHAIN_FDS))
        self.asked = 0
        if len(fds) != len(CHAIN_FDS):
            raise OSError("the template sent %d descriptors" % len(fds))
        return Chain(fds)

    def step(self, argv, stdin, limits, write_job, test=None):
        _write_bytes(os.path.join(JOB_DIR, "stdin"), stdin)
        chain = self.take()
        try:
            self.ask()  # the template forks the next one while this one runs
        except OSError:
            pass  # the template is gone: the next take() fails, the container ends after this job
        address_space = limits["memory_mb"] * (2 if self.cgroup else 1)  # the cgroup is the real bound
        step = {"argv": argv, "limits": limits, "write_job": write_job, "judged": test is not None,
                "address_space_mb": address_space}
        payload = json.dumps(test).encode() if test is not None else None
        return chain.execute(step, payload, self.cgroup)

    def job(self, job):
        results = []
        try:
            src = os.path.join(JOB_DIR, "main.py" if job["language"] == "python" else "main.cpp")
            _write_bytes(src, job["program"].encode("utf-8", "surrogatepass"))
            if job.get("compile"):
                compiled = self.step(job["compile"], b"", job["compile_limits"], True)
                results.append(compiled)
                if compiled["limit"] or compiled["exit_code"] != 0 or compiled["oom_kills"]:
                    return results
            for run in job["runs"]:
                test = {"test": run["test"], "token": run["token"]} if run.get("test") is not None else None
                results.append(self.step(job["argv"], base64.b64decode(run["stdin_b64"]), job["limits"], False, test))
            return results
        finally:
            for name in os.listdir(JOB_DIR):
                os.unlink(os.path.join(JOB_DIR, name))


def _send(obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def main():
    config = json.loads(sys.argv[1])
    _check(LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    _check(LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    for name in PRELOAD:
        __import__(name)
    gc.freeze()  # a forked execution's garbage collector then leaves the zygote's pages shared
    zygote = Zygote(config)  # the template is forked here, before any job exists
    _send({"ready": True, "python": sys.version.split()[0]})
    while True:
        head = _read_exact(0, 4)
        size = struct.unpack(">I", head)[0] if head else 0
        if size > config["max_request"]:
            _send({"error": "request of %d bytes (limit %d)" % (size, config["max_request"])})
            return  # the host never sends one: end the container rather than read it
        body = _read_exact(0, size) if head else None
        if body is None:
            return
        try:
            reply = {"results": zygote.job(json.loads(body))}
        except Exception as e:  # a fault of the sandbox itself, reported as such
            reply = {"error": "%s: %s" % (type(e).__name__, e)}
        del body
        closing = bool(os.waitpid(zygote.template, os.WNOHANG)[0])  # the template died (e.g. an OOM kill)
        if closing:
            reply["closing"] = True  # the host replaces this container
        _send(reply)
        del reply
        if closing:
            return


if __name__ == "__main__":
    main()
