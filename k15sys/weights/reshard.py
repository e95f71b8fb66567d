"""Reshard plans: (source layout, destination layout) -> strided copies, executed in C++ (paper 2.6.3).

The plan is computed once per (model, layouts): every destination piece is intersected with every source
piece of the same HF tensor; each non-empty intersection is one 2-D strided copy (rows x cols, with both
sides' leading dimensions). On the host the copies run in ``k15sys._C.strided_copy`` (thread pool, GIL
released); on a GPU the same plan runs as device copies.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from k15sys import _C
from k15sys.weights.layout import ModelLayout, Shape


@dataclass
class _Tensors:
    names: list[list[str]]           # per rank, tensor names in a fixed order
    shapes: list[list[Shape]]


class ReshardPlan:
    """Copies that turn shards of ``src`` into shards of ``dst``. Build with :func:`plan_reshard`."""

    def __init__(self, src: ModelLayout, dst: ModelLayout) -> None:
        if src.full_shapes != dst.full_shapes:
            raise ValueError("dst: the two layouts describe different models (HF tensor shapes differ)")
        self.src, self.dst = src, dst
        self._src_t = _Tensors([list(r) for r in src.ranks], [[t.shape for t in r.values()] for r in src.ranks])
        self._dst_t = _Tensors([list(r) for r in dst.ranks], [[t.shape for t in r.values()] for r in dst.ranks])
        by_hf = defaultdict(list)
        for sr, rank in enumerate(src.ranks):
            for ti, (name, lt) in enumerate(rank.items()):
                ld = lt.shape[1] if len(lt.shape) == 2 else 1
                for p in lt.pieces:
                    if p.src is not None:
                        by_hf[p.src].append((sr, ti, ld, p))
        rows = []
        self.zero_fill: list[tuple[int, int]] = []  # (dst rank, tensor index) holding padding
        for dr, rank in enumerate(dst.ranks):
            for ti, (name, lt) in enumerate(rank.items()):
                dld = lt.shape[1] if len(lt.shape) == 2 else 1
                for q in lt.pieces:
                    if q.src is None:
                        self.zero_fill.append((dr, ti))
                        continue
                    covered = 0
                    seen = set()  # replicated sources (norms, vLLM's repeated kv heads): copy from the first
                    for sr, si, sld, p in by_hf[q.src]:
                        r0, r1 = max(p.r0, q.r0), min(p.r1, q.r1)
                        c0, c1 = max(p.c0, q.c0), min(p.c1, q.c1)
                        if r1 <= r0 or c1 <= c0 or (r0, r1, c0, c1) in seen:
                            continue
                        seen.add((r0, r1, c0, c1))
                        s_off = (r0 - p.r0 + p.lr) * sld + (c0 - p.c0 + p.lc)
                        d_off = (r0 - q.r0 + q.lr) * dld + (c0 - q.c0 + q.lc)
                        rows.append((sr, si, s_off, dr, ti, d_off, r1 - r0, c1 - c0, sld, dld))
                        covered += (r1 - r0) * (c1 - c0)
                    if covered != (q.r1 - q.r0) * (q.c1 - q.c0):
                        raise ValueError(f"dst: tensor {name} (rank {dr}) is not covered by the source layout")
        self.copies = np.array(rows, dtype=np.int64).reshape(-1, 10)
        c = self.copies
        # copies that are one contiguous range on both sides (full-width rows): batched on devices
        self._flat = ((c[:, 7] == c[:, 8]) | (c[:, 6] == 1)) & ((c[:, 7] == c[:, 9]) | (c[:, 6] == 1))
        self._graph: tuple[tuple[int, ...], torch.cuda.CUDAGraph] | None = None  # device replay, by addresses

    @property
    def num_copies(self) -> int:
        return len(self.copies)

    def _validate(self, shards: list[dict[str, torch.Tensor]], t: _Tensors, what: str) -> torch.dtype:
        if len(shards) != len(t.names):
            raise ValueError(f"{what}: expected {len(t.names)} rank(s), got {len(shards)}")
        dtype = None
        for r, (names, shapes, shard) in enumerate(zip(t.names, t.shapes, shards)):
            missing = [n for n in names if n not in shard]
            extra = [n for n in shard if n not in set(names)]
            if missing:
                raise ValueError(f"{what}: rank {r} is missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
            if extra:
                raise ValueError(f"{what}: rank {r} has unexpected tensor {extra[0]!r}")
            for n, shape in zip(names, shapes):
                x = shard[n]
                if tuple(x.shape) != tuple(shape):
                    raise ValueError(f"{what}: tensor {n!r} on rank {r} has shape {tuple(x.shape)}, expected {tuple(shape)}")
                if dtype is None:
                    dtype = x.dtype
                elif x.dtype != dtype:
                    raise ValueError(f"{what}: tensor {n!r} on rank {r} has dtype {x.dtype}, others have {dtype}")
        return dtype  # type: ignore[return-value]

    def execute(self, src_shards: list[dict[str, torch.Tensor]], *, num_threads: int = 0) -> list[dict[str, torch.Tensor]]:
        """Reshard into new tensors (one dict per destination rank, destination names)."""
        dtype = self._validate(src_shards, self._src_t, "src_shards")
        device = next(iter(src_shards[0].values())).device
        out = [{n: torch.empty(s, dtype=dtype, device=device) for n, s in zip(names, shapes)}
               for names, shapes in zip(self._dst_t.names, self._dst_t.shapes)]
        self.execute_into(src_shards, out, num_threads=num_threads)
        return out

    def execute_into(self, src_shards: list[dict[str, torch.Tensor]], dst_shards: list[dict[str, torch.Tensor]], *,
                     num_threads: int = 0, cuda_graph: bool = False) -> None:
        """Reshard into the caller's tensors (e.g. pinned host buckets); padding rows are zeroed.

        Host tensors: the C++ thread pool (``num_threads``, 0 = all cores). Device tensors: one device copy
        per plan entry; with ``cuda_graph=True`` they are captured once per set of buffer addresses and
        replayed (one launch instead of ~50 per layer; the buffers must stay allocated between calls).
        """
        dtype = self._validate(src_shards, self._src_t, "src_shards")
        if self._validate(dst_shards, self._dst_t, "dst_shards") != dtype:
            raise ValueError(f"dst_shards: dtype differs from src_shards dtype {dtype}")
        src = [[s[n].contiguous() for n in names] for s, names in zip(src_shards, self._src_t.names)]
        dst = [[d[n] for n in names] for d, names in zip(dst_shards, self._dst_t.names)]
        for r, names in enumerate(dst):
            for n, x in zip(self._dst_t.names[r], names):
                if not x.is_contiguous():
                    raise ValueError(f"dst_shards: tensor {n!r} on rank {r} must be contiguous")
        for dr, ti in self.zero_fill:
            dst[dr][ti].zero_()
        if self.num_copies == 0:
            return
        c = self.copies
        if dst[0][0].device.type == "cpu" and src[0][0].device.type == "cpu":
            esz = torch.empty((), dtype=dtype).element_size()
            src_base = _pointer_table(src)
            dst_base = _pointer_table(dst)
            blocks = np.empty((len(c), 6), dtype=np.int64)
            blocks[:, 0] = src_base[c[:, 0], c[:, 1]] + c[:, 2] * esz
            blocks[:, 1] = dst_base[c[:, 3], c[:, 4]] + c[:, 5] * esz
            blocks[:, 2] = c[:, 6]
            blocks[:, 3] = c[:, 7] * esz
            blocks[:, 4] = c[:, 8] * esz
            blocks[:, 5] = c[:, 9] * esz
            _C.strided_copy(blocks, num_threads=num_threads)
            return
        if not cuda_graph:
            self._device_copies(src, dst)
            return
        if not all(t.is_cuda for side in (src, dst) for rank in side for t in rank):
            raise ValueError("cuda_graph: every source and destination tensor must be on a CUDA device")
        key = tuple(t.data_ptr() for side in (src, dst) for rank in side for t in rank)
        if self._graph is None or self._graph[0] != key:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._device_copies(src, dst)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._device_copies(src, dst)
            self._graph = (key, graph)
        self._graph[1].replay()

    def _device_copies(self, src: list[list[torch.Tensor]], dst: list[list[torch.Tensor]]) -> None:
        """The device path: copies that are contiguous on both sides in one batched ``_foreach_copy_`` (a few
        multi-tensor kernels), the strided rest (column splits) one device copy each."""
        s_flat = [[t.view(-1) for t in rank] for rank in src]
        d_flat = [[t.view(-1) for t in rank] for rank in dst]
        outs, ins = [], []
        for (sr, si, so, dr, di, do, nr, nc, sld, dld), flat in zip(self.copies.tolist(), self._flat.tolist()):
            if flat:
                outs.append(d_flat[dr][di][do : do + nr * nc])
                ins.append(s_flat[sr][si][so : so + nr * nc])
            else:
                s = s_flat[sr][si].as_strided((nr, nc), (sld, 1), so)
                d_flat[dr][di].as_strided((nr, nc), (dld, 1), do).copy_(s, non_blocking=True)
        if outs:
            torch._foreach_copy_(outs, ins, non_blocking=True)


def _pointer_table(tensors: list[list[torch.Tensor]]) -> np.ndarray:
    width = max(len(r) for r in tensors)
    table = np.zeros((len(tensors), width), dtype=np.int64)
    for r, row in enumerate(tensors):
        table[r, : len(row)] = [t.data_ptr() for t in row]
    return table


def plan_reshard(src: ModelLayout, dst: ModelLayout) -> ReshardPlan:
    """Compute once the copies from ``src`` layout shards to ``dst`` layout shards."""
    return ReshardPlan(src, dst)
