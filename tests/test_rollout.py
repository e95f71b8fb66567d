"""Rollout engine (TorchEngine) and partial rollouts with a replay buffer (paper 2.6.2)."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.algo import CurriculumSampler, RepeatDetector, find_repeat
from k15sys.rollout import (
    Completion,
    PartialRolloutScheduler,
    ReplayBuffer,
    SamplingParams,
    TorchEngine,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture()
def engine(model):
    return TorchEngine(model, repeat_detector=None)


def test_greedy_continuation_equals_one_go(engine):
    p = [1, 2, 3, 4, 5]
    whole = engine.generate([p], SamplingParams(20, temperature=0))[0]
    first = engine.generate([p], SamplingParams(8, temperature=0))[0]
    rest = engine.generate([p + first.token_ids], SamplingParams(12, temperature=0))[0]
    assert len(whole.token_ids) == 20 and whole.finish_reason == "length"
    assert whole.token_ids == first.token_ids + rest.token_ids


def test_batch_with_padding_equals_single(engine):
    prompts = [[7, 8], [1, 2, 3, 4, 5, 6, 7], [9]]
    batch = engine.generate(prompts, SamplingParams(10, temperature=0))
    for p, c in zip(prompts, batch):
        assert c.token_ids == engine.generate([p], SamplingParams(10, temperature=0))[0].token_ids


def test_logprobs_are_those_of_the_sampling_distribution(engine, model):
    p = [3, 1, 4, 1, 5]
    params = SamplingParams(12, temperature=0.7, top_k=20, seed=11)
    c = engine.generate([p], params)[0]
    again = engine.generate([p], params)[0]
    assert c.token_ids == again.token_ids and c.logprobs == again.logprobs  # seeded
    with torch.no_grad():
        logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].double() / 0.7
    kth = torch.topk(logits, 20, dim=-1).values[:, -1:]
    ref = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    ref = ref.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=1e-4)
    top1 = engine.generate([p], SamplingParams(12, temperature=1.0, top_k=1, seed=3))[0]
    assert top1.token_ids == engine.generate([p], SamplingParams(12, temperature=0))[0].token_ids
    assert all(abs(x) < 1e-6 for x in top1.logprobs)  # a point mass after top-k=1


def test_top_p_keeps_the_nucleus(engine, model):
    c = engine.generate([[5, 6]], SamplingParams(30, temperature=1.0, top_p=0.3, seed=0))[0]
    assert all(lp > -3.0 for lp in c.logprobs)  # only high-probability tokens survive a 0.3 nucleus


def test_stop_tokens_and_repeat_stop(model):
    eng = TorchEngine(model, repeat_detector=None)
    free = eng.generate([[1, 2]], SamplingParams(30, temperature=0))[0].token_ids
    stop = free[4]
    c = eng.generate([[1, 2]], SamplingParams(30, temperature=0, stop_token_ids=(stop,)))[0]
    assert c.finish_reason == "stop" and c.token_ids == free[: free.index(stop) + 1]
    opts = dict(min_repeats=2, min_span=4, max_period=32, key_len=2)
    looping = TorchEngine(model, repeat_detector=lambda: RepeatDetector(**opts))
    r = looping.generate([[1, 2]], SamplingParams(400, temperature=0))[0]
    assert r.finish_reason == "repeat" and len(r.token_ids) < 400
    assert find_repeat(r.token_ids, **opts) is not None


def test_update_weights_sleep_and_bad_input(model):
    eng = TorchEngine(Qwen2ForCausalLM(model.config).eval(), repeat_detector=None)
    before = eng.generate([[1, 2, 3]], SamplingParams(10, temperature=0))[0].token_ids
    eng.update_weights(model.state_dict().items())
    assert eng.weight_version == 1
    assert eng.generate([[1, 2, 3]], SamplingParams(10, temperature=0))[0].token_ids == \
        TorchEngine(model, repeat_detector=None).generate([[1, 2, 3]], SamplingParams(10, temperature=0))[0].token_ids
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
    assert before != [] and len(eng.generate([[1]], SamplingParams(2))[0].token_ids) == 2
    with pytest.raises(ValueError, match="prompts"):
        eng.generate([[]], SamplingParams(2))
    with pytest.raises(ValueError, match="prompts"):
        eng.generate([[999]], SamplingParams(2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=0.0)


class ScriptedEngine:
    """Deterministic fake engine: prompt index p (first token) needs LENGTHS[p] tokens, then stops."""

    def __init__(self, lengths: dict[int, int], fail_calls: set[int] = frozenset()):
        self.lengths, self.calls, self.fail_calls = lengths, 0, set(fail_calls)

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("worker died")
        out = []
        for p in prompts:
            need = self.lengths[p[0]] - (len(p) - 2)  # prompts are [id, 0]; the rest is the response
            n = min(need, params.max_new_tokens)
            out.append(Completion([1] * n, [-0.5] * n, "stop" if n == need else "length"))
        return out

    def update_weights(self, named_tensors):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


def _scheduler(engine, tmp_path=None, **kw):
    prompts = [[i, 0] for i in range(4)]
    opts = dict(group_size=2, prompts_per_iteration=2, budget_per_iteration=10, max_total_len=100,
                params=SamplingParams(1), batch_size=3)
    opts.update(kw)
    buf = ReplayBuffer(tmp_path / "buffer.json") if tmp_path else None
    return PartialRolloutScheduler(engine, CurriculumSampler([0, 1, 2, 3], ramp_iterations=0, seed=0), prompts,
                                   buffer=buf, **opts)


def test_partial_rollouts_budget_groups_versions(tmp_path):
    lengths = {0: 5, 1: 25, 2: 8, 3: 150}
    s = _scheduler(ScriptedEngine(lengths), tmp_path)
    emitted = []
    for v in range(12):
        groups = s.run_iteration(policy_version=v)
        for g in groups:
            assert len(g.trajectories) == 2 and all(t.finished for t in g.trajectories)
            for t in g.trajectories:
                assert all(seg.end - seg.start <= 10 for seg in t.segments)  # the per-iteration budget
                assert [seg.policy_version for seg in t.segments] == sorted(seg.policy_version for seg in t.segments)
                expect = min(lengths[g.prompt_index], 100 - 2)
                assert len(t.response_ids) == expect
                assert t.finish_reason == ("length" if lengths[g.prompt_index] >= 98 else "stop")
                if lengths[g.prompt_index] > 10:
                    assert len({seg.policy_version for seg in t.segments}) > 1  # continued across iterations
        emitted += groups
    assert len(emitted) == 24 - len(s.buffer.groups)
    # the persisted buffer restores exactly
    restored = ReplayBuffer.load(tmp_path / "buffer.json")
    assert restored.state_dict() == s.buffer.state_dict()
    s.close()


def test_failed_worker_loses_nothing(tmp_path):
    eng = ScriptedEngine({0: 5, 1: 5, 2: 5, 3: 5}, fail_calls={1})
    s = _scheduler(eng, tmp_path, prompts_per_iteration=2, batch_size=100)
    assert s.run_iteration(0) == [] and s.last_stats.failed_batches == 1
    assert len(s.buffer.unfinished()) == 4  # re-queued, untouched
    groups = s.run_iteration(1)
    assert sorted(g.group_id for g in groups) == [0, 1, 2, 3]  # the failed iteration's groups are among them
    assert all(len(t.segments) == 1 and t.segments[0].policy_version == 1 for g in groups for t in g.trajectories)
    s.close()


def test_scheduler_bad_input():
    eng = ScriptedEngine({0: 1})
    with pytest.raises(ValueError, match="group_size"):
        _scheduler(eng, group_size=0)
    with pytest.raises(ValueError, match="budget_per_iteration"):
        _scheduler(eng, budget_per_iteration=0)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        _scheduler(eng, max_total_len=2)


def test_scheduler_with_the_real_engine(model, tmp_path):
    eng = TorchEngine(model)
    s = PartialRolloutScheduler([eng, eng], CurriculumSampler([0, 1], ramp_iterations=0), [[1, 2, 3], [4, 5]],
                                group_size=2, prompts_per_iteration=2, budget_per_iteration=6, max_total_len=20,
                                params=SamplingParams(1, temperature=1.0, seed=0), batch_size=2,
                                buffer=ReplayBuffer(tmp_path / "b.json"))
    groups = []
    for v in range(5):
        groups += s.run_iteration(v)
    assert groups and all(t.finished for g in groups for t in g.trajectories)
    for t in (t for g in groups for t in g.trajectories):
        assert len(t.logprobs) == len(t.response_ids) and t.total_len <= 20
    s.close()
