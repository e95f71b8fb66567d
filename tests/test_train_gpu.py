"""The main job on GPUs: one CUDA device (varlen attention in the policy), and torchrun over 2 GPUs (NCCL)."""
from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch

from k15sys.train.config import load_config
from k15sys.train.trainer import Trainer

pytestmark = pytest.mark.gpu
TINY = ["sft.steps=6", "sft.batch_size=8", "rl.prompts_per_iteration=4", "rl.group_size=4", "rl.skip_zero_advantage=false",
        "rl.minibatch_size=8",
        "rl.max_new_tokens=24", "task.num_train=48", "task.num_eval=8", "eval.every=2", "run.checkpoint_every=1",
        "run.progress=false", "run.tensorboard=false", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "run.device=cuda"]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_main_job_on_cuda_trains_through_the_varlen_kernel(tmp_path):
    cfg = load_config(None, [*TINY, "rl.iterations=2", f"run.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    assert trainer.policy.lm.config._attn_implementation == "k15_varlen"
    assert next(trainer.policy.parameters()).is_cuda and next(trainer.engine.model.parameters()).is_cuda
    trainer.run()
    rows = _rows(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["rl/loss"])) for r in rows[1:])
    # the engine holds the trainer's weights after the last sync
    for (name, p), q in zip(trainer.policy.lm.named_parameters(), trainer.engine.model.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


@pytest.mark.timeout(400)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("colocate", ["false", "true"])
def test_torchrun_two_gpus_nccl(tmp_path, colocate):
    """The main job on 2 GPUs (FSDP2 over NCCL), also colocated (the sharded trainer offloaded during rollouts)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "k15sys.cli",
           "train", "--output-dir", str(run), *[f"--set={o}" for o in TINY], "--set=rl.iterations=2",
           f"--set=run.colocate={colocate}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["iteration"] for r in _rows(run)] == [0, 1, 2]


def test_rollout_worker_processes_on_cuda(tmp_path):
    """`run.rollout_workers` on CUDA: each worker's engine decodes on a GPU with weights sent through the
    checkpoint engine. One worker samples with the run's seed, so its run equals the in-process one
    (rewards, accuracies, evaluations); two workers (GPU w modulo the GPU count) run to the end."""
    runs = {}
    for workers in (0, 1, 2):
        cfg = load_config(None, [*TINY, "rl.iterations=2", f"run.rollout_workers={workers}",
                                 f"run.output_dir={tmp_path / f'run{workers}'}"])
        Trainer(cfg).run()
        runs[workers] = _rows(tmp_path / f"run{workers}")
    assert [r["iteration"] for r in runs[2]] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["rl/loss"])) for r in runs[2][1:])
    keys = ("rl/reward", "rl/accuracy", "rl/response_len", "eval/pass@1")
    for a, b in zip(runs[0], runs[1]):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


@pytest.fixture
def deterministic_mode():
    """`run.deterministic` switches the whole process; switch it back for the other tests."""
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_gpu_runs_are_bit_identical(tmp_path, deterministic_mode):
    """`run.deterministic`: two identical runs on the GPU give the same losses, grad norms and weights, bit for bit
    (without it, `index_add`'s atomics make them differ; see docs/main_job.md)."""
    big = ["model.hidden_size=256", "model.intermediate_size=1024", "model.num_layers=4"]
    runs, weights = [], []
    for n in range(2):
        cfg = load_config(None, [*TINY, *big, "rl.iterations=3", "run.deterministic=true", f"run.output_dir={tmp_path / str(n)}"])
        trainer = Trainer(cfg)
        trainer.run()
        assert torch.are_deterministic_algorithms_enabled()
        runs.append(_rows(tmp_path / str(n)))
        weights.append({k: v.detach().clone() for k, v in trainer.policy.lm.state_dict().items()})
        del trainer
    assert [r["iteration"] for r in runs[0]] == [0, 1, 2, 3]
    keys = ("rl/loss", "rl/grad_norm", "rl/kl_ref", "rl/entropy", "rl/reward", "eval/pass@1")
    for a, b in zip(*runs):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_colocated_trainer_gives_the_engine_its_memory_and_trains_the_same(tmp_path):
    """`run.colocate` (paper 2.6.3): the offload before a rollout frees the trainer's parameters and both Adam
    moments from the GPU, during the rollout all of them are in host memory, and the run's results equal the
    non-colocated run's. The totals in use at a rollout's start are not compared between the two runs: on an
    H200 (2026-12-03) the colocated run held more other memory there (154 MB against 132 MB; the engine's CUDA
    graphs are captured again after every wake, with their memory pools and workspaces)."""
    big = ["model.hidden_size=256", "model.intermediate_size=1024", "model.num_layers=4", "model.num_heads=4"]
    runs, freed, on_gpu = {}, [], []
    for colocate in (False, True):
        cfg = load_config(None, [*TINY, *big, "rl.iterations=3", f"run.colocate={str(colocate).lower()}",
                                 f"run.output_dir={tmp_path / str(colocate)}"])
        gc.collect()  # the previous run's trainer
        trainer = Trainer(cfg)
        offload, rollouts = trainer.offload.offload, trainer.scheduler.run_iteration

        def measured_offload():
            held = torch.cuda.memory_allocated()
            offload()
            freed.append(held - torch.cuda.memory_allocated())

        def measured_rollouts(*a, **k):
            module, rest = trainer.offload.tensors()  # the trainer's tensors on the GPU
            on_gpu.append((colocate, len(module) + len(rest)))
            return rollouts(*a, **k)

        trainer.offload.offload, trainer.scheduler.run_iteration = measured_offload, measured_rollouts
        trainer.run()
        runs[colocate] = _rows(tmp_path / str(colocate))
        assert runs[colocate][2]["rl/trained_groups"] > 0
        params = sum(p.numel() * p.element_size() for p in trainer.policy.parameters())
        assert next(trainer.policy.parameters()).is_cuda  # back on the GPU after the run
        del trainer, offload, rollouts, measured_offload, measured_rollouts
    # iteration 3 (trained before, so Adam's moments exist): parameters + two moments left the GPU (fp32, no masters)
    assert len(freed) == 3 and freed[-1] >= 3 * params, (freed, params)
    assert [c for c, _ in on_gpu] == [False] * 3 + [True] * 3
    assert all(n > 0 for c, n in on_gpu if not c) and all(n == 0 for c, n in on_gpu if c), on_gpu
    keys = ("rl/reward", "rl/accuracy", "eval/pass@1")
    for a, b in zip(runs[False], runs[True]):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    # Loss and grad norm are not compared: the offload round trip is exact (test below), but GPU training is not
    # bitwise reproducible, and this untrained model's rewards are all 0 (zero advantage), so its losses are
    # rounding noise: two identical plain runs on an H200 gave 2.3e-9 / 5.0e-9 at iteration 1 and 2.7e-6 / 8.1e-6
    # at iteration 2 (the colocated run: 4.5e-9 and 1.1e-5).


def test_trainer_offload_round_trip_is_exact():
    from k15sys.train.hybrid import TrainerOffload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.LayerNorm(512)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 512, device="cuda")).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]
    held = torch.cuda.memory_allocated()
    off = TrainerOffload(model, opt, torch.device("cuda"))
    off.offload()
    assert not next(model.parameters()).is_cuda and all(not st["exp_avg"].is_cuda for st in opt.state.values())
    assert torch.cuda.memory_allocated() <= held - 3 * sum(p.numel() * 4 for p in model.parameters())
    off.onload()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for st, ref in zip(opt.state.values(), moments):
        assert all(torch.equal(st[k].cpu(), ref[k].cpu()) and st[k].device == ref[k].device for k in ref)
    model(torch.randn(8, 512, device="cuda")).square().mean().backward()
    opt.step()  # the optimizer still holds the same Parameter objects, on the GPU


def _fsdp2_offload_worker(rank: int, port: int, out: str) -> None:
    """One NCCL rank: three AdamW steps of an FSDP2 model, with and without an offload/onload round trip between
    steps; writes the final weights of both and the memory freed by the offload."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from k15sys.train.hybrid import TrainerOffload

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=1)
    finals, freed = [], []
    for offload in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.LayerNorm(512), torch.nn.Linear(512, 512)).cuda()
        fully_shard(model[0])
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        off = TrainerOffload(model, opt, torch.device("cuda"))
        x = torch.randn(8, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if offload:
                held = torch.cuda.memory_allocated()
                off.offload()
                freed.append(held - torch.cuda.memory_allocated())
                off.onload()
        finals.append({k: v.full_tensor().cpu() for k, v in model.state_dict().items()})
    torch.save({"finals": finals, "freed": freed, "param_bytes": sum(p.numel() * 4 for p in model.parameters())}, out)
    dist.destroy_process_group()


def test_trainer_offload_round_trip_with_fsdp2(tmp_path):
    """TrainerOffload on an FSDP2-sharded model (the torchrun trainer): the offload frees the parameters and both
    Adam moments from the GPU, and training after the round trips equals training without them, bit for bit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "fsdp2.pt")
    torch.multiprocessing.spawn(_fsdp2_offload_worker, args=(port, out), nprocs=1)
    res = torch.load(out)
    plain, offloaded = res["finals"]
    assert all(torch.equal(plain[k], offloaded[k]) for k in plain)
    assert min(res["freed"]) >= 3 * res["param_bytes"], res


@pytest.fixture
def gsm8k_qwen2(tmp_path):
    """A tiny random Qwen2 directory with a locally trained BPE tokenizer (k15sys.train.scratch_model), and GSM8K
    JSONL files (train, eval, SFT traces), as a user brings them (docs/your_model.md)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from hf_fixtures import gsm8k_rows, gsm8k_traces, read_jsonl, write_jsonl, DATA

    from k15sys.train.scratch_model import save_scratch_model, train_tokenizer

    texts = [r["question"] + "\n" + r["answer"] for r in read_jsonl(DATA / "gsm8k_test.jsonl")[:300]]
    model = save_scratch_model(tmp_path / "model", train_tokenizer(texts, vocab_size=600), arch="qwen2", hidden_size=64,
                               intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    return {"model": model, "train": write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(0, 16)),
            "eval": write_jsonl(tmp_path / "eval.jsonl", gsm8k_rows(100, 4)),
            "sft": write_jsonl(tmp_path / "sft.jsonl", gsm8k_traces(0, 16))}


MODEL_PATH_RUN = ["sft.steps=2", "sft.batch_size=4", "sft.lr=1e-3", "rl.prompts_per_iteration=4", "rl.group_size=2",
                  "rl.minibatch_size=4", "rl.max_new_tokens=16", "rl.skip_zero_advantage=false", "eval.every=1",
                  "run.progress=false", "run.tensorboard=false", "run.device=cuda"]


def test_model_path_run_on_cuda_colocated_bf16_with_master_weights(tmp_path, gsm8k_qwen2):
    """The whole loop on a transformers directory on the GPU: bf16 (model.dtype auto) with fp32 master weights,
    PagedEngine rollouts, colocated (the trainer through pinned host buffers, the engine at sleep level 2 and
    refilled by the weight sync); metrics, a checkpoint with the masters, `k15 export` loading in transformers,
    and `--resume` continuing the run."""
    from transformers import AutoModelForCausalLM

    from k15sys.cli import main
    from k15sys.rollout import PagedEngine
    from k15sys.train.checkpoint import latest_checkpoint, load_checkpoint
    from k15sys.train.optim import MasterWeights

    g, run = gsm8k_qwen2, tmp_path / "run"
    opts = [f"model.path={g['model']}", f"data.train={g['train']}", f"data.eval={g['eval']}", f"sft.data={g['sft']}",
            *MODEL_PATH_RUN, "run.colocate=true", f"run.output_dir={run}"]
    trainer = Trainer(load_config(None, [*opts, "rl.iterations=2"]))
    assert isinstance(trainer.engine, PagedEngine) and isinstance(trainer.optimizer, MasterWeights)
    assert next(trainer.policy.parameters()).dtype == torch.bfloat16
    trainer.run()
    rows = _rows(run)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[0]["stage"] == "sft"
    assert all(r["rl/groups"] == 4 and r["rl/train_tokens"] > 0 and torch.isfinite(torch.tensor(r["rl/loss"]))
               for r in rows[1:])
    assert trainer.engine._discarded_at is not None  # the engine slept at level 2 and was refilled
    for (name, p), q in zip(trainer.policy.lm.named_parameters(), trainer.engine.model.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    assert not trainer.offload.offloaded and trainer.offload.mirror.allocations >= 1
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    masters = state["optimizer"]["master_weights"]
    assert all(t.dtype == torch.float32 for t in masters.values())
    assert all(torch.equal(t.to(torch.bfloat16), state["model"][n.removeprefix("lm.")]) for n, t in masters.items())
    del trainer
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).named_parameters())
    assert all(torch.equal(exported[k], state["model"][k]) for k in exported)
    assert main(["train", "--output-dir", str(run), "--resume",
                 *[a for o in [*opts[:-1], "rl.iterations=3"] for a in ("--set", o)]]) == 0
    assert [r["iteration"] for r in _rows(run)] == [0, 1, 2, 3]


@pytest.mark.timeout(400)
def test_model_path_run_under_torchrun_one_gpu_nccl(tmp_path, gsm8k_qwen2):
    """`torchrun --nproc-per-node 1 k15 train` with model.path on CUDA (NCCL group of one rank), colocated."""
    g, run = gsm8k_qwen2, tmp_path / "run"
    opts = [f"model.path={g['model']}", f"data.train={g['train']}", f"data.eval={g['eval']}", *MODEL_PATH_RUN,
            "sft.steps=0", "rl.iterations=2", "run.colocate=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "k15sys.cli",
           "train", "--output-dir", str(run), *[f"--set={o}" for o in opts]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(run)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all(r["rl/train_tokens"] > 0 for r in rows[1:])
    assert (run / "checkpoints").is_dir()
