"""Host resharding throughput: Megatron TP=2 -> vLLM TP=4 for a Qwen2-1.5B-shaped model (random bf16),
next to a plain copy of the same number of bytes, in one run (paper 2.6.3).

The plan is built once (timed separately); execution runs the C++ strided copies with N threads into
preallocated destination buffers (``execute_into``, as a checkpoint engine would). The reference copies
one contiguous buffer of the same size with ``torch.Tensor.copy_`` (torch's own multi-threaded memcpy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config

from k15sys.weights import ModelLayout, hf_shapes, plan_reshard


def config(quick: bool) -> Qwen2Config:
    if quick:
        return Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)


def timed(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = config(args.quick)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in hf_shapes(cfg).items()}
    params = sum(t.numel() for t in full.values())
    src_l, dst_l = ModelLayout.megatron(cfg, 2), ModelLayout.vllm(cfg, 4)
    t0 = time.perf_counter()
    plan = plan_reshard(src_l, dst_l)
    plan_s = time.perf_counter() - t0
    src = src_l.shard(full)
    del full
    dst = [{n: torch.empty(s, dtype=torch.bfloat16) for n, s in r.items()} for r in dst_l.shapes()]
    nbytes = sum(t.numel() * 2 for r in dst for t in r.values())
    reps = 3 if args.quick else 5
    t_reshard = timed(lambda: plan.execute_into(src, dst, num_threads=args.threads), reps)
    a = torch.empty(nbytes, dtype=torch.uint8)
    a.random_()
    b = torch.empty_like(a)
    t_copy = timed(lambda: b.copy_(a), reps)
    ok = all(torch.equal(x[k], y[k]) for x, y in zip(dst, dst_l.shard(src_l.unshard(src))) for k in x)
    out = {
        "bench": "reshard", "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "threads": args.threads,
        "model": "qwen2-small (quick)" if args.quick else "Qwen2-1.5B shape", "params": params,
        "bytes": nbytes, "copies_in_plan": plan.num_copies, "plan_seconds": plan_s,
        "reshard_seconds": t_reshard, "reshard_GBps": nbytes / t_reshard / 1e9,
        "memcpy_seconds": t_copy, "memcpy_GBps": nbytes / t_copy / 1e9,
        "ratio_vs_memcpy": t_copy / t_reshard, "correct": ok,
    }
    path = args.out or f"bench/results/reshard_cpu{os.cpu_count()}{'_quick' if args.quick else ''}.json"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
