"""The protocols that train a whole net end to end on the budget's labeled images, with
augmentation and early stopping: the scratch baseline (random weights) and fine-tuning (the
pretrained backbone with its probe head)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .. import store
from ..data import load_dataset
from ..models import BackboneConfig, build_backbone, pooled_dim
from ..pretrain import DEFAULT_WIDTH, Run, load_run
from ..checkpoint import CHECKPOINT_EVERY_S
from ..train import TrainConfig, fit, resolve_device
from .cells import (EvalConfig, budget_split, cell_config, cell_folder, cell_provenance, check_budgets, check_seeds,
                    computed_once, finish_cell, pretrained_id, repeat_to, result_row)
from .features import dataset_splits, run_features
from .heads import FeatureHead, ImageClassifier, predict, trainable_spread
from .metrics import classification_metrics
from .probe import probe_cell, probe_key, validator


def scratch_key(dataset: str, budget: int, seed: int, cfg: EvalConfig, width: float,
                image_size: Optional[int], arch: str = "alexnet") -> dict:
    return cell_config("scratch", "scratch", dataset, budget, seed, cfg, width=width, image_size=image_size,
                       backbone=arch)


def finetune_key(run: Run, budget: int, seed: int, cfg: EvalConfig) -> dict:
    return cell_config("finetune", run.method, run.config.dataset, budget, seed, replace(cfg, head="mlp"),
                       pretrained=pretrained_id(run))


def scratch_cell(dataset: str, labels: int, seed: int = 0, like: Optional[Run] = None, width: Optional[float] = None,
                 image_size: Optional[int] = None, layer: Optional[str] = None, device="auto", out=None,
                 config: Optional[EvalConfig] = None, data_root: Optional[str] = None, progress: bool = False,
                 deterministic: bool = False, arch: str = "alexnet") -> dict:
    """The supervised baseline: the same backbone (shaped ``like`` a pretrained run, or ``arch``
    at ``width``), randomly initialised, with the same classifier head, trained end to end on the
    same labeled images with the same augmentation, schedule and early stopping."""
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    dev = resolve_device(device)
    if like is not None:
        dataset, data_root = like.config.dataset, like.config.data_root
        width, image_size, arch = like.config.width, like.config.image_size, like.arch
    cfg = (config or EvalConfig()).with_(layer=layer).resolved(dev, arch)
    width = float(width or DEFAULT_WIDTH.get(dev.type, 1.0))
    key = scratch_key(dataset, budget, seed, cfg, width, image_size, arch)

    def compute(folder: Path) -> dict:
        splits = load_dataset(dataset, data_root, image_size)
        torch.manual_seed(seed)
        backbone = build_backbone(BackboneConfig(splits.train.channels, splits.train.image_size, width, arch))
        head = FeatureHead(pooled_dim(backbone, cfg.layer, cfg.grid), splits.train.num_classes, "mlp", cfg.hidden)
        model = ImageClassifier(backbone, head, cfg.layer, cfg.grid).to(dev)
        train = TrainConfig(epochs=cfg.scratch_epochs, lr=cfg.scratch_lr, patience=cfg.scratch_patience)
        return train_end_to_end(model, splits, "scratch", "scratch", cfg, budget, seed, train, None, folder, key,
                                dev, progress, deterministic)

    return computed_once(key, out, compute)


def finetune_cell(run, labels: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                  config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Fine-tuning: the pretrained backbone plus its trained ``mlp`` probe head (trained first if
    missing), trained together with a small learning rate, the backbone ``backbone_lr_scale``
    times slower than the head, ``finetune_epochs`` (15, as in the study) with early stopping."""
    run = run if isinstance(run, Run) else load_run(run)
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    dev = resolve_device(device)
    cfg = (config or EvalConfig()).with_(layer=layer, head="mlp").resolved(dev, run.arch)
    key = finetune_key(run, budget, seed, cfg)

    def compute(folder: Path) -> dict:
        splits = dataset_splits(run.config)
        model = classifier_from_probe(run, budget, seed, cfg, dev, out, deterministic)
        # The augmentation draws from torch's global generator: seed it here, or the result would
        # depend on whether the probe head above was trained just now or found stored.
        torch.manual_seed(seed)
        groups = [{"params": list(model.backbone.parameters()), "lr_scale": cfg.backbone_lr_scale},
                  {"params": list(model.head.parameters()), "lr_scale": 1.0}]
        train = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, patience=cfg.finetune_patience)
        return train_end_to_end(model, splits, run.method, "finetune", cfg, budget, seed, train, groups, folder, key,
                                dev, progress, deterministic)

    return computed_once(key, out, compute)


def classifier_from_probe(run: Run, budget: int, seed: int, cfg: EvalConfig, dev, out, deterministic: bool = False
                          ) -> ImageClassifier:
    """``run``'s backbone with the mlp head of its probe cell at this budget and seed (trained
    first if missing): how fine-tuning and FixMatch start, the head already reading the
    backbone's features."""
    probe_cell(run, budget, seed, device=dev, out=out, config=replace(cfg, head="mlp"), deterministic=deterministic)
    splits = dataset_splits(run.config)
    feats = run_features(run, "train", cfg.layer, cfg.grid, dev, precision=cfg.precision)
    head = FeatureHead(feats.shape[1], splits.train.num_classes, "mlp", cfg.hidden).to(dev)
    # The probe's folder under this ``out`` (its row holds the path it was computed at, which a
    # copied or merged store no longer has), and the head that cell recorded making.
    key = probe_key(run, budget, seed, replace(cfg, head="mlp"))
    head.load_state_dict(store.load_torch(cell_folder(key, out) / "head.pt", map_location=dev,
                                          expect=cell_provenance("head", key))["head"])
    head.std.copy_(trainable_spread(head.std))
    return ImageClassifier(run.load_backbone(dev), head, cfg.layer, cfg.grid).to(dev)


def train_end_to_end(model: ImageClassifier, splits, method: str, protocol: str, cfg: EvalConfig, budget: int,
                     seed: int, schedule: TrainConfig, groups, folder: Path, key: dict, dev, progress: bool,
                     deterministic: bool = False) -> dict:
    """Train ``model`` end to end on the budget's labeled images (an epoch = about
    ``samples_per_epoch`` augmented views) with Adam and cosine decay over ``schedule.epochs``
    at peak ``schedule.lr``, early stopping after ``schedule.patience`` epochs; store the cell
    (it resumes from its checkpoint when interrupted) and return its row."""
    train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
    images = splits.train.images.to(dev)
    y = splits.train.labels.to(dev)
    tr, va = train_idx.to(dev), val_idx.to(dev)
    order = tr[repeat_to(len(tr), cfg.samples_per_epoch, dev)]
    train_cfg = TrainConfig(epochs=schedule.epochs, batch_size=min(cfg.batch_size, len(order)), optimizer="adam",
                            lr=schedule.lr, weight_decay=cfg.weight_decay, schedule="cosine",
                            patience=schedule.patience, seed=seed)
    t0 = time.perf_counter()
    result = fit(model, (images[order], y[order]), train_cfg, dev, param_groups=groups,
                 validate=validator(model, images[va], y[va], cfg.precision), progress=progress, desc=protocol,
                 checkpoint=folder / "checkpoint.pt", deterministic=deterministic,
                 checkpoint_every=CHECKPOINT_EVERY_S, checkpoint_last=False, precision=cfg.precision,
                 provenance=cell_provenance("checkpoint", key))
    metrics = classification_metrics(predict(model, splits.test.images.to(dev), precision=cfg.precision),
                                     splits.test.labels.to(dev))
    row = result_row(method, protocol, "mlp", cfg, budget, seed, metrics, splits.train.classes, result.epochs_run,
                     time.perf_counter() - t0, result.history)
    row = finish_cell(folder, key, row, (train_idx, val_idx))
    store.remove(folder / "checkpoint.pt")
    return row
