"""Causal varlen attention: k15sys Triton kernel vs torch SDPA (FlashAttention-2 backend, cuDNN backend).

Shapes (issue 4): causal, bf16, D=128, 16 heads, S in {8192 x 8, 32768 x 2, 131072 x 1}, and GQA 32 query / 8 kv
heads at 32768 x 1 (the peers get k/v expanded to 32 heads); TFLOP/s counted as
4*S^2*H*D/2 per sequence for the forward and 3.5x that for forward+backward. Plus a packed long-tail batch
(64k tokens, lognormal lengths between 500 and 32k) against running SDPA once per sequence, and issue 21's
packed mix (131,072 tokens: 1 x 65,536, 4 x 8,192, 14 of 1-4k) fwd+bwd, k15 in one varlen call against
cuDNN and FlashAttention-2 (SDPA backends) once per sequence, plus its longest sequence alone (each side), which
bounds what scheduling the short sequences better could still gain. All in one run
on the same inputs. ``--quick`` runs tiny CPU shapes (torch backend vs SDPA math) to exercise the script.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import benchlib
from k15sys.ops.attention import varlen_attention


def bench(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    cuda = torch.cuda.is_available()
    ts = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def sdpa_fn(q4, k4, v4, backend, grad):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run():
        with sdpa_kernel(be):
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)
        if grad:
            o.backward(torch.ones_like(o))
    return run


def ours_fn(q, k, v, cu, maxlen, grad, backend):
    def run():
        o = varlen_attention(q, k, v, cu, maxlen, backend=backend)
        if grad:
            o.backward(torch.ones_like(o))
    return run


def uniform_case(B, S, H, D, dev, dtype, peers, backend, reps, HKV=None):
    """B sequences of S tokens; with ``HKV`` < H (GQA) the peers get k/v expanded to H heads (their GQA input)."""
    HKV = HKV or H
    g = torch.Generator(device="cpu").manual_seed(S)
    q4 = torch.randn(B, H, S, D, generator=g).to(dev, dtype)
    k4, v4 = (torch.randn(B, HKV, S, D, generator=g).to(dev, dtype).repeat_interleave(H // HKV, 1) for _ in range(2))
    packed = [x.transpose(1, 2).reshape(B * S, x.shape[1], D).contiguous() for x in (q4, k4[:, ::H // HKV],
                                                                                     v4[:, ::H // HKV])]
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=dev)
    flops_f = B * 4 * S * S * H * D / 2
    row = {"B": B, "S": S, "heads": H, "kv_heads": HKV}
    for grad in (False, True):
        tag = "fwd_bwd" if grad else "fwd"
        flops = flops_f * (3.5 if grad else 1.0)
        ins = [x.detach().requires_grad_(grad) for x in packed]
        ms = bench(ours_fn(*ins, cu, S, grad, backend), reps)
        row[f"k15_{tag}_ms"], row[f"k15_{tag}_tflops"] = ms, flops / ms / 1e9
        for p in peers:
            ins4 = [x.detach().requires_grad_(grad) for x in (q4, k4, v4)]
            try:
                ms_p = bench(sdpa_fn(*ins4, p, grad), reps)
                row[f"{p}_{tag}_ms"], row[f"{p}_{tag}_tflops"] = ms_p, flops / ms_p / 1e9
                row[f"speedup_vs_{p}_{tag}"] = ms_p / ms
            except RuntimeError as e:
                row[f"{p}_{tag}_error"] = str(e)[:200]
    # same output as the peer (forward): relative error, largest difference, share of elements that differ
    with torch.no_grad():
        o = varlen_attention(*packed, cu, S, backend=backend)
        ref = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True).transpose(1, 2).reshape(B * S, H, D)
        diff = o.float() - ref.float()
        row["rel_err_vs_sdpa"] = (diff.norm() / ref.float().norm()).item()
        row["max_abs_diff_vs_sdpa"] = diff.abs().max().item()
        row["frac_elements_differ_vs_sdpa"] = (o != ref).float().mean().item()
    return row


def packed_case(total, H, D, dev, dtype, backend, reps, lo, hi):
    rng = np.random.default_rng(0)
    lens = []
    while sum(lens) < total:
        lens.append(int(np.clip(rng.lognormal(np.log(3000), 1.0), lo, hi)))
    lens[-1] -= sum(lens) - total
    lens = [L for L in lens if L > 0]
    T = sum(lens)
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(T, H, D, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32, device=dev)

    def per_seq():
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            o = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True)
            outs.append(o[0].transpose(0, 1))
        torch.cat(outs).backward(torch.ones(T, H, D, device=dev, dtype=dtype))

    ours = bench(ours_fn(q, k, v, cu, max(lens), True, backend), reps)
    peer = bench(per_seq, reps)
    return {"tokens": T, "sequences": len(lens), "max_len": max(lens), "k15_fwd_bwd_ms": ours,
            "sdpa_per_sequence_fwd_bwd_ms": peer, "speedup": peer / ours}


def mix_lengths(big: int, mid: int, n_mid: int, n_small: int, lo: int, hi: int, total: int) -> list[int]:
    """Issue 21's packed long-tail mix: one ``big`` sequence, ``n_mid`` of ``mid`` tokens and ``n_small`` of
    ``lo``..``hi`` tokens (seeded), the small ones scaled so that the batch holds exactly ``total`` tokens."""
    rest = total - big - n_mid * mid
    raw = np.random.default_rng(0).uniform(lo, hi, n_small)
    small = [int(x) for x in np.floor(raw * rest / raw.sum())]
    small[-1] += rest - sum(small)
    return [big] + [mid] * n_mid + small


def mix_case(lens, H, D, dev, dtype, backend, reps, peers):
    """fwd+bwd of one packed batch: k15 in one varlen call vs each SDPA backend called once per sequence."""
    T = sum(lens)
    g = torch.Generator(device="cpu").manual_seed(2)
    q, k, v = (torch.randn(T, H, D, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32, device=dev)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def per_seq(peer):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[peer]

        def run():
            with sdpa_kernel(be):
                outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
                                                       is_causal=True)[0].transpose(0, 1) for a, b in bounds]
            torch.cat(outs).backward(torch.ones(T, H, D, device=dev, dtype=dtype))
        return run

    flops = sum(4 * L * L * H * D / 2 for L in lens) * 3.5
    row = {"tokens": T, "sequences": len(lens), "lengths": lens, "heads": H, "head_dim": D}
    row["k15_fwd_bwd_ms"] = bench(ours_fn(q, k, v, cu, max(lens), True, backend), reps)
    row["k15_fwd_bwd_tflops"] = flops / row["k15_fwd_bwd_ms"] / 1e9
    for p in peers:
        try:
            row[f"{p}_per_sequence_fwd_bwd_ms"] = bench(per_seq(p), reps)
            row[f"speedup_vs_{p}_per_sequence"] = row[f"{p}_per_sequence_fwd_bwd_ms"] / row["k15_fwd_bwd_ms"]
        except RuntimeError as e:
            row[f"{p}_per_sequence_error"] = str(e)[:200]
    # the longest sequence alone (k15, and each peer): how much of the batch's time it is, i.e. what a better
    # schedule of the short sequences around it could still save
    L0 = max(lens)
    a = lens.index(L0)
    b0 = int(cu[a])
    one = [x[b0:b0 + L0].detach().requires_grad_() for x in (q, k, v)]
    cu1 = torch.tensor([0, L0], dtype=torch.int32, device=dev)
    row["longest_share_of_flops"] = 4 * L0 * L0 * H * D / 2 * 3.5 / flops
    row["k15_longest_alone_fwd_bwd_ms"] = bench(ours_fn(*one, cu1, L0, True, backend), reps)
    for p in peers:
        try:
            row[f"{p}_longest_alone_fwd_bwd_ms"] = bench(sdpa_fn(*(x.transpose(0, 1)[None] for x in one), p, True),
                                                         reps)
        except RuntimeError as e:
            row[f"{p}_longest_alone_error"] = str(e)[:200]
    return row


def sweep(dev, dtype) -> dict:
    """Try block configurations at S=32768 x 2 (D=128) and install the fastest: forward configs on the forward,
    then dK/dV configs and dQ configs (one kernel at a time, the other held) on forward + backward."""
    from k15sys.ops import attention as A

    B, S, H, D = 2, 32768, 16, 128
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B * S, H, D, generator=g).to(dev, dtype) for _ in range(3))
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=dev)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    tables = [("fwd", A.FWD_CONFIG, [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)], False),
              ("dkdv", A.DKDV_CONFIG, [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (32, 128, 8, 3)], True),
              ("dq", A.DQ_CONFIG, [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 8, 4)], True)]
    out = {"chosen": {}}
    for name, table, cfgs, grad in tables:
        out[name] = {}
        for c in cfgs:
            table[D] = c
            try:
                out[name][str(c)] = bench(ours_fn(*((qg, kg, vg) if grad else (q, k, v)), cu, S, grad, "triton"), 3)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                out[name][str(c)] = f"{type(e).__name__}"
        best = min((c for c in cfgs if isinstance(out[name][str(c)], float)), key=lambda c: out[name][str(c)])
        table[D] = best
        out["chosen"][name] = best
    print(json.dumps(out), flush=True)
    return out


def summary(result: dict) -> list[str]:
    lines = [f"attention on {result['device']}: causal varlen, k15 times; speed-up = peer time / k15 time"]
    for r in result["cases"]:
        peers = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        lines.append(f"  B={r['B']} S={r['S']} heads {r['heads']}/{r['kv_heads']}: fwd {r['k15_fwd_ms']:.2f} ms, fwd+bwd {r['k15_fwd_bwd_ms']:.2f} ms; "
                     f"speed-up {peers}")
    pk = result["packed_long_tail"]
    lines.append(f"  packed long tail ({pk['sequences']} sequences, {pk['tokens']} tokens): {pk['speedup']:.2f}x "
                 f"vs SDPA per sequence")
    mx = result["packed_mix"]
    peers = ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in mx.items() if k.startswith("speedup_vs_"))
    lines.append(f"  packed mix ({mx['sequences']} sequences, {mx['tokens']} tokens) fwd+bwd: k15 "
                 f"{mx['k15_fwd_bwd_ms']:.1f} ms in one call; speed-up {peers}; its longest sequence alone "
                 f"({mx['longest_share_of_flops']:.0%} of the FLOPs): k15 {mx['k15_longest_alone_fwd_bwd_ms']:.1f} ms")
    return lines


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="tiny CPU shapes (torch backend vs SDPA math): exercises the script")
    ap.add_argument("--sweep", action="store_true", help="GPU: pick block sizes first (printed and recorded)")
    args = ap.parse_args()
    benchlib.require_gpus(args, "attention")
    if args.quick:
        dev, dtype, backend, peers, reps = "cpu", torch.float32, "torch", ["math"], 2
        cases = [(2, 256, 4, 64), (1, 128, 4, 64, 2)]
        packed = (4096, 4, 64, 100, 1024)
        mix = (mix_lengths(1024, 128, 4, 14, 16, 64, 2048), 4, 64)
        name = "cpu"
    else:
        dev, dtype, backend, peers, reps = "cuda", torch.bfloat16, "triton", ["flash", "cudnn"], 5
        cases = [(8, 8192, 16, 128), (2, 32768, 16, 128), (1, 131072, 16, 128), (1, 32768, 32, 128, 8)]
        packed = (65536, 16, 128, 500, 32768)
        mix = (mix_lengths(65536, 8192, 4, 14, 1024, 4096, 131072), 16, 128)
        name = torch.cuda.get_device_name().replace(" ", "_")
    tuned = sweep(dev, dtype) if args.sweep and dev == "cuda" else None
    rows = []
    for B, S, H, D, *hkv in cases:
        rows.append(uniform_case(B, S, H, D, dev, dtype, peers, backend, reps, *hkv))
        print(json.dumps(rows[-1]), flush=True)
    result = {"bench": "attention", "device": name, "torch": torch.__version__, "sweep": tuned, "cases": rows,
              "packed_long_tail": packed_case(*packed[:3], dev, dtype, backend, reps, *packed[3:]),
              "packed_mix": mix_case(*mix, dev, dtype, backend, reps, peers)}
    benchlib.finish(result, benchlib.result_path(args, f"attention_{name}.json"), summary(result))


if __name__ == "__main__":
    main()
