"""The probe protocol: a classifier head (mlp, linear or a kNN vote) on frozen features of a
pretrained backbone, trained on the budget's labeled images with early stopping on the
validation images. A sweep trains its heads together (:mod:`.batched_heads`)."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import store
from ..checkpoint import FitResult
from ..models import knn_predict
from ..train import TrainConfig, fit, make_deterministic
from .batched_heads import train_heads
from .cells import Cell, EvalConfig, cell_folder, cell_provenance, open_cell, protocol_key, repeat_to, stored_row
from .heads import FeatureHead, predict
from .metrics import topk_accuracy


def probe_cell(run, budget: int, seed: int = 0, layer: Optional[str] = None, head: Optional[str] = None,
               device="auto", out=None, config: Optional[EvalConfig] = None, progress: bool = False,
               deterministic: bool = False) -> dict:
    """Train a ``head`` (default: ``config``'s, mlp) on frozen ``layer`` features (default:
    ``config``'s, the backbone's default layer) of ``run`` with ``budget`` labeled images per class;
    return the test-set result row (top-1, top-5, per-class accuracy, confusion)."""
    return open_cell("probe", run, budget, seed, layer, head, device, out, config, progress,
                     deterministic).computed(compute_probe)


def compute_probe(cell: Cell) -> dict:
    """The probe's algorithm: a kNN vote, or a head trained on the labeled images' features with
    early stopping on the validation images."""
    if cell.cfg.head == "knn":
        return _knn(cell)
    probe = new_probe(cell)
    t0 = time.perf_counter()
    result = fit(probe.model, probe.train, head_train_config(cell.cfg, len(probe.train[0]), cell.seed), cell.device,
                 validate=validator(probe.model, *probe.val, cell.cfg.precision), progress=cell.progress,
                 desc="probe", deterministic=cell.deterministic, precision=cell.cfg.precision)
    row = probe_row(probe, result, time.perf_counter() - t0)
    return cell.finish(row, probe.split, {"head": probe.model.state_dict()})


def _knn(cell: Cell) -> dict:
    train_idx, val_idx = cell.labeled_split()
    y = cell.splits.train.labels.to(cell.device)
    t0 = time.perf_counter()
    scores = knn_predict(cell.features("train", train_idx), y[train_idx.to(cell.device)],
                         cell.features("test"), cell.splits.train.num_classes, cell.cfg.knn_k,
                         cell.cfg.knn_temperature)
    return cell.finish(cell.row(scores, "knn", 0, time.perf_counter() - t0), (train_idx, val_idx))


def probe_cells_together(items: Sequence[tuple], cfg: EvalConfig, device="auto", out=None,
                         deterministic: bool = False) -> int:
    """Compute the missing probe cells among ``items`` = [(run, budget, seed, head kind)] — or
    [(run, budget, seed, head kind, settings)] where the cells differ in settings that do not
    change how a head trains, such as the selection of their labeled images — with their heads
    trained together (:mod:`.batched_heads`), in groups of heads that train alike and whose epochs
    have the same steps; each cell is stored exactly as :func:`probe_cell` stores it, so a later
    ``probe_cell`` (or a fine-tuning cell that needs the probe) finds it. ``knn`` cells are left
    to ``probe_cell``. The cells' locks are taken in a fixed order, so two processes never
    deadlock and never compute the same cell twice. Returns how many cells were computed."""
    if deterministic:
        make_deterministic()
    wanted = {}
    for run, budget, seed, kind, *settings in items:
        if kind == "knn":
            continue
        cell = open_cell("probe", run, budget, seed, head=kind, device=device, out=out,
                         config=settings[0] if settings else cfg, deterministic=deterministic)
        if stored_row(cell.key, out) is None:
            cell.folder = cell_folder(cell.key, out)
            wanted[str(cell.folder)] = cell
    if len(wanted) < 2:
        return 0  # one cell: probe_cell is the same work
    computed = 0
    with contextlib.ExitStack() as locks:
        for folder in sorted(wanted):
            locks.enter_context(store.locked(Path(folder)))
        groups: dict = {}
        stats: dict = {}
        for folder in sorted(wanted):
            cell = wanted[folder]
            if stored_row(cell.key, out) is not None:
                continue  # another process computed it while we waited for its lock
            probe = new_probe(cell, stats)
            # heads train together when they train alike (the same schedule, head, precision) and
            # their epochs have the same shapes
            n = len(probe.train[0])
            shape = (repr(head_train_config(cell.cfg, n)), cell.cfg.head, cell.cfg.hidden, cell.cfg.precision, n,
                     len(probe.val[0]), probe.train[0].shape[1])
            groups.setdefault(shape, []).append((probe, cell))
        for shape, entries in groups.items():
            first = entries[0][1]
            started = time.perf_counter()
            results = train_heads([p.model for p, _ in entries], [p.train for p, _ in entries],
                                  [p.val for p, _ in entries], head_train_config(first.cfg, shape[4]),
                                  [p.seed for p, _ in entries], first.device, precision=first.cfg.precision)
            share = (time.perf_counter() - started) / len(entries)
            for (probe, cell), result in zip(entries, results):
                row = probe_row(probe, result, share)
                row["trained_with"] = len(entries)  # heads in its batch
                cell.finish(row, probe.split, {"head": probe.model.state_dict()})
                computed += 1
    return computed


def validator(model, inputs, targets, precision: str = "fp32"):
    """``validate`` for :func:`sslab.train.fit`: top-1 of ``model`` on the validation set; None
    when there is no validation image (``val_per_class`` 0: the run keeps its last epoch)."""
    if len(targets) == 0:
        return None

    def validate(m):
        return {"val_acc": topk_accuracy(predict(model, inputs, precision=precision), targets, 1)}
    return validate


@dataclass
class Probe:
    """One probe cell ready to train: its fresh head, the epoch-ordered training features and
    labels, the validation features and labels, and the split they were drawn from."""

    cell: Cell
    model: FeatureHead
    train: tuple
    val: tuple
    split: tuple

    @property
    def seed(self) -> int:
        return self.cell.seed


def new_probe(cell: Cell, stats: Optional[dict] = None, split: Optional[tuple] = None) -> Probe:
    """The probe of ``cell`` built the same way whether its head trains alone (:func:`probe_cell`)
    or with others (:func:`probe_cells_together`), so both start from the same weights and see the
    same data. ``stats`` caches each run's standardisation. ``split``: (train, validation) indices
    other than the cell's own (the held-out splits of :mod:`.choice`)."""
    train_idx, val_idx = split if split is not None else cell.labeled_split()
    dev = cell.device
    train, val = cell.features("train", train_idx), cell.features("train", val_idx)
    # Standardised with the pool's statistics: no labels involved.
    mean, std = cell.pool_statistics()
    y = cell.splits.train.labels
    order = repeat_to(len(train_idx), cell.cfg.samples_per_epoch, dev)
    torch.manual_seed(cell.seed)
    model = FeatureHead(train.shape[1], cell.splits.train.num_classes, cell.cfg.head, cell.cfg.hidden, mean,
                        std).to(dev)
    return Probe(cell, model, (train[order], y[train_idx].to(dev)[order]), (val, y[val_idx].to(dev)),
                 (train_idx, val_idx))


def head_train_config(cfg: EvalConfig, samples: int, seed: int = 0) -> TrainConfig:
    """How a probe head trains; without validation images it runs every epoch (no early stopping)."""
    return TrainConfig(epochs=cfg.probe_epochs, batch_size=min(cfg.batch_size, samples), optimizer="adam",
                       lr=cfg.probe_lr, weight_decay=cfg.weight_decay, schedule="cosine",
                       patience=cfg.probe_patience if cfg.val_per_class else 0, seed=seed)


def probe_row(probe: Probe, result: FitResult, seconds: float) -> dict:
    """The test-set result row of a trained probe head."""
    cell = probe.cell
    scores = predict(probe.model, cell.features("test"), precision=cell.cfg.precision)
    return cell.row(scores, cell.cfg.head, result.epochs_run, seconds, result.history)


def trained_probe(cell: Cell) -> FeatureHead:
    """The mlp head of the probe cell at ``cell``'s run, budget, seed and labeled images (computed
    first if missing), loaded from the head that cell recorded making, in eval mode: what
    fine-tuning and FixMatch start from, and what label propagation and self-training weigh
    against the graph."""
    probe_cfg = replace(cell.cfg, head="mlp")
    probe_cell(cell.run, cell.budget, cell.seed, device=cell.device, out=cell.out, config=probe_cfg,
               deterministic=cell.deterministic)
    head = FeatureHead(cell.features("test").shape[1], cell.splits.train.num_classes, "mlp",
                       cell.cfg.hidden).to(cell.device)
    # The probe's folder under this ``out`` (its row holds the path it was computed at, which a
    # copied or merged store no longer has), and the head that cell recorded making.
    key = protocol_key("probe", cell.run, cell.budget, cell.seed, probe_cfg)
    head.load_state_dict(store.load_torch(cell_folder(key, cell.out) / "head.pt", map_location=cell.device,
                                          expect=cell_provenance("head", key))["head"])
    return head.eval()


def probe_probabilities(head: FeatureHead, features: torch.Tensor, precision: str) -> torch.Tensor:
    """The probe's class probabilities (softmax of its logits) for frozen features N×D."""
    return predict(head, features, precision=precision).softmax(1)


def chosen_on_validation(candidates: dict, val_labels: torch.Tensor, default=None, margin: float = 0.0) -> tuple:
    """``(name, validation accuracy)`` of the candidate whose class scores classify the validation
    images best: ``candidates`` maps a name to its validation scores (V×classes), in order of
    preference — a tie goes to the earlier one, and without validation images (V = 0) the first
    is taken (accuracy None).

    With a ``default`` candidate (a protocol's probe) and ``margin`` > 0, the best is taken over
    the default only where the validation images say so beyond chance: paired on the images, with
    ``wins`` the images the best classifies right and the default wrong and ``losses`` the
    reverse, the best is kept when ``wins − losses > margin · √(wins + losses)`` (a sign test: the
    difference in units of its standard error when the two are equally good), else the default.
    A hundred validation images cannot tell apart candidates a few tenths of a point apart, and
    taking the higher count then picks by chance, below the default as often as above it."""
    if len(val_labels) == 0:
        return next(iter(candidates)), None
    best, best_accuracy = None, -1.0
    for name, scores in candidates.items():
        accuracy = float((scores.argmax(1) == val_labels).float().mean())
        if accuracy > best_accuracy:
            best, best_accuracy = name, accuracy
    if margin > 0 and default is not None and default in candidates and best != default:
        right = candidates[best].argmax(1) == val_labels
        right_default = candidates[default].argmax(1) == val_labels
        wins, losses = int((right & ~right_default).sum()), int((~right & right_default).sum())
        if wins - losses <= margin * math.sqrt(wins + losses):
            return default, float(right_default.float().mean())
    return best, best_accuracy

