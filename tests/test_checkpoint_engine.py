"""CheckpointEngine over gloo on the CPU: exact bytes, versions, verify, and failures (paper 2.6.3)."""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k15sys.weights import CheckpointEngine, WeightSyncError

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {
        "embed": torch.randn(37, 19, generator=g).to(torch.bfloat16),
        "norm": torch.randn(19, generator=g),
        "ids": torch.randint(0, 10**12, (5, 3), generator=g),
        "big": torch.randn(300, 41, generator=g).half(),
        "scalar": torch.tensor(float(version)),
    }


def _worker(rank: int, world: int, port: int, out_dir: str, scenario: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=8))
    eng = CheckpointEngine(bucket_bytes=4096, verify=scenario in ("verify", "corrupt"))
    applied: dict[int, dict] = {}
    log = {"errors": [], "applied": []}

    current = {"v": None}

    def load_fn(named):
        applied[current["v"]] = {n: t.clone() for n, t in named}
        log["applied"].append(sorted(n for n, _ in named))

    if scenario == "corrupt" and rank == 2:
        orig = eng._receive

        def bad_receive(sizes):
            bufs = orig(sizes)
            bufs[-1][0] ^= 1
            return bufs

        eng._receive = bad_receive
    for v in (1, 2):
        if scenario == "dead" and v == 2 and rank == 2:
            os._exit(0)  # a receiver dies before version 2
        current["v"] = v
        t0 = time.monotonic()
        try:
            if rank == 0:
                eng.update(v, named_tensors=_tensors(v))
            else:
                eng.update(v, load_fn=load_fn)
                got = applied[v]
                want = _tensors(v)
                log.setdefault("exact", []).append(all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                                       for k in want) and got.keys() == want.keys())
        except WeightSyncError as e:
            log["errors"].append({"version": v, "msg": str(e)[:300], "seconds": time.monotonic() - t0})
        log["version"] = eng.version
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(log, f)
    if scenario != "dead":
        dist.destroy_process_group()


def _run(tmp_path, scenario: str, world: int = 3) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), scenario)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert not p.is_alive(), "a rank hung"
        if p.is_alive():
            p.kill()
    logs = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        logs.append(json.loads(path.read_text()) if path.exists() else None)
    return logs


@pytest.mark.parametrize("scenario", ["plain", "verify"])
def test_exact_bytes_and_versions(tmp_path, scenario):
    logs = _run(tmp_path, scenario)
    for log in logs[1:]:
        assert log["errors"] == [] and log["exact"] == [True, True] and log["version"] == 2
    assert logs[0]["version"] == 2


def test_corrupted_bucket_applies_nothing_anywhere(tmp_path):
    logs = _run(tmp_path, "corrupt")
    for log in logs:
        assert [e["version"] for e in log["errors"]] == [1, 2]
        assert "checksum" in log["errors"][0]["msg"]
        assert log["version"] == -1
    assert all(log["applied"] == [] for log in logs[1:])


def test_dead_receiver_is_a_clear_error_on_live_ranks(tmp_path):
    logs = _run(tmp_path, "dead")
    assert logs[2] is None  # the dead rank wrote nothing
    for log in (logs[0], logs[1]):
        assert log["version"] == 1  # version 1 applied, version 2 not
        assert len(log["errors"]) == 1 and log["errors"][0]["version"] == 2
        assert "weight version 2 failed" in log["errors"][0]["msg"]
        assert log["errors"][0]["seconds"] < 30
    assert len(logs[1]["applied"]) == 1


def _ipc_worker(rank: int, port: int, out_dir: str) -> None:
    torch.cuda.set_device(0)  # both processes on the same GPU: the colocated case
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    eng = CheckpointEngine(device="cpu", colocated=True)
    got = {}
    if rank == 0:
        src = {k: v.cuda() for k, v in _tensors(3).items()}
        eng.update(1, named_tensors=src)
    else:
        eng.update(1, load_fn=lambda named: got.update({n: t.clone().cpu() for n, t in named}))
        want = _tensors(3)
        ok = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        with open(os.path.join(out_dir, "ipc.json"), "w") as f:
            json.dump({"exact": ok, "version": eng.version}, f)
    dist.destroy_process_group()


@pytest.mark.gpu
def test_colocated_cuda_ipc(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ipc_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert json.loads((tmp_path / "ipc.json").read_text()) == {"exact": True, "version": 1}
