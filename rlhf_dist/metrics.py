"""Per-iteration metrics: one JSON line each, a console line, and a plot at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import numpy as np


class Tracker(Protocol):
    """Where rows go besides the JSONL file (rlhf_dist/trackers.py: TensorBoard, wandb, MLflow)."""

    def log(self, row: dict) -> None: ...
    def artifact(self, path: Path) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class MetricsLog:
    """The one interface the drivers log through: rows to ``path`` (JSON lines) and to ``trackers``, if any; used as
    a context manager, the trackers are closed at the end (marked failed when the run raised)."""

    def __init__(self, path: Path, resume: bool = False, trackers: Tracker | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = trackers
        self.rows: list[dict] = []
        if resume and self.path.exists():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        elif self.path.exists():
            self.path.unlink()

    def truncate(self, next_iteration: int) -> None:
        """Forget rows from iterations a resumed run will redo (they came after its checkpoint)."""
        kept = [r for r in self.rows if r.get("iteration", 0) < next_iteration]
        if len(kept) != len(self.rows) or not self.path.exists():
            self.rows = kept
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)

    def log(self, row: dict) -> None:
        row = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def artifact(self, path: Path | None) -> None:
        """A file of the run (the final plot) for the trackers to keep; None (no plot drawn) is skipped."""
        if self.trackers is not None and path is not None:
            self.trackers.artifact(Path(path))

    def close(self, failed: bool = False) -> None:
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            trackers.close(failed)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.close(failed=kind is not None)


def mean_of_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key by key, the mean over dicts with the same keys (one per actor, or one per step)."""
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def console_line(row: dict, keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        v = row.get(k)
        if isinstance(v, float) and not math.isnan(v):
            parts.append(f"{k.split('/')[-1]}={v:.4g}")
    return " ".join(parts)


def plot(rows: list[dict], path: Path, keys: tuple[str, ...]) -> Path | None:
    """One panel per metric against the iteration; skipped quietly when matplotlib is missing."""
    try:
        import matplotlib  # deferred: matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: matplotlib
    except ImportError:
        return None
    keys = tuple(k for k in keys if any(k in r for r in rows))
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        xs = [r["iteration"] for r in rows if k in r]
        ax.plot(xs, [r[k] for r in rows if k in r], marker=".")
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def json_safe(x):
    """JSON without NaN (not JSON): unknown numbers become null, in nested dicts and lists too."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
