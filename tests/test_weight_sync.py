"""The trainer's weight path (WeightSync) and the checks of a version (push_weights, check_weights), on the CPU."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from k15sys.rollout import TorchEngine
from k15sys.weights import WeightSync, push_weights
from k15sys.weights.local import module_weights


def _qwen(seed: int = 0, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def _same(engine: TorchEngine, weights: dict[str, torch.Tensor]) -> bool:
    own = module_weights(engine.model)
    return own.keys() == weights.keys() and all(torch.equal(own[k], weights[k].to(own[k].dtype)) for k in weights)


def test_plan_path_copies_the_whole_version_in_place():
    trainer, engine = _qwen(0), TorchEngine(_qwen(1), repeat_detector=None)
    storage = {n: t.data_ptr() for n, t in module_weights(engine.model).items()}
    sync = WeightSync(trainer, engine)
    assert sync.path == "in-place"
    nbytes = sync.push()
    assert sync._plan is not None  # plain fp32 HF tensors on one device: one plan execution
    assert _same(engine, module_weights(trainer)) and engine.weight_version == 1
    assert nbytes == sum(t.numel() * 4 for t in module_weights(trainer).values())
    assert {n: t.data_ptr() for n, t in module_weights(engine.model).items()} == storage  # in place
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(-1)
    sync.push()
    assert _same(engine, module_weights(trainer)) and engine.weight_version == 2


def test_per_tensor_path_converts_precision_and_untied_llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    trainer = LlamaForCausalLM(cfg).float()
    engine = TorchEngine(copy.deepcopy(trainer).to(torch.bfloat16), repeat_detector=None)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.5)
    sync = WeightSync(trainer, engine)
    sync.push()
    assert sync._plan is None  # fp32 -> bf16: copy_ per tensor
    assert _same(engine, module_weights(trainer)) and "lm_head.weight" in module_weights(engine.model)


def test_a_bad_version_changes_nothing():
    engine = TorchEngine(_qwen(1), repeat_detector=None)
    before = {n: t.clone() for n, t in module_weights(engine.model).items()}
    with pytest.raises(ValueError, match="incomplete version, 'model.layers.2."):  # a 2-layer trainer, 3-layer engine
        WeightSync(_qwen(0, layers=2), TorchEngine(_qwen(1, layers=3), repeat_detector=None)).push()
    with pytest.raises(ValueError, match="unknown tensor 'model.layers.2."):
        WeightSync(_qwen(0, layers=3), engine).push()
    sd = {n: t.detach().clone() for n, t in module_weights(_qwen(0)).items()}
    bad = {"partial": ({k: v for k, v in list(sd.items())[:4]}, "incomplete version"),
           "unknown": ({**sd, "model.extra": torch.zeros(2)}, "unknown tensor 'model.extra'"),
           "shape": ({**sd, "model.norm.weight": torch.zeros(5)}, "'model.norm.weight' has shape"),
           "int64": ({**sd, "model.norm.weight": sd["model.norm.weight"].long()}, "is torch.int64"),
           "float64": ({**sd, "model.norm.weight": sd["model.norm.weight"].double()}, "is torch.float64")}
    for weights, msg in bad.values():
        with pytest.raises(ValueError, match=msg):
            push_weights(engine, weights)
    assert engine.weight_version == 0
    assert all(torch.equal(t, before[n]) for n, t in module_weights(engine.model).items())
    assert push_weights(engine, {k: v.half() for k, v in sd.items()}) > 0  # fp16 -> fp32 is a precision change
    assert engine.weight_version == 1


FSDP_SYNC = r"""
import copy, torch
from k15sys.rollout import TorchEngine
from k15sys.train import distributed as du
from k15sys.train.config import ModelConfig
from k15sys.train.model import build_model
from k15sys.train.policy import PackedPolicy
from k15sys.weights import WeightSync

du.init_from_env()
# vocabulary 25: the embedding's shards are uneven (13 + 12 rows, gathered then copied); the rest all-gathered
# straight into the engine's tensors
lm = build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2), 25, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
engine = TorchEngine(copy.deepcopy(lm), repeat_detector=None)
policy = du.shard(PackedPolicy(lm))
with torch.no_grad():
    for p in policy.parameters():
        p.to_local().mul_(-2.0)  # the shards change; the engine's copy does not
full = du.full_state_dict(policy.lm)
sync = WeightSync(policy.lm, engine)
gathers = {"into": 0}
real = torch.distributed.all_gather_into_tensor
def counting(*args, **kwargs):
    gathers["into"] += 1
    return real(*args, **kwargs)
torch.distributed.all_gather_into_tensor = counting
sync.push()
torch.distributed.all_gather_into_tensor = real
assert 0 < gathers["into"] < len(full), gathers
own = dict(engine.model.named_parameters())
assert sync._plan is None and engine.weight_version == 1
assert all(torch.equal(own[k], full[k]) for k in own), "engine differs from the gathered weights"
print("SYNCED", len(own))
du.shutdown(barrier=True)
du.exit_rank(0)
"""


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp2_shards_stream_into_an_in_process_engine(tmp_path):
    script = tmp_path / "fsdp_sync.py"
    script.write_text(FSDP_SYNC)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # gloo ranks on the CPU, also beside GPUs
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("SYNCED") == 2
