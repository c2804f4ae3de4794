"""The figures of notebook 07: which images each way of choosing labels picked, and the
accuracy each way reached. Needs matplotlib, imported inside the functions."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .evaluate.table import selection_of
from .plot_style import pyplot

SELECTION_COLORS = {"balanced": "#7f7f7f", "uniform": "#1f77b4", "typical": "#2ca02c", "cover": "#d62728"}


def selection_grid(picks: dict, images, labels, classes: Sequence[str], per_row: int = 10):
    """Thumbnails of the images each way of choosing picked (one row per method × selection, at
    most ``per_row`` images), each titled with its class; a row's label says how many classes it
    covers. ``picks``: ``{method: {selection: train indices}}``; ``images`` uint8 N×C×H×W and
    ``labels`` N of the train split."""
    plt = pyplot()
    rows = [(m, s, idx) for m, by in picks.items() for s, idx in by.items()]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(1.1 * per_row, 1.3 * len(rows)), squeeze=False)
    for r, (method, selection, index) in enumerate(rows):
        index = list(index)[:per_row]
        covered = len({int(labels[i]) for i in index})
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(index):
                image = np.asarray(images[index[c]], dtype=np.float32) / 255.0
                ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0),
                          cmap="gray" if image.shape[0] == 1 else None)
                ax.set_title(classes[int(labels[index[c]])], fontsize=6)
        axes[r][0].set_ylabel(f"{method}\n{selection}\n{covered}/{len(classes)} classes", fontsize=7,
                              color=SELECTION_COLORS.get(selection, "black"))
    fig.tight_layout()
    return fig


def selection_curves(table, metric: str = "top1"):
    """One panel per method × protocol: accuracy against labels per class for each way of choosing
    the labeled images (bands: ± one standard deviation over seeds)."""
    plt = pyplot()
    panels = list(dict.fromkeys((r["method"], r["protocol"]) for r in table.rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (method, protocol) in zip(axes[0], panels):
        for selection in dict.fromkeys(selection_of(r) for r in table.rows):
            entries = sorted((e for e in table.summary() if (e["method"], e["protocol"], e["selection"]) ==
                              (method, protocol, selection) and e[f"{metric}_mean"] is not None),
                             key=lambda e: e["budget"])
            if not entries:
                continue
            x = [e["budget"] for e in entries]
            mean = np.array([100 * e[f"{metric}_mean"] for e in entries])
            std = np.array([100 * e[f"{metric}_std"] for e in entries])
            color = SELECTION_COLORS.get(selection, "black")
            ax.plot(x, mean, marker="o", color=color, label=selection)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{method} · {protocol}", fontsize=9)
        ax.set_xlabel("labels per class")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy, %")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig
