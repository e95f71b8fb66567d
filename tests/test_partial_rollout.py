"""Partial rollouts with a persistent replay buffer (paper 2.6.2): the scheduler on scripted and real engines."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.algo import CurriculumSampler, PrioritizedSampler, RepeatDetector, find_repeat
from k15sys.rollout import Completion, PartialRolloutScheduler, ReplayBuffer, SamplingParams, TorchEngine
from k15sys.rollout.replay_buffer import Segment


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ScriptedEngine:
    """Deterministic fake engine. A prompt is ``[p, 0]``; prompt p needs ``lengths[p]`` response tokens, then
    stops. Response token i is ``pattern[p][i % len(pattern[p])]`` (default ``10 + i``, never looping).

    ``fail``: called with (call number, prompts) before generating; may raise to simulate a dying worker.
    ``barrier``: every call waits on it first (proves that calls run concurrently).
    """

    def __init__(self, lengths, *, patterns=None, fail=None, barrier=None):
        self.lengths, self.patterns, self.fail, self.barrier = lengths, patterns or {}, fail, barrier
        self.calls = 0
        self.lock = threading.Lock()
        self.log = []  # (call number, prompt ids of the call, max_new_tokens)

    def generate(self, prompts, params):
        with self.lock:
            self.calls += 1
            n = self.calls
            self.log.append((n, [p[0] for p in prompts], params.max_new_tokens))
        if self.barrier is not None:
            self.barrier.wait()
        if self.fail is not None:
            self.fail(n, prompts)
        out = []
        for p in prompts:
            done = len(p) - 2
            need = self.lengths[p[0]] - done
            k = min(need, params.max_new_tokens)
            pat = self.patterns.get(p[0])
            toks = [pat[(done + i) % len(pat)] if pat else 10 + done + i for i in range(k)]
            out.append(Completion(toks, [-0.5] * k, "stop" if k == need else "length"))
        return out

    def update_weights(self, named_tensors):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


def _scheduler(engine, tmp_path=None, num_prompts=4, **kw):
    opts = dict(group_size=2, prompts_per_iteration=2, budget_per_iteration=10, max_total_len=100,
                params=SamplingParams(1), batch_size=3)
    opts.update(kw)
    buf = ReplayBuffer(tmp_path / "buffer.json") if tmp_path else None
    sampler = CurriculumSampler(list(range(num_prompts)), ramp_iterations=0, seed=0)
    return PartialRolloutScheduler(engine, sampler, [[i, 0] for i in range(num_prompts)], buffer=buf, **opts)


def test_budget_groups_and_policy_versions(tmp_path):
    lengths = {0: 5, 1: 25, 2: 8, 3: 150}
    s = _scheduler(ScriptedEngine(lengths), tmp_path)
    emitted = []
    for v in range(12):
        groups = s.run_iteration(policy_version=v)
        assert [g.group_id for g in groups] == sorted(g.group_id for g in groups)
        for g in groups:
            assert [t.sample_index for t in g.trajectories] == [0, 1] and all(t.finished for t in g.trajectories)
            for t in g.trajectories:
                assert all(seg.end - seg.start <= 10 for seg in t.segments)  # the per-iteration budget
                assert [seg.start for seg in t.segments[1:]] == [seg.end for seg in t.segments[:-1]]
                assert t.policy_versions == sorted(set(t.policy_versions))  # one segment per iteration at most
                assert t.policy_versions[-1] <= v
                expect = min(lengths[g.prompt_index], 100 - 2)
                assert t.response_ids == [10 + i for i in range(expect)]  # continued exactly where it stopped
                assert len(t.logprobs) == expect
                assert t.finish_reason == ("length" if lengths[g.prompt_index] >= 98 else "stop")
                if lengths[g.prompt_index] > 10:
                    assert len(t.segments) > 1  # continued across iterations
        emitted += groups
        # groups still in the buffer have an unfinished member, and finished members wait there
        assert all(not all(t.finished for t in ts) for ts in s.buffer.groups.values())
        assert s.last_stats.emitted_groups == len(groups) and s.last_stats.new_groups == 2
    assert len(emitted) == 24 - len(s.buffer.groups) and len(emitted) > 12
    assert ReplayBuffer.load(tmp_path / "buffer.json").state_dict() == s.buffer.state_dict()  # persisted


def test_parallel_workers_new_and_continued():
    barrier = threading.Barrier(2, timeout=10)
    state = {"iteration": 0}

    def gate(n, prompts):
        if state["iteration"] == 1:
            barrier.wait()  # both calls of iteration 1 must be inside the engine together

    eng = ScriptedEngine({0: 50, 1: 50, 2: 50}, fail=gate)
    s = PartialRolloutScheduler([eng, eng], CurriculumSampler([0, 1, 2], ramp_iterations=0, seed=0),
                                [[0, 0], [1, 0], [2, 0]], group_size=2, prompts_per_iteration=1,
                                budget_per_iteration=5, max_total_len=100, batch_size=2)
    s.run_iteration(0)
    state["iteration"] = 1
    s.run_iteration(1)
    # one task continued the group of iteration 0 while the other started the new group, at the same time
    st = s.last_stats
    assert st.tasks == 2 and st.errors == [] and st.continued == 2 and st.new_groups == 1


def test_dead_worker_task_is_requeued_in_the_same_iteration(tmp_path):
    lengths = {i: 7 for i in range(4)}
    reference = _scheduler(ScriptedEngine(lengths), group_size=3, batch_size=2)
    want = reference.run_iteration(0)

    def die_once(n, prompts):
        if n == 2:
            raise RuntimeError("worker died")

    eng = ScriptedEngine(lengths, fail=die_once)
    s = _scheduler(eng, tmp_path, group_size=3, batch_size=2, num_workers=2)
    got = s.run_iteration(0)
    st = s.last_stats
    assert st.retries == 1 and st.failed_tasks == 0 and "worker died" in st.errors[0]
    assert eng.calls == st.tasks + 1
    assert [g.group_id for g in got] == [g.group_id for g in want] == [0, 1]  # nothing lost, nothing doubled
    for g, h in zip(got, want):
        assert [t.to_dict() for t in g.trajectories] == [t.to_dict() for t in h.trajectories]


def test_poison_task_is_kept_and_a_broken_engine_raises(tmp_path):
    def poison(n, prompts):
        if any(p[0] == 1 for p in prompts):
            raise ValueError("cannot run prompt 1")

    s = PartialRolloutScheduler(ScriptedEngine({i: 4 for i in range(4)}, fail=poison),
                                CurriculumSampler([0, 1, 2, 3], ramp_iterations=0, seed=0), [[i, 0] for i in range(4)],
                                group_size=1, prompts_per_iteration=4, budget_per_iteration=10, max_total_len=50,
                                batch_size=1, num_workers=2, max_attempts=2)
    groups = s.run_iteration(0)
    st = s.last_stats
    assert st.failed_tasks == 1 and st.retries == 1 and len(st.errors) == 2
    kept = s.buffer.unfinished()
    assert len(kept) == 1 and kept[0].prompt_index == 1 and kept[0].response_ids == [] and kept[0].segments == []
    assert sorted(g.prompt_index for g in groups) == [0, 2, 3]

    def always(n, prompts):
        raise OSError("engine gone")

    dead = PartialRolloutScheduler(ScriptedEngine({0: 4}, fail=always), CurriculumSampler([0]), [[0, 0]], group_size=2,
                                   prompts_per_iteration=1, budget_per_iteration=4, max_total_len=50,
                                   max_attempts=2, buffer=ReplayBuffer(tmp_path / "dead.json"))
    with pytest.raises(RuntimeError, match="every rollout worker failed"):
        dead.run_iteration(0)
    kept = ReplayBuffer.load(tmp_path / "dead.json")
    assert len(kept) == 2 and len(kept.unfinished()) == 2  # saved before raising: nothing lost


def test_malformed_engine_output_counts_as_a_failure():
    class Liar(ScriptedEngine):
        def generate(self, prompts, params):
            return [Completion([1] * (params.max_new_tokens + 1), [0.0] * (params.max_new_tokens + 1), "length")
                    for _ in prompts]

    s = _scheduler(Liar({}), max_attempts=1)
    with pytest.raises(RuntimeError, match="every rollout worker failed"):
        s.run_iteration(0)
    assert "malformed" in s.last_stats.errors[0]
    assert all(t.response_ids == [] for t in s.buffer.unfinished())


def test_repeat_loop_across_segment_boundaries_is_stopped():
    loop = [5, 6, 7]
    eng = ScriptedEngine({0: 500, 1: 30}, patterns={0: loop})  # prompt 0 loops, and the engine does not notice
    s = _scheduler(eng, num_prompts=2, group_size=1, prompts_per_iteration=2, budget_per_iteration=8,
                   max_total_len=600, repeat_detector=lambda: RepeatDetector(min_repeats=3, min_span=12, max_period=8))
    groups = []
    for v in range(6):
        groups += s.run_iteration(v)
    by_prompt = {g.prompt_index: g.trajectories[0] for g in groups}
    t = by_prompt[0]
    assert t.finish_reason == "repeat" and len(t.response_ids) < 500
    assert len(t.segments) >= 2  # the loop was caught after crossing a segment boundary
    assert len(t.response_ids) == 12  # first point where the tail holds 3 copies and 12 tokens
    assert find_repeat(t.response_ids, min_repeats=3, min_span=12, max_period=8) is not None
    assert by_prompt[1].finish_reason == "stop" and len(by_prompt[1].response_ids) == 30


def _torch_scheduler(model, num_workers, buffer=None, seed=5):
    eng = TorchEngine(model)
    return PartialRolloutScheduler(
        eng, PrioritizedSampler(3, seed=0), [[1, 2, 3], [4, 5], [6, 7, 8, 9]], group_size=3,
        prompts_per_iteration=2, budget_per_iteration=5, max_total_len=24, batch_size=2, num_workers=num_workers,
        params=SamplingParams(1, temperature=1.0, stop_token_ids=(0,), seed=seed), buffer=buffer)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight[0] += 0.3 * m.lm_head.weight[1:].mean(0)  # make the stop token a bit likelier
    return m


def test_real_engine_seeded_runs_do_not_depend_on_workers_and_resume_exactly(model, tmp_path):
    one, three = _torch_scheduler(model, 1), _torch_scheduler(model, 3)
    out1, out3 = [], []
    for v in range(3):
        out1 += one.run_iteration(v)
        out3 += three.run_iteration(v)
    assert json.dumps(one.state_dict()) == json.dumps(three.state_dict())
    # each task has its own seed: samples 0 and 2 of a group (same prompt, same row of different tasks) differ
    firsts = [[t.response_ids[: t.segments[0].end] for t in ts] for ts in one.buffer.groups.values()]
    firsts += [[t.response_ids[: t.segments[0].end] for t in g.trajectories] for g in out1]
    assert sum(f[0] == f[2] for f in firsts) < len(firsts) / 2
    # resume: a fresh scheduler loading the JSON state continues exactly like the uninterrupted one
    resumed = _torch_scheduler(model, 2, buffer=ReplayBuffer(tmp_path / "r.json"))
    resumed.load_state_dict(json.loads(json.dumps(one.state_dict())))
    for v in range(3, 7):
        a, b = one.run_iteration(v), resumed.run_iteration(v)
        assert [[t.to_dict() for t in g.trajectories] for g in a] == [[t.to_dict() for t in g.trajectories] for g in b]
        out1 += a
    assert ReplayBuffer(tmp_path / "r.json").state_dict() == one.buffer.state_dict()
    assert out1, "no group finished"
    for t in (t for g in out1 for t in g.trajectories):
        assert len(t.logprobs) == len(t.response_ids) and t.total_len <= 24 and all(x <= 0 for x in t.logprobs)
        assert t.finish_reason in ("stop", "length", "repeat")
        assert (t.finish_reason == "stop") == (t.response_ids[-1] == 0)
    assert any(len(t.segments) > 1 for g in out1 for t in g.trajectories)
    other = _torch_scheduler(model, 1, seed=6)
    other.run_iteration(0)
    first = _torch_scheduler(model, 1)
    first.run_iteration(0)
    assert other.state_dict()["buffer"] != first.state_dict()["buffer"]  # the seed matters


def test_greedy_partial_rollout_equals_one_go(model):
    """Continuing from the buffer is exact: segments of 8 + 8 + 4 greedy tokens equal 20 in one go."""
    eng = TorchEngine(model, repeat_detector=None)
    prompt = [3, 1, 4, 1, 5]
    s = PartialRolloutScheduler(eng, CurriculumSampler([0]), [prompt], group_size=2, prompts_per_iteration=1,
                                budget_per_iteration=8, max_total_len=len(prompt) + 20,
                                params=SamplingParams(1, temperature=0), repeat_detector=None)
    groups = [g for v in range(3) for g in s.run_iteration(v)]
    first = groups[0].trajectories[0]
    whole = eng.generate([prompt], SamplingParams(20, temperature=0))[0]
    assert [(x.start, x.end) for x in first.segments] == [(0, 8), (8, 16), (16, 20)] and first.finish_reason == "length"
    assert first.response_ids == whole.token_ids
    torch.testing.assert_close(torch.tensor(first.logprobs), torch.tensor(whole.logprobs), atol=1e-5, rtol=1e-5)


def test_lowered_max_total_len_finishes_longer_trajectories():
    s = _scheduler(ScriptedEngine({i: 50 for i in range(4)}), prompts_per_iteration=1)
    s.run_iteration(0)
    s.max_total_len, s.prompts_per_iteration = 8, 0  # e.g. long2short RL with a much smaller max length
    groups = s.run_iteration(1)
    assert len(groups) == 1 and all(t.finish_reason == "length" and len(t.response_ids) == 10 for t in groups[0].trajectories)


def test_max_response_len_gives_every_prompt_the_same_response_budget():
    """Prompts of different lengths: each response is cut at max_response_len tokens, across segments."""

    class Endless:  # never stops: every call fills its budget
        def generate(self, prompts, params):
            return [Completion([5] * params.max_new_tokens, [-1.0] * params.max_new_tokens, "length") for _ in prompts]

    prompts = [[1], [1, 2, 3, 4, 5, 6]]
    s = PartialRolloutScheduler(Endless(), CurriculumSampler([0, 0], ramp_iterations=0, seed=0), prompts, group_size=1,
                                prompts_per_iteration=2, budget_per_iteration=4, max_total_len=100, max_response_len=7)
    assert s.run_iteration(0) == []  # 4 of 7 tokens each: both continue
    groups = s.run_iteration(1)
    assert sorted(g.prompt_index for g in groups) == [0, 1]  # a short and a long prompt
    assert [len(g.trajectories[0].response_ids) for g in groups] == [7, 7]
    assert all(g.trajectories[0].finish_reason == "length" for g in groups)
    with pytest.raises(ValueError, match="max_response_len"):
        PartialRolloutScheduler(Endless(), CurriculumSampler([0], seed=0), [[1]], group_size=1, prompts_per_iteration=1,
                                budget_per_iteration=4, max_total_len=100, max_response_len=0)


def test_buffer_path_resumes_instead_of_overwriting(tmp_path):
    s = _scheduler(ScriptedEngine({0: 30, 1: 30, 2: 30, 3: 30}), tmp_path)
    s.run_iteration(0)
    again = ReplayBuffer(tmp_path / "buffer.json")  # e.g. the job restarted with the same path
    assert again.state_dict() == s.buffer.state_dict() and len(again.unfinished()) == 4
    with pytest.raises(ValueError, match="path"):
        ReplayBuffer.load(tmp_path / "missing.json")
    assert list(tmp_path.iterdir()) == [tmp_path / "buffer.json"]  # no temporary files left behind
    t = again.groups[0][1]
    t.segments.append(Segment(1, len(t.response_ids), len(t.response_ids) + 2))
    t.response_ids += [2**31 - 1, 0]
    t.logprobs += [-0.1234567890123456789, -1e-300]
    t.finish_reason = "repeat"
    again.save()
    u = ReplayBuffer.load(again.path).groups[0][1]
    assert (u.response_ids, u.logprobs, u.finish_reason) == (t.response_ids, t.logprobs, "repeat")  # exact
    assert u.segments == t.segments and u.policy_versions == [0, 1] and type(u.response_ids[0]) is int


@pytest.mark.parametrize("kw,name", [
    (dict(group_size=0), "group_size"), (dict(budget_per_iteration=0), "budget_per_iteration"),
    (dict(max_total_len=2), r"prompts\[0\]"), (dict(batch_size=0), "batch_size"),
    (dict(num_workers=0), "num_workers"), (dict(max_attempts=0), "max_attempts"),
    (dict(prompts_per_iteration=-1), "prompts_per_iteration"),
])
def test_scheduler_bad_input(kw, name):
    with pytest.raises(ValueError, match=name):
        _scheduler(ScriptedEngine({0: 1}), **kw)


def test_scheduler_bad_runtime_input():
    s = _scheduler(ScriptedEngine({i: 1 for i in range(4)}))
    with pytest.raises(ValueError, match="policy_version"):
        s.run_iteration(-1)

    class Wild:
        def sample(self, n):
            return [7] * n

    s.sampler = Wild()
    with pytest.raises(ValueError, match="sampler"):
        s.run_iteration(0)
    with pytest.raises(ValueError, match="prompts"):
        PartialRolloutScheduler(ScriptedEngine({}), Wild(), [], group_size=1, budget_per_iteration=1,
                                max_total_len=4, prompts_per_iteration=1)
