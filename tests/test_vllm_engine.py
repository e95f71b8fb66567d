"""VLLMEngine against TorchEngine on a tiny random Llama (runs where vLLM is installed; skips otherwise)."""
from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (optional extra [vllm]); VLLMEngine untested here")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from k15sys.rollout import SamplingParams, TorchEngine  # noqa: E402
from k15sys.rollout.vllm_engine import VLLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
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
    return d, model


def test_vllm_greedy_matches_torch_and_takes_new_weights(tiny_model_dir):
    d, model = tiny_model_dir
    eng = VLLMEngine(d, repeat_detector=None, dtype="float32", max_model_len=256, gpu_memory_utilization=0.1)
    ref = TorchEngine(model, repeat_detector=None)
    p = [[1, 2, 3, 4], [9, 8]]
    got = eng.generate(p, SamplingParams(16, temperature=0))
    want = ref.generate(p, SamplingParams(16, temperature=0))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    sampled = eng.generate(p, SamplingParams(16, temperature=1.0, seed=0))
    assert all(len(c.logprobs) == len(c.token_ids) and all(x <= 0 for x in c.logprobs) for c in sampled)
    torch.manual_seed(1)
    other = LlamaForCausalLM(model.config).eval()
    eng.update_weights(other.state_dict().items())
    got2 = eng.generate(p, SamplingParams(16, temperature=0))
    want2 = TorchEngine(other, repeat_detector=None).generate(p, SamplingParams(16, temperature=0))
    assert [c.token_ids for c in got2] == [c.token_ids for c in want2]
