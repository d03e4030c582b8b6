"""The search's picture: per stage, the probability that each pair of tasks shares it, per epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtvision.atomic import atomic_write_path


def sharing_series(history: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Pair label 'a+b' -> array (epochs, stages) of P(a and b share the stage), from the JSONL records."""
    out: dict[str, np.ndarray] = {}
    share = np.asarray([r["sharing"] for r in history], dtype=float)  # (E, K, T, T)
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            out[f"{tasks[i]}+{tasks[j]}"] = share[:, :, i, j]
    return out


def plot_sharing(history: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: str | Path) -> None:
    """A PNG with one panel per stage: P(share) of every task pair against the epoch (matplotlib, a
    dependency; a grey-level grid through `mtvision.visualize` in an environment without it)."""
    series = sharing_series(history, tasks)
    epochs = [int(r["epoch"]) for r in history]
    stages = len(history[0]["sharing"]) if history else 0
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - an environment that dropped matplotlib
        _plot_grid(series, stages, path)
        return
    cols = min(stages, 4) or 1
    rows = max(1, -(-stages // cols))
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    warm = [int(r["epoch"]) for r in history if r.get("warmup")]
    for k in range(stages):
        ax = fig.add_subplot(rows, cols, k + 1)
        for label, values in series.items():
            ax.plot(epochs, values[:, k], marker="o", markersize=3, label=label)
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.9", zorder=0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"stage {k}")
        ax.set_xlabel("epoch")
        if k % cols == 0:
            ax.set_ylabel("P(share)")
    if series:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize="small")
    fig.suptitle("which stages each pair of tasks shares (grey: warm-up)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    atomic_write_path(path, lambda p: fig.savefig(p, format="png"))


def _plot_grid(series: Mapping[str, np.ndarray], stages: int, path: str | Path) -> None:
    from mtvision import visualize

    cells = []
    for values in series.values():  # one row per pair: epochs x stages, white = always shared
        grey = (np.clip(values.T, 0, 1) * 255).astype(np.uint8)  # (stages, epochs)
        big = np.kron(grey, np.ones((12, 12), dtype=np.uint8))
        cells.append([np.repeat(big[..., None], 3, axis=2)])
    if cells:
        visualize.save_png(str(path), visualize.image_grid(cells, titles=None))
