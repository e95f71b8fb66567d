"""RemoteEngine: rollout workers in their own processes, weights through the checkpoint engine (gloo, CPU)."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.rollout import RemoteEngine, RolloutEngine, SamplingParams, TorchEngine

pytestmark = pytest.mark.distributed


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def make_engine() -> TorchEngine:
    torch.set_num_threads(1)
    return TorchEngine(tiny_model(0), repeat_detector=None)


PROMPTS = [[1, 5, 9], [2, 3], [7, 7, 7, 8], [4], [10, 11, 12], [13, 14]]
GREEDY = SamplingParams(12, temperature=0)


def test_workers_generate_like_a_local_engine_and_take_new_weights():
    remote = RemoteEngine(make_engine, num_workers=2, timeout_s=60)
    try:
        assert isinstance(remote, RolloutEngine)
        local = TorchEngine(tiny_model(0), repeat_detector=None)
        want = local.generate(PROMPTS, GREEDY)
        got = remote.generate(PROMPTS, GREEDY)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        # new weights (another init) reach every worker through the checkpoint engine
        new = tiny_model(1)
        state = [*new.named_parameters(), *new.named_buffers()]
        remote.update_weights(state)
        local.update_weights(state)
        assert remote.weight_version == 1
        want = local.generate(PROMPTS, GREEDY)
        got = remote.generate(PROMPTS, GREEDY)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        # a bad update (unknown tensor) is an error and changes nothing on any worker
        with pytest.raises(Exception, match="unknown tensor"):
            remote.update_weights([*state, ("model.nope", torch.zeros(3))])
        assert [c.token_ids for c in remote.generate(PROMPTS, GREEDY)] == [c.token_ids for c in want]
        # a worker's own error comes back with its rank
        with pytest.raises(RuntimeError, match="worker 2 raised ValueError in generate"):
            remote.generate([[]], GREEDY)
    finally:
        remote.close()


def test_dead_worker_is_a_clear_error():
    remote = RemoteEngine(make_engine, num_workers=2, timeout_s=10)
    try:
        remote.generate(PROMPTS, GREEDY)
        remote.procs[1].kill()
        remote.procs[1].join()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rollout worker failed"):
            remote.generate(PROMPTS, GREEDY)
        assert time.monotonic() - t0 < 30
    finally:
        remote.close()


def test_main_job_with_a_rollout_worker_process_equals_the_in_process_run(tmp_path):
    """Same seeds, one worker (it samples with the run's seed): the metrics equal the in-process run's."""
    from k15sys.cli import main
    from k15sys.train.metrics import read_metrics

    tiny = ["sft.steps=4", "sft.batch_size=8", "rl.iterations=2", "rl.prompts_per_iteration=4", "rl.group_size=4",
            "rl.skip_zero_advantage=false", "rl.minibatch_size=8", "rl.max_new_tokens=24", "task.num_train=48", "task.num_eval=8", "eval.every=1",
            "run.threads=1", "run.progress=false", "run.tensorboard=false", "model.hidden_size=32",
            "model.intermediate_size=64", "model.num_layers=2"]
    runs = {}
    for workers in (0, 1):
        out = tmp_path / f"run{workers}"
        assert main(["train", "--output-dir", str(out), *[f"--set={o}" for o in tiny],
                     f"--set=run.rollout_workers={workers}"]) == 0
        runs[workers] = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in runs[1]] == [0, 1, 2]
    for a, b in zip(runs[0], runs[1]):
        same = {k: v for k, v in a.items() if k.startswith(("rl/", "eval/"))}
        assert same == {k: b[k] for k in same}


def test_bad_arguments_fail_before_spawning():
    with pytest.raises(ValueError, match="num_workers"):
        RemoteEngine(make_engine, 0)
    with pytest.raises(ValueError, match="cuda_devices"):
        RemoteEngine(make_engine, 2, cuda_devices=[0])
