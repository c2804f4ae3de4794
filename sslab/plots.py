"""Every figure the lab shows. Needs matplotlib (the ``notebooks`` extra), imported inside the
functions so that ``python -m sslab curve`` still runs where matplotlib is missing.

Each function draws from numbers computed elsewhere in sslab (result rows, run metrics,
embeddings, model outputs) and returns the matplotlib Figure (or Axes, for the functions
that draw into a given ``ax``); :func:`save_figure` writes a figure as PNG and PDF under
``outputs/figures/``. Every method keeps one colour in every figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .evaluate.table import ResultTable, series_name, series_order
from .plot_style import method_color, pyplot
from .plots_pretext import rotation_examples, training_curves, vae_gallery, view_pairs
from .plots_selection import selection_curves, selection_grid

# What the notebooks and the command line call, the pretraining figures included.
__all__ = ["accuracy_bars", "confusion", "entries_table", "figures_dir", "finetune_comparison", "gain_bars",
           "label_curves", "per_class_bars", "plot_label_curves", "rotation_examples", "save_figure",
           "save_label_curves", "selection_curves", "selection_grid", "semi_curves", "separation_bars", "spread_note",
           "training_curves", "umap_panels",
           "vae_gallery", "view_pairs"]

PROTOCOL_STYLES = {"probe": "-", "finetune": "-.", "scratch": "--", "labelprop": ":", "selftrain": (0, (5, 1)),
                   "fixmatch": (0, (3, 1, 1, 1, 1, 1))}
PROTOCOL_MARKERS = {"probe": "o", "finetune": "s", "scratch": "^", "labelprop": "D", "selftrain": "v",
                    "fixmatch": "P"}
# Colours by protocol, for figures that compare the protocols of one method.
PROTOCOL_COLORS = {"probe": "#1f77b4", "finetune": "#9467bd", "labelprop": "#2ca02c", "selftrain": "#ff7f0e",
                   "fixmatch": "#d62728", "scratch": "#555555"}
PROTOCOL_HATCHES = {"finetune": "//", "labelprop": "..", "selftrain": "xx", "fixmatch": "\\\\"}
METRIC_NAMES = {"top1": "top-1", "top5": "top-5"}


def figures_dir(out: Optional[str] = None) -> Path:
    from .store import outputs_root
    return outputs_root(out) / "figures"


def save_figure(fig, name: str, out: Optional[str] = None, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list:
    """Write ``fig`` as ``outputs/figures/<name>.png`` and ``.pdf`` (for papers); returns the paths."""
    folder = figures_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- label-budget curves

def _summary_entries(table) -> list:
    """``table.summary()`` for a ResultTable; a list of result rows is summarised the same way."""
    if hasattr(table, "summary"):
        return table.summary()
    return ResultTable(list(table)).summary()


def _row_order(table):
    """Sort key for (method, protocol) series: the order the rows were computed in (methods as
    the sweep listed them), scratch last."""
    rows = getattr(table, "rows", None) or (table if isinstance(table, list) else [])
    seen = series_order([r for r in rows if "method" in r and "seed" in r])

    def key(item):
        series = item[0]
        return (series[1] == "scratch", seen.index(series) if series in seen else len(seen), series)
    return key


def spread_note(counts, what: str = "bands", interval: bool = False) -> str:
    """What a figure's bands or error bars summarise (± 1 std, or with ``interval`` the 95 %
    confidence interval of the mean), from the number of seeds behind each point: a reader of a
    saved figure cannot otherwise tell a zero-width band of one seed from a tight spread of five."""
    counts = sorted({int(n) for n in counts})
    if not counts:
        return ""
    if counts == [1]:
        return "1 seed per point: no spread shown"
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"{what}: {'95 % confidence interval' if interval else '± 1 std'} over {seeds} seeds"


def _note(ax, text: str) -> None:
    if text:
        ax.text(0.99, 0.01, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgrey")


def plot_label_curves(table, metric: str = "top1", ax=None, references=None, protocols=None, methods=None,
                      title: Optional[str] = None, color_by: str = "method"):
    """Accuracy against labels per class (log₂ x-axis), one line per method and protocol with
    a ± std band over seeds. ``table``: a ResultTable or a list of result rows.
    ``references``: optional list of dicts (label, budgets, values in %) drawn as labelled grey
    dotted reference points/lines, never mixed with the measurements. ``protocols`` /
    ``methods`` keep only those series. ``color_by``: ``method`` or ``protocol``."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"metric={metric!r} is not known; allowed: {', '.join(METRIC_NAMES)}")
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    groups: dict = {}
    for e in _summary_entries(table):
        if e[f"{metric}_mean"] is None:
            continue
        if protocols is not None and e["protocol"] not in protocols:
            continue
        if methods is not None and e["method"] not in methods and e["protocol"] != "scratch":
            continue
        groups.setdefault((e["method"], e["protocol"]), []).append(e)
    for i, ((method, protocol), entries) in enumerate(sorted(groups.items(), key=_row_order(table))):
        entries = sorted(entries, key=lambda e: e["budget"])
        x = np.array([e["budget"] for e in entries])
        y = 100 * np.array([e[f"{metric}_mean"] for e in entries])
        s = 100 * np.array([e[f"{metric}_std"] for e in entries])
        color = PROTOCOL_COLORS.get(protocol, "black") if color_by == "protocol" else method_color(method, i)
        ax.plot(x, y, linestyle=PROTOCOL_STYLES.get(protocol, "-"), marker=PROTOCOL_MARKERS.get(protocol, "o"),
                color=color, label=series_name(method, protocol))
        ax.fill_between(x, y - s, y + s, color=color, alpha=0.15, linewidth=0)
    for ref in references or []:
        ax.plot(ref["budgets"], ref["values"], ":", marker="x", color="grey", label=ref["label"])
    ax.set_xscale("log", base=2)
    budgets = sorted({b for entries in groups.values() for b in (e["budget"] for e in entries)})
    if budgets:
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("labeled images per class (log₂)")
    ax.set_ylabel(f"{METRIC_NAMES[metric]} test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if groups or references:
        ax.legend(fontsize=8)
    _note(ax, spread_note(e["n"] for entries in groups.values() for e in entries))
    return ax


def label_curves(table, references=None, protocols=None, methods=None, suptitle: Optional[str] = None):
    """Top-1 and top-5 curves side by side (a Figure)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_label_curves(table, "top1", axes[0], references, protocols, methods)
    plot_label_curves(table, "top5", axes[1], None, protocols, methods)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def semi_curves(table, metric: str = "top1"):
    """One panel per method (random-init included): each protocol's curve, coloured by protocol,
    with scratch in every panel; a shared y axis, so the panels compare at a glance."""
    plt = pyplot()
    rows = table.rows if hasattr(table, "rows") else list(table)
    methods = list(dict.fromkeys(m for m, p in series_order(rows) if p != "scratch"))
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.6 * max(1, len(methods)), 4), sharey=True,
                             squeeze=False)
    for ax, method in zip(axes[0], methods):
        plot_label_curves(table, metric, ax, methods=[method], title=method, color_by="protocol")
    fig.tight_layout()
    return fig


def save_label_curves(table, stem) -> Path:
    """Top-1 and top-5 curves side by side, saved as ``stem.png`` and ``stem.pdf``."""
    import matplotlib
    if not matplotlib.get_backend().lower().startswith(("module://", "inline")):
        matplotlib.use("Agg")
    plt = pyplot()
    fig = label_curves(table)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    fig.savefig(stem.with_suffix(".pdf"))
    plt.close(fig)
    return stem.with_suffix(".png")


def gain_bars(gains: list, metric: str = "top1", ax=None):
    """Paired gain (percentage points, mean over seeds, error bars its 95 % confidence interval)
    per budget, one bar group per budget and one bar per series. ``gains``:
    ``ResultTable.paired_gain(metric, over=...)``; the y label names the baseline."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    protocol_rank = {p: i for i, p in enumerate(PROTOCOL_COLORS)}
    series = sorted({(g["method"], g["protocol"]) for g in gains},
                    key=lambda s: (protocol_rank.get(s[1], len(protocol_rank)), s[0]))
    methods = {m for m, _ in series}
    budgets = sorted({g["budget"] for g in gains})
    width = 0.8 / max(1, len(series))
    for i, (method, protocol) in enumerate(series):
        values = {g["budget"]: g for g in gains if (g["method"], g["protocol"]) == (method, protocol)}
        x = np.arange(len(budgets)) + (i - (len(series) - 1) / 2) * width
        y = [100 * values[b][f"gain_{metric}_mean"] if b in values else np.nan for b in budgets]
        s = [100 * (values[b].get(f"gain_{metric}_ci95") or 0) if b in values else 0 for b in budgets]
        # One method's protocols: a colour each; several methods: a colour per method, a hatch per protocol.
        color = PROTOCOL_COLORS.get(protocol, "black") if len(methods) == 1 else method_color(method, i)
        ax.bar(x, y, width, yerr=s, color=color, alpha=0.85, hatch=PROTOCOL_HATCHES.get(protocol, ""),
               edgecolor="white", label=series_name(method, protocol), capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(budgets)))
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("labeled images per class")
    over = gains[0].get("over", "scratch") if gains else "scratch"
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} gain over {over} (pp)")
    ax.grid(alpha=0.3, axis="y")
    if series:
        ax.legend(fontsize=8)
    _note(ax, spread_note((g["n"] for g in gains), "error bars", interval=True))
    return ax


# ---------------------------------------------------------------- classification

def confusion(matrix, classes: Sequence[str], title: str = "", normalize: bool = True, ax=None):
    """A confusion matrix (rows = true class, columns = predicted), row-normalised to % by default."""
    plt = pyplot()
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classes):
        raise ValueError(f"matrix has shape {m.shape}; expected {len(classes)}×{len(classes)} (one row per class)")
    if normalize:
        m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.55 * len(classes) + 2.5, 0.55 * len(classes) + 1.8))
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=100 if normalize else None)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j] >= (0.5 if normalize else 1):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > (50 if normalize else m.max() / 2) else "black")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class" if normalize else "images")
    ax.figure.tight_layout()
    return ax.figure


def accuracy_bars(rows: list, ax=None, title: str = ""):
    """Top-1 and top-5 per method for one budget: bars with the mean over seeds and one dot per seed."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    names = []
    for r in rows:
        label = series_name(r["method"], r["protocol"])
        if label not in names:
            names.append(label)
    for j, metric in enumerate(("top1", "top5")):
        for i, name in enumerate(names):
            values = [100 * r[metric] for r in rows
                      if series_name(r["method"], r["protocol"]) == name and r[metric] is not None]
            if not values:
                continue
            method = name.split(" (")[0]
            x = i + (j - 0.5) * 0.38
            ax.bar(x, np.mean(values), 0.36, color=method_color(method, i), alpha=1.0 if j == 0 else 0.45,
                   label=METRIC_NAMES[metric] if i == 0 else None)
            ax.plot([x] * len(values), values, "k.", markersize=4)
            ax.text(x, np.mean(values) + 1, f"{np.mean(values):.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=9)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, title="dark: top-1, light: top-5", title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return ax.figure


def per_class_bars(rows: list, classes: Sequence[str], ax=None, title: str = ""):
    """Per-class top-1 accuracy of each method (mean over the given rows' seeds)."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.2))
    names = []
    for r in rows:
        label = series_name(r["method"], r["protocol"])
        if label not in names:
            names.append(label)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = np.mean([r["per_class"] for r in rows if series_name(r["method"], r["protocol"]) == name], axis=0)
        ax.bar(np.arange(len(classes)) + (i - (len(names) - 1) / 2) * width, 100 * values, width,
               color=method_color(name.split(" (")[0], i), label=name)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 per class (%)")
    ax.grid(alpha=0.3, axis="y")
    # Beside the axes, not inside: inside, the legend covers the last classes' bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.tight_layout()
    return ax.figure


# ---------------------------------------------------------------- embeddings

def umap_panels(embeddings: list, classes: Sequence[str], point_size: float = 4.0):
    """UMAP panels side by side, coloured by class, with one legend of class names and each
    panel's separation score in its title. ``embeddings``: :class:`sslab.embed.Embedding` list."""
    plt = pyplot()
    if not embeddings:
        raise ValueError("embeddings is empty; allowed: at least one Embedding")
    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.8, 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, e in zip(axes[0], embeddings):
        for c in range(len(classes)):
            mask = e.labels == c
            if mask.any():
                ax.scatter(e.coords[mask, 0], e.coords[mask, 1], s=point_size, color=cmap(c % cmap.N),
                           label=classes[c], alpha=0.8, linewidths=0)
        ax.set_title(f"{e.name} — {e.space}\n{e.score_label}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    right = 1 - 1.8 / (4.2 * n + 1.8)
    fig.tight_layout(rect=(0, 0, right, 1))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(right, 0.5), markerscale=3, fontsize=8,
               frameon=False)
    return fig


def separation_bars(embeddings: list, ax=None):
    """The separation score of each UMAP panel as bars (one number per method)."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(1.4 * len(embeddings) + 2, 3))
    names = [f"{e.name}\n{e.space}" for e in embeddings]
    scale = 100 if embeddings and embeddings[0].score_name == "knn" else 1
    values = [scale * e.score for e in embeddings]
    ax.bar(range(len(values)), values, color=[method_color(e.name, i) for i, e in enumerate(embeddings)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}" if scale == 100 else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("5-NN accuracy in the UMAP (%)" if scale == 100 else "silhouette")
    ax.grid(alpha=0.3, axis="y")
    return ax.figure


# ---------------------------------------------------------------- fine-tuning

def finetune_comparison(table, metric: str = "top1", methods=None):
    """Fine-tuning against the frozen probe and scratch: one panel per method, accuracy against
    labels per class for the three protocols (± std bands over seeds)."""
    plt = pyplot()
    entries = _summary_entries(table)
    pretrained = [m for m in dict.fromkeys(e["method"] for e in entries if e["protocol"] != "scratch")
                  if methods is None or m in methods]
    if not pretrained:
        raise ValueError("table has no probe or finetune rows; allowed: a table from label_curve(..., finetune=True)")
    fig, axes = plt.subplots(1, len(pretrained), figsize=(4.6 * len(pretrained), 3.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], pretrained):
        plot_label_curves(entries_table(entries), metric, ax, methods=[method],
                          title=f"{method}: probe vs fine-tune vs scratch")
    fig.tight_layout()
    return fig


class entries_table:  # noqa: N801 - a tiny adapter, used like a function
    """Wrap already summarised entries so :func:`plot_label_curves` can draw them."""

    def __init__(self, entries: list):
        self.entries = entries

    def summary(self) -> list:
        return self.entries

