"""Rollout workers in their own processes, fed through the checkpoint engine (paper 2.6.2-2.6.3).

:class:`RemoteEngine` is a :class:`~k15sys.rollout.RolloutEngine` that lives in the trainer process. It
spawns ``num_workers`` processes and joins them in a gloo :class:`~k15sys.weights.WeightGroup` of their own
(trainer = rank 0, workers = ranks 1..N; its own TCP store, not torch's default group, so a torchrun rank can
have rollout workers); each worker builds its own engine with ``make_engine()`` (a picklable factory: e.g. a
TorchEngine on its GPU, or a VLLMEngine) and serves commands until :meth:`close`:

* ``generate``: the prompts are split into contiguous chunks, one per worker, run concurrently, and the
  completions come back in prompt order; worker w samples with ``seed + w`` (seeded runs stay reproducible
  for a given number of workers);
* ``update_weights``: one :class:`~k15sys.weights.CheckpointEngine` version from rank 0 to every worker
  (bucketed, pipelined; each worker checks the version against its engine's tensors before the commit vote,
  :func:`~k15sys.weights.local.check_weights`, and hands it to its engine's ``update_weights`` after it), so
  a version is applied by every worker or by none;
* ``sleep`` / ``wake`` for colocated deployments.

A worker that dies or stops answering is a :class:`RuntimeError` (generation) or
:class:`~k15sys.weights.WeightSyncError` (weights) in the trainer within ``timeout_s``.
"""
from __future__ import annotations

import dataclasses
import datetime
import signal
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k15sys.rollout.types import Completion, SamplingParams
from k15sys.weights import CheckpointEngine, WeightGroup, WeightSyncError
from k15sys.weights.local import check_weights, engine_weights


def _check_for(engine: Any) -> Callable[[list[tuple[str, torch.Tensor]]], None]:
    """The worker's pre-commit check of a version: against its engine's tensors when it exposes them."""
    def check(named: list[tuple[str, torch.Tensor]]) -> None:
        own = engine_weights(engine)
        check_weights(named, None if own is None else own[0], optional=() if own is None else own[1])
    return check


def _serve(rank: int, world: int, port: int, make_engine: Callable[[], Any], timeout_s: float,
           bucket_bytes: int, cuda_device: int | None) -> None:
    """A worker's loop: build the engine (on its GPU when given), then answer rank 0's commands until ``close``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the trainer decides
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)
    group = WeightGroup.create(rank, world, port=port, timeout_s=timeout_s)
    engine = make_engine()
    sync = CheckpointEngine(group, src=0, bucket_bytes=bucket_bytes, device="cpu")
    while True:
        cmd, *args = group.recv_object(0)
        if cmd == "close":
            break
        try:
            if cmd == "weights":  # all-or-nothing over the workers: checked before the commit vote
                reply: Any = sync.update(args[0], load_fn=engine.update_weights, check_fn=_check_for(engine))
            else:
                reply = getattr(engine, cmd)(*args)
        except Exception as e:  # the trainer re-raises it with the worker's rank
            reply = e
        group.send_object(reply, 0)
    group.close()


class RemoteEngine:
    """Rollout engine whose generation runs in ``num_workers`` worker processes.

    Args:
        make_engine: picklable zero-argument factory run in each worker (e.g. ``functools.partial``).
        num_workers: worker processes (ranks 1..N of the private group).
        timeout_s: the group's timeout: how long the trainer waits for a silent worker.
        bucket_bytes: checkpoint-engine bucket size of the weight updates.
        cuda_devices: GPU index of each worker (made current before ``make_engine`` runs, so a factory that
            uses ``torch.cuda.current_device()`` lands on it); None leaves the device choice to the factory.

    Works in a single-process trainer and in each rank of a torchrun job alike (the workers' group is not
    torch's default group).
    """

    def __init__(self, make_engine: Callable[[], Any], num_workers: int, *, timeout_s: float = 300.0,
                 bucket_bytes: int = 64 << 20, cuda_devices: list[int] | None = None) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: must be a positive int, got {num_workers!r}")
        if cuda_devices is not None and len(cuda_devices) != num_workers:
            raise ValueError(f"cuda_devices: {len(cuda_devices)} entries for {num_workers} workers")
        world = num_workers + 1
        # the trainer hosts the group's store on a port the OS picks, then hands it to the workers
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        gpus = cuda_devices or [None] * num_workers
        self.procs = [ctx.Process(target=_serve, args=(r, world, store.port, make_engine, timeout_s, bucket_bytes,
                                                       gpus[r - 1]), daemon=True) for r in range(1, world)]
        for p in self.procs:
            p.start()
        self.group = WeightGroup.create(0, world, port=store.port, timeout_s=timeout_s, store=store)
        self.num_workers = num_workers
        self.weight_version = 0
        self._sync = CheckpointEngine(self.group, src=0, bucket_bytes=bucket_bytes, device="cpu")
        self._closed = False

    def _call(self, per_worker: list[tuple[Any, ...]]) -> list[Any]:
        """Send worker w its command, then collect every reply (workers run concurrently)."""
        if self._closed:
            raise RuntimeError("RemoteEngine: closed")
        try:
            for w, cmd in enumerate(per_worker):
                self.group.send_object(cmd, w + 1)
        except Exception as e:
            raise self._failed(per_worker[0][0], e) from e
        return self._collect(per_worker[0][0])

    def _collect(self, what: str) -> list[Any]:
        """Every worker's reply to ``what``; a worker's exception is raised here with its rank."""
        replies = []
        try:
            for w in range(self.num_workers):
                replies.append(self.group.recv_object(w + 1))
        except Exception as e:
            raise self._failed(what, e) from e
        for w, r in enumerate(replies):
            if isinstance(r, Exception):
                raise RuntimeError(f"RemoteEngine: worker {w + 1} raised {type(r).__name__} in {what}: {r}") from r
        return replies

    @staticmethod
    def _failed(what: str, e: Exception) -> RuntimeError:
        return RuntimeError(f"RemoteEngine: a rollout worker failed or timed out during {what}: "
                            f"{type(e).__name__}: {e}")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Completions of ``prompts`` in order, generated by the workers in contiguous chunks."""
        if not prompts:
            return []
        n = self.num_workers
        bounds = [len(prompts) * w // n for w in range(n + 1)]
        cmds = []
        for w in range(n):
            p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + w)
            cmds.append(("generate", [list(x) for x in prompts[bounds[w]:bounds[w + 1]]], p))
        return [c for chunk in self._call(cmds) for c in chunk]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One checkpoint-engine version to every worker; all of them apply it or none does.

        The tensors are taken one at a time into host memory (an iterator may gather each lazily). A tensor
        of a dtype the engines do not take (int, float64) is a ValueError before any worker is involved; a
        version a worker's engine would refuse (unknown name, shape, a missing tensor) is a
        :class:`~k15sys.weights.WeightSyncError` naming the worker, and no worker applies it.
        """
        if self._closed:
            raise RuntimeError("RemoteEngine: closed")
        pairs = [(n, t.detach().cpu().contiguous() if isinstance(t, torch.Tensor) else t) for n, t in named_tensors]
        host = dict(check_weights(pairs, what="named_tensors"))  # each tensor left the device as it came
        version = self.weight_version + 1
        for w in range(self.num_workers):
            self.group.send_object(("weights", version), w + 1)
        try:
            self._sync.update(version, named_tensors=host)
        except WeightSyncError as e:  # every worker raised it too: take their replies, then report it
            try:
                self._collect("update_weights")
            except RuntimeError:
                pass
            raise e
        finally:
            self.weight_version = version  # the version number is used up, applied or not
        self._collect("update_weights")

    def sleep(self) -> None:
        self._call([("sleep",)] * self.num_workers)

    def wake(self) -> None:
        self._call([("wake",)] * self.num_workers)

    def close(self) -> None:
        """Stop the workers and tear the group down (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w, p in enumerate(self.procs):
            if p.is_alive():
                try:
                    self.group.send_object(("close",), w + 1)
                except Exception:  # a dead worker: nothing to tell
                    pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        self.group.close()
