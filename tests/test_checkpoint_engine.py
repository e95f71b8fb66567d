"""CheckpointEngine over gloo on the CPU: exact bytes, versions, verify, refusals and failures (paper 2.6.3).

Each test spawns 3-4 gloo ranks (8 s group timeout). Receivers use both modes: staged (``load_fn``) and in
place (``targets``); "nothing applied" is checked byte for byte on the in-place targets. The "good" scenario
runs on torch's default group; the others on a :class:`WeightGroup` of their own, in processes that also hold
a default group of another size (what a torchrun rank with rollout workers looks like).
"""
from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import k15sys.weights.checkpoint_engine as ce
from k15sys.weights import CheckpointEngine, WeightGroup, WeightSyncError, free_port

pytestmark = pytest.mark.distributed
TIMEOUT_S = 8


def _tensors(version: int, part: int = 0) -> dict[str, torch.Tensor]:
    """Version ``version`` of the weights; ``part`` picks a disjoint name set (one per source)."""
    g = torch.Generator().manual_seed(100 * part + version)
    out = {
        "embed": torch.randn(37, 19, generator=g).to(torch.bfloat16),
        "norm": torch.randn(19, generator=g),
        "ids": torch.randint(0, 10**12, (5, 3), generator=g),
        "big": torch.randn(300, 41, generator=g).half(),  # larger than a bucket
        "scalar": torch.tensor(float(version)),
    }
    return {f"p{part}.{k}": v for k, v in out.items()}


def _sent(scenario: str, version: int, part: int) -> dict[str, torch.Tensor]:
    """What source ``part`` sends: in "grow", version 3 adds a tensor (its header changes)."""
    out = _tensors(version, part)
    if scenario == "grow" and version >= 3:
        out[f"p{part}.extra"] = torch.full((3, 7), 2.5)
    return out


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                             for k in want)


def _worker(rank: int, world: int, port: int, out_dir: str, scenario: str, port2: int) -> None:
    group = None
    if scenario == "good":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    else:  # a default group of 2 ranks beside the weight group of `world` ranks, like torchrun + workers
        if rank < 2:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port2}", rank=rank, world_size=2,
                                    timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = WeightGroup.create(rank, world, port=port, timeout_s=TIMEOUT_S)
    sources = [0, 1] if scenario == "multi" else [0]
    parts = range(len(sources))
    eng = CheckpointEngine(group, src=sources if len(sources) > 1 else 0, bucket_bytes=4096,
                           verify=scenario in ("good", "src_dies"))
    log: dict = {"errors": [], "applied": [], "exact": [], "object_broadcasts": 0}
    real_object_broadcast = eng.group.broadcast_object

    def counting_object_broadcast(*args, **kwargs):
        log["object_broadcasts"] += 1
        return real_object_broadcast(*args, **kwargs)

    eng.group.broadcast_object = counting_object_broadcast
    if rank == 0:
        for bad in ([7], [0, 0], list(range(world))):
            try:
                CheckpointEngine(src=bad)
            except ValueError:
                log["bad_src_rejected"] = log.get("bad_src_rejected", 0) + 1
    in_place = rank == world - 1  # the last rank receives in place, the others staged
    targets = {k: torch.zeros_like(v) for p in parts for k, v in _tensors(0, p).items()}
    applied: dict[int, dict] = {}
    current = {"v": 0}

    def load_fn(named):
        if scenario == "reject" and current["v"] == 3:
            raise RuntimeError("the engine broke while loading")
        applied[current["v"]] = {n: t.clone() for n, t in named}
        log["applied"].append(current["v"])

    def check_fn(named):
        if current["v"] == 2:
            raise ValueError("update_weights: unknown tensor 'p0.ids'")

    versions = {"good": [1, 2, 3, 4, 5], "src_dies": [1, 2], "receiver_dies": [1, 2], "multi": [1, 2],
                "grow": [1, 2, 3, 4], "reject": [1, 2, 3, 4]}[scenario]
    for v in versions:
        current["v"] = v
        if scenario == "receiver_dies" and v == 2 and rank == 2:
            os._exit(0)  # a receiver dies before version 2
        if scenario == "src_dies" and v == 2 and rank == 0:
            sent = {"n": 0}
            real = eng.group.broadcast

            def dying_broadcast(*args, **kwargs):
                if not kwargs.get("async_op"):  # the header's (version, digest) tensor: not a bucket
                    return real(*args, **kwargs)
                sent["n"] += 1
                if sent["n"] == 3:  # buckets 0 and 1 went out; the trainer dies before the last one
                    time.sleep(0.5)
                    os._exit(0)
                work = real(*args, **kwargs)
                work.wait()
                return work

            eng.group.broadcast = dying_broadcast
        if scenario == "good" and v == 4 and rank == 2:
            real_digest, seen = ce._digest, {"n": 0}

            def corrupting_digest(buf):
                seen["n"] += 1
                if seen["n"] == 2:
                    buf[0] ^= 1  # a bit flips in the second received bucket
                return real_digest(buf)

            ce._digest = corrupting_digest
        before = {k: t.clone() for k, t in targets.items()}
        t0 = time.monotonic()
        try:
            if rank in sources:
                eng.update(v, named_tensors=_sent(scenario, v, sources.index(rank)))
            elif in_place:
                tg = targets
                if scenario == "good" and v == 3:  # this receiver cannot take the version: all refuse it
                    tg = {k: t for k, t in targets.items() if k != "p0.norm"}
                if scenario == "grow" and v >= 3:
                    tg = {**targets, "p0.extra": torch.zeros(3, 7)}
                eng.update(v, targets=tg)
                log["applied"].append(v)
                log["exact"].append(_same(tg, {k: t for p in parts for k, t in _sent(scenario, v, p).items()}))
            else:
                eng.update(v, load_fn=load_fn, check_fn=check_fn if scenario == "reject" else None)
                log["exact"].append(_same(applied[v], {k: t for p in parts for k, t in _sent(scenario, v, p).items()}))
        except WeightSyncError as e:
            log["errors"].append({"version": v, "msg": str(e)[:300], "seconds": time.monotonic() - t0})
            if in_place:
                log.setdefault("untouched", []).append(_same(targets, before))
        if scenario == "good" and v == 4 and rank == 2:
            ce._digest = real_digest
        log["version"] = eng.version
    if scenario == "good" and rank == 1:  # caller errors are raised locally, before any collective
        bad_calls = ({"version": 5, "load_fn": load_fn}, {"version": 6},
                     {"version": 6, "load_fn": load_fn, "targets": targets})
        for kwargs in bad_calls:
            try:
                eng.update(**kwargs)
            except ValueError as e:
                log.setdefault("bad_calls", []).append(str(e).split(":")[0])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(log, f)
    if scenario in ("good", "multi", "grow") and dist.is_initialized():
        dist.destroy_process_group()


def _run(tmp_path, scenario: str, world: int = 3) -> list[dict | None]:
    ctx = mp.get_context("spawn")
    port, port2 = free_port(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), scenario, port2)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    logs = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        logs.append(json.loads(path.read_text()) if path.exists() else None)
    return logs


def test_versions_exact_bytes_refusal_and_corruption(tmp_path):
    """v1, v2 exact on a staged and an in-place receiver; v3 refused (a target is missing); v4 corrupted in
    flight (verify catches it); v5 exact again. Failed versions are errors on every rank, applied nowhere."""
    logs = _run(tmp_path, "good")
    assert logs[0]["bad_src_rejected"] == 3
    assert logs[1]["bad_calls"] == ["version", "load_fn/targets", "load_fn/targets"]
    for r, log in enumerate(logs):
        assert [e["version"] for e in log["errors"]] == [3, 4], (r, log["errors"])
        assert log["version"] == 5
        assert all(e["seconds"] < TIMEOUT_S for e in log["errors"])  # refusals are fast, not timeouts
        assert "refused" in log["errors"][0]["msg"] and "checksum" in log["errors"][1]["msg"]
    assert "'p0.norm'" in logs[2]["errors"][0]["msg"]  # the refusing rank names the tensor
    for log in logs[1:]:
        assert log["applied"] == [1, 2, 5] and log["exact"] == [True, True, True]
    assert logs[2]["untouched"] == [True, True]  # the corrupted bytes were written in place, then rolled back


def test_header_travels_again_when_the_tensors_change(tmp_path):
    """The header travels with v1, v2 sends only its digest, v3 adds a tensor: header sent again; v4 digest."""
    logs = _run(tmp_path, "grow")
    for log in logs:
        assert log["errors"] == [] and log["version"] == 4
        assert log["object_broadcasts"] == 2
    for log in logs[1:]:
        assert log["exact"] == [True] * 4


def test_source_dying_mid_transfer_leaves_old_version(tmp_path):
    logs = _run(tmp_path, "src_dies")
    assert logs[0] is None
    for log in logs[1:]:
        assert log["version"] == 1 and log["applied"] == [1] and log["exact"] == [True]
        assert [e["version"] for e in log["errors"]] == [2]
        assert "weight version 2 failed" in log["errors"][0]["msg"]
        assert log["errors"][0]["seconds"] < 3 * TIMEOUT_S
    assert logs[2]["untouched"] == [True]  # in-place receiver: buckets already written were restored


def test_dead_receiver_is_a_clear_error_on_live_ranks(tmp_path):
    logs = _run(tmp_path, "receiver_dies")
    assert logs[2] is None  # the dead rank wrote nothing
    for log in (logs[0], logs[1]):
        assert log["version"] == 1  # version 1 applied, version 2 not
        assert [e["version"] for e in log["errors"]] == [2]
        assert "weight version 2 failed" in log["errors"][0]["msg"]
        assert log["errors"][0]["seconds"] < 3 * TIMEOUT_S
    assert logs[1]["applied"] == [1]


def test_several_sources_each_send_their_own_tensors(tmp_path):
    logs = _run(tmp_path, "multi", world=4)
    for log in logs:
        assert log["errors"] == [] and log["version"] == 2
    for log in logs[2:]:  # rank 2 staged, rank 3 in place: both get the union of both sources' tensors
        assert log["exact"] == [True, True]


def test_a_rejected_version_is_applied_nowhere(tmp_path):
    """v2: the staged receiver's check_fn rejects it before the commit: every rank raises, naming rank 1 and its
    reason, the in-place receiver's bytes are untouched and load_fn never runs. v3: load_fn fails after the
    commit: every rank raises, naming rank 1; the in-place receiver restores its bytes. v1 and v4 apply."""
    logs = _run(tmp_path, "reject")
    for log in logs:
        assert [e["version"] for e in log["errors"]] == [2, 3], log["errors"]
        assert log["version"] == 4
        rejected, failed = (e["msg"] for e in log["errors"])
        assert "version 2 not applied: rank 1: check_fn: ValueError: update_weights: unknown tensor" in rejected
        assert "version 3 failed after the commit" in failed and "rank 1: load_fn: RuntimeError" in failed
    assert logs[1]["applied"] == [1, 4] and logs[1]["exact"] == [True, True]
    assert logs[2]["applied"] == [1, 4] and logs[2]["exact"] == [True, True]
    assert logs[2]["untouched"] == [True, True]


def test_weight_group_arguments_are_checked_before_any_rendezvous():
    for kwargs, name in (({"rank": 0, "size": 1}, "size"), ({"rank": 2, "size": 2}, "rank"),
                         ({"rank": 0, "size": 2, "backend": "mpi"}, "backend"),
                         ({"rank": 0, "size": 2, "port": 0}, "port"),
                         ({"rank": 1, "size": 2, "store": object()}, "store"),
                         ({"rank": 0, "size": 2, "timeout_s": float("nan")}, "timeout_s")):
        with pytest.raises(ValueError, match=f"^{name}:"):
            WeightGroup.create(**{"port": 12345, **kwargs})
    with pytest.raises(ValueError, match="not initialised"):
        CheckpointEngine()  # no default group and no WeightGroup


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
        with open(os.path.join(out_dir, "ipc.json"), "w") as f:
            json.dump({"exact": _same(got, _tensors(3)), "version": eng.version}, f)
    dist.destroy_process_group()


@pytest.mark.gpu
def test_colocated_cuda_ipc(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ipc_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert json.loads((tmp_path / "ipc.json").read_text()) == {"exact": True, "version": 1}


def _cuda_worker(rank: int, port: int, out_dir: str) -> None:
    """Both processes on GPU 0 with gloo moving CUDA buckets: the engine's device paths (GPU-resident, pinned
    and pageable host sources, device checksums, in-place unpacking on the GPU) without needing two GPUs."""
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    eng = CheckpointEngine(device="cuda", bucket_bytes=4096, verify=True)
    results = []
    targets = {k: torch.zeros_like(v, device="cuda") for k, v in _tensors(0).items()}
    for v, where in ((1, "gpu"), (2, "pinned"), (3, "pageable"), (4, "gpu"), (5, "pinned"), (6, "pageable")):
        want = _tensors(v)
        if rank == 0:
            place = {"gpu": torch.Tensor.cuda, "pinned": torch.Tensor.pin_memory, "pageable": torch.Tensor.clone}
            src = {k: place[where](t) for k, t in want.items()}
            eng.update(v, named_tensors=src)
        elif v <= 3:
            got = {}
            eng.update(v, load_fn=lambda named: got.update({n: t.cpu() for n, t in named}))
            results.append(_same(got, want))
        else:
            eng.update(v, targets=targets)
            results.append(_same({k: t.cpu() for k, t in targets.items()}, want))
    if rank == 1:
        with open(os.path.join(out_dir, "cuda.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.gpu
def test_cuda_buckets_staged_and_in_place(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_cuda_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert json.loads((tmp_path / "cuda.json").read_text()) == [True] * 6
