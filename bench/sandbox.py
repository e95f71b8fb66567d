"""Sandbox overhead and throughput (paper 2.6.4) vs a bare subprocess, in one run.

The same trivial Python program runs (a) as a bare ``python3 -I main.py`` subprocess and (b) through
``Sandbox.run`` (bubblewrap container, rlimits, unprivileged user, pre-started worker process).
Reports p50/p99 latency of each, the overhead (sandbox - bare), and executions/s with 2 concurrent
workers for both. The paper's crun sandbox: 0.04 s start-up, 120 containers/s (Docker: 0.12 s, 27/s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from k15sys.sandbox import RunRequest, Sandbox, Status

PROGRAM = "print(sum(range(100)))\n"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/results/sandbox_cpu.json")
    args = ap.parse_args()
    n = 60 if args.quick else 300
    workdir = tempfile.mkdtemp()
    Path(workdir, "main.py").write_text(PROGRAM)

    def bare() -> str:
        return subprocess.run(["/usr/bin/python3", "-I", "main.py"], cwd=workdir, capture_output=True, text=True).stdout

    with Sandbox(workers=2) as sb:
        assert sb.run(PROGRAM).status == Status.OK
        lat_bare, lat_sb = [], []
        for _ in range(n):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            bare()
            lat_bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = sb.run(PROGRAM)
            lat_sb.append(time.perf_counter() - t0)
            assert r.status == Status.OK and r.stdout.strip() == "4950"
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda _: bare(), range(n)))
        bare_rate = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = sb.run_batch([RunRequest(PROGRAM)] * n)
        sb_rate = n / (time.perf_counter() - t0)
        assert all(r.status == Status.OK for r in results)
    out = {
        "bench": "sandbox", "device": "cpu", "cpus": os.cpu_count(), "machine": platform.machine(), "n": n,
        "bare_p50_ms": statistics.median(lat_bare) * 1e3, "bare_p99_ms": pct(lat_bare, 0.99) * 1e3,
        "sandbox_p50_ms": statistics.median(lat_sb) * 1e3, "sandbox_p99_ms": pct(lat_sb, 0.99) * 1e3,
        "overhead_p50_ms": (statistics.median(lat_sb) - statistics.median(lat_bare)) * 1e3,
        "overhead_p99_ms": (pct(lat_sb, 0.99) - pct(lat_bare, 0.99)) * 1e3,
        "bare_exec_per_s": bare_rate, "sandbox_exec_per_s": sb_rate, "throughput_ratio_vs_bare": sb_rate / bare_rate,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
