"""The sandbox against hostile programs (paper 2.6.4): each ends with a clear status, within its
limit, with the host untouched and nothing left running (checked in the host's process table)."""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sandbox_support import assert_idle, requires_sandbox

from k15sys.rewards import code_reward, run_tests
from k15sys.sandbox import Limits, RunRequest, Sandbox, Status, TestCase, isolation
from k15sys.sandbox.cgroup import tree

pytestmark = requires_sandbox

LIMITS = Limits(wall_s=1.5, cpu_s=1, memory_mb=256, max_procs=32, output_bytes=1 << 16, scratch_mb=8)
# Filling 256 MiB page by page takes ~0.5 s of CPU on this shared machine: room to reach the limit.
MEMORY_BOMB_LIMITS = dataclasses.replace(LIMITS, wall_s=6.0, cpu_s=4)


@pytest.fixture(scope="module")
def sb():
    with Sandbox(LIMITS, workers=2, compile_limits=Limits(wall_s=6.0, cpu_s=6, memory_mb=1024)) as s:
        yield s


def _settled(sb: Sandbox) -> None:
    """Wait (briefly) until every container is idle again, then check it holds nothing else."""
    deadline = time.monotonic() + 3.0
    while True:
        try:
            assert_idle(sb)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _expected(sb: Sandbox, expected: set[Status]) -> set[Status]:
    """MEMORY is an OOM kill seen in the execution's cgroup; without one, running out of address space
    is the program's own error (its MemoryError or bad_alloc)."""
    if Status.MEMORY in expected and any(c.cgroup is None for c in sb._containers):
        return expected | {Status.RUNTIME_ERROR}
    return expected


PY = {
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                  {Status.TIMEOUT, Status.RUNTIME_ERROR}),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", {Status.MEMORY}),
    "infinite_loop": ("while True:\n    pass", {Status.TIMEOUT}),
    "sleep_past_limit": ("import time\ntime.sleep(60)", {Status.TIMEOUT}),
    "huge_output": ("while True:\n    print('x' * 10000)", {Status.OUTPUT_LIMIT}),
    "huge_stderr": ("import sys\nwhile True:\n    sys.stderr.write('y' * 10000)", {Status.OUTPUT_LIMIT}),
    # the parent is pid 1 of the execution's namespace: signals from inside cannot kill it
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')", {Status.OK}),
    "kill_process_group": ("import os, signal\nos.kill(0, signal.SIGKILL)", {Status.RUNTIME_ERROR}),
    "kill_everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')", {Status.RUNTIME_ERROR, Status.OK}),
    "daemon_left_behind": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                           "        time.sleep(120)\n    os._exit(0)\nprint('parent done')", {Status.OK}),
    "zombies": ("import os\nfor _ in range(10):\n    if os.fork() == 0:\n        os._exit(0)\nprint('ok')", {Status.OK}),
    "cpu_burn_threads": ("import threading\ndef f():\n    while True: pass\n"
                         "for _ in range(4): threading.Thread(target=f, daemon=True).start()\nimport time\ntime.sleep(60)",
                         {Status.TIMEOUT}),
    "fill_scratch": ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1", {Status.RUNTIME_ERROR}),
    "big_file": ("open('big', 'wb').write(b'x' * 40 * 2**20)", {Status.RUNTIME_ERROR, Status.MEMORY}),
    "too_many_files": ("fs = [open('/dev/null') for _ in range(1000)]", {Status.RUNTIME_ERROR}),
    "stdin_flood_read": ("import sys\nprint(len(sys.stdin.read()))", {Status.OK}),
}


@pytest.mark.parametrize("name", sorted(PY))
def test_hostile_python_ends_cleanly(sb, name):
    program, expected = PY[name][0], _expected(sb, PY[name][1])
    limits = MEMORY_BOMB_LIMITS if name == "memory_bomb" else LIMITS
    t0 = time.perf_counter()
    r = sb.run(program, stdin="z" * (1 << 20) if name == "stdin_flood_read" else "", limits=limits)
    assert r.status in expected, (r.status, r.stderr[-400:])
    assert time.perf_counter() - t0 < limits.wall_s + 2.0
    _settled(sb)
    if name == "kill_parent":
        assert r.stdout.strip() == "alive"
    assert sb.run("print(6 * 7)").stdout.strip() == "42"  # the container still works


CPP = {
    "memory_bomb": ("#include <vector>\nint main(){ std::vector<char*> v; while(true){ char* p = new char[1<<24];"
                    " for(int i=0;i<(1<<24);i+=4096) p[i]=1; v.push_back(p);} }", {Status.MEMORY}),
    "fork_bomb": ("#include <unistd.h>\nint main(){ while(true) fork(); }", {Status.TIMEOUT, Status.RUNTIME_ERROR}),
    "infinite_loop": ("int main(){ volatile long x = 0; while(true) x++; }", {Status.TIMEOUT}),
    "huge_output": ("#include <cstdio>\nint main(){ while(true) puts(\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"); }",
                    {Status.OUTPUT_LIMIT}),
    "segfault": ("int main(){ volatile int* p = nullptr; return *p; }", {Status.RUNTIME_ERROR}),
}


@pytest.mark.parametrize("name", sorted(CPP))
def test_hostile_cpp_ends_cleanly(sb, name):
    program, expected = CPP[name][0], _expected(sb, CPP[name][1])
    r = sb.run(program, language="cpp", limits=MEMORY_BOMB_LIMITS if name == "memory_bomb" else LIMITS)
    assert r.status in expected, (r.status, r.stderr[-400:])
    _settled(sb)


def test_fork_bomb_does_not_starve_a_concurrent_execution(sb):
    """RLIMIT_NPROC is counted per execution (its own user namespace), not per host uid."""
    bomb = RunRequest(PY["fork_bomb"][0])
    normal = RunRequest("import os, time\ntime.sleep(0.3)\npids = []\nfor _ in range(8):\n    pid = os.fork()\n"
                        "    if pid == 0:\n        os._exit(0)\n    pids.append(pid)\n"
                        "[os.waitpid(p, 0) for p in pids]\nprint('fine')")
    bomb_result, normal_result = sb.run_batch([bomb, normal])
    assert normal_result[0].status == Status.OK and normal_result[0].stdout.strip() == "fine", normal_result
    assert bomb_result[0].status in {Status.TIMEOUT, Status.RUNTIME_ERROR}
    _settled(sb)


def test_compiler_bomb_is_bounded(sb):
    bomb = ("template<int N> struct F { static const long v = F<N-1>::v + F<N-2>::v; };\n"
            "template<> struct F<0> { static const long v = 0; };\ntemplate<> struct F<1> { static const long v = 1; };\n"
            "#include <iostream>\nint main(){ std::cout << F<100000>::v; }")
    t0 = time.perf_counter()
    r = sb.run(bomb, language="cpp")
    assert r.status == Status.COMPILE_ERROR
    assert time.perf_counter() - t0 < sb.compile_limits.wall_s + 3.0
    include_bomb = '#include "/dev/zero"\nint main(){}'
    assert sb.run(include_bomb, language="cpp").status == Status.COMPILE_ERROR
    _settled(sb)


def test_cannot_read_host_secrets_or_environment(sb, monkeypatch):
    monkeypatch.setenv("K15_HOST_SECRET", "hunter2")
    r = sb.run("import os\nprint(sorted(os.environ))\n"
               "print([os.path.exists(p) for p in ('/etc/shadow', '/etc/passwd', '/root', '/home', '/work')])\n"
               "print(open('/etc/shadow').read())")
    assert "hunter2" not in r.stdout and "K15_HOST_SECRET" not in r.stdout
    assert "[False, False, False, False, False]" in r.stdout
    assert r.status == Status.RUNTIME_ERROR and "FileNotFoundError" in r.stderr
    # the other processes of the container (zygote, init) are invisible or unreadable
    r = sb.run("import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
               "try:\n    print(os.listdir('/proc/1/fd'))\nexcept OSError as e:\n    print('denied', e.errno)")
    assert r.status == Status.OK
    pids, fd_line = r.stdout.splitlines()
    assert pids == "['1', '2']" and fd_line.startswith("denied"), r.stdout


def test_cannot_forge_its_own_status(sb):
    """A failing program cannot make its run look OK by writing to its init's status pipe."""
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'status 0\\n')\n    except OSError:\n"
             "        pass\nfor p in ('/proc/1/fd/3', '/proc/1/fd/4', '/proc/1/fd/5', '/proc/1/fd/6'):\n    try:\n"
             "        open(p, 'wb').write(b'status 0\\n')\n    except OSError:\n        pass\nraise SystemExit(1)")
    assert sb.run(forge).status == Status.RUNTIME_ERROR


def test_cannot_write_outside_its_scratch(sb):
    host_target = f"/tmp/k15-escape-{uuid.uuid4().hex}"
    prog = ("import os\nok = []\nfor p in ['%s', '/usr/k15-escape', '/k15-escape', '/job/k15', '/dev/k15', '/proc/k15']:\n"
            "    try:\n        open(p, 'w').write('x')\n        ok.append(p)\n    except OSError:\n        pass\n"
            "open('/tmp/mine', 'w').write('x')\nopen('/dev/shm/mine', 'w').write('x')\nprint(ok, os.getcwd())") % host_target
    r = sb.run(prog)
    assert r.status == Status.OK, r.stderr
    assert r.stdout.strip() == "['%s'] /tmp" % host_target  # its own private /tmp, not the host's
    assert not os.path.exists(host_target) and not os.path.exists("/usr/k15-escape")
    # nothing survives into the next execution
    r = sb.run("import os\nprint(os.listdir('/tmp'), os.listdir('/dev/shm'))")
    assert r.stdout.strip() == "[] []", r.stdout


def test_no_network(sb):
    r = sb.run("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 80))")
    assert r.status == Status.RUNTIME_ERROR and "OSError" in r.stderr or "unreachable" in r.stderr
    r = sb.run("import socket\nprint(socket.if_nameindex())")
    assert r.stdout.strip() == "[(1, 'lo')]"
    r = sb.run("import socket\nsocket.getaddrinfo('example.com', 80)")
    assert r.status == Status.RUNTIME_ERROR


def test_no_privilege(sb):
    r = sb.run("import os\nprint(os.getuid() != 0)\nos.setuid(0)")
    assert r.stdout.strip() == "True" and r.status == Status.RUNTIME_ERROR  # PermissionError
    r = sb.run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.mount(b'tmpfs', b'/usr', b'tmpfs', 0, None), ctypes.get_errno())")
    assert r.stdout.split()[0] == "-1"  # no capabilities left


def test_bad_input_gets_a_status_not_an_exception(sb):
    assert sb.run("print(1)", language="brainfuck").status == Status.INVALID
    assert sb.run("print(1)", language=["python"]).status == Status.INVALID  # type: ignore[arg-type]
    assert sb.run("").status == Status.INVALID
    assert sb.run("   \n").status == Status.INVALID
    assert sb.run(None).status == Status.INVALID  # type: ignore[arg-type]
    r = sb.run("import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok')")
    assert r.status == Status.OK and r.stdout.endswith("ok") and r.stdout_bytes == b"\xff\xfeok"
    r = sb.run("print(input())", stdin="caf\udce9")  # unencodable stdin is replaced, not raised
    assert r.status == Status.OK
    r = sb.run("x = 'unterminated")
    assert r.status == Status.RUNTIME_ERROR and "SyntaxError" in r.stderr
    assert sb.run_tests("print(1)", [TestCase(expected="2")])[0].status == Status.WRONG_ANSWER
    _settled(sb)


def test_a_killed_container_is_replaced():
    with Sandbox(LIMITS, workers=1) as s:
        s._containers[0].kill()
        r = s.run("print(1)")
        assert r.status in {Status.OK, Status.SANDBOX_ERROR}
        assert s.run("print(2)").stdout.strip() == "2"
        _settled(s)
    assert not s._containers


def test_a_dead_template_ends_its_container_without_failing_a_run():
    """If a container's template dies (only the OOM killer could do it), the run in flight completes with the
    chain already prepared -- or, when the template died before preparing one (seen on a loaded machine), is a
    SANDBOX_ERROR, never a verdict on the program -- and the container is replaced before the next one."""
    with Sandbox(LIMITS, workers=1) as s:
        assert s.run("print(1)").status == Status.OK
        zygote = tree(s._containers[0].proc.pid)[1]
        children = [int(p) for p in Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()]
        os.kill(min(children), 9)  # the template: the zygote's first child
        first = s.run("print(0)")
        assert (first.status, first.stdout.strip()) in {(Status.OK, "0"), (Status.SANDBOX_ERROR, "")}
        assert [s.run(f"print({i})").stdout.strip() for i in (1, 2)] == ["1", "2"]
        _settled(s)


def test_memory_spread_over_many_processes_stays_in_the_container_cgroup():
    """RLIMIT_AS bounds each process; the container's cgroup bounds their sum (20 x 200 MiB here)."""
    with Sandbox(MEMORY_BOMB_LIMITS, workers=1, container_memory_mb=600) as s:
        container = s._containers[0]
        if container.cgroup is None:
            pytest.skip(f"NO CGROUP HERE -- per-container memory bound NOT TESTED: {s.cgroup_error}")
        spread = ("import os, time\nfor _ in range(20):\n    if os.fork() == 0:\n        b = bytearray(200 * 2**20)\n"
                  "        for j in range(0, len(b), 4096):\n            b[j] = 1\n        time.sleep(5)\n        os._exit(0)\n"
                  "time.sleep(1)\nprint('parent alive')")
        r = s.run(spread)
        assert r.status == Status.MEMORY, (r.status, r.stderr[-300:])  # over the execution's own 256 MiB
        assert container.oom_kills() > 0
        assert s.run("print(3)").stdout.strip() == "3"
        _settled(s)
        dirs = container.cgroup.tops + container.cgroup.execs
    assert not any(d.exists() for d in dirs)  # removed with the container


# --- Verdict integrity (issue 20): a pass means the tests ran to completion and held ------------------

# Reads the readable, writable memory of its own process and returns the first match of ``pattern``.
# Every character of a needle is written as a one-character class, so the source never holds it.
SCAN_MEMORY = """
import ctypes, re
def scan(pattern):
    found = []
    regions = [line.split() for line in open('/proc/self/maps')]
    for fields in regions:
        if not fields[1].startswith('rw') or (len(fields) > 5 and fields[5] in ('[vvar]', '[vsyscall]')):
            continue
        start, end = (int(x, 16) for x in fields[0].split('-'))
        for at in range(start, end, 1 << 22):
            found += re.findall(pattern, ctypes.string_at(at, min(1 << 22, end - at)))
    return found
"""


def _hidden(text: str) -> bytes:
    return "".join(f"[{c}]" for c in text).encode()


FAKE_PASSES = {
    "os_exit": "import os\nos._exit(0)",
    "system_exit_at_top_level": "raise SystemExit",
    "system_exit_in_the_function": "def add(a, b):\n    raise SystemExit(0)",
    "os_exit_in_the_function": "import os\ndef add(a, b):\n    os._exit(0)",
    # redefining a builtin the test uses (the test below compares sorted(...))
    "shadow_a_builtin": "def sorted(x):\n    return 0\ndef add(a, b):\n    return 0",
    # answering for the test's math.isclose, or for `expected in result`
    "fake_math_module": "class M:\n    def isclose(self, *a, **k):\n        return True\nmath = M()\n"
                        "def add(a, b):\n    return 0.0",
    "contains_everything": "class All:\n    def __contains__(self, x):\n        return True\n"
                           "def add(a, b):\n    return All()",
    # a test that expects an exception with a bare except must not take an exit for one
    "exit_caught_by_the_test": "import os\ndef add(a, b):\n    os._exit(0) if a < 0 else None",
    "always_equal": "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                    "def add(a, b):\n    return Any()",
    "always_equal_str_subclass": "class S(str):\n    def __eq__(self, other):\n        return True\n"
                                 "    __hash__ = str.__hash__\ndef add(a, b):\n    return S('no')",
    "read_own_file": "import re\nsource = open(__file__).read()\n"
                     "def add(a, b):\n    return re.findall(r\"== '(k15exp-[0-9a-f]+)'\", source)[0]",
    "read_caller_frames": "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n    while f is not None:\n"
                          "        for c in f.f_code.co_consts:\n            if isinstance(c, str) and c.startswith('k15exp-'):\n"
                          "                return c\n        f = f.f_back\n",
    "scan_own_memory": SCAN_MEMORY + "def add(a, b):\n    return scan(rb'k15exp-[0-9a-f]{32}')[0].decode()",
}


@pytest.mark.parametrize("name", sorted(FAKE_PASSES))
def test_fake_passes_fail(sb, name):
    """os._exit / SystemExit before or during the test, objects whose __eq__ always holds, and reading
    the expected value from its own file, frames or memory: none of them passes an assert test."""
    expected = f"k15exp-{uuid.uuid4().hex}"
    tests = [f"assert add(1, 2) == '{expected}'", "assert add(2, 2) == 4"]
    if name == "shadow_a_builtin":
        tests = [f"assert sorted([add(1, 2)]) == sorted(['{expected}'])", "assert sorted([add(2, 2)]) == sorted([4])"]
    if name == "fake_math_module":
        tests = ["assert math.isclose(add(2, 2), 4.0)", "assert math.isclose(add(3, 4), 7.0)"]
    if name == "contains_everything":
        tests = [f"assert '{expected}' in add(1, 2)", "assert add(2, 2) == 4"]
    if name == "exit_caught_by_the_test":
        tests = ["try:\n    add(-1, 0)\nexcept:\n    pass\nelse:\n    assert False"] * 2
    rs = run_tests(FAKE_PASSES[name], tests, timeout_s=10.0, sandbox=sb)
    assert [r.status for r in rs] == [Status.RUNTIME_ERROR] * 2, [(r.status, r.stderr[-300:]) for r in rs]
    honest = f"import math\ndef add(a, b):\n    if a < 0:\n        raise ValueError(a)\n    return '{expected}' if (a, b) == (1, 2) else a + b"
    assert code_reward(honest, tests, sandbox=sb) == 1.0  # the same tests can pass


def test_judged_values_are_plain_data(sb):
    """What crosses from the program to its judge is plain data; other objects stay behind a handle."""
    program = ("import collections\ndef f():\n    return {'a': [1, 2.5, (3, b'x')], 4: {5, 6}, 'n': None, 't': True}\n"
               "def g():\n    return collections.Counter('aab')\nclass Box:\n    def __init__(self, v):\n"
               "        self.v = v\n    def get(self):\n        return self.v\ndef gen(n):\n    yield from range(n)\n"
               "def boom():\n    raise ValueError('bad')\n")
    tests = ["assert f() == {'a': [1, 2.5, (3, b'x')], 4: {5, 6}, 'n': None, 't': True}",
             "assert g() == {'a': 2, 'b': 1} and type(g()) is dict",
             "assert Box(7).get() == 7 and Box([1]).v == [1]",
             "assert list(gen(3)) == [0, 1, 2]",
             "try:\n    boom()\nexcept ValueError as e:\n    assert str(e) == 'bad'\nelse:\n    assert False",
             "assert Box(1) != Box(1)"]  # objects without a plain value never compare equal
    assert [r.status for r in run_tests(program, tests, sandbox=sb)] == [Status.OK] * len(tests)


PROBE_OTHERS = """import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def others():
    return [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]
def probe():
    got = []
    for pid in others():
        for what in ('mem', 'environ', 'fd'):
            try:
                os.listdir(f'/proc/{pid}/fd') if what == 'fd' else open(f'/proc/{pid}/{what}', 'rb').close()
                got.append((pid, what))
            except OSError:
                pass
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            got.append((pid, 'ptrace'))
        try:
            os.kill(pid, 0)
        except OSError:
            pass
    return got
"""


def test_program_cannot_reach_its_judge(sb):
    """The judge (and the execution's init) are visible to the program but neither readable nor
    traceable: their memory, environment and descriptors are closed to it."""
    tests = ["assert len(others()) >= 2", "assert probe() == []"]
    rs = run_tests(PROBE_OTHERS, tests, sandbox=sb)
    assert [r.status for r in rs] == [Status.OK, Status.OK], [r.stderr[-300:] for r in rs]


def test_no_data_of_earlier_executions():
    """Executions are forked from a state that never held a job: the program, stdin, stdout, assert
    tests and expected values of earlier executions are nowhere in a later one's memory."""
    with Sandbox(Limits(wall_s=10.0, cpu_s=5), workers=1) as s:
        secret = f"k15leak{uuid.uuid4().hex}"
        s.run(f"SECRET = '{secret}-program'\nprint('{secret}-stdout')", stdin=f"{secret}-stdin")
        run_tests("def f():\n    return 1", [f"assert f() == 1, '{secret}-test'"], sandbox=s)
        r = s.run(SCAN_MEMORY + f"print(len(scan(rb'{_hidden(secret).decode()}')))")
        assert (r.status, r.stdout.strip()) == (Status.OK, "0"), (r.status, r.stdout, r.stderr[-300:])


def test_status_comes_from_what_the_sandbox_observed(sb):
    """Signals to its init are not delivered; printed error names and self-sent signals are read as
    what they are: the program's own exit."""
    for sig in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1"):
        r = sb.run(f"import os, signal\nos.kill(1, signal.{sig})\nimport time\ntime.sleep(0.1)\nprint('alive')")
        assert (r.status, r.stdout.strip()) == (Status.OK, "alive"), (sig, r.status, r.stderr[-300:])
    for fake in ("MemoryError", "terminate called after throwing an instance of 'std::bad_alloc'", "out of memory"):
        r = sb.run(f"import sys\nsys.stderr.write({fake!r})\nsys.exit(1)")
        assert r.status == Status.RUNTIME_ERROR, (fake, r.status)
    r = sb.run("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)")  # no CPU time was spent
    assert r.status == Status.RUNTIME_ERROR, r.status


def _require_cgroup(s: Sandbox) -> None:
    if any(c.cgroup is None for c in s._containers):
        pytest.skip(f"NO CGROUP HERE -- per-execution CPU share NOT TESTED: {s.cgroup_error}")


SPINNERS = ("import os, time\nfor _ in range({n}):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        while True:\n            pass\ntime.sleep(60)")
HONEST = "x = 0\nfor i in range(2_000_000):\n    x += i\nprint(x)"


def test_spinners_do_not_slow_other_executions():
    """60 setsid spinners keep to their execution's one CPU: an honest execution in the other worker
    runs at about its own speed (it used to be starved until the spinners were killed at the wall limit)."""
    with Sandbox(Limits(wall_s=6.0, cpu_s=60, max_procs=100), workers=2) as s:
        _require_cgroup(s)
        alone = sorted(s.run(HONEST).wall_s for _ in range(3))[1]
        with ThreadPoolExecutor(1) as pool:
            bomb = pool.submit(s.run, SPINNERS.format(n=60))
            time.sleep(1.0)
            loaded = s.run(HONEST)
            b = bomb.result()
        assert loaded.status == Status.OK and loaded.wall_s < 3 * alone + 0.5, (alone, loaded.wall_s)
        assert b.status == Status.TIMEOUT and b.cpu_s <= 1.15 * b.wall_s + 0.2, (b.status, b.cpu_s, b.wall_s)
        _settled(s)


def test_cpu_time_is_counted_per_execution_not_per_process():
    """Orphaned spinners each under their own RLIMIT_CPU still add up: the execution ends when all its
    processes together have used cpu_s, long before the wall limit."""
    with Sandbox(Limits(wall_s=8.0, cpu_s=1), workers=1) as s:
        _require_cgroup(s)
        r = s.run(SPINNERS.format(n=4))
        assert r.status == Status.TIMEOUT and r.cpu_s >= 0.95 and r.wall_s < 5.0, (r.status, r.cpu_s, r.wall_s)
        _settled(s)


def test_cgroups_nest_under_the_callers():
    """The container's processes live in cgroups below the caller's own, in every hierarchy, so the
    caller is charged for them (they used to be created at the hierarchy's top)."""
    with Sandbox(LIMITS, workers=1) as s:
        _require_cgroup(s)
        zygote = tree(s._containers[0].proc.pid)[1]

        def paths(pid: object) -> dict[str, str]:
            return {controllers: path for _, controllers, path in
                    (line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())}

        own, theirs = paths("self"), paths(zygote)
        for controllers in ("memory", "pids", "cpu", "cpuacct", ""):  # v1 hierarchies, the v2 one
            if controllers in own and own[controllers] != theirs[controllers]:
                assert theirs[controllers].startswith(own[controllers].rstrip("/") + "/k15sys-sandbox-"), \
                    (controllers, own[controllers], theirs[controllers])
        assert any(own[c] != theirs[c] for c in own if c in ("memory", "")), (own, theirs)


def test_request_size_is_bounded_and_read_in_linear_time(sb, monkeypatch):
    t0 = time.perf_counter()
    r = sb.run("#" * (100 << 20) + "\nprint(1)")  # 100 MiB program: refused before reaching a container
    assert r.status == Status.INVALID and "max_request_bytes" in r.stderr and time.perf_counter() - t0 < 3.0
    with Sandbox(LIMITS, workers=1, max_request_bytes=1 << 20) as small:
        r = small.run("print(len(input()))", stdin="x" * (2 << 20))
        assert r.status == Status.INVALID and "max_request_bytes=1048576" in r.stderr
        assert small.run("print(len(input()))", stdin="x" * (600 << 10)).stdout.strip() == str(600 << 10)
    with Sandbox(Limits(wall_s=20.0, cpu_s=10, memory_mb=512), workers=1) as s:  # linear: 4x the input, ~4x the time
        seconds = {}
        for mib in (10, 40):
            t0 = time.perf_counter()
            r = s.run("import sys\nprint(len(sys.stdin.buffer.read()))", stdin="x" * (mib << 20))
            seconds[mib] = time.perf_counter() - t0
            assert r.stdout.strip() == str(mib << 20), r
        assert seconds[40] < 10 * seconds[10] + 0.5, seconds  # it was quadratic: 0.8 s -> 21-29 s here


def test_binary_output_does_not_inflate_the_reply(sb, monkeypatch):
    """0xFF bytes travel base64-encoded (x1.33), not as JSON escapes of latin-1 text (x6)."""
    sizes = []
    original = isolation.Container._read_exact

    def recording(self, n, deadline):
        sizes.append(n)
        return original(self, n, deadline)

    monkeypatch.setattr(isolation.Container, "_read_exact", recording)
    r = sb.run("import sys\nsys.stdout.buffer.write(b'\\xff' * 60000)")
    assert r.status == Status.OK and r.stdout_bytes == b"\xff" * 60000
    assert max(sizes) < 1.4 * 60000 + 4096, max(sizes)
