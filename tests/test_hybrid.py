"""Hybrid deployment moves (paper 2.6.3): HostMirror, TrainerOffload, PagedEngine sleep levels; exact round trips.

The CPU tests run the same moves with the CPU as a stand-in device (plain copies instead of pinned DMA on a
side stream); the GPU tests run the real path.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.rollout import PagedEngine, SamplingParams
from k15sys.train.hybrid import TrainerOffload
from k15sys.weights.pinned import HostMirror

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[1, 2, 3], list(range(5, 19)), [7] * 17]


def _qwen2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def _engine(model, **kw) -> PagedEngine:
    return PagedEngine(model, kv_cache_tokens=512, page_size=8, sync_every=5, **kw)


def _model_and_adam(device: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.LayerNorm(48), torch.nn.Linear(48, 8))
    model = model.to(device, dtype)
    model.register_buffer("scale", torch.tensor(0.5, device=device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt, seed: int) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()))
    (model(x) * model.scale).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_host_mirror_round_trip_is_exact_and_reuses_its_buffers():
    a = torch.randn(5, 7)
    b = torch.randn(3, 4, dtype=torch.float64).t()  # non-contiguous
    c = torch.tensor(3.0, dtype=torch.bfloat16)  # 0-dim
    d = (torch.randn(11) * 100).to(torch.bfloat16)
    tensors = [a, b, c, d]
    want = [t.clone() for t in tensors]
    mirror = HostMirror("cpu")
    for _ in range(3):
        mirror.offload(tensors)
        assert mirror.offloaded
        homes = {dt: buf.data_ptr() for dt, buf in mirror._buffers.items()}
        inside = lambda t: (mirror._buffers[t.dtype].data_ptr() <= t.data_ptr() <  # noqa: E731
                            mirror._buffers[t.dtype].data_ptr() + mirror._buffers[t.dtype].nbytes)
        assert all(inside(t) for t in tensors)  # each tensor now lives in its dtype's host buffer
        mirror.onload()
        assert not any(inside(t) for t in tensors)  # storage of its own again, same objects
        assert all(torch.equal(t, w) and t.dtype == w.dtype for t, w in zip(tensors, want))
    assert mirror.allocations == 3 and homes == {dt: buf.data_ptr() for dt, buf in mirror._buffers.items()}
    mirror.offload([a, c])  # a layout that fits the buffers: no new ones
    mirror.onload()
    assert mirror.allocations == 3
    mirror.offload([a, b, c, d, torch.zeros(2)])  # more float32 than the buffer holds: that buffer again
    mirror.onload()
    assert mirror.allocations == 4 and torch.equal(a, want[0])
    ahead = HostMirror("cpu")
    ahead.reserve(((torch.float32, (5, 7)), (torch.float32, (5, 7))))  # e.g. an optimizer state to come
    ahead.offload([a])
    ahead.onload()
    ahead.offload([a, torch.ones(5, 7)])
    ahead.onload()
    assert ahead.allocations == 1


def test_host_mirror_refuses_a_second_offload_duplicates_and_other_devices():
    mirror = HostMirror("cpu")
    t = torch.ones(3)
    with pytest.raises(ValueError, match="twice"):
        mirror.offload([t, t])
    mirror.offload([t])
    with pytest.raises(RuntimeError, match="already on the host"):
        mirror.offload([torch.ones(2)])
    mirror.onload()
    mirror.onload()  # nothing to bring back: a no-op
    with pytest.raises(ValueError, match="device"):
        HostMirror("meta").offload([torch.ones(1)])


def test_trainer_offload_host_path_is_exact_and_training_continues_the_same():
    """The offload's tensor list (parameters, buffers, AdamW moments; not twice) and a bit-exact round trip,
    with the CPU standing in for the device; the steps after round trips equal steps without them."""
    ref_model, ref_opt = _model_and_adam("cpu")
    model, opt = _model_and_adam("cpu")
    off = TrainerOffload(model, opt, torch.device("cpu"))
    assert not off.enabled
    off.offload()  # a CPU trainer: nothing moves
    assert not off.offloaded
    off.enabled = True  # the device path, with the CPU as the device
    params = list(model.parameters())
    off.offload()  # before the first step: no optimizer state yet
    off.onload()
    for it in range(3):
        _step(ref_model, ref_opt, it)
        _step(model, opt, it)
        module, rest = off.tensors()
        assert len(module) == len(params) + 1  # + the buffer
        assert len(rest) == 3 * len(params)  # exp_avg, exp_avg_sq, step counter (on the stand-in device)
        before = [t.clone() for t in module + rest]
        off.offload()
        assert off.offloaded
        off.onload()
        assert all(torch.equal(t, b) for t, b in zip(module + rest, before))
        assert list(model.parameters()) == params and opt.param_groups[0]["params"] == params
    # the buffer was sized ahead for the moments of the first step; the step counters, which a real device's
    # optimizer keeps on the host, are on the stand-in device here and made it grow once
    assert off.mirror.allocations == 2
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("level", [1, 2])
def test_paged_engine_sleep_levels_on_cpu(level):
    """Level 1 keeps the weights (on the CPU they stay in place); level 2 discards them: generate refuses until a
    new version arrives, then equals an engine that had that version all along."""
    want = _engine(_qwen2(3)).generate(PROMPTS, SamplingParams(12, temperature=0))
    eng = _engine(_qwen2(0))
    eng.generate(PROMPTS, SamplingParams(12, temperature=0))
    eng.update_weights(_qwen2(3).state_dict().items())
    eng.sleep(level=level)
    eng.sleep(level=level)  # asleep already: a no-op
    if level == 2:
        assert all(p.numel() == 0 for p in eng.model.parameters())
    eng.wake()
    assert eng._kv is None  # the KV cache comes with the next generate call
    if level == 2:
        with pytest.raises(RuntimeError, match="discarded"):
            eng.generate(PROMPTS, SamplingParams(4))
        eng.update_weights(_qwen2(3).state_dict().items())
    got = eng.generate(PROMPTS, SamplingParams(12, temperature=0))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    with pytest.raises(ValueError, match="level"):
        eng.sleep(level=3)


def test_weight_sync_fills_an_engine_woken_from_level_2():
    """The trainer's path: sleep(level=2), wake, WeightSync's in-place copy; generation equals the source's."""
    from k15sys.weights import WeightSync

    src = _qwen2(5)
    want = _engine(_qwen2(5)).generate(PROMPTS, SamplingParams(10, temperature=0))
    eng = _engine(_qwen2(0))
    sync = WeightSync(src, eng)
    eng.sleep(level=2)
    eng.wake()
    sync.push()
    got = eng.generate(PROMPTS, SamplingParams(10, temperature=0))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


@pytest.mark.gpu
def test_gpu_trainer_offload_moves_through_pinned_buffers_exactly():
    model, opt = _model_and_adam("cuda", torch.bfloat16)
    off = TrainerOffload(model, opt, torch.device("cuda"))
    off.offload()  # before the first step: the buffers are sized for the moments to come
    off.onload()
    allocated = off.mirror.allocations
    _step(model, opt, 0)
    module, rest = off.tensors()
    before = [t.clone() for t in module + rest]
    held = torch.cuda.memory_allocated()
    moved = sum(t.numel() * t.element_size() for t in module + rest)
    for _ in range(2):
        off.offload()
        assert all(t.device.type == "cpu" and t.is_pinned() for t in module + rest)
        assert torch.cuda.memory_allocated() <= held - moved + 4096
        off.onload()
        assert all(t.is_cuda and torch.equal(t, b) for t, b in zip(module + rest, before))
    assert off.mirror.allocations == allocated == 2  # bf16 and float32 (the buffer), never again
    _step(model, opt, 1)  # the optimizer still holds the same Parameter objects, on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("level", [1, 2])
def test_gpu_paged_engine_sleep_levels_free_the_weights_and_come_back_exact(level):
    model = _qwen2(0).cuda().to(torch.bfloat16)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    eng = _engine(model, device="cuda")
    want = [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(16, temperature=0))]
    held = torch.cuda.memory_allocated()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    eng.sleep(level=level)
    assert torch.cuda.memory_allocated() <= held - weights - eng.num_pages * eng._page_bytes
    eng.wake()
    if level == 2:
        eng.update_weights(ref.items())
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(16, temperature=0))] == want
