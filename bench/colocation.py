"""The hybrid deployment's moves (paper 2.6.3), before and after persistent pinned buffers, side by side.

On a Qwen2.5-1.5B-shaped Qwen2 (bf16, built in memory with random weights), each iteration of a colocated run
moves the trainer's tensors to host memory and back (``TrainerOffload``) and puts the rollout engine to sleep and
wakes it (``PagedEngine.sleep`` / ``wake``). Measured here, each move timed with CUDA synchronised around it:

- trainer, bf16 AdamW state (``model.master_weights=none``) and fp32 master weights + fp32 moments (the bf16
  default): the previous path (``module.to("cpu")`` and ``Tensor.to`` per optimizer state tensor, pageable memory,
  freed blocks returned with ``empty_cache``) against ``TrainerOffload`` (``HostMirror``: buffers page-locked once,
  copies on a side stream, one synchronisation; with masters the bf16 parameters are recomputed from them, not
  copied: ``bytes_moved_each_way`` against ``trainer_bytes``);
- engine: the previous sleep/wake (weights to pageable host memory and back, re-fused, cache reallocated)
  against ``sleep(level=1)`` (weights through pinned buffers) and ``sleep(level=2)`` + a weight push (what the
  trainer does: the weights are discarded, reallocated by wake and filled by the push); the KV cache allocation
  and CUDA-graph recapture of the first generate call after wake are reported apart (they run inside the rollout).

Every round trip is checked bit for bit. The first move of the new path also locks its host buffers (a one-time
cost, reported apart); figures are medians of ``--reps`` repetitions (``--previous-reps`` for the previous
trainer path, seconds per move). ``--quick`` only exercises the code: on the CPU the previous path moves nothing.

    python bench/colocation.py --quick     # tiny model on the CPU (the host path), < 1 minute
    python bench/colocation.py             # one GPU
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import benchlib
import torch

from rl_iteration import QWEN25_15B, TINY

from k15sys.train.scratch_model import scratch_lm


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def build(quick: bool, device: torch.device) -> torch.nn.Module:
    shape = {"vocab_size": 1000, **(TINY if quick else QWEN25_15B)}
    return scratch_lm(arch="qwen2", dtype=torch.bfloat16, device=str(device), **shape)


def _state_tensors(opt: Any) -> list[tuple[dict, str]]:
    return [(st, k) for st in opt.state.values() for k, v in st.items()
            if torch.is_tensor(v) and v.device.type != "cpu"]


class PreviousTrainerOffload:
    """The moves before HostMirror (the baseline): ``module.to`` for the module, ``Tensor.to`` per optimizer
    tensor (the optimizer's own parameters too, for master weights), pageable memory, ``empty_cache``."""

    def __init__(self, model: torch.nn.Module, opt: Any, device: torch.device) -> None:
        self.model, self.opt, self.device = model, opt, device
        own = {id(p) for p in model.parameters()}
        self.extra = [p for g in opt.param_groups for p in g["params"] if id(p) not in own]

    def offload(self) -> None:
        self.model.to("cpu")
        for p in self.extra:
            p.data = p.data.to("cpu")
        self.moved = _state_tensors(self.opt)
        for st, k in self.moved:
            st[k] = st[k].to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def onload(self) -> None:
        self.model.to(self.device)
        for p in self.extra:
            p.data = p.data.to(self.device)
        for st, k in self.moved:
            st[k] = st[k].to(self.device)


def trainer_case(lm: torch.nn.Module, device: torch.device, *, masters: bool, reps: int,
                 previous_reps: int) -> dict[str, Any]:
    from k15sys.train.hybrid import TrainerOffload
    from k15sys.train.optim import build_optimizer

    opt = build_optimizer("adamw", lm, lr=1e-6, master_weights=masters)
    new = TrainerOffload(lm, opt, device)
    new.enabled = True  # on the CPU (--quick) the host path, with the CPU standing in for the device
    first_offload = timed(new.offload)  # before the first step: buffers locked for the state to come
    new.onload()
    for p in lm.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    module, rest = new.tensors()
    moving = module + rest
    nbytes = sum(t.numel() * t.element_size() for t in moving)
    want = [t.clone() for t in moving]
    times: dict[str, list[float]] = {k: [] for k in ("previous_offload", "previous_onload", "offload", "onload")}
    old = PreviousTrainerOffload(lm, opt, device)
    for _ in range(previous_reps):
        times["previous_offload"].append(timed(old.offload))
        times["previous_onload"].append(timed(old.onload))
    for _ in range(reps):
        times["offload"].append(timed(new.offload))
        times["onload"].append(timed(new.onload))
    module, rest = new.tensors()  # the previous path replaced the state tensors in the optimizer's dicts
    exact = all(torch.equal(a, b) for a, b in zip(module + rest, want))
    out = {k: statistics.median(v) if v else None for k, v in times.items()}
    out.update({
        "trainer_bytes": nbytes, "bytes_moved_each_way": new.mirror.layout_bytes,
        "first_offload_with_locking_s": first_offload,
        "host_bytes_locked": new.mirror.host_bytes, "host_buffer_allocations": new.mirror.allocations,
        "bit_identical": exact,
        "round_trip_speedup": None if not previous_reps else
        (out["previous_offload"] + out["previous_onload"]) / (out["offload"] + out["onload"]),
        "new_gb_per_s_each_way": new.mirror.layout_bytes / 1e9 / max(out["offload"], out["onload"]),
    })
    del new, old, opt, module, rest, want
    for p in lm.parameters():
        p.grad = None
    return out


def engine_case(lm: torch.nn.Module, device: torch.device, *, reps: int) -> dict[str, Any]:
    from k15sys.rollout.paged_engine import make_rollout_engine
    from k15sys.rollout.types import SamplingParams

    eng = make_rollout_engine("paged", copy.deepcopy(lm), device,
                              kv_cache_tokens=None if device.type == "cuda" else 4096)
    vocab = eng.decoder.vocab
    prompts = [[(37 * i + j) % (vocab - 10) + 5 for j in range(60 + i)] for i in range(32) for _ in range(8)]
    sp = SamplingParams(8 if device.type == "cpu" else 32, temperature=1.0, seed=0)
    eng.generate(prompts, sp)  # compile, autotune, capture
    weights = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    first_level1 = timed(lambda: eng.sleep(level=1))  # locks the host buffers for the weights (once)
    eng.wake()
    times: dict[str, list[float]] = {k: [] for k in (
        "previous_sleep", "previous_wake", "sleep_level1", "wake_level1", "sleep_level2", "wake_level2",
        "push_after_level2", "generate_after_wake", "generate_graphs_captured")}

    def previous_sleep() -> None:
        eng._kv = eng._cos = eng._sin = None
        eng._graphs, eng._graph_pool = {}, None
        eng.decoder.fused = []
        eng.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def previous_wake() -> None:
        eng.model.to(device)
        if eng.fused_kernels:
            eng.decoder.fuse_projections()
        eng._allocate()

    for _ in range(reps):
        times["previous_sleep"].append(timed(previous_sleep))
        times["previous_wake"].append(timed(previous_wake))
        times["sleep_level1"].append(timed(lambda: eng.sleep(level=1)))
        times["wake_level1"].append(timed(eng.wake))
        times["generate_after_wake"].append(timed(lambda: eng.generate(prompts, sp)))  # KV cache + graph capture
        times["generate_graphs_captured"].append(timed(lambda: eng.generate(prompts, sp)))
        times["sleep_level2"].append(timed(lambda: eng.sleep(level=2)))
        times["wake_level2"].append(timed(eng.wake))
        times["push_after_level2"].append(timed(lambda: eng.update_weights(weights.items())))
        eng.generate(prompts[:8], sp)
    exact = all(torch.equal(p, weights[n]) for n, p in eng.model.named_parameters())
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({
        "weight_bytes": sum(p.numel() * p.element_size() for p in eng.model.parameters()),
        "kv_cache_bytes": eng.num_pages * eng._page_bytes, "bit_identical_after_level1": exact,
        "first_sleep_level1_with_locking_s": first_level1,
        "level1_speedup": (out["previous_sleep"] + out["previous_wake"]) / (out["sleep_level1"] + out["wake_level1"]),
        "level2_speedup": (out["previous_sleep"] + out["previous_wake"]) / (out["sleep_level2"] + out["wake_level2"]),
        "first_generate_extra_s": out["generate_after_wake"] - out["generate_graphs_captured"],
    })
    return out


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="a tiny model, the host path on the CPU (< 1 minute)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per move (median reported)")
    ap.add_argument("--previous-reps", type=int, default=1, help="repetitions of the previous trainer path (seconds "
                    "per move on a GPU)")
    args = ap.parse_args()
    benchlib.require_gpus(args, "colocation")
    gpu = not args.quick and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    lm = build(not gpu, device)
    result: dict[str, Any] = {
        "bench": "colocation", "quick": args.quick, "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__, "model": "tiny Qwen2" if not gpu else "Qwen2.5-1.5B shape (random), bf16",
        "parameters": sum(p.numel() for p in lm.parameters()), "reps": args.reps, "previous_reps": args.previous_reps,
    }
    name = "cpu_quick" if not gpu else result["device"].replace(" ", "_")
    out_path = benchlib.result_path(args, f"colocation_{name}.json")
    for name, masters in (("trainer_bf16_adamw", False), ("trainer_fp32_master_weights", True)):
        result[name] = trainer_case(lm, device, masters=masters, reps=args.reps, previous_reps=args.previous_reps)
        if gpu:
            torch.cuda.empty_cache()
    result["engine"] = engine_case(lm, device, reps=args.reps)

    def summary() -> list[str]:
        lines = [f"colocation moves on {result['device']} ({result['model']}), medians of {args.reps}"]
        for name in ("trainer_bf16_adamw", "trainer_fp32_master_weights"):
            r = result[name]
            before = (f"previous {r['previous_offload']:.3f} + {r['previous_onload']:.3f} s, "
                      if r["round_trip_speedup"] else "")
            ratio = f" ({r['round_trip_speedup']:.1f}x)" if r["round_trip_speedup"] else ""
            lines.append(f"  {name}: {r['trainer_bytes'] / 2**30:.2f} GiB of state, "
                         f"{r['bytes_moved_each_way'] / 2**30:.2f} GiB copied each way; {before}now "
                         f"{r['offload']:.3f} + {r['onload']:.3f} s{ratio}; first offload with locking "
                         f"{r['first_offload_with_locking_s']:.2f} s; exact: {r['bit_identical']}")
        e = result["engine"]
        lines.append(f"  engine: previous sleep+wake {e['previous_sleep'] + e['previous_wake']:.3f} s; level 1 "
                     f"{e['sleep_level1'] + e['wake_level1']:.3f} s ({e['level1_speedup']:.1f}x, exact: "
                     f"{e['bit_identical_after_level1']}); level 2 {e['sleep_level2'] + e['wake_level2']:.3f} s "
                     f"({e['level2_speedup']:.1f}x) + push {e['push_after_level2']:.3f} s; first generate after "
                     f"wake +{e['first_generate_extra_s']:.3f} s (KV cache, graph capture)")
        return lines

    benchlib.finish(result, out_path, summary())


if __name__ == "__main__":
    main()
