"""What ``k15 train`` shows while it runs: tqdm bars whose total and ETA follow the RL time limit, and messages
printed above a bar instead of inside its line."""
from __future__ import annotations

import math
import sys
from typing import Any, Iterable


def progress_bar(iterable: Iterable, enabled: bool, **kw: Any) -> Any:
    """``tqdm(iterable, **kw)`` on stderr when ``enabled``, else ``iterable`` itself."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kw)


def note(message: str) -> None:
    """Print ``message`` on stderr on a line of its own, above any open progress bar (``tqdm.write``)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def expected_iterations(done: int, seconds: float, iterations: int, max_minutes: float) -> int:
    """The RL iteration at which the run will stop: ``iterations`` (``rl.iterations``), or earlier when
    ``max_minutes`` (``rl.max_minutes``, 0 = no limit) runs out first at the pace so far (``seconds`` of RL for
    ``done`` iterations). The loop stops at the first iteration boundary past the limit, so the iteration that
    crosses it counts. Used as the RL bar's total, so its ETA is that of the real stop."""
    if not max_minutes or done <= 0 or seconds <= 0:
        return iterations
    left = 60.0 * max_minutes - seconds
    return min(iterations, done + max(0, math.ceil(left / (seconds / done))))
