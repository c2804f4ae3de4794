"""The pretraining figures: training curves, rotation examples, SimCLR's view pairs, the VAE
gallery (the notebooks call them from :mod:`sslab.plots`, which imports them)."""
from __future__ import annotations

import numpy as np

from .plot_style import method_color, pyplot

# Per task: the per-epoch metrics worth a panel of their own, and their test counterpart.
TASK_METRICS = {"rotation": ["rot_acc"], "vae": ["recon", "kl"], "siamese-vae": ["recon", "kl", "triplet"],
                "simclr": ["contrastive_acc"]}
METRIC_LABELS = {"loss": "training loss", "rot_acc": "rotation accuracy", "recon": "reconstruction error (SSE)",
                 "kl": "KL to N(0, I)", "triplet": "triplet loss", "contrastive_acc": "positive found (top-1)",
                 "knn_acc": "kNN top-1 (monitor)"}


def training_curves(runs):
    """Per-epoch training curves of pretraining runs: one column per run, its loss on top and
    each task metric in a panel of its own below (the KL, ~100, and the triplet loss, ~0.1, on
    one axis would flatten the triplet term); the held-out test value at the end as a star.
    ``runs``: a dict name → Run or a list of Runs."""
    plt = pyplot()
    items = list(runs.items()) if isinstance(runs, dict) else [(r.method, r) for r in runs]
    if not items:
        raise ValueError("runs is empty; allowed: at least one pretraining run")
    rows = 1 + max(len(TASK_METRICS.get(run.method, [])) for _, run in items)
    fig, axes = plt.subplots(rows, len(items), figsize=(4.2 * len(items), 2.4 * rows + 0.6), squeeze=False)
    for col, (name, run) in enumerate(items):
        history = run.metrics
        epochs = np.array([row["epoch"] + 1 for row in history])
        color = method_color(run.method, col)
        metrics = ["loss"] + TASK_METRICS.get(run.method, [])
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            ax.plot(epochs, [r.get(metric, np.nan) for r in history], marker="o", color=color, label="train")
            test = run.summary.get(f"test_{metric}")
            if test is not None and len(epochs):
                ax.plot([epochs[-1]], [test], marker="*", markersize=12, linestyle="none", color="black",
                        label="test (end)")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_xticks(epochs if len(epochs) <= 12 else ax.get_xticks())
        axes[len(metrics) - 1, col].set_xlabel("epoch")
        for ax in axes[len(metrics):, col]:
            ax.axis("off")
        axes[0, col].set_title(f"{name}: {run.summary.get('images', '?')} images, "
                               f"{run.summary.get('epochs_run', len(history))} epochs")
    fig.tight_layout()
    return fig


def _image(ax, img, title: str = "", color: str = "black"):
    """Show one C×H×W float image in [0, 1] (grey or RGB) without axes."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    elif img.ndim == 3:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
    else:
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, color=color)


def rotation_examples(examples: dict):
    """A grid of test images at the angles the run was trained on (0/90/180/270°, or 0/180°) with
    the rotation the net predicts (green when right, red when wrong). ``examples``: the dict
    :func:`sslab.lab.rotation_predictions` returns (``images`` N×R×C×H×W, ``predicted`` N×R,
    ``confidence`` N×R, ``angles`` R)."""
    plt = pyplot()
    images = np.asarray(examples["images"])
    predicted = np.asarray(examples["predicted"])
    confidence = np.asarray(examples["confidence"])
    angles = list(examples.get("angles", (0, 90, 180, 270)))
    n, rotations = images.shape[0], len(angles)
    fig, axes = plt.subplots(rotations, n, figsize=(1.3 * n, 1.5 * rotations), squeeze=False)
    for i in range(n):
        for r in range(rotations):
            ok = predicted[i, r] == r
            _image(axes[r, i], images[i, r], f"→ {angles[predicted[i, r]]}° ({100 * confidence[i, r]:.0f}%)",
                   "green" if ok else "red")
        axes[0, i].set_xlabel("")
    for r in range(rotations):
        axes[r, 0].set_ylabel(f"shown {angles[r]}°", fontsize=9)
    accuracy = float((predicted == np.arange(rotations)[None, :]).mean())
    fig.suptitle(f"rotation predicted by the pretrained net ({100 * accuracy:.0f}% right on these "
                 f"{rotations * n})", fontsize=10)
    fig.tight_layout()
    return fig


def view_pairs(views: dict, rows=("test image", "view 1", "view 2"),
               title: str = "SimCLR's two views of each image:\npulled together, other images' views pushed apart"):
    """Images above two views of each, one column per image: by default SimCLR's, the image, then
    view 1 and view 2; ``rows`` names the three rows and ``title`` says what they are (the siamese-
    VAE's anchor, positive and negative, FixMatch's weak and strong views). ``views``: the dict
    :func:`sslab.lab.simclr_views` returns (``images``, ``first``, ``second``: N×C×H×W floats in [0, 1])."""
    plt = pyplot()
    rows = list(zip(rows, (views["images"], views["first"], views["second"])))
    n = np.asarray(views["images"]).shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.1 * n + 1.6, 3.6), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            _image(axes[r, i], np.asarray(images)[i])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def vae_gallery(gallery: dict):
    """VAE reconstructions and samples from the prior N(0, I). ``gallery``: the dict
    :func:`sslab.lab.vae_reconstructions` returns (``inputs`` N×C×H×W, ``reconstructions`` and
    ``samples``: name → N×C×H×W, all floats in [0, 1])."""
    plt = pyplot()
    inputs = np.asarray(gallery["inputs"])
    recon = {k: np.asarray(v) for k, v in gallery["reconstructions"].items()}
    samples = {k: np.asarray(v) for k, v in gallery["samples"].items()}
    rows = [("test input", inputs)] + [(f"{k} reconstruction", v) for k, v in recon.items()] + \
           [(f"{k} prior sample", v) for k, v in samples.items()]
    n = inputs.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 2.2, 1.15 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for i in range(n):
            _image(axes[r, i], images[i])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig
