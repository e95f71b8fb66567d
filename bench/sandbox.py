"""Sandbox overhead and throughput (paper 2.6.4) vs a bare subprocess, in one run.

The same trivial Python program runs (a) as a bare ``/usr/bin/python3 main.py`` subprocess (no
isolation at all), (b) through ``Sandbox.run`` (pre-started bubblewrap container and zygote; per
execution a fresh nested user/pid/mount/ipc namespace forked from a template that never held a job,
rlimits, private tmpfs, a 1-CPU memory-limited cgroup where the host allows it) and (c) in a fresh
bubblewrap container per execution (what a container-per-run design such as the paper's pays). An
assert test is also timed both ways: (d) appended to the program in a bare subprocess (what the
sandbox did before issue 20) and (e) judged by the sandbox (the test in a separate judge process,
values crossing as plain data). Latencies are interleaved (a, b, c, d, e, a, ...) so all see the
same machine load; between two
sandbox calls the zygote has time to prepare the next nested sandbox, so "back-to-back" also times
sandbox calls issued with no pause at all. Reports p50/p99 latency, the overhead vs bare, and
executions/s with 2 concurrent workers for (a) and (b), and for (b) with 4 containers on the 2
cores. The paper's crun sandbox: 0.04 s start-up, 120 containers/s
(Docker: 0.12 s, 27/s). A short summary, then one JSON object with the figures on the last line
(written to runs/bench/ by default; ``--update-results``: bench/results/sandbox_cpu.json).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib
from k15sys.sandbox import RunRequest, Sandbox, Status, TestCase

PROGRAM = "print(sum(range(100)))\n"
FUNCTION = "def add(a, b):\n    return a + b\n"
ASSERT_TEST = "assert add(1, 2) == 3"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="fewer repetitions (< 1 minute)")
    ap.add_argument("--n", type=int, default=None, help="repetitions per measurement")
    args = ap.parse_args()
    n = args.n or (100 if args.quick else 400)
    workdir = tempfile.mkdtemp()
    Path(workdir, "main.py").write_text(PROGRAM)
    Path(workdir, "test.py").write_text(FUNCTION + "\n" + ASSERT_TEST + "\n")

    def bare() -> str:
        return subprocess.run(["/usr/bin/python3", "main.py"], cwd=workdir, capture_output=True, text=True).stdout

    fresh_cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
                 "--symlink", "usr/lib", "/lib",
                 "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
                 "--tmpfs", "/tmp", "--ro-bind", workdir, "/job", "--chdir", "/tmp", "--clearenv",
                 "--", "/usr/bin/python3", "/job/main.py"]

    def fresh_container() -> str:
        return subprocess.run(fresh_cmd, capture_output=True, text=True).stdout

    def bare_assert() -> int:
        return subprocess.run(["/usr/bin/python3", "test.py"], cwd=workdir, capture_output=True).returncode

    with Sandbox(workers=2) as sb:
        assert sb.run(PROGRAM).status == Status.OK, sb.start_error
        sb_cgroup = sb.cgroup_error or "per-container cgroups, 1-CPU execution group"
        lat_bare, lat_sb, lat_fresh, lat_b2b, lat_bare_assert, lat_judged = [], [], [], [], [], []
        for _ in range(n):  # interleaved, so all see the same machine load
            t0 = time.perf_counter()
            assert bare().strip() == "4950"
            lat_bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = sb.run(PROGRAM)
            lat_sb.append(time.perf_counter() - t0)
            assert r.status == Status.OK and r.stdout.strip() == "4950", r
            t0 = time.perf_counter()
            assert fresh_container().strip() == "4950"
            lat_fresh.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert bare_assert() == 0
            lat_bare_assert.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = sb.run_tests(FUNCTION, [TestCase(suffix=ASSERT_TEST)])[0]
            lat_judged.append(time.perf_counter() - t0)
            assert r.status == Status.OK, r
        for _ in range(n):
            t0 = time.perf_counter()
            r = sb.run(PROGRAM)
            lat_b2b.append(time.perf_counter() - t0)
            assert r.status == Status.OK
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            assert all(out.strip() == "4950" for out in ex.map(lambda _: bare(), range(n)))
        bare_rate = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = sb.run_batch([RunRequest(PROGRAM)] * n)
        sb_rate = n / (time.perf_counter() - t0)
        assert all(rs[0].status == Status.OK and rs[0].stdout.strip() == "4950" for rs in results)
    with Sandbox(workers=4) as sb4:  # more containers than cores: overlaps each zygote's idle moments
        sb4.run_batch([RunRequest(PROGRAM)] * 8)
        t0 = time.perf_counter()
        results = sb4.run_batch([RunRequest(PROGRAM)] * n)
        sb4_rate = n / (time.perf_counter() - t0)
        assert all(rs[0].status == Status.OK for rs in results)
    out = {
        "bench": "sandbox", "device": "cpu", "cpus": os.cpu_count(), "machine": platform.machine(), "n": n,
        "loadavg_1min_at_end": os.getloadavg()[0],
        "bare_p50_ms": statistics.median(lat_bare) * 1e3, "bare_p99_ms": pct(lat_bare, 0.99) * 1e3,
        "sandbox_p50_ms": statistics.median(lat_sb) * 1e3, "sandbox_p99_ms": pct(lat_sb, 0.99) * 1e3,
        "overhead_p50_ms": (statistics.median(lat_sb) - statistics.median(lat_bare)) * 1e3,
        "overhead_p99_ms": (pct(lat_sb, 0.99) - pct(lat_bare, 0.99)) * 1e3,
        "sandbox_back_to_back_p50_ms": statistics.median(lat_b2b) * 1e3,
        "sandbox_back_to_back_p99_ms": pct(lat_b2b, 0.99) * 1e3,
        "overhead_back_to_back_p50_ms": (statistics.median(lat_b2b) - statistics.median(lat_bare)) * 1e3,
        "fresh_container_p50_ms": statistics.median(lat_fresh) * 1e3,
        "fresh_container_p99_ms": pct(lat_fresh, 0.99) * 1e3,
        "fresh_container_overhead_p50_ms": (statistics.median(lat_fresh) - statistics.median(lat_bare)) * 1e3,
        "bare_assert_test_p50_ms": statistics.median(lat_bare_assert) * 1e3,
        "judged_assert_test_p50_ms": statistics.median(lat_judged) * 1e3,
        "judged_assert_test_p99_ms": pct(lat_judged, 0.99) * 1e3,
        "cgroup": sb_cgroup,
        "bare_exec_per_s": bare_rate, "sandbox_exec_per_s": sb_rate, "throughput_ratio_vs_bare": sb_rate / bare_rate,
        "sandbox_4_workers_exec_per_s": sb4_rate,
    }
    lines = [f"sandbox: {n} runs of a trivial program, p50 / p99 latency",
             f"  bare subprocess {out['bare_p50_ms']:.1f} / {out['bare_p99_ms']:.1f} ms; Sandbox.run "
             f"{out['sandbox_p50_ms']:.1f} / {out['sandbox_p99_ms']:.1f} ms; fresh container per run "
             f"{out['fresh_container_p50_ms']:.1f} / {out['fresh_container_p99_ms']:.1f} ms",
             f"  assert test: bare subprocess {out['bare_assert_test_p50_ms']:.1f} ms, judged by the sandbox "
             f"{out['judged_assert_test_p50_ms']:.1f} ms (p50)",
             f"  throughput with 2 workers: {out['sandbox_exec_per_s']:.0f} executions/s "
             f"({out['throughput_ratio_vs_bare']:.2f}x bare), 4 containers {out['sandbox_4_workers_exec_per_s']:.0f}/s"]
    benchlib.finish(out, benchlib.result_path(args, f"sandbox_cpu{'_quick' if args.quick else ''}.json"), lines)


if __name__ == "__main__":
    main()
