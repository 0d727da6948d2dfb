"""A run's curves: ``metrics.jsonl`` (one row per step) and ``loss.png`` drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from app.files import atomic_path, write_atomic

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the rows of steps <= ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
    write_atomic(path, "".join(ln + "\n" for ln in kept))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_loss_plot(metrics_path: Path, out: Path, *, lambd: float | None = None) -> Path | None:
    """Plots loss, on-diagonal and weighted off-diagonal terms per step, and the
    frame-level term where the run had one, into ``out`` (PNG)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], label="loss", color="C0", alpha=0.35)
    ax.plot(steps, _smooth([r["loss"] for r in rows]), label="loss (smoothed)", color="C0")
    ax.plot(steps, _smooth([r["on_diag"] for r in rows]), label="on-diagonal", color="C1", ls="--")
    if lambd is not None:
        ax.plot(
            steps, _smooth([lambd * r["off_diag"] for r in rows]), label=f"{lambd:g} x off-diagonal", color="C2", ls=":"
        )
    framed = [r for r in rows if "frame_loss" in r]
    if framed:
        ax.plot([r["step"] for r in framed], _smooth([r["frame_loss"] for r in framed]),
                label="frame-level term (smoothed)", color="C3")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("Barlow Twins loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
