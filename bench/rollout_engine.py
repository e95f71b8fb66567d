"""Rollout engines side by side: PagedEngine vs TorchEngine vs transformers' generate (paper 2.6.2).

A Qwen2-1.5B-shaped model (random init, bf16, built from a Qwen2Config: 28 layers, hidden 1536, 12 query /
2 KV heads of 128, vocabulary 151,936, tied embeddings), sampling at temperature 1 with no stop token and no
repeat detection, so every sequence runs its whole budget. Cases, all in one run:

- the issue's table: prompts of 256 tokens, 256 new tokens, batch 64 and 256. The two peers are timed on
  their first ``--peer-new-tokens`` new tokens (their per-token cost only grows with the context, so this
  favours them); the roofline is the batch times the measured copy bandwidth over the bytes one decode step
  must read at the mean context (all weights once + every sequence's K/V);
- the long case: prompts of 1k tokens, ``--long-new-tokens`` new tokens, batch 64 (PagedEngine only);
- the k1.5 group case: 64 prompts x 8 samples (prompts 256, 256 new tokens), identical prompts sharing their
  prefill and KV pages vs the same batch with ``share_prefixes=False``.

``--quick`` runs a tiny fp32 model on the CPU (exercises the script; not GPU figures).
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import benchlib
from k15sys.rollout import PagedEngine, SamplingParams, TorchEngine


def build_model(quick: bool) -> tuple[torch.nn.Module, str, torch.dtype]:
    if quick:
        cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        dev, dtype = "cpu", torch.float32
    else:
        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                          rope_theta=1e6, tie_word_embeddings=True)
        dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, dev, dtype


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev: str) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (the decode roofline's memory rate)."""
    n = (1 << 30) // 2 if dev == "cuda" else (1 << 24)
    x = torch.empty(n, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(dev)
    reps = 20 if dev == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(dev)
    return 2 * x.numel() * x.element_size() * reps / (time.perf_counter() - t0)


def roofline(model: torch.nn.Module, batch: int, prompt: int, new: int, bandwidth: float) -> float:
    """Tokens/s if each decode step read all weights once and every sequence's K/V at the mean context."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    step_bytes = weights + batch * (prompt + new / 2) * kv_per_token
    return batch * bandwidth / step_bytes


def prompts_of(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, length).tolist() for _ in range(batch)]


def timed(fn, dev: str) -> tuple[float, object]:
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def time_paged(engine: PagedEngine, prompts: list[list[int]], new: int, dev: str) -> dict:
    engine.generate(prompts, SamplingParams(min(new, 2 * engine.sync_every), seed=1))  # graphs captured, kernels built
    params = SamplingParams(new, seed=0)
    seconds, outs = timed(lambda: engine.generate(prompts, params), dev)
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == len(prompts) * new, "a sequence stopped early"
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def step_profile(engine: PagedEngine, batch: int, context: int, dev: str) -> dict:
    """Milliseconds of one decode step at ``batch`` rows of up to ``context`` tokens: the whole step (forward and
    sampling; a graph replay on CUDA) and its forward alone. Replayed over the step buffers the timed run
    left; their pages are free, so the writes land nowhere used."""
    out, reps = {}, 20 if dev == "cuda" else 2
    for name, sample in (("step_ms", True), ("forward_ms", False)):
        engine._decode_step(batch, context, sample=sample)
        seconds, _ = timed(lambda s=sample: [engine._decode_step(batch, context, sample=s) for _ in range(reps)], dev)
        out[name] = round(seconds / reps * 1e3, 3)
    return out


def time_torch_engine(model, prompts, new: int, dev: str) -> dict:
    engine = TorchEngine(model, device=dev, repeat_detector=None)
    engine.generate(prompts[:2], SamplingParams(2, seed=1))
    seconds, outs = timed(lambda: engine.generate(prompts, SamplingParams(new, seed=0)), dev)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def time_hf_generate(model, prompts, new: int, dev: str) -> dict:
    ids = torch.tensor(prompts, device=dev)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new)
    model.generate(ids[:2], attention_mask=mask[:2], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    seconds, out = timed(lambda: model.generate(ids, attention_mask=mask, **kw), dev)
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def summary(r: dict) -> list[str]:
    lines = [f"rollout engines on {r['device']} (copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s), tokens/s:"]
    for c in r["table"]:
        lines.append(f"  batch {c['batch']}: paged {c['paged']['tokens_per_s']:.0f} ({c['roofline_fraction']:.0%} of "
                     f"roofline {c['roofline_tokens_per_s']:.0f}), TorchEngine {c['torch_engine']['tokens_per_s']:.0f}, "
                     f"HF generate {c['hf_generate']['tokens_per_s']:.0f}; paged / TorchEngine "
                     f"{c['speedup_vs_torch_engine']:.1f}x, / generate {c['speedup_vs_hf_generate']:.1f}x")
    if "long" in r:
        lg = r["long"]
        lines.append(f"  long (batch {lg['batch']}, prompt {lg['prompt']}, {lg['new_tokens']} new): paged "
                     f"{lg['paged']['tokens_per_s']:.0f} ({lg['roofline_fraction']:.0%} of roofline)")
    if "group" in r:
        g = r["group"]
        lines.append(f"  group ({g['prompts']} prompts x {g['samples']}): shared {g['shared']['tokens_per_s']:.0f}, "
                     f"not shared {g['not_shared']['tokens_per_s']:.0f} -> {g['speedup']:.2f}x")
    return lines


def main() -> None:
    ap = benchlib.parser(__doc__, quick_help="tiny fp32 model on the CPU: exercises the script in under a minute")
    ap.add_argument("--peer-new-tokens", type=int, default=64, help="new tokens timed for TorchEngine / generate")
    ap.add_argument("--long-new-tokens", type=int, default=8192, help="new tokens of the long case")
    ap.add_argument("--cases", default="table,group,long",
                    help="comma-separated subset of table, group, long (all by default; the long case is the slowest)")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    if not cases <= {"table", "group", "long"}:
        ap.error(f"--cases: expected a subset of table,group,long, got {args.cases!r}")
    benchlib.require_gpus(args, "rollout_engine")
    quick = args.quick
    model, dev, dtype = build_model(quick)
    vocab = model.config.vocab_size
    if quick:
        torch.set_num_threads(1)
        batches, prompt, new, peer_new = (4, 8), 16, 16, 8
        long_b, long_p, long_n = 4, 32, 48
        group_p, group_k, name = 4, 4, "cpu"
        kw = dict(kv_cache_tokens=8192, max_num_seqs=16, sync_every=8)
    else:
        batches, prompt, new, peer_new = (64, 256), 256, 256, args.peer_new_tokens
        long_b, long_p, long_n = 64, 1024, args.long_new_tokens
        group_p, group_k, name = 64, 8, torch.cuda.get_device_name().replace(" ", "_")
        kw = dict(kv_cache_memory_fraction=0.5, max_num_seqs=512, sync_every=32)
    bandwidth = copy_bandwidth(dev)
    path = benchlib.result_path(args, f"rollout_engine_{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def partial() -> None:  # what is measured so far, in case a time limit ends the run
        path.write_text(json.dumps({**result, "partial": True}, indent=2) + "\n")
    engine = PagedEngine(model, device=dev, repeat_detector=None, **kw)
    result = {"bench": "rollout_engine", "device": name, "torch": torch.__version__, "dtype": str(dtype),
              "model": "Qwen2-1.5B-shaped, random init" if not quick else "tiny Qwen2",
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "kv_cache_pages": engine.num_pages,
              "page_size": engine.page_size, "cases": sorted(cases), "table": []}
    for b in batches if "table" in cases else ():
        ps = prompts_of(b, prompt, vocab, b)
        row = {"batch": b, "prompt": prompt, "new_tokens": new, "peer_new_tokens": peer_new,
               "paged": time_paged(engine, ps, new, dev)}
        row["paged_step"] = step_profile(engine, b, prompt + new, dev)
        print(row, flush=True)
        row["torch_engine"] = time_torch_engine(model, ps, peer_new, dev)
        row["hf_generate"] = time_hf_generate(model, ps, peer_new, dev)
        row["roofline_tokens_per_s"] = round(roofline(model, b, prompt, new, bandwidth), 1)
        row["roofline_fraction"] = round(row["paged"]["tokens_per_s"] / row["roofline_tokens_per_s"], 3)
        for peer in ("torch_engine", "hf_generate"):
            row[f"speedup_vs_{peer}"] = round(row["paged"]["tokens_per_s"] / row[peer]["tokens_per_s"], 2)
        result["table"].append(row)
        print(row, flush=True)
        partial()
    if "group" in cases:
        group_prompts = [p for p in prompts_of(group_p, prompt, vocab, 11) for _ in range(group_k)]
        shared = time_paged(engine, group_prompts, new, dev)
        engine.share_prefixes = False
        unshared = time_paged(engine, group_prompts, new, dev)
        engine.share_prefixes = True
        result["group"] = {"prompts": group_p, "samples": group_k, "prompt": prompt, "new_tokens": new,
                           "shared": shared, "not_shared": unshared,
                           "speedup": round(shared["tokens_per_s"] / unshared["tokens_per_s"], 2)}
        print(result["group"], flush=True)
        partial()
    if "long" in cases:
        long = {"batch": long_b, "prompt": long_p, "new_tokens": long_n,
                "paged": time_paged(engine, prompts_of(long_b, long_p, vocab, 7), long_n, dev),
                "roofline_tokens_per_s": round(roofline(model, long_b, long_p, long_n, bandwidth), 1)}
        long["roofline_fraction"] = round(long["paged"]["tokens_per_s"] / long["roofline_tokens_per_s"], 3)
        result["long"] = long
        print(long, flush=True)
    benchlib.finish(result, path, summary(result))


if __name__ == "__main__":
    main()
