"""Layouts and reshard plans (paper 2.6.3): round trips bit-exact, Megatron -> vLLM as vLLM slices, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from k15sys.weights import ModelLayout, hf_shapes, plan_reshard


def qwen(tie=False, nkv=2, V=1000):
    return Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=nkv, tie_word_embeddings=tie)


def random_state(cfg, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in hf_shapes(cfg).items()}


LAYOUTS = [
    ("hf", None), ("fsdp", 1), ("fsdp", 3), ("fsdp", 4), ("megatron", 1), ("megatron", 2),
    ("vllm", 1), ("vllm", 2), ("vllm", 4), ("vllm", 8),
]


def make(kind, n, cfg):
    return ModelLayout.hf(cfg) if kind == "hf" else getattr(ModelLayout, kind)(cfg, n)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("a", LAYOUTS)
@pytest.mark.parametrize("b", [("fsdp", 2), ("megatron", 2), ("vllm", 4)])
def test_a_to_b_to_a_is_bit_exact(a, b, tie):
    cfg = qwen(tie=tie)
    sd = random_state(cfg)
    A, B = make(*a, cfg), make(*b, cfg)
    shards_a = A.shard(sd)
    back = plan_reshard(B, A).execute(plan_reshard(A, B).execute(shards_a))
    for ra, rb in zip(shards_a, back):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert torch.equal(ra[k], rb[k]), k
    full = A.unshard(shards_a)
    assert all(torch.equal(full[k], sd[k]) for k in sd)


def vllm_slices(sd, cfg, tp):
    """vLLM's sharding written out directly from the HF tensors (the independent reference)."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    nh, nkv, I, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size
    Vp = (V + 63) // 64 * 64
    out = []
    for r in range(tp):
        d = {}
        emb = torch.cat([sd["model.embed_tokens.weight"], torch.zeros(Vp - V, cfg.hidden_size, dtype=torch.bfloat16)])
        d["model.embed_tokens.weight"] = emb[r * Vp // tp:(r + 1) * Vp // tp]
        head = torch.cat([sd["lm_head.weight"], torch.zeros(Vp - V, cfg.hidden_size, dtype=torch.bfloat16)])
        d["lm_head.weight"] = head[r * Vp // tp:(r + 1) * Vp // tp]
        kv = [r * nkv // tp] if tp > nkv else list(range(r * nkv // tp, (r + 1) * nkv // tp))
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for kind in ("weight", "bias"):
                q = sd[p + f"self_attn.q_proj.{kind}"][r * nh // tp * hd:(r + 1) * nh // tp * hd]
                k = torch.cat([sd[p + f"self_attn.k_proj.{kind}"][h * hd:(h + 1) * hd] for h in kv])
                v = torch.cat([sd[p + f"self_attn.v_proj.{kind}"][h * hd:(h + 1) * hd] for h in kv])
                d[p + f"self_attn.qkv_proj.{kind}"] = torch.cat([q, k, v])
            d[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, r * nh // tp * hd:(r + 1) * nh // tp * hd]
            d[p + "mlp.gate_up_proj.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"][r * I // tp:(r + 1) * I // tp],
                                                          sd[p + "mlp.up_proj.weight"][r * I // tp:(r + 1) * I // tp]])
            d[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, r * I // tp:(r + 1) * I // tp]
            d[p + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
            d[p + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        d["model.norm.weight"] = sd["model.norm.weight"]
        out.append(d)
    return out


@pytest.mark.parametrize("nkv", [2, 4])
def test_megatron_tp2_to_vllm_tp4_equals_vllm_slicing(nkv):
    cfg = qwen(nkv=nkv, V=1001)
    sd = random_state(cfg, seed=nkv)
    mg, vl = ModelLayout.megatron(cfg, 2), ModelLayout.vllm(cfg, 4)
    got = plan_reshard(mg, vl).execute(mg.shard(sd), num_threads=2)
    want = vllm_slices(sd, cfg, 4)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]), k


def test_execute_into_caller_buffers_zeroes_padding():
    cfg = qwen(V=1001)
    sd = random_state(cfg)
    vl = ModelLayout.vllm(cfg, 2)
    bufs = [{n: torch.full(s, 7.0, dtype=torch.bfloat16) for n, s in r.items()} for r in vl.shapes()]
    plan_reshard(ModelLayout.fsdp(cfg, 2), vl).execute_into(ModelLayout.fsdp(cfg, 2).shard(sd), bufs)
    last = bufs[1]["model.embed_tokens.weight"]
    assert torch.count_nonzero(last[-(1024 - 1001):]) == 0  # padding rows are zero
    assert torch.equal(vl.unshard(bufs)["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


def test_llama_without_bias_and_fp32():
    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1)
    sd = random_state(cfg, dtype=torch.float32)
    assert not any(k.endswith("bias") for k in sd)
    vl = ModelLayout.vllm(cfg, 4)  # tp > kv heads: the single kv head is replicated
    shards = vl.shard(sd)
    assert shards[3]["model.layers.0.self_attn.qkv_proj.weight"].shape == (8 + 8 + 8, 32)
    assert all(torch.equal(vl.unshard(shards)[k], sd[k]) for k in sd)


def test_llama_attention_and_mlp_biases():
    """Llama's optional biases: o_proj/down_proj ones replicated on every rank, gate/up ones fused like rows."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    sd = random_state(cfg, dtype=torch.float32)
    p = "model.layers.0."
    assert {p + "self_attn.o_proj.bias", p + "mlp.gate_proj.bias", p + "mlp.down_proj.bias"} <= sd.keys()
    mg, vl = ModelLayout.megatron(cfg, 2), ModelLayout.vllm(cfg, 4)
    got = plan_reshard(mg, vl).execute(mg.shard(sd))
    for r, shard in enumerate(got):
        assert torch.equal(shard[p + "self_attn.o_proj.bias"], sd[p + "self_attn.o_proj.bias"])
        assert torch.equal(shard[p + "mlp.down_proj.bias"], sd[p + "mlp.down_proj.bias"])
        gate_up = [sd[p + f"mlp.{n}_proj.bias"][r * 16:(r + 1) * 16] for n in ("gate", "up")]
        assert torch.equal(shard[p + "mlp.gate_up_proj.bias"], torch.cat(gate_up))
    for layout in (mg, vl, ModelLayout.fsdp(cfg, 3)):
        assert all(torch.equal(layout.unshard(layout.shard(sd))[k], sd[k]) for k in sd)


def test_vllm_divisibility_rules():
    """vLLM divides num_kv_heads by tp (tp <= kv heads) and the 64-padded vocabulary by tp."""
    cfg = LlamaConfig(vocab_size=190, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=12, num_key_value_heads=6)
    with pytest.raises(ValueError, match="num_key_value_heads=6"):
        ModelLayout.vllm(cfg, 4)  # 12 heads split, but 6 kv heads do not split over 4 ranks
    vl = ModelLayout.vllm(cfg, 3)  # 190 -> 192 rows, 64 per rank
    assert [r["model.embed_tokens.weight"] for r in vl.shapes()] == [(64, 48)] * 3
    sd = random_state(cfg, dtype=torch.float32)
    assert all(torch.equal(vl.unshard(vl.shard(sd))[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="padded vocabulary 256"):
        ModelLayout.vllm(LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=12, num_key_value_heads=6), 3)


def test_push_weights_single_process():
    from transformers import Qwen2ForCausalLM

    from k15sys.rollout import TorchEngine
    from k15sys.weights import push_weights

    cfg = qwen(tie=True)
    engine = TorchEngine(Qwen2ForCausalLM(cfg).float(), repeat_detector=None)
    sd = random_state(cfg, dtype=torch.float32, seed=3)
    mg = ModelLayout.megatron(cfg, 2)
    nbytes = push_weights(engine, mg.shard(sd), layout=mg)
    own = dict(engine.model.named_parameters())
    assert nbytes == sum(t.numel() * 4 for t in sd.values()) and engine.weight_version == 1
    assert own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in sd)
    push_weights(engine, {k: -v for k, v in sd.items()})
    assert torch.equal(own["model.norm.weight"], -sd["model.norm.weight"])
    with pytest.raises(ValueError, match="layout="):
        push_weights(engine, mg.shard(sd))
    with pytest.raises(ValueError, match="engine"):
        push_weights(object(), sd)


def test_bad_specs_are_clear_errors():
    cfg = qwen()
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelLayout.vllm(cfg, 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelLayout.megatron(cfg, 4)
    with pytest.raises(ValueError, match="world_size"):
        ModelLayout.fsdp(cfg, 0)
    sd = random_state(cfg)
    fs = ModelLayout.fsdp(cfg, 2)
    shards = fs.shard(sd)
    plan = plan_reshard(fs, ModelLayout.vllm(cfg, 2))
    broken = [dict(shards[0]), shards[1]]
    del broken[0]["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        plan.execute(broken)
    extra = [dict(shards[0], **{"model.bogus": torch.zeros(1, dtype=torch.bfloat16)}), shards[1]]
    with pytest.raises(ValueError, match="model.bogus"):
        plan.execute(extra)
    mixed = [dict(shards[0]), shards[1]]
    mixed[0]["model.norm.weight"] = mixed[0]["model.norm.weight"].float()
    with pytest.raises(ValueError, match="model.norm.weight.*dtype"):
        plan.execute(mixed)
    with pytest.raises(ValueError, match="rank"):
        plan.execute(shards[:1])
    with pytest.raises(ValueError, match="different models"):
        plan_reshard(fs, ModelLayout.vllm(qwen(V=2000), 2))


@pytest.mark.parametrize("a, b", [(("megatron", 2), ("vllm", 4)), (("fsdp", 3), ("vllm", 8)),
                                  (("vllm", 2), ("megatron", 2))])
def test_device_path_logic(a, b):
    """The device path (the Triton plan-copy kernel: on CUDA when there is a GPU, else under the interpreter on
    CPU tensors) equals the C++ path: contiguous copies re-shaped into rows plus their tails, strided column
    splits."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = qwen(V=1001)
    A, B = make(*a, cfg), make(*b, cfg)
    plan = plan_reshard(A, B)
    src = A.shard(random_state(cfg))
    want = plan.execute(src)
    src = [{k: v.to(dev) for k, v in r.items()} for r in src]
    out = [{k: torch.full_like(v, 3.0, device=dev) for k, v in r.items()} for r in want]
    for dr, ti, off, nr, nc, ld in plan.zero_fill:
        list(out[dr].values())[ti].view(-1).as_strided((nr, nc), (ld, 1), off).zero_()
    plan._device_copies([list(r.values()) for r in src], [list(r.values()) for r in out], want[0][next(iter(want[0]))].dtype)
    assert 0 < int(plan._flat.sum()) <= plan.num_copies
    assert all(torch.equal(w[k], o[k].cpu()) for w, o in zip(want, out) for k in w)


@pytest.mark.gpu
def test_gpu_path_matches_host():
    cfg = qwen()
    sd = random_state(cfg)
    mg, vl = ModelLayout.megatron(cfg, 2), ModelLayout.vllm(cfg, 4)
    host = plan_reshard(mg, vl).execute(mg.shard(sd))
    plan = plan_reshard(mg, vl)
    src = [{k: v.cuda() for k, v in r.items()} for r in mg.shard(sd)]
    dev = plan.execute(src)
    torch.cuda.synchronize()
    assert all(torch.equal(h[k], d[k].cpu()) for h, d in zip(host, dev) for k in h)
    out = [{k: torch.full_like(v, 5.0) for k, v in r.items()} for r in dev]
    for scale in (1.0, -2.0):  # the copy table is built on the first call, reused on the second
        for r in src:
            for v in r.values():
                v.mul_(scale)
        plan.execute_into(src, out)
        torch.cuda.synchronize()
        want = plan_reshard(mg, vl).execute([{k: v.cpu() for k, v in r.items()} for r in src])
        assert all(torch.equal(w[k], o[k].cpu()) for w, o in zip(want, out) for k in w)
