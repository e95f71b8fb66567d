"""RemoteEngine: rollout workers in their own processes, weights through the checkpoint engine (gloo, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from k15sys.rollout import RemoteEngine, RolloutEngine, SamplingParams, TorchEngine
from k15sys.weights import WeightSyncError

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
        # bad versions change nothing on any worker: refused by the workers before the commit (an unknown tensor,
        # a missing one) or by the trainer before any worker is involved (a dtype the engines do not take)
        with pytest.raises(WeightSyncError, match="rank 1: check_fn: ValueError: .*unknown tensor 'model.nope'"):
            remote.update_weights([*state, ("model.nope", torch.zeros(3))])
        with pytest.raises(WeightSyncError, match="incomplete version, 'model.norm.weight' is missing"):
            remote.update_weights([(n, t * 0) for n, t in state if n != "model.norm.weight"])
        for dtype in (torch.int64, torch.float64):
            with pytest.raises(ValueError, match=f"'model.norm.weight' is {dtype}"):
                remote.update_weights([(n, t.to(dtype) if n == "model.norm.weight" else t * 0) for n, t in state])
        assert remote.weight_version == 3
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
            "model.intermediate_size=64", "model.num_layers=2", "run.device=cpu"]  # bit-identity is a CPU property
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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU, also on a machine with GPUs


@pytest.mark.timeout(600)
def test_torchrun_ranks_with_rollout_workers_equal_in_process_engines(tmp_path):
    """2 torchrun ranks (gloo default group, FSDP2), each with one rollout worker process in a weight group of its
    own: the metrics equal the same job's with in-process engines (whose weights arrive by the in-place FSDP2 path)."""
    from k15sys.train.metrics import read_metrics

    tiny = ["sft.steps=2", "sft.batch_size=8", "rl.iterations=1", "rl.prompts_per_iteration=4", "rl.group_size=4",
            "rl.skip_zero_advantage=false", "rl.minibatch_size=8", "rl.max_new_tokens=16", "task.num_train=48",
            "task.num_eval=4", "eval.every=1", "run.threads=1", "run.progress=false", "run.tensorboard=false",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
            "rl.logprob_path=fused"]  # and the fused first PMD step under FSDP2
    runs = {}
    for workers in (0, 1):
        out = tmp_path / f"run{workers}"
        cmd = [*TORCHRUN, "-m", "k15sys.cli", "train", "--output-dir", str(out), *[f"--set={o}" for o in tiny],
               f"--set=run.rollout_workers={workers}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=CPU_ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[workers] = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in runs[1]] == [0, 1]
    for a, b in zip(runs[0], runs[1]):
        same = {k: v for k, v in a.items() if k.startswith(("rl/", "eval/"))}
        assert same and same == {k: b[k] for k in same}
