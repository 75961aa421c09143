"""Training metrics: what a batch of trajectories did, and where the numbers go (JSONL +
TensorBoard), plus the plot of a run's curves."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES = ("reward/mean", "accuracy", "turns/mean", "tool_call_rate", "exec_error_rate",
          "loss/entropy")


def trajectory_metrics(trajectories) -> dict[str, float]:
    """Reward, accuracy, turns, tool use and execution errors over a batch of trajectories."""
    turns = [t for traj in trajectories for t in traj.turns]
    statuses = [t.info.get("exec", {}).get("status") for t in turns if t.info.get("tool_called")]
    rewards = np.array([sum(traj.rewards) for traj in trajectories], dtype=float)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "accuracy": float(np.mean([traj.correct for traj in trajectories])),
        "turns/mean": float(np.mean([len(traj.turns) for traj in trajectories])),
        "tool_call_rate": float(np.mean([bool(t.info.get("tool_called")) for t in turns])),
        "exec_error_rate": float(np.mean([s != "ok" for s in statuses])) if statuses else 0.0,
        "infra_error_rate": float(np.mean([traj.infra_error for traj in trajectories])),
        "truncated_rate": float(np.mean([traj.done_reason != "terminated" for traj in trajectories])),
    }


class MetricsLogger:
    """Appends one JSON line per iteration and mirrors every scalar to TensorBoard.

    ``truncate_after`` drops lines past a resumed checkpoint's iteration, so a resumed run's log
    holds each iteration once.
    """

    def __init__(self, run_dir: str | os.PathLike, truncate_after: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if truncate_after is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["iteration"] <= truncate_after]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:
            logger.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """A PNG of the run's learning curves (one panel per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = [k for k in CURVES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
