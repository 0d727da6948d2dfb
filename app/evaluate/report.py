"""A benchmark run's report: the console table, and ``report.json``, ``report.md`` and
``report.png``."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from app.evaluate.metrics import METRICS
from app.files import atomic_path, write_atomic

# How a report writes each metric.
_LABELS = {"recall@1": "recall@1", "recall@5": "recall@5", "mAP": "mAP", "uAP": "µAP"}


@dataclass
class Report:
    """What :func:`app.evaluate.run.run` measured, per system."""

    metrics: dict[str, dict[str, float]]  # system -> metric -> value
    per_edit: dict[str, dict[str, float]]  # system -> edit -> recall@1 of queries with it
    seconds: dict[str, float]  # system -> scoring time (embedding included); "decode@S"
    baselines: list[str]
    counts: dict[str, int]
    edit_counts: dict[str, int] = field(default_factory=dict)  # queries with a copy, per edit
    paths: dict[str, str] = field(default_factory=dict)

    def margins(self) -> dict[str, dict[str, float]]:
        """For each non-baseline system: metric minus the best baseline's."""
        out: dict[str, dict[str, float]] = {}
        for name, m in self.metrics.items():
            if name in self.baselines or not self.baselines:
                continue
            out[name] = {k: m[k] - max(self.metrics[b][k] for b in self.baselines) for k in METRICS}
        return out


def summary_table(report: Report) -> Table:
    """The metrics and scoring time of every system, the best of each metric in bold."""
    c = report.counts
    table = Table(
        title=f"Retrieval: {c['library']} library clips ({c['sources']} sources), "
        f"{c['queries']} queries ({c['negatives']} negatives)"
    )
    table.add_column("system")
    for k in METRICS:
        table.add_column(_LABELS[k], justify="right")
    table.add_column("seconds", justify="right")
    best = {k: max(m[k] for m in report.metrics.values()) for k in METRICS}
    for name, m in report.metrics.items():
        cells = [f"[bold]{m[k]:.3f}[/bold]" if m[k] == best[k] else f"{m[k]:.3f}" for k in METRICS]
        table.add_row(name, *cells, f"{report.seconds[name]:.1f}")
    return table


def _markdown(report: Report, *, gt_path: Path, fps: float) -> str:
    c = report.counts
    lines = [
        "# Retrieval benchmark",
        "",
        f"Ground truth `{gt_path}`: {c['library']} library clips from {c['sources']} sources; "
        f"{c['queries']} queries, {c['queries'] - c['negatives']} with a copy in the library and "
        f"{c['negatives']} negatives. Frames sampled at {fps:g} fps. recall@k and mAP over the "
        "queries with a copy; µAP over all (query, library clip) pairs, negatives included.",
        "",
        "| system | " + " | ".join(_LABELS[k] for k in METRICS) + " | seconds |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for name, m in report.metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + f" | {report.seconds[name]:.1f} |")
    for name, margin in report.margins().items():
        lines += [
            "",
            f"## {name}: margin over the best baseline",
            "",
            f"| metric | {name} | best baseline | margin |",
            "|---|---:|---|---:|",
        ]
        for k in METRICS:
            best = max(report.baselines, key=lambda b: report.metrics[b][k])
            ours, theirs = report.metrics[name][k], report.metrics[best][k]
            lines.append(f"| {_LABELS[k]} | {ours:.3f} | {best} ({theirs:.3f}) | {margin[k]:+.3f} |")
    edits = sorted({e for per in report.per_edit.values() for e in per})
    names = list(report.per_edit)
    lines += [
        "",
        "## recall@1 by edit (a query with two edits counts under both)",
        "",
        "| edit | queries | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for e in edits:
        lines.append(
            f"| {e} | {report.edit_counts.get(e, 0)} | "
            + " | ".join(f"{report.per_edit[n].get(e, float('nan')):.2f}" for n in names)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _plot(report: Report, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report.metrics)
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    x = np.arange(len(METRICS))
    for i, name in enumerate(names):
        values = [report.metrics[name][k] for k in METRICS]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [_LABELS[k] for k in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    c = report.counts
    ax.set_title(f"{c['library']} library clips, {c['queries']} queries ({c['negatives']} negatives)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def write_reports(report: Report, out_dir: Path, *, gt_path: Path, fps: float) -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` into ``out_dir`` and records
    their paths in ``report.paths``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.paths = {k: str(out_dir / f"report.{k}") for k in ("json", "md", "png")}
    data = {
        "ground_truth": str(gt_path),
        "ground_truth_sha256": hashlib.sha256(gt_path.read_bytes()).hexdigest(),
        "fps": fps,
        "counts": report.counts,
        "metrics": report.metrics,
        "margins_over_best_baseline": report.margins(),
        "recall@1_by_edit": report.per_edit,
        "queries_by_edit": report.edit_counts,
        "seconds": report.seconds,
        "baselines": report.baselines,
    }
    write_atomic(out_dir / "report.json", json.dumps(_finite(data), indent=1).encode())
    write_atomic(out_dir / "report.md", _markdown(report, gt_path=gt_path, fps=fps).encode())
    _plot(report, out_dir / "report.png")


def _finite(value: Any) -> Any:
    """NaN (a metric with no query to average) as JSON null, not the invalid ``NaN``."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
