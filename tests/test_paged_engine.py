"""PagedEngine (paper 2.6.2 rollouts): equality with transformers, log-probs, paging, sharing, errors, kernel."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from k15sys.algo.sampling import CurriculumSampler
from k15sys.rollout import PagedEngine, PartialRolloutScheduler, RolloutEngine, SamplingParams
from k15sys.rollout.paged_attention import paged_decode_attention
from k15sys.rollout.torch_engine import _filtered_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[1, 2, 3], list(range(5, 19)), [7] * 17, [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def _qwen2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def _llama(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    # head dim 24 (the main job's default shape): not a power of two, padded inside the Triton kernels
    cfg = LlamaConfig(vocab_size=89, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _qwen3(seed: int = 2) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=83, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return Qwen3ForCausalLM(cfg).eval()


def _hf_greedy(model, prompt: list[int], n: int, stop: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=stop)
    toks = out[0, len(prompt):].tolist()
    return toks[: toks.index(stop) + 1] if stop is not None and stop in toks else toks


def _engine(model, **kw) -> PagedEngine:
    kw.setdefault("kv_cache_tokens", 1024)
    kw.setdefault("page_size", 8)
    kw.setdefault("sync_every", 5)
    return PagedEngine(model, **kw)


@pytest.mark.parametrize("build", [_qwen2, _llama, _qwen3], ids=["qwen2", "llama", "qwen3"])
def test_greedy_equals_transformers_generate(build):
    model = build()
    # two sequences at a time: the later prompts join as the first ones finish (continuous batching)
    eng = _engine(model, max_num_seqs=2)
    assert isinstance(eng, RolloutEngine)
    outs = eng.generate(PROMPTS, SamplingParams(21, temperature=0))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _hf_greedy(model, p, 21)
        assert o.finish_reason == "length"
    assert eng.free_pages == eng.num_pages - 1


def test_stop_tokens_and_logprobs_equal_the_model():
    model = _qwen2()
    eng = _engine(model, max_num_seqs=3)
    greedy = eng.generate(PROMPTS, SamplingParams(21, temperature=0))
    stop = greedy[1].token_ids[6]  # a token some sequence emits mid-round
    outs = eng.generate(PROMPTS, SamplingParams(21, temperature=0, stop_token_ids=(stop,)))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _hf_greedy(model, p, 21, stop)
        assert o.finish_reason == ("stop" if o.token_ids[-1] == stop else "length")
    assert outs[1].finish_reason == "stop" and len(outs[1].token_ids) <= 7
    for params in (SamplingParams(12, temperature=0.8, top_k=20, top_p=0.9, seed=5),
                   SamplingParams(12, temperature=0.7, seed=5), SamplingParams(12, seed=5)):
        for p, o in zip(PROMPTS, eng.generate(PROMPTS, params)):
            seq = torch.tensor([p + o.token_ids])
            logits = model(seq).logits[0, len(p) - 1: -1]
            want = _filtered_logprobs(logits, params).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-4)
            assert all(np.isfinite(o.logprobs))


def test_continued_trajectory_equals_one_shot():
    eng = _engine(_llama())
    whole = eng.generate(PROMPTS, SamplingParams(20, temperature=0))
    first = eng.generate(PROMPTS, SamplingParams(8, temperature=0))
    rest = eng.generate([p + f.token_ids for p, f in zip(PROMPTS, first)], SamplingParams(12, temperature=0))
    for w, f, r in zip(whole, first, rest):
        assert f.token_ids + r.token_ids == w.token_ids
        assert np.allclose(f.logprobs + r.logprobs, w.logprobs, atol=1e-5)


def test_samples_of_one_prompt_share_pages_and_differ():
    model = _qwen2()
    eng = _engine(model)
    # prompt of 14 tokens with 8-token pages: one shared full page, the partly filled one copied per sample
    single = eng.generate([PROMPTS[1]], SamplingParams(15, temperature=0))[0]
    group = eng.generate([PROMPTS[1]] * 4 + [PROMPTS[0]], SamplingParams(15, temperature=0))
    assert all(g.token_ids == single.token_ids for g in group[:4])
    params = SamplingParams(15, temperature=1.0, seed=11)
    a = eng.generate([PROMPTS[1]] * 4 + [PROMPTS[0]], params)
    b = eng.generate([PROMPTS[1]] * 4 + [PROMPTS[0]], params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert len({tuple(x.token_ids) for x in a[:4]}) == 4
    c = eng.generate([PROMPTS[1]] * 4, SamplingParams(15, temperature=1.0, seed=12))
    assert [x.token_ids for x in c] != [x.token_ids for x in a[:4]]
    assert eng.free_pages == eng.num_pages - 1


def test_small_cache_queues_and_preempts_sequences_and_frees_pages():
    """Pages are taken as sequences grow; when the cache runs short the latest admitted sequences give theirs back
    and are prefilled again later, which changes no token (greedy, and sampled: the noise is keyed by position)."""
    model = _llama()
    eng = _engine(model, kv_cache_tokens=48)  # 6 pages of 8: room for a sequence and a half at full length
    outs = eng.generate(PROMPTS, SamplingParams(21, temperature=0))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _hf_greedy(model, p, 21)
    assert eng.preemptions > 0 and eng.free_pages == eng.num_pages - 1
    params, before = SamplingParams(21, temperature=1.0, seed=4), eng.preemptions
    small = eng.generate(PROMPTS * 2, params)
    big = _engine(model).generate(PROMPTS * 2, params)
    assert eng.preemptions > before
    assert [s.token_ids for s in small] == [b.token_ids for b in big]
    assert np.allclose([x for s in small for x in s.logprobs], [x for b in big for x in b.logprobs], atol=1e-5)
    assert eng.free_pages == eng.num_pages - 1


def test_bad_input_is_a_clear_error():
    eng = _engine(_qwen2(), kv_cache_tokens=64)
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty prompt"):
        eng.generate([[1], []], SamplingParams(4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([[1, 97]], SamplingParams(4))
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        eng.generate([list(range(70))], SamplingParams(4))
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        eng.generate([[1, 2]], SamplingParams(64))
    with pytest.raises(ValueError, match="TorchEngine"):
        PagedEngine(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(ValueError, match="page_size"):
        _engine(_qwen2(), page_size=0)
    assert eng.generate([], SamplingParams(4)) == []


def test_update_weights_sleep_wake():
    model, other = _qwen2(0), _qwen2(3)
    eng = _engine(model)
    before = eng.generate(PROMPTS[:2], SamplingParams(10, temperature=0))
    eng.update_weights(other.state_dict().items())
    assert eng.weight_version == 1
    after = eng.generate(PROMPTS[:2], SamplingParams(10, temperature=0))
    assert [a.token_ids for a in after] == [_hf_greedy(other, p, 10) for p in PROMPTS[:2]]
    assert [a.token_ids for a in after] != [b.token_ids for b in before]
    with pytest.raises(ValueError, match="unknown tensor"):
        eng.update_weights([("nope", torch.zeros(1))])
    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(PROMPTS[:1], SamplingParams(4))
    eng.wake()
    again = eng.generate(PROMPTS[:2], SamplingParams(10, temperature=0))
    assert [a.token_ids for a in again] == [a.token_ids for a in after]


def test_partial_rollout_scheduler_with_paged_engine():
    model = _qwen2()
    eng = _engine(model)
    prompts = [p for p in PROMPTS]
    sched = PartialRolloutScheduler(eng, CurriculumSampler([0.0] * len(prompts), ramp_iterations=0, seed=0), prompts, group_size=3,
                                    budget_per_iteration=6, max_total_len=40, max_response_len=14,
                                    prompts_per_iteration=2, params=SamplingParams(1, seed=1), batch_size=4,
                                    repeat_detector=None)
    groups = []
    for it in range(4):
        groups += sched.run_iteration(it)
    assert groups and all(len(g.trajectories) == 3 for g in groups)
    for g in groups:
        for t in g.trajectories:
            assert len(t.response_ids) == len(t.logprobs) <= 14 and t.finish_reason is not None
    assert eng.free_pages == eng.num_pages - 1


def _naive_paged(q, kc, vc, bt, lens, scale):
    """Per sequence, gather its tokens one by one and run float64 softmax attention."""
    out = torch.empty(q.shape, dtype=torch.float64)
    page, hkv = kc.shape[1], kc.shape[2]
    for b, n in enumerate(lens.tolist()):
        idx = [(int(bt[b, t // page]), t % page) for t in range(n)]
        k = torch.stack([kc[p, s] for p, s in idx]).double()
        v = torch.stack([vc[p, s] for p, s in idx]).double()
        for h in range(q.shape[1]):
            g = h // (q.shape[1] // hkv)
            w = torch.softmax(k[:, g] @ q[b, h].double() * scale, 0)
            out[b, h] = w @ v[:, g]
    return out


def _paged_case(seed: int, lens: list[int], d: int, pages: int = 48, page: int = 8, hkv: int = 2, hq: int = 6):
    """A random paged cache (k, v), block tables over shuffled pages (page 0 unused), the lengths and one query per
    sequence; the generator is returned for further draws."""
    g = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(pages, page, hkv, d, generator=g), torch.randn(pages, page, hkv, d, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    bt = torch.zeros(len(lens), 16, dtype=torch.int32)
    perm, k = torch.randperm(pages - 1, generator=g) + 1, 0
    for b, n in enumerate(lens):
        m = -(-n // page)
        bt[b, :m], k = perm[k: k + m], k + m
    q = torch.randn(len(lens), hq, d, generator=g)
    return g, kc, vc, bt, seq_lens, q


@pytest.mark.parametrize("d", [32, 24])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_decode_attention_matches_float64(backend, d):
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # lengths inside, at and across page ends
    _, kc, vc, bt, lens, q = _paged_case(0, [1, 7, 8, 9, 33, 101], d)
    ref = _naive_paged(q, kc, vc, bt, lens, d ** -0.5)
    for splits in (1, 4):
        out = paged_decode_attention(q.to(dev), kc.to(dev), vc.to(dev), bt.to(dev), lens.to(dev), splits=splits,
                                     backend=backend)
        assert (out.cpu().double() - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="splits"):
        paged_decode_attention(q.to(dev), kc.to(dev), vc.to(dev), bt.to(dev), lens.to(dev), splits=3, backend="triton")


@pytest.mark.parametrize("d", [32, 24])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_decode_attention_files_and_rotates_the_newest_token(backend, d):
    """new_kv / rotary: the newest token's key and value come separately, q and that key are rotated at its
    position, the key / value land in its cache slot, and attention covers it (float64 reference)."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g, kc, vc, bt, lens, q = _paged_case(1, [1, 8, 9, 33, 101], d)
    page, hkv = kc.shape[1], kc.shape[2]
    k_new, v_new = torch.randn(len(lens), hkv, d, generator=g), torch.randn(len(lens), hkv, d, generator=g)
    angle = torch.arange(128, dtype=torch.float64)[:, None] * 0.1 ** torch.arange(d // 2, dtype=torch.float64)
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)

    def rot(x, p):  # float64 rotate-half at position p
        x = x.double()
        return x * cos[p] + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * sin[p]

    ref_k, ref_v = kc.clone(), vc.clone()
    ref_q = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        p = n - 1
        ref_k[bt[b, p // page], p % page] = rot(k_new[b], p).float()
        ref_v[bt[b, p // page], p % page] = v_new[b]
        ref_q[b] = rot(q[b], p)
    ref = _naive_paged(ref_q, ref_k, ref_v, bt, lens, d ** -0.5)
    for splits in (1, 4):
        kcd, vcd = kc.clone().to(dev), vc.clone().to(dev)
        out = paged_decode_attention(q.to(dev), kcd, vcd, bt.to(dev), lens.to(dev), splits=splits, backend=backend,
                                     new_kv=(k_new.to(dev), v_new.to(dev)),
                                     rotary=(cos.float().to(dev), sin.float().to(dev)))
        assert (out.cpu().double() - ref).abs().max() < 1e-4
        assert (kcd.cpu() - ref_k).abs().max() < 1e-5 and torch.equal(vcd.cpu(), ref_v)


@pytest.mark.parametrize("build", [_qwen2, _llama, _qwen3], ids=["qwen2", "llama", "qwen3"])
def test_engine_with_triton_kernels_on_interpreter(build):
    """Decode attention, fused norms and rotary / cache writes as Triton kernels (the CUDA path, without graphs)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    model = build()
    want = [_hf_greedy(model, p, 4) for p in PROMPTS[:2]]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    eng = _engine(model, device=dev, attention_backend="triton", fused_kernels=True, cuda_graphs=False)
    outs = eng.generate(PROMPTS[:2], SamplingParams(4, temperature=0))
    assert [o.token_ids for o in outs] == want
    ref = _engine(model, device=dev, attention_backend="torch", fused_kernels=False, cuda_graphs=False)
    for o, r in zip(outs, ref.generate(PROMPTS[:2], SamplingParams(4, temperature=0))):
        assert np.allclose(o.logprobs, r.logprobs, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("build", [_qwen2, _llama], ids=["qwen2", "llama"])
def test_gpu_graphs_greedy_equals_transformers(build):
    model = build()
    want = [_hf_greedy(model, p, 40) for p in PROMPTS]
    eng = _engine(model.cuda(), device="cuda", max_num_seqs=3)  # fp32: exact kernels (ieee dots)
    outs = eng.generate(PROMPTS, SamplingParams(40, temperature=0))
    assert [o.token_ids for o in outs] == want
    assert eng._graphs, "decode steps were not captured as CUDA graphs"
    params = SamplingParams(30, temperature=1.0, top_p=0.95, seed=3)
    a, b = eng.generate(PROMPTS * 2, params), eng.generate(PROMPTS * 2, params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    for p, o in zip(PROMPTS, a):
        logits = model(torch.tensor([p + o.token_ids], device="cuda")).logits[0, len(p) - 1: -1]
        want_lp = _filtered_logprobs(logits, params).gather(-1, torch.tensor(o.token_ids, device="cuda")[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), want_lp.cpu(), atol=1e-3)


@pytest.mark.gpu
def test_gpu_bf16_matches_torch_reference_backend():
    model = _qwen2().to(device="cuda", dtype=torch.bfloat16)
    fast = _engine(model, device="cuda", kv_cache_tokens=4096)
    ref = _engine(model, device="cuda", kv_cache_tokens=4096, attention_backend="torch", cuda_graphs=False)
    prompts = [list(np.random.default_rng(i).integers(0, 97, n)) for i, n in enumerate([5, 64, 130, 200])]
    a = fast.generate(prompts, SamplingParams(16, temperature=0))
    b = ref.generate(prompts, SamplingParams(16, temperature=0))
    agree = np.mean([x == y for o, r in zip(a, b) for x, y in zip(o.token_ids, r.token_ids)])
    assert agree > 0.9  # bf16: rare near-ties may flip


def test_make_rollout_engine_picks_by_kind_and_device():
    from k15sys.rollout import TorchEngine
    from k15sys.rollout.paged_engine import make_rollout_engine

    assert isinstance(make_rollout_engine("auto", _qwen2(), "cpu"), TorchEngine)
    assert isinstance(make_rollout_engine("paged", _qwen2(), "cpu", kv_cache_tokens=256), PagedEngine)
    assert isinstance(make_rollout_engine("torch", _qwen2(), "cpu"), TorchEngine)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert isinstance(make_rollout_engine("auto", gpt2, "cpu"), TorchEngine)
    with pytest.raises(ValueError, match="TorchEngine"):
        make_rollout_engine("paged", gpt2, "cpu")
    with pytest.raises(ValueError, match="kind"):
        make_rollout_engine("vllm", gpt2, "cpu")


def test_sampled_tokens_follow_the_sampling_distribution():
    model = _qwen2()
    eng = _engine(model)
    params = SamplingParams(1, temperature=0.03, seed=2)
    outs = eng.generate([PROMPTS[0]] * 3000, params)
    seen = np.bincount([o.token_ids[0] for o in outs], minlength=97) / 3000
    want = _filtered_logprobs(model(torch.tensor([PROMPTS[0]])).logits[0, -1], params).exp().detach().numpy()
    assert 0.5 * np.abs(seen - want).sum() < 0.07  # total variation of 3000 draws (noise ~0.04; 0.28 at twice the temperature)
    assert eng.free_pages == eng.num_pages - 1


@pytest.mark.gpu
def test_gpu_update_weights_and_sleep_wake_reach_the_fused_graphs():
    model, other = _qwen2(0), _qwen2(3)
    want = [_hf_greedy(other, p, 24) for p in PROMPTS]
    eng = _engine(model.cuda(), device="cuda")
    eng.generate(PROMPTS, SamplingParams(24, temperature=0))  # graphs captured on the old weights
    eng.update_weights(other.state_dict().items())
    assert [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(24, temperature=0))] == want
    held = torch.cuda.memory_allocated()
    freed = eng._kv.numel() * eng._kv.element_size() + sum(p.numel() * p.element_size() for p in model.parameters())
    eng.sleep()
    assert torch.cuda.memory_allocated() <= held - freed  # the cache, the weights and their fused copies left
    eng.wake()
    assert [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(24, temperature=0))] == want


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sample_tokens_kernel_equals_reference_and_advances(backend):
    """The sampling kernels (interpreter on the CPU) against the torch arithmetic: same draws, log-probs of the
    sampling distribution, greedy rows the first argmax, and the round buffers advanced."""
    from k15sys.rollout.paged_sampling import gumbel_noise, row_seed, sample_tokens

    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    n, vocab = 5, 301  # awkward vocabulary: slices end mid-block
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dev)
    logits[0, 7] = logits[0, 250] = logits[0].max() + 1  # a tie: the first index wins
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0], device=dev)
    seeds = torch.tensor([row_seed(7, i) for i in range(n)], device=dev)
    pos = torch.tensor([3, 10, 100, 5000, 3], device=dev)
    z = logits.double() / torch.where(temps == 0, 1.0, temps).double()[:, None]
    want = torch.where(temps[:, None] == 0, z, z + gumbel_noise(seeds, pos, vocab).double()).argmax(-1)
    tok, lp = sample_tokens(logits, temps, seeds, pos, backend=backend)
    assert tok.tolist() == want.tolist() and tok[0] == 7
    assert torch.allclose(lp.double(), torch.log_softmax(z, -1).gather(-1, tok[:, None])[:, 0], atol=1e-5)
    tokens, cur, start = torch.zeros(n, dtype=torch.long, device=dev), pos.clone(), pos - torch.arange(n, device=dev)
    out_tok, out_lp = torch.full((n, 3), -1, device=dev), torch.zeros(n, 3, device=dev)
    sample_tokens(logits, temps, seeds, cur, advance=(tokens, cur, start, out_tok, out_lp), backend=backend)
    assert tokens.tolist() == tok.tolist() and (cur == pos + 1).all()
    for r in range(n):  # column pos - start; row 3 and 4 are outside the 3 columns: nothing filed
        assert out_tok[r].tolist() == [tok[r] if c == r else -1 for c in range(3)]
    noise = gumbel_noise(seeds, pos, 200000)
    assert abs(noise.mean() - 0.5772) < 0.01 and abs(noise.std() - 1.2825) < 0.01  # Gumbel(0, 1)


def test_draws_depend_on_seed_and_position_only():
    """A request's sampled tokens do not depend on the other requests of its call, and a trajectory continued
    with the same seed draws what one-shot generation draws."""
    eng = _engine(_llama())
    params = SamplingParams(14, temperature=1.0, seed=21)
    alone = eng.generate(PROMPTS[:1], params)[0]
    batch = eng.generate(PROMPTS, params)
    assert batch[0].token_ids == alone.token_ids
    first = eng.generate(PROMPTS, params.with_budget(6))
    rest = eng.generate([p + f.token_ids for p, f in zip(PROMPTS, first)], params.with_budget(8))
    assert [f.token_ids + r.token_ids for f, r in zip(first, rest)] == [b.token_ids for b in batch]
