"""Weight sync: CheckpointEngine end to end vs a raw broadcast of the same bytes, in one run (paper 2.6.3).

Rank 0 (the trainer) holds ``--gb`` GB of bf16 weights as named tensors; every other rank (inference)
receives them into its own preallocated weights. Runs on any number of GPUs (one process per GPU, NCCL,
``--gpus N`` or all visible), or with ``--quick`` on the CPU (2 gloo processes, small size; the engine
timings are then labelled ``engine_cpu``: CPU tensors over gloo). Without ``--quick`` it refuses (exit 2)
on a machine with fewer than 2 GPUs. The JSON goes to ``--out`` (default runs/bench/;
``--update-results``: bench/results/).

Measured, each the median of ``--reps`` runs after a warm-up, every receiver checked bit-exact after each path:
* ``raw_broadcast``: dist.broadcast of the same bytes in ``--bucket-gb`` buckets, nothing else;
* ``engine_gpu``: CheckpointEngine.update from GPU-resident tensors, staged receivers (pack, broadcast,
  commit vote, then ``load_fn`` copies every tensor into the receiver's weights);
* ``engine_gpu_inplace``: the same with in-place receivers (``targets=`` their weights: each bucket is
  unpacked while the next is in flight, old bytes kept for rollback; nothing left after the vote);
* ``h2d``: the pinned host -> GPU copy of the same bytes alone on rank 0;
* ``engine_pinned`` / ``engine_pinned_inplace``: the same from pinned host tensors (H2D overlapped with
  the broadcast).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import benchlib
from k15sys.weights import CheckpointEngine, free_port


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _median_time(fn, reps: int, dev: torch.device) -> float:
    fn()
    ts = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    cuda = not args.quick
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)  # several gloo ranks share a few cores: no OpenMP oversubscription
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    nbytes = int(args.gb * 2**30)
    per = int(args.tensor_mb * 2**20) // 2
    n = max(1, nbytes // (per * 2))
    names = [f"w{i}" for i in range(n)]
    bucket = int(args.bucket_gb * 2**30)
    g = torch.Generator(device=dev).manual_seed(0)
    if rank == 0:
        gpu_w = {k: torch.randn(per, generator=g, device=dev).to(torch.bfloat16) for k in names}
        host_w = {k: v.cpu().pin_memory() if cuda else v.clone() for k, v in gpu_w.items()}
    dst = {k: torch.empty(per, dtype=torch.bfloat16, device=dev) for k in names} if rank else None

    def load(named):
        for k, t in named:
            dst[k].copy_(t, non_blocking=True)

    eng = CheckpointEngine(bucket_bytes=bucket, device=dev)
    version = [0]

    def engine_run(weights, in_place=False):
        version[0] += 1
        if rank == 0:
            eng.update(version[0], named_tensors=weights)
        elif in_place:
            eng.update(version[0], targets=dst)
        else:
            eng.update(version[0], load_fn=load)

    raw = torch.empty(min(bucket, n * per * 2), dtype=torch.uint8, device=dev)
    chunks = -(-n * per * 2 // raw.numel())

    def raw_run():
        works = [dist.broadcast(raw, src=0, async_op=True) for _ in range(chunks)]
        for w in works:
            w.wait()

    eng_key = "engine_gpu" if cuda else "engine_cpu"  # what the engine's tensors lived on
    res = {"raw_broadcast": _median_time(raw_run, args.reps, dev),
           eng_key: _median_time(lambda: engine_run(gpu_w if rank == 0 else None), args.reps, dev)}
    def delivered() -> bool:
        """The receivers' weights equal what rank 0 generated (same seed, same device type)."""
        if not rank:
            return True
        dst_ok = True
        g2 = torch.Generator(device=dev).manual_seed(0)
        for k in names:
            want = torch.randn(per, generator=g2, device=dev).to(torch.bfloat16)
            dst_ok &= torch.equal(dst[k], want)
            dst[k].zero_()  # the next path must deliver again
        return dst_ok

    ok = delivered()
    res[f"{eng_key}_inplace"] = _median_time(lambda: engine_run(gpu_w if rank == 0 else None, True), args.reps, dev)
    ok &= delivered()
    if cuda:
        if rank == 0:
            stage = torch.empty(n * per, dtype=torch.bfloat16, device=dev)

            def h2d():
                for i, k in enumerate(names):
                    stage[i * per:(i + 1) * per].copy_(host_w[k], non_blocking=True)
        else:
            def h2d():
                pass
        res["h2d"] = _median_time(h2d, args.reps, dev)
        res["engine_pinned"] = _median_time(lambda: engine_run(host_w if rank == 0 else None), args.reps, dev)
        ok &= delivered()
        res["engine_pinned_inplace"] = _median_time(lambda: engine_run(host_w if rank == 0 else None, True),
                                                    args.reps, dev)
        ok &= delivered()
    flags = [None] * world
    dist.all_gather_object(flags, ok)
    if rank == 0:
        res = {k: v * 1e3 for k, v in res.items()}
        result = {"bench": "weight_sync", "world_size": world, "bytes": n * per * 2, "bucket_bytes": bucket,
                  "device": torch.cuda.get_device_name() if cuda else "cpu (gloo)",
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                  "ms": res, "correct_on_all_receivers": all(flags),
                  f"{eng_key}_vs_raw": res[eng_key] / res["raw_broadcast"],
                  f"{eng_key}_inplace_vs_raw": res[f"{eng_key}_inplace"] / res["raw_broadcast"]}
        if cuda:
            floor = max(res["h2d"], res["raw_broadcast"])
            result["engine_pinned_vs_max_h2d_broadcast"] = res["engine_pinned"] / floor
            result["engine_pinned_inplace_vs_max_h2d_broadcast"] = res["engine_pinned_inplace"] / floor
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="2 gloo processes on the CPU, small size")
    ap.add_argument("--gb", type=float, default=16.0)
    ap.add_argument("--bucket-gb", type=float, default=1.0)
    ap.add_argument("--tensor-mb", type=float, default=64.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gpus", type=int, default=None)
    args = ap.parse_args()
    benchlib.require_gpus(args, "weight_sync", max(2, args.gpus or 2))
    if args.quick:
        args.gb, args.bucket_gb, args.tensor_mb, args.reps = 0.0625, 0.015625, 1.0, 3
        world = 2
    else:
        world = args.gpus or torch.cuda.device_count()
    port = free_port()
    tmp = f"/tmp/k15_weight_sync_{os.getpid()}.json"
    mp.spawn(worker, args=(world, port, args, tmp), nprocs=world, join=True)
    result = json.loads(Path(tmp).read_text())
    name = "cpu" if args.quick else f"{world}x{result['device'].replace(' ', '_')}"
    eng_key = "engine_cpu" if args.quick else "engine_gpu"
    ms = result["ms"]
    lines = [f"weight_sync on {result['device']}, {world} processes, {result['bytes'] / 2**30:.3g} GiB:",
             f"  raw broadcast {ms['raw_broadcast']:.1f} ms; CheckpointEngine {ms[eng_key]:.1f} ms staged "
             f"({result[eng_key + '_vs_raw']:.2f}x raw), {ms[eng_key + '_inplace']:.1f} ms in place",
             f"  every receiver bit-exact: {result['correct_on_all_receivers']}"]
    benchlib.finish(result, benchlib.result_path(args, f"weight_sync_{name}.json"), lines)


if __name__ == "__main__":
    main()
