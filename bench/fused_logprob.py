"""Fused hidden -> log-prob (+ entropy) forward+backward: k15sys vs naive torch, Liger-Kernel and CCE.

Workload (issue 3): forward + backward of ``sum(logprobs * w)`` for random per-token weights w, bf16,
hidden [T, H], LM head [V, H]. Implementations, all in one run on the same inputs:

* ``naive``: logits = h @ W^T, log_softmax in fp32, gather (+ entropy), autograd;
* ``liger``: Liger-Kernel's fused linear cross-entropy, reduction="none" (loss = -logprob);
* ``cce``: cut-cross-entropy ``linear_cross_entropy``, reduction="none";
* ``k15_autograd``: ``fused_logprobs(..., return_entropy=True)`` then autograd (entropy returned);
* ``k15_fused_loss``: ``fused_logprob_loss(h, W, y, w)`` (gradient produced in the forward; entropy
  returned too), which is how the k1.5 trainer calls it.

"extra memory" = peak allocated during fwd+bwd minus what was allocated before (inputs) minus the two
gradients every implementation must return (d hidden, d weight). TFLOP/s counts the useful 3 GEMMs
(6 T H V flops) for everyone; the floor is that count at the measured bf16 GEMM rate of the same GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from k15sys.ops.logprobs import fused_logprob_loss, fused_logprobs


def naive(h, w, y, coef):
    z = (h @ w.T).float()
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(1, y[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    (lp * coef).sum().backward()
    return lp, ent


def k15_autograd(h, w, y, coef):
    lp, ent = fused_logprobs(h, w, y, return_entropy=True)
    (lp * coef).sum().backward()
    return lp, ent


def k15_fused_loss(h, w, y, coef):
    loss, lp, ent = fused_logprob_loss(h, w, y, coef)
    loss.backward()
    return lp, ent


def make_liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    mod = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def run(h, w, y, coef):
        loss = mod(w, h, y)
        (-loss * coef).sum().backward()
        return -loss, None

    return run


def make_cce():
    from cut_cross_entropy import linear_cross_entropy

    def run(h, w, y, coef):
        loss = linear_cross_entropy(h, w, y, reduction="none")
        (-loss * coef).sum().backward()
        return -loss, None

    return run


def measure(fn, h, w, y, coef, iters, warmup):
    cuda = h.is_cuda
    times = []
    extra = None
    for i in range(warmup + iters):
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        lp, _ = fn(hh, ww, y, coef)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if cuda and i == warmup:
            grads = hh.grad.numel() * hh.grad.element_size() + ww.grad.numel() * ww.grad.element_size()
            outs = lp.numel() * lp.element_size() * 2
            extra = (torch.cuda.max_memory_allocated() - base - grads - outs) / 2**30
        if i >= warmup:
            times.append(dt)
        result = (lp.detach(), hh.grad, ww.grad)
        del hh, ww, lp
    return statistics.median(times) * 1e3, extra, result


def gemm_tflops(dev, dtype, n=8192, iters=20):
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def run_case(T, H, V, dev, dtype, impls, iters, warmup, ref_impl="naive"):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(T, H, generator=g) ).to(dev, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dev, dtype)
    y = torch.randint(0, V, (T,), generator=g).to(dev)
    coef = torch.randn(T, generator=g).to(dev)
    rows = {}
    ref = None
    for name, fn in impls.items():
        try:
            ms, extra, res = measure(fn, h, w, y, coef, iters, warmup)
        except torch.OutOfMemoryError:
            rows[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # a peer that fails is reported, not hidden
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        row = {"ms": ms, "extra_mem_gib": extra, "tflops": 6 * T * H * V / (ms * 1e-3) / 1e12}
        if ref is None and name == ref_impl:
            ref = res
        if ref is not None:
            row["max_abs_diff_logprob_vs_naive"] = (res[0].float() - ref[0].float()).abs().max().item()
            row["max_rel_diff_dweight_vs_naive"] = ((res[2].float() - ref[2].float()).norm() / ref[2].float().norm()).item()
        rows[name] = row
        del res
        if dev == "cuda":
            torch.cuda.empty_cache()
    for name, row in rows.items():
        for peer in ("naive", "liger", "cce"):
            if "ms" in row and "ms" in rows.get(peer, {}):
                row[f"speedup_vs_{peer}"] = rows[peer]["ms"] / row["ms"]
    return {"T": T, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""), "impls": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CPU-sized case, < 1 minute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    impls = {"naive": naive, "k15_autograd": k15_autograd, "k15_fused_loss": k15_fused_loss}
    if args.quick or not torch.cuda.is_available():
        dev, dtype = "cpu", torch.float32
        cases = [(512, 256, 8000)]
        iters, warmup = 3, 1
        device_name = platform.processor() or "cpu"
    else:
        dev, dtype = "cuda", torch.bfloat16
        for name, make in (("liger", make_liger), ("cce", make_cce)):
            try:
                impls[name] = make()
            except ImportError as e:
                print(f"peer {name} unavailable: {e}")
        cases = [(16384, 4096, 151936), (4096, 4096, 151936), (65536, 4096, 151936), (16384, 4096, 32000)]
        iters, warmup = 10, 3
        device_name = torch.cuda.get_device_name()
    results = []
    for T, H, V in cases:
        r = run_case(T, H, V, dev, dtype, impls, iters, warmup)
        print(json.dumps(r), flush=True)
        results.append(r)
    out = {"bench": "fused_logprob", "device": device_name, "torch": torch.__version__, "cases": results}
    if dev == "cuda":
        out["gemm_tflops_measured"] = gemm_tflops(dev, dtype)
        for r in results:
            floor_ms = 6 * r["T"] * r["H"] * r["V"] / (out["gemm_tflops_measured"] * 1e12) * 1e3
            r["matmul_floor_ms"] = floor_ms
            for row in r["impls"].values():
                if "ms" in row:
                    row["gap_to_floor"] = row["ms"] / floor_ms
        import triton

        out["triton"] = triton.__version__
    path = args.out or f"bench/results/fused_logprob_{'cpu' if dev == 'cpu' else device_name.replace(' ', '_')}.json"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
