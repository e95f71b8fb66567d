"""What every benchmark here shares: its command-line options, where it writes, GPU refusal, how it ends.

A user's run writes to its own place: ``--out FILE``, or by default ``runs/bench/<file>`` under the
current directory (figures beside it). Only ``--update-results`` writes the shipped results
(``bench/results/`` and ``docs/img/`` of this checkout), which is how the figures in docs/ are refreshed.
A GPU benchmark without ``--quick`` on a machine without enough CUDA GPUs exits with status 2 and says
so, instead of measuring something else. Every benchmark prints a few human-readable lines, where its
JSON went, and then the result as one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RESULTS = ROOT / "bench" / "results"
SHIPPED_FIGURES = ROOT / "docs" / "img"
USER_DIR = Path("runs") / "bench"  # relative to where the user runs the command
EXIT_NO_GPU = 2


def parser(doc: str | None, *, quick_help: str = "a CPU-sized case, under a minute") -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: ``--quick``, ``--out``, ``--update-results``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"write the JSON result here (default: {USER_DIR}/<name>.json; figures beside it)")
    ap.add_argument("--update-results", action="store_true",
                    help="write into the shipped bench/results/ and docs/img/ instead (maintainers)")
    return ap


def result_path(args: argparse.Namespace, filename: str) -> Path:
    """Where the JSON result goes: ``--out``, else bench/results/ with ``--update-results``, else runs/bench/."""
    if args.out is not None:
        return Path(args.out)
    return (SHIPPED_RESULTS if args.update_results else USER_DIR) / filename


def figure_path(args: argparse.Namespace, filename: str) -> Path:
    """Where a figure goes: docs/img/ with ``--update-results``, else beside the JSON result."""
    if args.update_results and args.out is None:
        return SHIPPED_FIGURES / filename
    return result_path(args, filename).parent / filename


def require_gpus(args: argparse.Namespace, bench: str, count: int = 1) -> None:
    """Exit with status 2 and a clear message when the full (non ``--quick``) case lacks ``count`` CUDA GPUs."""
    if args.quick:
        return
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < count:
        print(f"{bench}: the full benchmark runs on CUDA and needs {count} GPU(s); found {found}. "
              f"Run `python bench/{bench}.py --quick` for the small CPU case (it exercises the script; its "
              f"figures are not GPU figures).", file=sys.stderr)
        raise SystemExit(EXIT_NO_GPU)


def finish(result: dict[str, Any], path: Path, summary: Iterable[str]) -> None:
    """Write ``result`` to ``path``, print the summary lines and where it went, then ``result`` as one JSON line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for line in summary:
        print(line)
    print(f"result written to {path}")
    print(json.dumps(result), flush=True)
