"""The probe protocol: a classifier head (mlp, linear or a kNN vote) on frozen features of a
pretrained backbone, trained on the budget's labeled images with early stopping on the
validation images. A sweep trains its heads together (:mod:`.batched_heads`)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import store
from ..pretrain import Run, load_run
from ..checkpoint import FitResult
from ..train import TrainConfig, fit, make_deterministic, resolve_device
from .batched_heads import train_heads
from .cells import (EvalConfig, budget_split, cell_config, cell_folder, check_budgets, check_seeds, computed_once,
                    finish_cell, pretrained_id, repeat_to, result_row, stored_row)
from .features import dataset_splits, run_features
from .heads import FeatureHead, knn_predict, predict
from .metrics import classification_metrics, topk_accuracy


def probe_key(run: Run, budget: int, seed: int, cfg: EvalConfig) -> dict:
    """The stored config of a probe cell (a kNN cell keeps only the kNN settings)."""
    kind = "knn" if cfg.head == "knn" else "probe"
    return cell_config(kind, run.method, run.config.dataset, budget, seed, cfg, pretrained=pretrained_id(run))


def probe_cell(run, labels: int, seed: int = 0, layer: Optional[str] = None, head: Optional[str] = None, device="auto",
               out=None, config: Optional[EvalConfig] = None, progress: bool = False,
               deterministic: bool = False) -> dict:
    """Train a ``head`` (default: ``config``'s, mlp) on frozen ``layer`` features (default:
    ``config``'s, the backbone's default layer) of ``run`` with ``labels`` images per class;
    return the test-set result row (top-1, top-5, per-class accuracy, confusion)."""
    run = run if isinstance(run, Run) else load_run(run)
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    dev = resolve_device(device)
    cfg = (config or EvalConfig()).with_(layer=layer, head=head).resolved(dev, run.arch)

    def compute(folder: Path) -> dict:
        if cfg.head == "knn":
            return _knn_cell(run, budget, seed, cfg, dev, folder)
        probe = new_probe(run, budget, seed, cfg.head, cfg, dev)
        t0 = time.perf_counter()
        result = fit(probe.model, probe.train, head_train_config(cfg, len(probe.train[0]), seed), dev,
                     validate=validator(probe.model, *probe.val, cfg.precision), progress=progress, desc="probe",
                     deterministic=deterministic, precision=cfg.precision)
        row = probe_row(probe, cfg, result, time.perf_counter() - t0, dev)
        return finish_cell(folder, probe_key(run, budget, seed, cfg), row, probe.split,
                           {"head": probe.model.state_dict()})

    return computed_once(probe_key(run, budget, seed, cfg), out, compute)


def _knn_cell(run: Run, budget: int, seed: int, cfg: EvalConfig, dev, folder: Path) -> dict:
    splits = dataset_splits(run.config)
    train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
    y = splits.train.labels.to(dev)
    feats, test_feats = _features(run, "train", cfg, dev), _features(run, "test", cfg, dev)
    t0 = time.perf_counter()
    scores = knn_predict(feats[train_idx.to(dev)], y[train_idx.to(dev)], test_feats, splits.train.num_classes,
                         cfg.knn_k, cfg.knn_temperature)
    row = result_row(run.method, "probe", "knn", cfg, budget, seed,
                     classification_metrics(scores, splits.test.labels.to(dev)), splits.train.classes, 0,
                     time.perf_counter() - t0)
    return finish_cell(folder, probe_key(run, budget, seed, cfg), row, (train_idx, val_idx))


def probe_cells_together(items: Sequence[tuple], cfg: EvalConfig, device="auto", out=None,
                         deterministic: bool = False) -> int:
    """Compute the missing probe cells among ``items`` = [(run, budget, seed, head kind)] with
    their heads trained together (:mod:`.batched_heads`), in groups of heads whose epochs have
    the same steps; each cell is stored exactly as :func:`probe_cell` stores it, so a later
    ``probe_cell`` (or a fine-tuning cell that needs the probe) finds it. ``knn`` cells are left
    to ``probe_cell``. The cells' locks are taken in a fixed order, so two processes never
    deadlock and never compute the same cell twice. Returns how many cells were computed."""
    if deterministic:
        make_deterministic()
    dev = resolve_device(device)
    wanted = {}
    for run, budget, seed, kind in items:
        if kind == "knn":
            continue
        run_cfg = replace(cfg, head=kind).resolved(dev, run.arch)
        key = probe_key(run, budget, seed, run_cfg)
        if stored_row(key, out) is None:
            wanted[str(cell_folder(key, out))] = (run, budget, seed, run_cfg, key)
    if len(wanted) < 2:
        return 0  # one cell: probe_cell is the same work
    computed = 0
    with contextlib.ExitStack() as locks:
        for folder in sorted(wanted):
            locks.enter_context(store.locked(Path(folder)))
        groups: dict = {}
        configs: dict = {}
        stats: dict = {}
        for folder in sorted(wanted):
            run, budget, seed, run_cfg, key = wanted[folder]
            if stored_row(key, out) is not None:
                continue  # another process computed it while we waited for its lock
            probe = new_probe(run, budget, seed, run_cfg.head, run_cfg, dev, stats)
            # heads train together when their settings and their epochs' shapes are the same
            shape = (repr(run_cfg), len(probe.train[0]), len(probe.val[0]), probe.train[0].shape[1])
            groups.setdefault(shape, []).append((probe, key, Path(folder)))
            configs[shape] = run_cfg
        for shape, entries in groups.items():
            run_cfg, n = configs[shape], shape[1]
            started = time.perf_counter()
            results = train_heads([p.model for p, _, _ in entries], [p.train for p, _, _ in entries],
                                  [p.val for p, _, _ in entries], head_train_config(run_cfg, n),
                                  [p.seed for p, _, _ in entries], dev, precision=run_cfg.precision)
            share = (time.perf_counter() - started) / len(entries)
            for (probe, key, folder), result in zip(entries, results):
                row = probe_row(probe, run_cfg, result, share, dev)
                row["trained_with"] = len(entries)  # heads in its batch
                finish_cell(folder, key, row, probe.split, {"head": probe.model.state_dict()})
                computed += 1
    return computed


def validator(model, inputs, targets, precision: str = "fp32"):
    """``validate`` for :func:`sslab.train.fit`: top-1 of ``model`` on the validation set."""
    def validate(m):
        return {"val_acc": topk_accuracy(predict(model, inputs, precision=precision), targets, 1)}
    return validate


@dataclass
class Probe:
    """One probe cell ready to train: its fresh head, the epoch-ordered training features and
    labels, the validation features and labels, and the split they were drawn from."""

    run: Run
    budget: int
    seed: int
    model: FeatureHead
    train: tuple
    val: tuple
    split: tuple
    classes: list


def new_probe(run: Run, budget: int, seed: int, kind: str, cfg: EvalConfig, dev,
              stats: Optional[dict] = None) -> Probe:
    """The probe cell (run, budget, seed) built the same way whether its head trains alone
    (:func:`probe_cell`) or with others (:func:`probe_cells_together`), so both start from the
    same weights and see the same data. ``stats`` caches each run's standardisation."""
    splits = dataset_splits(run.config)
    train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
    feats = _features(run, "train", cfg, dev)
    stats = {} if stats is None else stats
    if run.path.name not in stats:
        # Standardise with statistics of every train image's features: no labels involved.
        stats[run.path.name] = (feats.mean(0), feats.std(0).clamp(min=1e-6))
    mean, std = stats[run.path.name]
    y = splits.train.labels.to(dev)
    order = train_idx.to(dev)[repeat_to(len(train_idx), cfg.samples_per_epoch, dev)]
    torch.manual_seed(seed)
    model = FeatureHead(feats.shape[1], splits.train.num_classes, kind, cfg.hidden, mean, std).to(dev)
    val = val_idx.to(dev)
    return Probe(run, budget, seed, model, (feats[order], y[order]), (feats[val], y[val]),
                 (train_idx, val_idx), list(splits.train.classes))


def head_train_config(cfg: EvalConfig, samples: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(epochs=cfg.probe_epochs, batch_size=min(cfg.batch_size, samples), optimizer="adam",
                       lr=cfg.probe_lr, weight_decay=cfg.weight_decay, schedule="cosine",
                       patience=cfg.probe_patience, seed=seed)


def _features(run: Run, split: str, cfg: EvalConfig, dev) -> torch.Tensor:
    return run_features(run, split, cfg.layer, cfg.grid, dev, precision=cfg.precision)


def probe_row(probe: Probe, cfg: EvalConfig, result: FitResult, seconds: float, dev) -> dict:
    """The test-set result row of a trained probe head."""
    test_y = dataset_splits(probe.run.config).test.labels.to(dev)
    metrics = classification_metrics(predict(probe.model, _features(probe.run, "test", cfg, dev),
                                             precision=cfg.precision), test_y)
    return result_row(probe.run.method, "probe", cfg.head, cfg, probe.budget, probe.seed, metrics, probe.classes,
                      result.epochs_run, seconds, result.history)
