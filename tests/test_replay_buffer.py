"""The replay buffer (paper 2.6.2) checks what it takes in (issue 20 item 10): a truncated or damaged file, NaN
log-probs, an unknown finish reason, a prompt index outside the pool or an incomplete group is refused with an error
that says where, and the buffer is left as it was."""
from __future__ import annotations

import json

import pytest

from k15sys.algo import CurriculumSampler
from k15sys.rollout import Completion, PartialRolloutScheduler, ReplayBuffer
from k15sys.rollout.replay_buffer import ReplayBufferError, Segment, _pack


def _buffer(num_groups=2, k=3):
    buf = ReplayBuffer()
    for g in range(num_groups):
        gid = buf.add_group(g, [1, 5 + g], k)
        for j, t in enumerate(buf.groups[gid]):
            t.response_ids, t.logprobs = [7, 8, 9], [-0.5, -0.25, -1.0]
            t.segments = [Segment(0, 0, 2), Segment(1, 2, 3)]
            t.finish_reason = "stop" if j else None
    return buf


def _state_with(edit):
    state = json.loads(json.dumps(_buffer().state_dict()))
    edit(state)
    return state


def test_a_valid_buffer_round_trips():
    buf = _buffer()
    again = ReplayBuffer()
    again.load_state_dict(buf.state_dict(), num_prompts=2, group_size=3)
    assert again.state_dict() == buf.state_dict() and len(again.unfinished()) == 2


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["groups"]["0"][1].update(logprobs=_pack([-0.5, float("nan"), -1.0], "float64")),
     r"group 0: logprobs: not finite at token 1 \(nan\)"),
    (lambda s: s["groups"]["1"][0].update(logprobs=_pack([-0.5, float("-inf"), -1.0], "float64")), "group 1: logprobs: not finite"),
    (lambda s: s["groups"]["0"][2].update(finish_reason="timeout"), "group 0: finish_reason: expected None or one of"),
    (lambda s: s["groups"]["0"][0].update(logprobs=_pack([-0.5], "float64")), "logprobs: 1 for 3 response tokens"),
    (lambda s: s["groups"]["0"][0].update(response_ids="###"), "response_ids: not packed int32 values"),
    (lambda s: s["groups"]["0"][0].update(response_ids=_pack([1], "int32")[:-4]), "response_ids: not packed int32"),
    (lambda s: s["groups"]["0"][0].update(segments=[[0, 0, 2]]), "segments: cover 2 of 3 response tokens"),
    (lambda s: s["groups"]["0"][0].update(segments=[[0, 0, 2], [1, 1, 3]]), "does not continue the response"),
    (lambda s: s["groups"]["0"][0].update(prompt_index=-1), "prompt_index: expected ints >= 0"),
    (lambda s: s["groups"]["0"][0].pop("finish_reason"), "group 0: missing 'finish_reason'"),
    (lambda s: s["groups"]["1"].pop(), "group 1: incomplete group: 2 trajectories, group_size is 3"),
    (lambda s: s["groups"]["1"][2].update(prompt_index=0), "group 1: member 2 has another prompt"),
    (lambda s: s.update(next_group_id=1), "next_group_id: 1 would reuse group id 1"),
    (lambda s: s.update(next_group_id="2"), "next_group_id: expected an int"),
])
def test_a_malformed_state_is_refused_and_changes_nothing(edit, message):
    buf = _buffer(num_groups=1)
    before = buf.state_dict()
    with pytest.raises(ReplayBufferError, match=f"^checkpoint: .*{message}"):
        buf.load_state_dict(_state_with(edit), num_prompts=2, group_size=3, source="checkpoint")
    assert buf.state_dict() == before


def test_prompt_index_outside_the_pool_and_missing_last_member_need_the_schedulers_sizes():
    state = _buffer().state_dict()
    ReplayBuffer().load_state_dict(state)  # on its own, a buffer cannot know the pool or k
    with pytest.raises(ReplayBufferError, match="group 1: prompt_index: 1 is outside the pool of 1 prompts"):
        ReplayBuffer().load_state_dict(state, num_prompts=1)
    with pytest.raises(ReplayBufferError, match="incomplete group: 3 trajectories, group_size is 4"):
        ReplayBuffer().load_state_dict(state, group_size=4)
    with pytest.raises(ReplayBufferError, match="group 1: member 1 is sample 2 of group 1"):  # a lost middle member
        ReplayBuffer().load_state_dict(_state_with(lambda s: s["groups"]["1"].pop(1)))


def test_damaged_files_are_clear_errors(tmp_path):
    path = tmp_path / "buffer.json"
    _buffer().save(path)
    assert ReplayBuffer.load(path).state_dict() == _buffer().state_dict()
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ReplayBufferError, match=rf"{path.name}: not a replay buffer file \(truncated or damaged JSON"):
        ReplayBuffer.load(path)
    path.write_bytes(b"\xff\xfe" + text.encode())
    with pytest.raises(ReplayBufferError, match="not a replay buffer file"):
        ReplayBuffer(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ReplayBufferError, match=f"{path.name}: state: "):
        ReplayBuffer(path)
    state = json.loads(text)
    state["groups"]["0"][0]["logprobs"] = _pack([float("nan")] * 3, "float64")
    path.write_text(json.dumps(state))
    with pytest.raises(ReplayBufferError, match=f"{path.name}: group 0: logprobs: not finite"):
        ReplayBuffer(path)


def test_a_scheduler_refuses_a_buffer_that_does_not_fit_its_pool_or_group_size(tmp_path):
    path = tmp_path / "buffer.json"
    _buffer().save(path)  # prompts 0 and 1, groups of 3
    opts = dict(prompts_per_iteration=1, budget_per_iteration=4, max_total_len=50)
    with pytest.raises(ReplayBufferError, match="group 1: prompt_index: 1 is outside the pool of 1 prompts"):
        PartialRolloutScheduler(_NanEngine(), CurriculumSampler([0]), [[1, 5]], group_size=3, buffer=ReplayBuffer(path), **opts)
    with pytest.raises(ReplayBufferError, match="group 0: incomplete group: 3 trajectories, group_size is 2"):
        PartialRolloutScheduler(_NanEngine(), CurriculumSampler([0, 0]), [[1, 5], [1, 6]], group_size=2,
                                buffer=ReplayBuffer(path), **opts)
    s = PartialRolloutScheduler(_NanEngine(), CurriculumSampler([0, 0]), [[1, 5], [1, 6]], group_size=3, **opts)
    state = s.state_dict()
    s.load_state_dict({**state, "buffer": _buffer().state_dict()})
    with pytest.raises(ReplayBufferError, match="checkpoint's replay buffer: group 0: incomplete group"):
        PartialRolloutScheduler(_NanEngine(), CurriculumSampler([0, 0]), [[1, 5], [1, 6]], group_size=2,
                                **opts).load_state_dict({**state, "buffer": _buffer().state_dict()})


class _NanEngine:
    """Returns NaN log-probs for every token."""

    def generate(self, prompts, params):
        return [Completion([3] * params.max_new_tokens, [float("nan")] * params.max_new_tokens, "length") for _ in prompts]


def test_nan_logprobs_from_the_engine_never_enter_the_buffer():
    s = PartialRolloutScheduler(_NanEngine(), CurriculumSampler([0]), [[1, 5]], group_size=2, prompts_per_iteration=1,
                                budget_per_iteration=4, max_total_len=50, max_attempts=2)
    with pytest.raises(RuntimeError, match="every rollout worker failed"):
        s.run_iteration(0)
    assert any("non-finite log-probs" in e for e in s.last_stats.errors)
    assert all(t.response_ids == [] and t.logprobs == [] for t in s.buffer.unfinished())


@pytest.mark.parametrize("args, name", [((-1, [1, 2], 2), "prompt_index"), ((0, [], 2), "prompt_ids"),
                                        ((0, [1, -3], 2), "prompt_ids"), ((0, [1], 0), "group_size"),
                                        ((True, [1], 2), "prompt_index")])
def test_add_group_checks_its_arguments(args, name):
    buf = ReplayBuffer()
    with pytest.raises(ValueError, match=f"^{name}"):
        buf.add_group(*args)
    assert buf.groups == {} and buf.next_group_id == 0
