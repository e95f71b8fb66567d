"""Per-iteration metrics (paper 2.6): one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard.

Rows are flushed and fsynced as they are written, so a killed run leaves a valid prefix. On resume,
:meth:`MetricsLog.truncate` drops rows written after the checkpoint being resumed, so the file of a
resumed run equals the file of an uninterrupted one (timings aside).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL metrics with an optional TensorBoard mirror (scalars, step = ``row["iteration"]``)."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` (must hold an int ``"iteration"``)."""
        if "iteration" not in row:
            raise ValueError(f"row: needs an 'iteration' key, got keys {sorted(row)}")
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                    self._tb.add_scalar(k, v, row["iteration"])
            self._tb.flush()

    def scalar(self, key: str, value: float, step: int) -> None:
        """A TensorBoard-only scalar (e.g. the SFT loss curve, which has no JSONL row)."""
        if self._tb is not None:
            self._tb.add_scalar(key, value, step)

    def truncate(self, last_iteration: int) -> None:
        """Keep only rows with ``iteration <= last_iteration`` (atomic rewrite)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in read_metrics(self.path) if line["iteration"] <= last_iteration]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
