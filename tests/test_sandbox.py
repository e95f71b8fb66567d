"""The code sandbox doing its normal job (paper 2.6.4): languages, tests, statuses, the pool, the API.
Hostile programs are in test_sandbox_adversarial.py."""
from __future__ import annotations

import os
import time

import pytest
from sandbox_support import assert_idle, requires_sandbox

from k15sys.sandbox import Limits, RunRequest, Sandbox, Status, TestCase, classify
from k15sys.sandbox.cgroup import tree

pytestmark = requires_sandbox

ADD_CPP = "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<std::endl;}"


@pytest.fixture(scope="module")
def sb():
    with Sandbox(Limits(wall_s=3.0, cpu_s=2, memory_mb=512, output_bytes=1 << 16), workers=2) as s:
        yield s


def test_python_runs_like_python3(sb):
    r = sb.run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3")
    assert (r.status, r.stdout, r.exit_code) == (Status.OK, "6\n", 0)
    assert sb.run("print(input()[::-1])", stdin="abc\n").stdout == "cba\n"
    assert sb.run("import sys\nsys.exit(3)").exit_code == 3
    r = sb.run("import sys\nsys.exit('bad thing')")
    assert (r.status, r.exit_code, r.stderr.strip()) == (Status.RUNTIME_ERROR, 1, "bad thing")
    r = sb.run("def f():\n    raise KeyError('k')\nf()")
    assert r.status == Status.RUNTIME_ERROR and "KeyError: 'k'" in r.stderr and 'File "/job/main.py", line 3' in r.stderr
    # interpreter-exit behaviour: atexit handlers run, non-daemon threads are joined, output is flushed
    r = sb.run("import atexit, threading, time\natexit.register(lambda: print('bye'))\n"
               "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\nprint('main', end='')")
    assert r.status == Status.OK and r.stdout == "mainthread\nbye\n"
    r = sb.run("import os, signal, time\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(1)\n"
               "except KeyboardInterrupt:\n    print('interrupted')")
    assert (r.status, r.stdout) == (Status.OK, "interrupted\n")  # SIGINT is KeyboardInterrupt, as in python3
    r = sb.run("if __name__ == '__main__':\n    import sys\n    print(__file__, sys.argv, __name__)")
    assert r.stdout.strip() == "/job/main.py ['/job/main.py'] __main__"


def test_cpp_compiles_once_and_runs_every_test(sb):
    tests = [TestCase("1 2", "3"), TestCase("40 2", "42\n"), TestCase("2 2", "5")]
    rs = sb.run_tests(ADD_CPP, tests, language="cpp")
    assert [r.status for r in rs] == [Status.OK, Status.OK, Status.WRONG_ANSWER]
    assert rs[1].stdout == "42\n"
    rs = sb.run_tests("int main( {", tests, language="cpp")
    assert all(r.status == Status.COMPILE_ERROR for r in rs) and "error" in rs[0].stderr
    assert sb.run("int main(){ return 4; }", language="cpp").status == Status.RUNTIME_ERROR
    r = sb.run("#include <cstdio>\nint main(){ char b[16]; scanf(\"%15s\", b); printf(\"[%s]\", b); }",
               language="cpp", stdin="hello")
    assert r.stdout == "[hello]"


def test_expected_output_and_checker(sb):
    assert sb.run("print(' 1  2 ')", expected="1 2\n").status == Status.OK  # whitespace-tolerant
    assert sb.run("print('1 2 3')", expected="1 2").status == Status.WRONG_ANSWER
    close = lambda stdin, exp, act: abs(float(act) - float(exp)) < 1e-3  # noqa: E731
    assert sb.run("print(1/3)", expected="0.3333", checker=close).status == Status.OK
    broken = lambda stdin, exp, act: 1 / 0  # noqa: E731
    assert sb.run("print(1)", expected="1", checker=broken).status == Status.WRONG_ANSWER
    assert sb.run("raise SystemExit(2)", expected="").status == Status.RUNTIME_ERROR  # not WRONG_ANSWER


def test_assert_suffixes_run_separately(sb):
    prog = "def add(a, b):\n    return a + b\n"
    rs = sb.run_tests(prog, [TestCase(suffix="assert add(1, 2) == 3"), TestCase(suffix="assert add(1, 1) == 3"),
                             TestCase(suffix="while True: pass")], limits=Limits(wall_s=1.0, cpu_s=1))
    assert [r.status for r in rs] == [Status.OK, Status.RUNTIME_ERROR, Status.TIMEOUT]
    assert "AssertionError" in rs[1].stderr


def test_batch_keeps_order_and_uses_the_pool(sb):
    reqs = [RunRequest(f"import time\ntime.sleep(0.2)\nprint({i} * {i})") for i in range(6)]
    t0 = time.perf_counter()
    out = sb.run_batch(reqs)
    assert [rs[0].stdout.strip() for rs in out] == [str(i * i) for i in range(6)]
    assert time.perf_counter() - t0 < 6 * 0.2  # two workers at once
    mixed = sb.run_batch([RunRequest(ADD_CPP, "cpp", (TestCase("2 3", "5"),)), RunRequest("print(1)", "cobol")])
    assert mixed[0][0].status == Status.OK and mixed[1][0].status == Status.INVALID


def test_limits_apply_per_execution(sb):
    r = sb.run("import resource\nprint([resource.getrlimit(r)[0] for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS,"
               " resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE)])",
               limits=Limits(wall_s=2.0, cpu_s=1, memory_mb=300, max_procs=7, open_files=20))
    in_cgroup = all(c.cgroup is not None for c in sb._containers)  # the cgroup bounds memory; RLIMIT_AS backs it
    assert r.stdout.strip() == str([1, (2 if in_cgroup else 1) * 300 << 20, 7, 20])
    r = sb.run("import os\nst = os.statvfs('/tmp')\nprint(st.f_blocks * st.f_frsize // 2**20)", limits=Limits(scratch_mb=5))
    assert r.stdout.strip() == "5"
    r = sb.run("import time\nt = time.time()\nwhile time.time() - t < 5: pass", limits=Limits(wall_s=10.0, cpu_s=1))
    assert r.status == Status.TIMEOUT and r.wall_s < 4  # RLIMIT_CPU, well before the wall limit


def test_stdin_and_output_sizes(sb):
    big = "x" * (3 << 20)
    r = sb.run("import sys\nprint(len(sys.stdin.read()))", stdin=big)
    assert r.stdout.strip() == str(len(big))
    r = sb.run("print('y' * 60000)")
    assert r.status == Status.OK and len(r.stdout) == 60001
    assert sb.run("print('y' * 70000)").status == Status.OUTPUT_LIMIT


def test_runs_unprivileged_with_nothing_left(sb):
    r = sb.run("import os\nprint(os.getuid(), os.getpid(), os.getppid())")
    uid, pid, ppid = map(int, r.stdout.split())
    assert (pid, ppid) == (2, 1)
    if os.getuid() == 0:
        assert uid == 65534  # nobody, outside and inside
    cgroup_files = ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/cgroup.subtree_control")
    cgroups_writable = any(os.access(p, os.W_OK) for p in cgroup_files)
    if os.getuid() == 0 and cgroups_writable:  # root with writable cgroups (here and CI): one per container
        assert sb.cgroup_error is None and all(c.cgroup is not None for c in sb._containers)
    time.sleep(0.2)
    assert_idle(sb)


def test_classify_rules():
    assert classify({"limit": "timeout"}) == Status.TIMEOUT
    assert classify({"limit": "output", "exit_code": 0}) == Status.OUTPUT_LIMIT
    assert classify({"exit_code": None, "error": "x"}) == Status.SANDBOX_ERROR
    assert classify({"limit": "cpu", "exit_code": -9}) == Status.TIMEOUT  # the execution's cgroup CPU time
    assert classify({"exit_code": -24, "cpu_over": True}) == Status.TIMEOUT  # SIGXCPU after the CPU was spent
    assert classify({"exit_code": -24}) == Status.RUNTIME_ERROR  # a SIGXCPU the program sent itself
    assert classify({"exit_code": -9, "cpu_over": False}) == Status.RUNTIME_ERROR
    assert classify({"exit_code": -9, "oom_kills": 1}) == Status.MEMORY
    assert classify({"exit_code": None, "oom_kills": 2}) == Status.MEMORY  # its init killed too
    # the program's output is never read: a printed MemoryError is a runtime error
    assert classify({"exit_code": 1, "stderr": "MemoryError", "oom_kills": 0}) == Status.RUNTIME_ERROR
    # an assert test passes only with the judge's verdict carrying this run's token
    good = {"exit_code": 0, "token": "t1", "verdict": {"token": "t1", "passed": True}}
    assert classify(good) == Status.OK
    assert classify({**good, "verdict": {"token": "t2", "passed": True}}) == Status.RUNTIME_ERROR
    assert classify({**good, "verdict": None}) == Status.RUNTIME_ERROR
    assert classify({**good, "exit_code": 3}) == Status.RUNTIME_ERROR


def test_bad_arguments_raise_value_errors(sb):
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)
    with pytest.raises(ValueError, match="python"):
        Sandbox(python="/opt/python")
    with pytest.raises(ValueError, match="tests"):
        sb.run_tests("print(1)", [])
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        sb.run_tests("print(1)", [TestCase(stdin=b"bytes")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stdin"):
        sb.run("print(1)", stdin=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"requests\[0\]"):
        sb.run_batch([RunRequest("print(1)", tests=())])


def test_a_sandbox_that_cannot_start_reports_why():
    with Sandbox(workers=1, python="/usr/bin/false") as broken:  # the container exits at once
        r = broken.run("print(1)")
    assert r.status == Status.SANDBOX_ERROR and "exited" in r.stderr and broken.start_error


def test_closed_sandbox_reports_and_leaves_nothing():
    s = Sandbox(workers=1)
    assert s.run("print(1)").status == Status.OK
    container = s._containers[0]
    deadline = time.monotonic() + 3.0
    while len(tree(container.proc.pid)) != 4 and time.monotonic() < deadline:  # next nested sandbox: ready
        time.sleep(0.02)
    pids = tree(container.proc.pid)
    dirs = container.cgroup.tops + container.cgroup.execs if container.cgroup else []
    assert len(pids) == 4  # bubblewrap, the zygote (pid 1 inside), its template, the next nested sandbox's init
    s.close()
    assert s.run("print(1)").status == Status.SANDBOX_ERROR
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)  # gone, not even zombies
    assert not any(d.exists() for d in dirs)
