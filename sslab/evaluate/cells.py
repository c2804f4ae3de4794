"""Evaluation cells in the run store: one folder per (method, protocol, budget, seed) holding
its config, the labeled/validation split, the trained head and the result row. A cell is found
again by the hash of what it trains with, locked while computed, and never computed twice."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from .. import integrity, store
from ..checks import check_choice, check_int, check_int_list, check_number
from ..data import DatasetSplits, label_budget_split
from ..models import ALL_LAYERS, resolve_layer
from ..precision import PRECISIONS, resolve_precision
from ..pretrain import Run
from .heads import HEADS


@dataclass
class EvalConfig:
    """How evaluation cells train. ``val_per_class`` labeled images per class (disjoint from the
    budget and the test split) drive early stopping; ``samples_per_epoch`` makes an epoch of a
    tiny budget a fixed number of (augmented) views rather than a handful of images."""

    layer: str = "auto"  # the backbone's layer the classifier reads; auto: conv4 (AlexNet), layer4 (ResNet-18)
    head: str = "mlp"
    grid: int = 4
    hidden: int = 200
    val_per_class: int = 10
    # probe: a head on frozen features (mlp, linear)
    probe_epochs: int = 60
    probe_lr: float = 1e-3
    probe_patience: int = 10
    # scratch: the same net from random weights, trained end to end
    scratch_epochs: int = 30
    scratch_lr: float = 1e-3
    scratch_patience: int = 8
    # finetune: the pretrained backbone and its probe head, trained end to end
    finetune_epochs: int = 15
    finetune_lr: float = 1e-4
    finetune_patience: int = 8
    backbone_lr_scale: float = 0.1
    # shared by the trained protocols
    batch_size: int = 128
    samples_per_epoch: int = 1024
    weight_decay: float = 5e-4
    # head = knn
    knn_k: int = 20
    knn_temperature: float = 0.07
    # labelprop: the k-NN graph (k, PCA dimensions, 0 = none) and the propagation (alpha, gamma, steps)
    lp_k: int = 20
    lp_pca: int = 128
    lp_alpha: float = 0.99
    lp_gamma: float = 3.0
    lp_iterations: int = 20
    # selftrain: rounds of (teacher labels the pool → a student trains on labeled + pseudo-labeled)
    st_rounds: int = 1
    st_per_class: int = 1000  # the teacher's most confident pseudo-labels per class (class-balanced)
    st_threshold: float = 0.0  # and only those at least this confident (0–1, the propagation's confidence)
    st_steps: int = 600
    st_lr: float = 1e-3
    st_labeled_fraction: float = 0.25  # the labeled images' share of every batch
    # fixmatch: steps of fm_batch labeled and fm_mu × fm_batch unlabeled images; threshold τ, weight λ_u
    fm_steps: int = 1000
    fm_batch: int = 32
    fm_mu: int = 7
    fm_threshold: float = 0.95
    fm_weight: float = 1.0
    fm_lr: float = 0.03
    fm_ema: float = 0.99
    # bf16 or fp32 (features, heads, end-to-end training); auto: bf16 where the hardware has it
    precision: str = "auto"

    def validate(self) -> "EvalConfig":
        check_choice("layer", self.layer, ("auto",) + ALL_LAYERS)
        check_choice("head", self.head, HEADS)
        check_choice("precision", self.precision, PRECISIONS)
        for name in ("grid", "hidden", "probe_epochs", "scratch_epochs", "finetune_epochs", "batch_size", "knn_k",
                     "val_per_class", "lp_k", "lp_iterations"):
            check_int(name, getattr(self, name), 1)
        check_int("lp_pca", self.lp_pca, 0, " (principal components of the graph's space; 0: all)")
        for name in ("st_rounds", "st_per_class", "st_steps", "fm_steps", "fm_batch", "fm_mu"):
            check_int(name, getattr(self, name), 1)
        check_number("st_threshold", self.st_threshold, 0.0, 1.0, low_open=False, high_open=True)
        check_number("st_labeled_fraction", self.st_labeled_fraction, 0.0, 1.0, high_open=True)
        check_number("fm_threshold", self.fm_threshold, 0.0, 1.0, low_open=False)
        check_number("fm_ema", self.fm_ema, 0.0, 1.0, low_open=False, high_open=True)
        for name in ("st_lr", "fm_lr", "fm_weight"):
            check_number(name, getattr(self, name))
        check_number("lp_alpha", self.lp_alpha, 0.0, 1.0, high_open=True)
        check_number("lp_gamma", self.lp_gamma)
        return self

    def resolved(self, device, arch: str = "alexnet") -> "EvalConfig":
        """The same settings with ``precision`` resolved for ``device`` and ``layer`` for the
        backbone ``arch`` (a cell's key holds the arithmetic and the layer it was computed with)."""
        return replace(self.validate(), precision=resolve_precision(self.precision, device),
                       layer=resolve_layer(self.layer, arch))

    def with_(self, **changes) -> "EvalConfig":
        """A copy with the given settings changed; None leaves a setting as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_budgets(budgets, name: str = "budgets") -> list:
    return list(check_int_list(name, budgets, 1, "labeled images per class"))


def check_seeds(seeds, name: str = "seeds") -> list:
    return list(check_int_list(name, seeds, 0, "seeds"))


_SHARED = ("layer", "grid", "hidden", "val_per_class", "batch_size", "samples_per_epoch", "weight_decay", "precision")
_PROBE = ("probe_epochs", "probe_lr", "probe_patience")
# The EvalConfig settings each kind of cell trains with, and so the ones in its stored key: a
# setting a cell does not use (the sweep's head for a scratch cell, k of kNN for a fine-tuning
# cell) must not make the same cell count as a new one.
CELL_FIELDS = {
    "knn": ("layer", "grid", "val_per_class", "knn_k", "knn_temperature", "precision"),
    "probe": ("head",) + _SHARED + _PROBE,
    "scratch": _SHARED + ("scratch_epochs", "scratch_lr", "scratch_patience"),
    "finetune": _SHARED + _PROBE + ("finetune_epochs", "finetune_lr", "finetune_patience", "backbone_lr_scale"),
    "labelprop": ("layer", "grid", "val_per_class", "precision", "lp_k", "lp_pca", "lp_alpha", "lp_gamma",
                  "lp_iterations"),
}
CELL_FIELDS["selftrain"] = CELL_FIELDS["labelprop"] + ("hidden", "batch_size", "weight_decay", "st_rounds",
                                                       "st_per_class", "st_threshold", "st_steps", "st_lr",
                                                       "st_labeled_fraction")
CELL_FIELDS["fixmatch"] = ("head",) + _SHARED + _PROBE + ("fm_steps", "fm_batch", "fm_mu", "fm_threshold",
                                                         "fm_weight", "fm_lr", "fm_ema")


def cell_config(kind: str, method: str, dataset: str, budget: int, seed: int, cfg: EvalConfig, **extra) -> dict:
    """The stored config of one cell: its protocol, method, dataset, budget, seed, the settings
    of ``cfg`` that ``kind`` trains with (:data:`CELL_FIELDS`) and ``extra`` (what it starts from)."""
    fields = asdict(cfg)
    return {"stage": "eval", "protocol": kind, "method": method, "dataset": dataset, "budget": budget,
            "seed": seed, **{k: fields[k] for k in CELL_FIELDS[kind]}, **extra}


def pretrained_id(run: Run) -> str:
    """What an evaluation cell records of the pretrained net it used: the run folder's name and a
    digest of its weights file, so a run trained again under the same name (``--force``) does
    not reuse cells computed from the old weights. (The sha256 the store verifies model.pt with,
    computed once per process.)"""
    return f"{run.path.name}@{integrity.file_digest(run.path / 'model.pt')[:12]}"


def cell_folder(config: dict, out) -> Path:
    return store.run_dir("eval", f"{config['method']}-{config['protocol']}", config["dataset"], config, out)


# What every stored row holds (:func:`result_row`); a metrics.json without one of them is damaged.
ROW_KEYS = ("method", "protocol", "head", "layer", "budget", "seed", "top1", "top5", "epochs", "per_class",
            "confusion", "classes")


def stored_row(config: dict, out) -> Optional[dict]:
    """The result row of a complete cell (its metrics.json verified), or None."""
    folder = cell_folder(config, out)
    return store.read_json(folder / "metrics.json", required=ROW_KEYS) if store.is_complete(folder) else None


def computed_once(cell: dict, out, compute) -> dict:
    """The stored row of ``cell``, computing it with ``compute(folder)`` when missing. A lock on
    the cell's folder makes a second process (another notebook, another shard) wait and then
    reuse the row instead of computing the same cell again."""
    cached = stored_row(cell, out)
    if cached is not None:
        return cached
    folder = cell_folder(cell, out)
    with store.locked(folder):
        cached = stored_row(cell, out)
        return cached if cached is not None else compute(folder)


def finish_cell(folder: Path, config: dict, row: dict, split: tuple, head_state: Optional[dict] = None) -> dict:
    """Write a computed cell (config, split, head weights, row; complete.json last) and return its row."""
    folder.mkdir(parents=True, exist_ok=True)
    store.write_json(folder / "config.json", config)
    store.save_torch(folder / "split.pt", {"train": split[0], "val": split[1]},
                     provenance=cell_provenance("split", config))
    if head_state is not None:
        store.save_torch(folder / "head.pt", head_state, provenance=cell_provenance("head", config))
    row = {**row, "run": str(folder)}
    store.write_json(folder / "metrics.json", row)
    store.write_json(folder / store.COMPLETE, {"top1": row["top1"], "top5": row["top5"]})
    return row


def cell_provenance(kind: str, config: dict) -> dict:
    """What a cell's ``kind`` of torch file (head, checkpoint) records: the cell it belongs to."""
    return integrity.provenance(kind, method=config["method"], protocol=config["protocol"],
                                config=store.config_hash(config))


def result_row(method, protocol, head, cfg: EvalConfig, budget, seed, metrics, classes, epochs, seconds,
               history=None) -> dict:
    """One row of a results table: what was evaluated and its test metrics."""
    return {"method": method, "protocol": protocol, "head": head, "layer": cfg.layer, "budget": budget,
            "seed": seed, "top1": metrics["top1"], "top5": metrics["top5"], "epochs": epochs,
            "seconds": round(seconds, 3), "per_class": metrics["per_class"], "confusion": metrics["confusion"],
            "classes": list(classes), "history": history or []}


def budget_split(splits: DatasetSplits, budget: int, seed: int, val_per_class: int):
    """The labeled and validation indices into ``splits.train`` for one budget and seed — the
    same for every method (a paired comparison)."""
    return label_budget_split(splits.train.labels, budget, seed, val_per_class)


def repeat_to(n: int, samples: int, device) -> torch.Tensor:
    """Indices 0..n-1 repeated so one epoch holds about ``samples`` (at least n)."""
    return torch.arange(n, device=device).repeat(max(1, math.ceil(samples / n)))
