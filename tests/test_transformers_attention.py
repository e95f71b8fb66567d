"""A Qwen2 model trains on packed batches through varlen_attention: same logits as eager per sequence."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.integrations.transformers_attention import cu_seqlens_from_position_ids, register


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_logits_equal_eager_per_sequence(backend):
    """On CUDA when there is a GPU (the Triton kernels compiled), else on the CPU (Triton's interpreter)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = register(backend=backend, name=f"k15_varlen_{backend}")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    eager = Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager").eval().to(dev)
    packed = Qwen2ForCausalLM._from_config(cfg, attn_implementation=name).eval().to(dev)
    packed.load_state_dict(eager.state_dict())
    lens = [5, 9, 1, 3]
    seqs = [torch.randint(0, 50, (n,)).to(dev) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(dev)
    out = packed(input_ids=ids, position_ids=pos).logits[0]
    ref = torch.cat([eager(input_ids=s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # and gradients flow through the packed path
    out.sum().backward()
    assert packed.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_cu_seqlens_from_position_ids():
    cu, m = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and m == 4
