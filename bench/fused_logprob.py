"""Fused hidden -> log-prob (+ entropy) forward+backward: k15sys vs naive torch, Liger-Kernel and CCE.

Workload (issue 3): forward + backward of ``sum(logprobs * w)`` for random per-token weights w, bf16,
hidden [T, H], LM head [V, H]. Implementations, all in one run on the same inputs:

* ``naive``: logits = h @ W^T, log_softmax in fp32, gather (+ entropy), autograd;
* ``liger``: Liger-Kernel's fused linear cross-entropy, reduction="none" (loss = -logprob);
* ``cce``: cut-cross-entropy ``linear_cross_entropy``, reduction="none";
* ``k15_autograd``: ``fused_logprobs(..., return_entropy=True)`` then autograd (entropy returned);
  ``k15_autograd_entgrad``: with a gradient through the entropy too; ``k15_autograd_noent``: log-probs only;
* ``k15_fused_loss``: ``fused_logprob_loss(h, W, y, w)`` (gradient produced in the forward; entropy
  returned too), which is how the k1.5 trainer calls it; ``k15_fused_loss_c<N>``: the same with a
  ``[N, V]`` logits chunk (the memory / speed trade-off), ``k15_fused_loss_entgrad``: with an entropy
  coefficient too.

Forward only, no gradient (the reference-policy log-prob pass): ``fwd_naive``, ``fwd_cce``,
``fwd_k15_fused`` (``chunk=0``: the fully fused Triton statistics kernel, no logits buffer) and
``fwd_k15_chunked`` (the default: cuBLAS logits chunk + Triton row statistics).

Memory, two conventions: ``extra_mem_gib`` = peak allocated during the call minus what was allocated
before (inputs) minus the gradients and outputs every implementation must return (d hidden, d weight,
log-probs); ``peak_minus_inputs_gib`` = peak minus what was allocated before (gradients included: the
issue's convention). TFLOP/s counts the useful 3 GEMMs (6 T H V flops; 2 T H V forward only) for
everyone; the floor is that count at the measured bf16 GEMM rate of the same GPU.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import torch

import benchlib
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


def k15_autograd_entgrad(h, w, y, coef):
    lp, ent = fused_logprobs(h, w, y, return_entropy=True)
    ((lp * coef).sum() + (ent * (0.01 * coef)).sum()).backward()
    return lp, ent


def k15_autograd_noent(h, w, y, coef):
    lp = fused_logprobs(h, w, y)
    (lp * coef).sum().backward()
    return lp, None


def k15_fused_loss(h, w, y, coef, chunk=None):
    loss, lp, ent = fused_logprob_loss(h, w, y, coef, chunk=chunk)
    loss.backward()
    return lp, ent


def k15_fused_loss_entgrad(h, w, y, coef):
    loss, lp, ent = fused_logprob_loss(h, w, y, coef, 0.01 * coef)
    loss.backward()
    return lp, ent


def fwd_naive(h, w, y, coef):
    logp = torch.log_softmax((h @ w.T).float(), -1)
    return logp.gather(1, y[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def fwd_k15_fused(h, w, y, coef):
    return fused_logprobs(h, w, y, return_entropy=True, backend="triton", chunk=0)


def fwd_k15_chunked(h, w, y, coef):
    return fused_logprobs(h, w, y, return_entropy=True, backend="triton")


def make_fwd_cce():
    from cut_cross_entropy import linear_cross_entropy

    def run(h, w, y, coef):
        return -linear_cross_entropy(h, w, y, reduction="none"), None

    return run


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


def measure(fn, h, w, y, coef, iters, warmup, grad=True):
    cuda = h.is_cuda
    times = []
    mem = {}
    for i in range(warmup + iters):
        hh = h.detach().requires_grad_(grad)
        ww = w.detach().requires_grad_(grad)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            lp, _ = fn(hh, ww, y, coef)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if cuda and i == warmup:
            peak = torch.cuda.max_memory_allocated() - base
            grads = 0
            if grad:
                grads = hh.grad.numel() * hh.grad.element_size() + ww.grad.numel() * ww.grad.element_size()
            outs = lp.numel() * lp.element_size() * 2
            mem = {"extra_mem_gib": (peak - grads - outs) / 2**30, "peak_minus_inputs_gib": peak / 2**30}
        if i >= warmup:
            times.append(dt)
        result = (lp.detach(), hh.grad, ww.grad)
        del hh, ww, lp
    return statistics.median(times) * 1e3, mem, result


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


def run_case(T, H, V, dev, dtype, impls, iters, warmup, ref_impl="naive", grad=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(T, H, generator=g) ).to(dev, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dev, dtype)
    y = torch.randint(0, V, (T,), generator=g).to(dev)
    coef = torch.randn(T, generator=g).to(dev)
    rows = {}
    ref = None
    for name, fn in impls.items():
        try:
            ms, mem, res = measure(fn, h, w, y, coef, iters, warmup, grad=grad)
        except torch.OutOfMemoryError:
            rows[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # a peer that fails is reported, not hidden
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        row = {"ms": ms, **mem, "tflops": (6 if grad else 2) * T * H * V / (ms * 1e-3) / 1e12}
        if ref is None and name == ref_impl:
            ref = res
        if ref is not None:
            row["max_abs_diff_logprob_vs_naive"] = (res[0].float() - ref[0].float()).abs().max().item()
            if grad:
                row["max_rel_diff_dweight_vs_naive"] = ((res[2].float() - ref[2].float()).norm()
                                                        / ref[2].float().norm()).item()
        rows[name] = row
        del res
        if dev == "cuda":
            torch.cuda.empty_cache()
    for name, row in rows.items():
        for peer in ("naive", "liger", "cce", "fwd_naive", "fwd_cce"):
            if "ms" in row and "ms" in rows.get(peer, {}):
                row[f"speedup_vs_{peer}"] = rows[peer]["ms"] / row["ms"]
    return {"T": T, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""), "grad": grad, "impls": rows}


def summary(out: dict) -> list[str]:
    lines = [f"fused_logprob on {out['device']}: ms per call, each implementation on the same inputs"]
    for r in out["cases"]:
        what = "fwd+bwd" if r["grad"] else "fwd only"
        cells = ", ".join(f"{n} {row['ms']:.1f}" if "ms" in row else f"{n} failed" for n, row in r["impls"].items())
        lines.append(f"  T={r['T']} H={r['H']} V={r['V']} {what}: {cells}")
    return lines


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="CPU-sized case, < 1 minute: exercises the script")
    args = ap.parse_args()
    benchlib.require_gpus(args, "fused_logprob")
    impls = {"naive": naive, "k15_autograd": k15_autograd, "k15_fused_loss": k15_fused_loss}
    fwd_impls = {"fwd_naive": fwd_naive}
    if args.quick:
        dev, dtype = "cpu", torch.float32
        cases = [(512, 256, 8000, True)]
        iters, warmup = 3, 1
        device_name = platform.processor() or "cpu"
    else:
        dev, dtype = "cuda", torch.bfloat16
        for name, make in (("liger", make_liger), ("cce", make_cce), ("fwd_cce", make_fwd_cce)):
            try:
                (fwd_impls if name.startswith("fwd") else impls)[name] = make()
            except ImportError as e:
                print(f"peer {name} unavailable: {e}")
        fwd_impls.update(fwd_k15_fused=fwd_k15_fused, fwd_k15_chunked=fwd_k15_chunked)
        main_impls = dict(impls, k15_autograd_entgrad=k15_autograd_entgrad, k15_autograd_noent=k15_autograd_noent,
                          k15_fused_loss_entgrad=k15_fused_loss_entgrad)
        for c in (1024, 4096):
            main_impls[f"k15_fused_loss_c{c}"] = lambda h, w, y, coef, c=c: k15_fused_loss(h, w, y, coef, chunk=c)
        cases = [(16384, 4096, 151936, True, main_impls), (4096, 4096, 151936, True), (65536, 4096, 151936, True),
                 (16384, 4096, 32000, True), (16384, 4096, 151936, False, fwd_impls),
                 (65536, 4096, 151936, False, fwd_impls), (16384, 4096, 32000, False, fwd_impls)]
        iters, warmup = 10, 3
        device_name = torch.cuda.get_device_name()
    results = []
    for T, H, V, grad, *case_impls in cases:
        big = T * V > 16384 * 151936  # the T = 65536 cases: fewer repetitions
        r = run_case(T, H, V, dev, dtype, case_impls[0] if case_impls else impls, 4 if big else iters,
                     2 if big else warmup,
                     ref_impl="naive" if grad else "fwd_naive", grad=grad)
        print(json.dumps(r), flush=True)
        results.append(r)
    out = {"bench": "fused_logprob", "device": device_name, "torch": torch.__version__, "cases": results}
    if dev == "cuda":
        out["gemm_tflops_measured"] = gemm_tflops(dev, dtype)
        for r in results:
            floor_ms = (6 if r["grad"] else 2) * r["T"] * r["H"] * r["V"] / (out["gemm_tflops_measured"] * 1e12) * 1e3
            r["matmul_floor_ms"] = floor_ms
            for row in r["impls"].values():
                if "ms" in row:
                    row["gap_to_floor"] = row["ms"] / floor_ms
        import triton

        out["triton"] = triton.__version__
    name = "cpu" if dev == "cpu" else device_name.replace(" ", "_")
    benchlib.finish(out, benchlib.result_path(args, f"fused_logprob_{name}.json"), summary(out))


if __name__ == "__main__":
    main()
