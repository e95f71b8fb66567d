"""PNG curves of a run's ``metrics.jsonl`` (``k15 plot``): held-out pass@1, reward, length, KL, ..."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from k15sys.train.metrics import read_metrics

DEFAULT_KEYS = ("eval/pass@1", "eval/direct_share", "rl/accuracy", "rl/response_len", "rl/kl_ref", "rl/entropy", "time/iteration_s")
# rl/kl_ref: mean of log pi_i - log pi_theta over samples drawn from pi_i, an unbiased but noisy estimate of
# KL(pi_i || pi_theta): it can go below 0 at one iteration
TITLES = {"rl/kl_ref": "rl/kl_ref (sample estimate, can be < 0)"}


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, keys: Sequence[str] | None = None) -> Path:
    """Render one panel per metric against the RL iteration; eval panels mark the SFT row (iteration 0).

    The x axis is the RL iteration; panels whose rows carry ``time/rl_elapsed_s`` also show minutes of
    RL on a secondary axis label. Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"run_dir: no metrics.jsonl in {run_dir}")
    rows = read_metrics(path)
    keys = list(keys) if keys else [k for k in DEFAULT_KEYS if any(k in r for r in rows)]
    missing = [k for k in keys if not any(k in r for r in rows)]
    if missing:
        raise ValueError(f"keys: not in {path}: {missing}")
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key.startswith("eval/") else None, ms=3)
        sft = [r[key] for r in rows if r.get("stage") == "sft" and key in r]
        if sft:
            ax.axhline(sft[0], color="gray", ls="--", lw=1, label=f"SFT model {sft[0]:.2f}")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("RL iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    minutes = [r["time/rl_elapsed_s"] / 60 for r in rows if "time/rl_elapsed_s" in r]
    if minutes:
        fig.suptitle(f"{run_dir.name}: {len(minutes)} RL iterations in {minutes[-1]:.1f} min", fontsize=11)
    fig.tight_layout()
    target = Path(out) if out else run_dir / "curves.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
