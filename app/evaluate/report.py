"""A benchmark run's report: the console tables, and ``report.json``, ``report.md``,
``report.png`` (each part's metrics with their intervals) and ``families-<part>.png`` (a
panel per edit family)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from app.evaluate.ground_truth import DEV, TEST
from app.evaluate.metrics import BOOTSTRAP_SEED, INTERVAL_LEVEL, METRICS, Scored
from app.files import atomic_path, write_atomic

# How a report writes each metric.
_LABELS = {"recall@1": "recall@1", "recall@5": "recall@5", "mAP": "mAP", "uAP": "µAP"}
# The test part first: it is the claim; the dev part is what choices were made on.
_ORDER = (TEST, DEV)
_ROLE = {TEST: "scored only, never tuned on", DEV: "every recipe, preset, threshold and setting is chosen on it"}


@dataclass
class PartReport:
    """Every system on one part of the benchmark."""

    counts: dict[str, int]  # library clips, sources, distractors, queries, negatives
    sources: list[str]
    systems: dict[str, Scored]  # system -> metrics and intervals
    families: dict[str, dict[str, Scored]]  # system -> edit family -> metrics and intervals


@dataclass
class Report:
    """What :func:`app.evaluate.run.run` measured, per part and system."""

    parts: dict[str, PartReport]
    seconds: dict[str, float]  # system -> scoring time over all parts (embedding included); "decode@S"
    baselines: list[str]
    held_out: list[str]  # edit families no training augmentation covers (app.evaluate.edits)
    index: dict[str, Any] = field(default_factory=dict)  # the IndexParams of the served path
    resamples: int = 0  # bootstrap resamples behind each interval
    paths: dict[str, str] = field(default_factory=dict)

    def margins(self, part: str) -> dict[str, dict[str, float]]:
        """For each non-baseline system: metric minus the best baseline's, on ``part``."""
        systems = self.parts[part].systems
        baselines = [b for b in self.baselines if b in systems]
        if not baselines:
            return {}
        return {
            name: {k: s.metrics[k] - max(systems[b].metrics[k] for b in baselines) for k in METRICS}
            for name, s in systems.items()
            if name not in baselines
        }


def _cell(s: Scored, k: str, *, sep: str = " ") -> str:
    """A metric and its interval: ``0.682 [0.60, 0.75]``."""
    low, high = s.intervals[k]
    return f"{s.metrics[k]:.3f}{sep}[{low:.2f}, {high:.2f}]"


def _library(counts: dict[str, int]) -> str:
    distractors = counts.get("distractors", 0)
    return f"{counts['library']} library clips" + (f" ({distractors} distractors)" if distractors else "")


def _title(part: str, p: PartReport) -> str:
    c = p.counts
    return f"{part} part ({', '.join(p.sources)}): {_library(c)}, {c['queries']} queries ({c['negatives']} negatives)"


def summary_tables(report: Report) -> list[Table]:
    """Per part, the metrics of every system with their intervals; the best in bold."""
    tables = []
    for part in (p for p in _ORDER if p in report.parts):
        p = report.parts[part]
        table = Table(title=f"Retrieval, {_title(part, p)}; {INTERVAL_LEVEL:.0%} intervals under the values")
        table.add_column("system")
        for k in METRICS:
            table.add_column(_LABELS[k], justify="right")
        table.add_column("seconds", justify="right")
        best = {k: max(s.metrics[k] for s in p.systems.values()) for k in METRICS}
        for name, s in p.systems.items():
            cells = [escape(_cell(s, k, sep="\n")) for k in METRICS]  # the interval below: consoles are narrow
            cells = [f"[bold]{c}[/bold]" if s.metrics[k] == best[k] else c for c, k in zip(cells, METRICS, strict=True)]
            table.add_row(name, *cells, f"{report.seconds.get(name, float('nan')):.1f}")
        tables.append(table)
    return tables


def _markdown(report: Report, *, gt_path: Path, fps: float) -> str:
    held = set(report.held_out)
    lines = [
        "# Retrieval benchmark",
        "",
        f"Ground truth `{gt_path}`, split by source into a **dev** part (every recipe, preset, "
        "threshold and setting is chosen on it) and a **test** part (scored only). Frames sampled at "
        f"{fps:g} fps. Every system is scored on the served path: an index version of the part's "
        f"library (`{_index_label(report.index)}`) searched for each query, each hit's cosine "
        "calibrated against the version's background sample (pHash, no vector: the same calibration "
        "of its matrix); every encoder's library normalisation is fitted on the part's library, so "
        "`untrained` is the untrained network given the whole pipeline. recall@k and mAP over the "
        "queries with a copy; µAP over all (query, library clip) pairs, negatives included. Ties "
        f"count as their mean over orders. Intervals: {INTERVAL_LEVEL:.0%} percentile bootstrap over "
        f"the queries ({report.resamples} resamples, fixed seed). Edit families marked † are held "
        "out of training (no augmentation covers them).",
    ]
    for part in (p for p in _ORDER if p in report.parts):
        p = report.parts[part]
        lines += [
            "",
            f"## {_title(part, p)}",
            "",
            f"The {part} part: {_ROLE[part]}.",
            "",
            "| system | " + " | ".join(_LABELS[k] for k in METRICS) + " | seconds |",
            "|---|" + "---:|" * (len(METRICS) + 1),
        ]
        for name, s in p.systems.items():
            seconds = report.seconds.get(name, float("nan"))
            lines.append(f"| {name} | " + " | ".join(_cell(s, k) for k in METRICS) + f" | {seconds:.1f} |")
        baselines = [b for b in report.baselines if b in p.systems]
        for name, margin in report.margins(part).items():
            lines += ["", f"### {name}: margin over the best baseline ({part} part)", "",
                      f"| metric | {name} | best baseline | margin |", "|---|---:|---|---:|"]  # fmt: skip
            for k in METRICS:
                best = max(baselines, key=lambda b: p.systems[b].metrics[k])
                ours, theirs = p.systems[name].metrics[k], p.systems[best].metrics[k]
                lines.append(f"| {_LABELS[k]} | {ours:.3f} | {best} ({theirs:.3f}) | {margin[k]:+.3f} |")
        lines += [
            "",
            f"### By edit family ({part} part; a query with two edits counts under both; † held out of training)",
            "",
            "| family | queries (with a copy) | system | " + " | ".join(_LABELS[k] for k in METRICS) + " |",
            "|---|---:|---|" + "---:|" * len(METRICS),
        ]
        for family in sorted({f for per in p.families.values() for f in per}):
            label = f"{family} †" if family in held else family
            for name, per in p.families.items():
                if family not in per:
                    continue
                s = per[family]
                count = f"{s.metrics['queries']} ({s.metrics['positives']})"
                lines.append(f"| {label} | {count} | {name} | " + " | ".join(_cell(s, k) for k in METRICS) + " |")
                label, count = "", ""
    return "\n".join(lines) + "\n"


def _index_label(index: dict[str, Any]) -> str:
    if not index:
        return "default"
    label = f"{index.get('mode')} {index.get('dtype') if index.get('mode') == 'hnsw' else 'b1'}"
    return label + (f", {index['rerank']} re-ranked" if index.get("rerank") else "")


def _bars(ax: Any, scored: dict[str, Scored], *, fontsize: int = 7) -> None:
    """Grouped bars: a group per metric, a bar per system, its interval as an error bar."""
    names = list(scored)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(METRICS))
    for i, name in enumerate(names):
        s = scored[name]
        values = np.array([s.metrics[k] for k in METRICS], dtype=float)
        lows = np.array([s.intervals[k][0] for k in METRICS], dtype=float)
        highs = np.array([s.intervals[k][1] for k in METRICS], dtype=float)
        err = np.nan_to_num(np.vstack([values - lows, highs - values]).clip(min=0))
        ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(values), width, yerr=err, capsize=2,
               label=name, error_kw={"elinewidth": 0.8})  # fmt: skip
    ax.set_xticks(x, [_LABELS[k] for k in METRICS], fontsize=fontsize)
    ax.set_ylim(0, 1.05)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def _plot_parts(report: Report, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = [p for p in _ORDER if p in report.parts]
    fig = Figure(figsize=(7 * len(parts), 4.5))
    FigureCanvasAgg(fig)
    for i, part in enumerate(parts):
        ax = fig.add_subplot(1, len(parts), i + 1)
        _bars(ax, report.parts[part].systems, fontsize=9)
        c = report.parts[part].counts
        ax.set_title(f"{part} part: {_library(c)}, {c['queries']} queries ({c['negatives']} negatives)", fontsize=9)
        ax.set_ylabel(f"score ({INTERVAL_LEVEL:.0%} bootstrap interval)")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def _plot_families(report: Report, part: str, path: Path) -> None:
    """A panel per edit family: every system's metrics on the queries with that edit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = report.parts[part]
    families = sorted({f for per in p.families.values() for f in per})
    cols = min(4, max(1, len(families)))
    rows = max(1, math.ceil(len(families) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, family in enumerate(families):
        ax = fig.add_subplot(rows, cols, i + 1)
        scored = {name: per[family] for name, per in p.families.items() if family in per}
        _bars(ax, scored, fontsize=7)
        any_scored = next(iter(scored.values()))
        held = " (held out of training)" if family in report.held_out else ""
        ax.set_title(f"{family}{held}: {any_scored.metrics['queries']} queries", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if i == 0:
            ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(f"{part} part, by edit family ({INTERVAL_LEVEL:.0%} bootstrap intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    _save(fig, path)


def _scored_json(s: Scored) -> dict[str, Any]:
    return {"metrics": s.metrics, "intervals": {k: list(v) for k, v in s.intervals.items()}}


def write_reports(report: Report, out_dir: Path, *, gt_path: Path, fps: float) -> None:
    """Writes ``report.json``, ``report.md``, ``report.png`` and ``families-<part>.png``
    into ``out_dir`` and records their paths in ``report.paths``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.paths = {k: str(out_dir / f"report.{k}") for k in ("json", "md", "png")}
    for part in report.parts:
        report.paths[f"families-{part}"] = str(out_dir / f"families-{part}.png")
    parts = {
        part: {
            "counts": p.counts,
            "sources": p.sources,
            "metrics": {name: s.metrics for name, s in p.systems.items()},
            "intervals": {name: _scored_json(s)["intervals"] for name, s in p.systems.items()},
            "families": {name: {f: _scored_json(s) for f, s in per.items()} for name, per in p.families.items()},
            "margins_over_best_baseline": report.margins(part),
        }
        for part, p in report.parts.items()
    }
    data = {
        "ground_truth": str(gt_path),
        "ground_truth_sha256": hashlib.sha256(gt_path.read_bytes()).hexdigest(),
        "fps": fps,
        "index": report.index,
        "bootstrap": {"resamples": report.resamples, "level": INTERVAL_LEVEL, "seed": BOOTSTRAP_SEED},
        "parts": parts,
        "held_out_families": report.held_out,
        "seconds": report.seconds,
        "baselines": report.baselines,
    }
    write_atomic(out_dir / "report.json", json.dumps(_finite(data), indent=1).encode())
    write_atomic(out_dir / "report.md", _markdown(report, gt_path=gt_path, fps=fps).encode())
    _plot_parts(report, out_dir / "report.png")
    for part in report.parts:
        _plot_families(report, part, out_dir / f"families-{part}.png")


def _finite(value: Any) -> Any:
    """NaN (a metric with no query to average) as JSON null, not the invalid ``NaN``."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
