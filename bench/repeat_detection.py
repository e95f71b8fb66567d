"""Repeat detection throughput (paper 2.6.2): our amortised-O(1) detector vs a naive per-token check.

The naive reference checks, after every token, every period p <= max_period for a periodic tail
(O(max_period * span) per token). Both run on the same streams in one run: a long non-repeating
stream (the common case, where the detector must cost ~nothing) and a stream that falls into a loop.
Prints a short summary, then one JSON object as its last line (written to runs/bench/ by default;
``--update-results``: bench/results/).
"""
from __future__ import annotations

import platform
import random
import time

import benchlib
from k15sys.algo import RepeatDetector


def naive_detect(tokens: list[int], min_repeats: int, min_span: int, max_period: int) -> int | None:
    seen: list[int] = []
    for t in tokens:
        seen.append(t)
        n = len(seen)
        for p in range(1, min(max_period, n) + 1):
            need = max(min_repeats * p, min_span)
            if need > n:
                continue
            if all(seen[n - 1 - j] == seen[n - 1 - j - p] for j in range(need - p)):
                return n
    return None


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def ours(tokens: list[int], min_repeats: int, min_span: int, max_period: int) -> int | None:
    det = RepeatDetector(min_repeats=min_repeats, min_span=min_span, max_period=max_period)
    det.extend(tokens)
    return det.match.end if det.match else None


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="small CPU case (< 1 minute)")
    args = ap.parse_args()
    n = 3_000 if args.quick else 20_000
    opts = dict(min_repeats=4, min_span=32, max_period=64)
    rng = random.Random(0)
    streams = {
        "no_loop": [rng.randrange(5000) for _ in range(n)],
        "loop_at_end": [rng.randrange(5000) for _ in range(n)] + [rng.randrange(5000) for _ in range(37)] * 8,
    }
    rows = {}
    for name, toks in streams.items():
        t_ours, a = timed(ours, toks, *opts.values())
        t_naive, b = timed(naive_detect, toks, *opts.values())
        rows[name] = {
            "tokens": len(toks),
            "ours_tokens_per_s": len(toks) / t_ours,
            "naive_tokens_per_s": len(toks) / t_naive,
            "speedup_vs_naive": t_naive / t_ours,
            "ours_detected_at": a,
            "naive_detected_at": b,
        }
    result = {"bench": "repeat_detection", "machine": platform.processor() or platform.machine(),
              "device": "cpu", "options": opts, "quick": args.quick, "streams": rows}
    lines = [f"repeat_detection: {n} tokens per stream, incremental detector vs the naive per-token check"]
    for name, r in rows.items():
        lines.append(f"  {name}: {r['ours_tokens_per_s']:,.0f} vs {r['naive_tokens_per_s']:,.0f} tokens/s "
                     f"({r['speedup_vs_naive']:.1f}x), detected at {r['ours_detected_at']} / {r['naive_detected_at']}")
    benchlib.finish(result, benchlib.result_path(args, "repeat_detection_cpu.json"), lines)


if __name__ == "__main__":
    main()
