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
        # padding regions to zero: (dst rank, tensor index, element offset, rows, cols, leading dimension)
        self.zero_fill: list[tuple[int, int, int, int, int, int]] = []
        for dr, rank in enumerate(dst.ranks):
            for ti, (name, lt) in enumerate(rank.items()):
                dld = lt.shape[1] if len(lt.shape) == 2 else 1
                for q in lt.pieces:
                    if q.src is None:
                        self.zero_fill.append((dr, ti, q.lr * dld + q.lc, q.r1 - q.r0, q.c1 - q.c0, dld))
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
        self._device_table: tuple | None = None  # device path: (addresses, base, copy table, tiles...), by addresses

    @property
    def num_copies(self) -> int:
        return len(self.copies)

    def _validate(self, shards: list[dict[str, torch.Tensor]], t: _Tensors, what: str) -> torch.dtype:
        if len(shards) != len(t.names):
            raise ValueError(f"{what}: expected {len(t.names)} rank(s), got {len(shards)}")
        dtype = None
        for r, (names, shapes, shard) in enumerate(zip(t.names, t.shapes, shards)):
            missing = [n for n in names if n not in shard]
            known = set(names)
            extra = [n for n in shard if n not in known]
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
                     num_threads: int = 0) -> None:
        """Reshard into the caller's tensors (e.g. pinned host buckets); padding rows are zeroed.

        Host tensors: the C++ thread pool (``num_threads``, 0 = all cores). Device tensors: the whole plan in
        one Triton launch (its copy table is cached per set of buffer addresses).
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
        for dr, ti, off, nr, nc, ld in self.zero_fill:  # only the padding: the copies write the rest
            dst[dr][ti].view(-1).as_strided((nr, nc), (ld, 1), off).zero_()
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
        self._device_copies(src, dst, dtype)

    def _device_copies(self, src: list[list[torch.Tensor]], dst: list[list[torch.Tensor]], dtype: torch.dtype) -> None:
        """The device path: every copy of the plan in one Triton launch (``k15sys.kernels.plan_copy``).

        Offsets are taken relative to one base tensor; the copy table is rebuilt only when the buffers'
        addresses change. Contiguous copies are re-shaped into rows of ``_FLAT_WIDTH`` elements first."""
        tensors = [t for side in (src, dst) for rank in side for t in rank]
        dev = tensors[0].device
        if any(t.device != dev for t in tensors):
            raise ValueError(f"src_shards/dst_shards: device copies need every tensor on one device ({dev})")
        key = tuple(t.data_ptr() for t in tensors)
        if self._device_table is None or self._device_table[0] != key:
            self._device_table = (key, *self._build_device_table(src, dst, dtype, dev))
        self._launch_device_table()

    def _launch_device_table(self) -> None:
        """One launch of the plan-copy kernel over the cached copy table (the buffers it was built for)."""
        from k15sys.kernels.plan_copy import _plan_copy_kernel

        _, base, table, tile_copy, tile_row, tile_rows, align = self._device_table  # type: ignore[misc]
        rows, cols, warps = _TILE
        _plan_copy_kernel[(tile_copy.numel(),)](base, table, tile_copy, tile_row, tile_rows, ROWS=rows, COLS=cols,
                                               ALIGN=align, num_warps=warps)

    def _build_device_table(self, src, dst, dtype, dev):
        esz = torch.empty((), dtype=dtype).element_size()
        base = dst[0][0]
        b = base.data_ptr()
        sp = _pointer_table(src) - b
        dp = _pointer_table(dst) - b
        if (sp % esz).any() or (dp % esz).any():
            raise ValueError("src_shards/dst_shards: tensor addresses are not aligned to the element size")
        c = self.copies
        flat = self._flat
        n = c[:, 6] * c[:, 7]
        width = np.where(flat, np.minimum(n, _FLAT_WIDTH), c[:, 7])
        nrows = np.where(flat, n // width, c[:, 6])
        src_off = sp[c[:, 0], c[:, 1]] // esz + c[:, 2]
        dst_off = dp[c[:, 3], c[:, 4]] // esz + c[:, 5]
        src_ld = np.where(flat, width, c[:, 8])
        dst_ld = np.where(flat, width, c[:, 9])
        table = [np.stack([src_off, dst_off, width, src_ld, dst_ld], 1)]
        tail = flat & (n % width > 0)  # the last partial row of a re-shaped contiguous copy: a copy of its own
        if tail.any():
            done = nrows[tail] * width[tail]
            w = n[tail] - done
            table.append(np.stack([src_off[tail] + done, dst_off[tail] + done, w, w, w], 1))
            nrows = np.concatenate([nrows, np.ones(int(tail.sum()), dtype=np.int64)])
        table = np.concatenate(table).astype(np.int64)
        keep = nrows > 0
        table, nrows = table[keep], nrows[keep]
        rows = _TILE[0]
        per = -(-nrows // rows)
        tile_copy = np.repeat(np.arange(len(table)), per)
        tile_row = np.concatenate([np.arange(k) * rows for k in per]) if len(per) else np.zeros(0, np.int64)
        tile_rows = np.minimum(nrows[tile_copy] - tile_row, rows)
        align = int(np.gcd.reduce(np.concatenate([table.ravel(), [16 // esz]])))
        to = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.int64), device=dev)  # noqa: E731
        return base, to(table), to(tile_copy), to(tile_row), to(tile_rows), max(1, align)


# device path tiles: (rows, columns in elements, warps); contiguous copies become rows of _FLAT_WIDTH elements
_TILE = (16, 256, 4)
_FLAT_WIDTH = 4096


def _pointer_table(tensors: list[list[torch.Tensor]]) -> np.ndarray:
    width = max(len(r) for r in tensors)
    table = np.zeros((len(tensors), width), dtype=np.int64)
    for r, row in enumerate(tensors):
        table[r, : len(row)] = [t.data_ptr() for t in row]
    return table


def plan_reshard(src: ModelLayout, dst: ModelLayout) -> ReshardPlan:
    """Compute once the copies from ``src`` layout shards to ``dst`` layout shards."""
    return ReshardPlan(src, dst)
