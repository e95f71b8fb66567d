"""torch.distributed: FSDP2 on 2 gloo ranks equals the single-process step; the main job runs under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo ranks on the CPU, also on a machine with GPUs

FSDP_STEP = r"""
import sys, torch
from k15sys.algo import pmd_loss
from k15sys.train import distributed as du
from k15sys.train.config import ModelConfig
from k15sys.train.model import build_model
from k15sys.train.packing import pack
from k15sys.train.policy import PackedPolicy

du.init_from_env()
rank, world = du.rank_and_world()
assert world == 2
g = torch.Generator().manual_seed(1)
seqs = [torch.randint(3, 24, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
rewards = torch.randint(0, 2, (16,), generator=g).float()

def make():
    return PackedPolicy(build_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2), 24,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0))

def step(policy, idx):
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(2):
        batch = pack([seqs[i] for i in idx], [2] * len(idx), row_tokens=32)
        with torch.no_grad():
            ref = policy(batch).seq_logp
        loss = pmd_loss(policy(batch).seq_logp, ref + 0.1, rewards[idx], group_size=4, tau=0.5)
        opt.zero_grad()
        loss.backward()
        du.clip_grad_norm(policy, 1.0)
        opt.step()
    return du.full_state_dict(policy.lm)

sharded = du.shard(make())
assert any(hasattr(p, "device_mesh") for p in sharded.parameters()), "not sharded"
got = step(sharded, list(range(rank * 8, rank * 8 + 8)))
if rank == 0:
    want = step(make(), list(range(16)))
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    print("MAXDIFF", worst)
    assert worst < 5e-5, worst  # float32 reductions in another order, through 2 Adam steps
du.shutdown(barrier=True)
du.exit_rank(0)  # interpreter teardown under gloo threads kept alive by DTensor caches can abort
"""


@pytest.mark.timeout(300)
def test_fsdp2_two_ranks_equal_single_process_steps(tmp_path):
    script = tmp_path / "fsdp_step.py"
    script.write_text(FSDP_STEP)
    out = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=240, env=CPU_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MAXDIFF" in out.stdout


TINY = ["sft.steps=4", "sft.batch_size=8", "rl.prompts_per_iteration=4", "rl.group_size=4", "rl.truncated_reward=-0.5",
        "rl.minibatch_size=8",
        "rl.max_new_tokens=24", "task.num_train=48", "task.num_eval=8", "eval.every=2", "run.checkpoint_every=1",
        "run.threads=1", "run.progress=false", "run.tensorboard=false", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_layers=2"]


@pytest.mark.timeout(400)
def test_torchrun_main_job_and_resume(tmp_path):
    """2 ranks (gloo), then resume. rl.skip_zero_advantage is on (the default) and rl.truncated_reward=-0.5 makes
    groups with finished and truncated samples informative, so ranks train different numbers of minibatches
    and the zero-weight passes keep FSDP in step."""
    run = tmp_path / "run"
    base = [*TORCHRUN, "-m", "k15sys.cli", "train", "--output-dir", str(run), *[f"--set={o}" for o in TINY]]
    out = subprocess.run([*base, "--set=rl.iterations=2"], capture_output=True, text=True, timeout=240, env=CPU_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([*base, "--set=rl.iterations=3", "--resume"], capture_output=True, text=True, timeout=240, env=CPU_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all(r["rl/groups"] >= 0 for r in rows[1:])
    from k15sys.train.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert state["world_size"] == 2 and len(state["scheduler"]) == 2 and state["iteration"] == 3
    shutil.rmtree(run)
