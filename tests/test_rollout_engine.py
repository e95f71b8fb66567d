"""TorchEngine, the transformers-based rollout engine (paper 2.6.2), on tiny random models."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from k15sys.algo import RepeatDetector, find_repeat
from k15sys.rollout import Completion, RolloutEngine, SamplingParams, TorchEngine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture()
def engine(model):
    return TorchEngine(model, repeat_detector=None)


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(n, temperature=0, **kw)


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_decoding_uses_the_installed_transformers_cache_argument(engine):
    """Recent transformers renamed the KV-cache argument (``past_key_values`` -> ``cache``) and warn on
    the old name, which goes away in a later release: the engine passes the name the model takes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = engine.generate([[1, 2, 3], [4, 5]], _greedy(6))
    assert [len(c.token_ids) for c in out] == [6, 6]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_greedy_continuation_equals_one_go(arch, engine):
    if arch == "gpt2":  # any causal LM: an architecture with learned absolute positions too
        torch.manual_seed(1)
        engine = TorchEngine(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval(),
                             repeat_detector=None)
    p = [1, 2, 3, 4, 5]
    whole = engine.generate([p], _greedy(20))[0]
    first = engine.generate([p], _greedy(8))[0]
    rest = engine.generate([p + first.token_ids], _greedy(12))[0]
    assert isinstance(whole, Completion) and len(whole.token_ids) == 20 and whole.finish_reason == "length"
    assert whole.token_ids == first.token_ids + rest.token_ids
    # continuation inside a padded batch next to a longer prompt gives the same tokens
    both = engine.generate([p + first.token_ids, [9] * 30], _greedy(12))
    assert both[0].token_ids == rest.token_ids


def test_batch_with_padding_and_early_stops_equals_single(engine):
    prompts = [[7, 8], [1, 2, 3, 4, 5, 6, 7], [9], [3, 3, 3, 1]]
    free = [engine.generate([p], _greedy(16))[0].token_ids for p in prompts]
    # a stop token that ends some rows early (they leave the batch and the cache), others run to the end
    stop = free[1][3]
    params = _greedy(16, stop_token_ids=(stop,))
    batch = engine.generate(prompts, params)
    assert any(c.finish_reason == "stop" for c in batch) and any(c.finish_reason == "length" for c in batch)
    for p, c in zip(prompts, batch):
        single = engine.generate([p], params)[0]
        assert c.token_ids == single.token_ids and c.finish_reason == single.finish_reason
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=1e-5)


def _reference_logprobs(model, prompt, tokens, temperature, top_k=0, top_p=1.0):
    """float64 log-probs of ``tokens`` under the filtered sampling distribution, from one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].double() / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs = torch.softmax(logits, -1)
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.6)])
def test_logprobs_are_those_of_the_sampling_distribution(engine, model, temperature, top_k, top_p):
    p = [3, 1, 4, 1, 5]
    params = SamplingParams(12, temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    c = engine.generate([p], params)[0]
    ref = _reference_logprobs(model, p, c.token_ids, temperature, top_k, top_p)
    assert torch.isfinite(ref).all()  # every sampled token is inside the filtered support
    torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=1e-4)


def test_seed_top_k1_and_nucleus(engine):
    p = [3, 1, 4, 1, 5]
    params = SamplingParams(24, temperature=1.0, seed=11)
    a, b = engine.generate([p, p], params)
    assert a.token_ids != b.token_ids  # rows of a batch draw independently
    again = engine.generate([p, p], params)
    assert [a.token_ids, b.token_ids] == [c.token_ids for c in again]  # seeded: reproducible
    assert engine.generate([p], SamplingParams(24, temperature=1.0, seed=12))[0].token_ids != a.token_ids
    top1 = engine.generate([p], SamplingParams(12, temperature=1.0, top_k=1, seed=3))[0]
    assert top1.token_ids == engine.generate([p], _greedy(12))[0].token_ids
    assert all(abs(x) < 1e-6 for x in top1.logprobs)  # a point mass after top-k=1
    tiny = engine.generate([p], SamplingParams(12, temperature=1.0, top_p=1e-6, seed=3))[0]
    assert tiny.token_ids == top1.token_ids  # the smallest nucleus is the argmax alone


def test_stop_tokens_and_repeat_stop(model):
    eng = TorchEngine(model, repeat_detector=None)
    free = eng.generate([[1, 2]], _greedy(30)).pop().token_ids
    stop = free[4]
    c = eng.generate([[1, 2]], _greedy(30, stop_token_ids=(stop,)))[0]
    assert c.finish_reason == "stop" and c.token_ids == free[: free.index(stop) + 1]
    opts = dict(min_repeats=2, min_span=4, max_period=32, key_len=2)
    looping = TorchEngine(model, repeat_detector=lambda: RepeatDetector(**opts))
    r = looping.generate([[1, 2]], _greedy(400))[0]
    assert r.finish_reason == "repeat" and len(r.token_ids) < 400
    assert find_repeat(r.token_ids, **opts) is not None
    assert find_repeat(r.token_ids[:-1], **opts) is None  # stopped at the first token that closes the loop


def test_concurrent_generate_calls_match_sequential(engine):
    prompts = [[i + 1, i + 2, i + 3] for i in range(4)]
    want = [engine.generate([p], _greedy(10))[0].token_ids for p in prompts]
    got = [None] * 4

    def run(i):
        got[i] = engine.generate([prompts[i]], _greedy(10))[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_update_weights_sleep_and_bad_input(model):
    eng = TorchEngine(Qwen2ForCausalLM(model.config).eval(), repeat_detector=None)
    before = eng.generate([[1, 2, 3]], _greedy(10))[0].token_ids
    eng.update_weights(model.state_dict().items())
    assert eng.weight_version == 1
    after = eng.generate([[1, 2, 3]], _greedy(10))[0].token_ids
    assert after == TorchEngine(model, repeat_detector=None).generate([[1, 2, 3]], _greedy(10))[0].token_ids
    snapshot = {k: v.clone() for k, v in eng.model.state_dict().items()}
    bad = [("model.norm.weight", torch.zeros(32)), ("lm_head.weight", torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="lm_head.weight"):
        eng.update_weights(bad)
    assert all(torch.equal(v, eng.model.state_dict()[k]) for k, v in snapshot.items())  # nothing half-applied
    with pytest.raises(ValueError, match="unknown"):
        eng.update_weights([("nope", torch.zeros(1))])
    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1]], SamplingParams(2))
    eng.wake()
    assert before != after and len(eng.generate([[1]], SamplingParams(2))[0].token_ids) == 2
    assert eng.generate([], SamplingParams(2)) == []
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        eng.generate([[]], SamplingParams(2))
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        eng.generate([[1], [999]], SamplingParams(2))
    with pytest.raises(ValueError, match="prompts"):
        eng.generate("1 2 3", SamplingParams(2))


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"), (dict(max_new_tokens=4, top_p=1.5), "top_p"),
    (dict(max_new_tokens=4, top_k=-1), "top_k"), (dict(max_new_tokens=4, seed=-3), "seed"),
])
def test_sampling_params_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
