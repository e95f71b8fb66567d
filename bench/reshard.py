"""Resharding throughput: Megatron TP=2 -> vLLM TP=4 for a Qwen2-1.5B-shaped model (random bf16),
next to a plain copy of the same number of bytes, in one run (paper 2.6.3).

The plan is built once (timed separately); execution goes into preallocated destination buffers
(``execute_into``, as a checkpoint engine would). Host: the C++ strided copies with N threads (streaming
stores, the default for copies this large, and plain memcpy stores for comparison) against
``torch.Tensor.copy_`` of one contiguous buffer of the same size with the same number of torch threads.
Reshard and reference alternate rep by rep, so load from other processes hits both alike.
With a CUDA device: the device path (the whole plan in one Triton launch) against a device copy of one
contiguous buffer of the same size. A short summary, then one JSON object on the last line (written to
runs/bench/ by default; ``--update-results``: bench/results/).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from transformers import Qwen2Config

import benchlib
import k15sys.weights.reshard as reshard_mod
from k15sys import _C
from k15sys.weights import ModelLayout, hf_shapes, plan_reshard


def config(quick: bool) -> Qwen2Config:
    if quick:
        return Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)


def alternating(fns: dict, reps: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns rep by rep (after one warm-up each).
    A pause before each call lets the previous one's idle threads (OpenMP spins) go to sleep."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            sync()
            time.sleep(0.25)
            t0 = time.perf_counter()
            fn()
            sync()
            if rep:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _MemcpyStores:
    """Runs the plan with plain memcpy stores (streaming off), for the comparison row."""

    def strided_copy(self, blocks, num_threads=0):
        return _C.strided_copy(blocks, num_threads=num_threads, streaming=False)


def host_rows(plan, src, dst, nbytes: int, threads: list[int], reps: int) -> list[dict]:
    a = torch.empty(nbytes, dtype=torch.uint8)
    a.random_()
    b = torch.empty_like(a)
    rows = []
    for n in threads:
        torch.set_num_threads(n)

        def memcpy_stores():
            reshard_mod._C = _MemcpyStores()
            try:
                plan.execute_into(src, dst, num_threads=n)
            finally:
                reshard_mod._C = _C

        t = alternating({"reshard": lambda: plan.execute_into(src, dst, num_threads=n),
                         "reshard_memcpy_stores": memcpy_stores, "torch_copy": lambda: b.copy_(a)}, reps)
        rows.append({"threads": n, **{f"{k}_GBps": nbytes / v / 1e9 for k, v in t.items()},
                     "ratio_vs_memcpy": t["torch_copy"] / t["reshard"]})
    return rows


def gpu_row(plan, src, want, nbytes: int, reps: int) -> dict:
    dev_src = [{k: v.cuda() for k, v in r.items()} for r in src]
    dst = [{k: torch.empty_like(v, device="cuda") for k, v in r.items()} for r in want]
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    plan.execute_into(dev_src, dst)  # builds the copy table for these buffers; the launch alone skips host checks
    t = alternating({"reshard": lambda: plan.execute_into(dev_src, dst),
                     "reshard_kernel_only": plan._launch_device_table,
                     "device_copy": lambda: b.copy_(a)}, reps, torch.cuda.synchronize)
    ok = all(torch.equal(x[k].cpu(), y[k]) for x, y in zip(dst, want) for k in y)
    return {"device": torch.cuda.get_device_name(), **{f"{k}_GBps": nbytes / v / 1e9 for k, v in t.items()},
            "reshard_vs_device_copy": t["device_copy"] / t["reshard"],
            "kernel_only_vs_device_copy": t["device_copy"] / t["reshard_kernel_only"], "correct": ok}


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="a small Qwen2 shape instead of Qwen2-1.5B")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 2 and all cores)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = [int(x) for x in args.threads.split(",")] if args.threads else sorted({min(2, cores), cores})
    reps = args.reps or (3 if args.quick else 5)
    cfg = config(args.quick)
    torch.set_num_threads(cores)
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
    host = host_rows(plan, src, dst, nbytes, threads, reps)
    want = dst_l.shard(src_l.unshard(src))  # reference: full HF tensors sliced straight into vLLM's layout
    ok = all(torch.equal(x[k], y[k]) for x, y in zip(dst, want) for k in y)
    out = {
        "bench": "reshard", "host": f"cpu ({platform.machine()}, {cores} cores)",
        "model": "qwen2-small (quick)" if args.quick else "Qwen2-1.5B shape", "params": params,
        "bytes": nbytes, "copies_in_plan": plan.num_copies, "plan_seconds": plan_s, "correct": ok,
        "host_rows": host,
        "ratio_vs_memcpy_2_threads": next((r["ratio_vs_memcpy"] for r in host if r["threads"] == 2), None),
    }
    if torch.cuda.is_available():
        del dst
        out["gpu"] = gpu_row(plan, src, want, nbytes, reps)
    name = out["gpu"]["device"].replace(" ", "_") if "gpu" in out else f"cpu{cores}"
    lines = [f"reshard Megatron TP=2 -> vLLM TP=4, {out['model']}, {nbytes / 2**30:.2f} GiB, correct: {ok}"]
    for r in host:
        lines.append(f"  host, {r['threads']} threads: {r['reshard_GBps']:.1f} GB/s vs one contiguous torch copy "
                     f"{r['torch_copy_GBps']:.1f} GB/s ({r['ratio_vs_memcpy']:.2f}x)")
    if "gpu" in out:
        lines.append(f"  {out['gpu']['device']}: {out['gpu']['reshard_GBps']:.0f} GB/s, "
                     f"{out['gpu']['reshard_vs_device_copy']:.2f}x a device copy")
    benchlib.finish(out, benchlib.result_path(args, f"reshard_{name}{'_quick' if args.quick else ''}.json"), lines)


if __name__ == "__main__":
    main()
