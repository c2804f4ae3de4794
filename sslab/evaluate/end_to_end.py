"""The protocols that train a whole net end to end on the budget's labeled images, with
augmentation and early stopping: the scratch baseline (random weights) and fine-tuning (the
pretrained backbone with its probe head)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..models import BackboneConfig, build_backbone, pooled_dim
from ..train import TrainConfig
from .cells import Cell, EvalConfig, open_cell, repeat_to
from .heads import FeatureHead, ImageClassifier, predict, trainable_spread
from .probe import trained_probe, validator


def scratch_cell(like, budget: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                 config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """The supervised baseline: the backbone of the pretrained run ``like`` (its architecture,
    width and input size, on its dataset), randomly initialised, with the same classifier head,
    trained end to end on the same labeled images with the same augmentation, schedule and early
    stopping."""
    return open_cell("scratch", like, budget, seed, layer, None, device, out, config, progress,
                     deterministic).computed(compute_scratch)


def compute_scratch(cell: Cell) -> dict:
    cfg, splits = cell.cfg, cell.splits
    torch.manual_seed(cell.seed)
    backbone = build_backbone(BackboneConfig(splits.train.channels, splits.train.image_size, cell.run.config.width,
                                             cell.run.arch))
    head = FeatureHead(pooled_dim(backbone, cfg.layer, cfg.grid), splits.train.num_classes, "mlp", cfg.hidden)
    model = ImageClassifier(backbone, head, cfg.layer, cfg.grid).to(cell.device)
    return train_end_to_end(cell, model, cfg.scratch_epochs, cfg.scratch_lr, cfg.scratch_patience)


def finetune_cell(run, budget: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                  config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Fine-tuning: the pretrained backbone plus its trained ``mlp`` probe head (trained first if
    missing), trained together with a small learning rate, the backbone ``backbone_lr_scale``
    times slower than the head, ``finetune_epochs`` (15, as in the study) with early stopping."""
    return open_cell("finetune", run, budget, seed, layer, None, device, out, config, progress,
                     deterministic).computed(compute_finetune)


def compute_finetune(cell: Cell) -> dict:
    model = classifier_from_probe(cell)
    # The augmentation draws from torch's global generator: seed it here, or the result would
    # depend on whether the probe head above was trained just now or found stored.
    torch.manual_seed(cell.seed)
    groups = [{"params": list(model.backbone.parameters()), "lr_scale": cell.cfg.backbone_lr_scale},
              {"params": list(model.head.parameters()), "lr_scale": 1.0}]
    return train_end_to_end(cell, model, cell.cfg.finetune_epochs, cell.cfg.finetune_lr, cell.cfg.finetune_patience,
                            groups)


def classifier_from_probe(cell: Cell) -> ImageClassifier:
    """The cell's run's backbone with the mlp head of its probe cell at this budget and seed (trained
    first if missing): how fine-tuning and FixMatch start, the head already reading the backbone's
    features."""
    return ImageClassifier(cell.run.load_backbone(cell.device), probe_head_to_train(cell), cell.cfg.layer,
                           cell.cfg.grid).to(cell.device)


def probe_head_to_train(cell: Cell) -> FeatureHead:
    """The mlp head of the cell's probe cell (:func:`.probe.trained_probe`) with its spreads floored
    (:func:`.heads.trainable_spread`), to train on with a backbone that trains too."""
    head = trained_probe(cell)
    head.std.copy_(trainable_spread(head.std))
    return head


def train_end_to_end(cell: Cell, model: ImageClassifier, epochs: int, lr: float, patience: int,
                     param_groups=None) -> dict:
    """Train ``model`` end to end on the cell's labeled images (an epoch = about
    ``samples_per_epoch`` augmented views) with Adam and cosine decay over ``epochs`` at peak
    ``lr``, early stopping after ``patience`` epochs without a better validation score; store the
    cell (it resumes from its checkpoint when interrupted) and return its row."""
    cfg, dev = cell.cfg, cell.device
    train_idx, val_idx = cell.labeled_split()
    images = cell.splits.train.images.to(dev)
    y = cell.splits.train.labels.to(dev)
    tr, va = train_idx.to(dev), val_idx.to(dev)
    order = tr[repeat_to(len(tr), cfg.samples_per_epoch, dev)]
    train_config = TrainConfig(epochs=epochs, batch_size=min(cfg.batch_size, len(order)), optimizer="adam", lr=lr,
                               weight_decay=cfg.weight_decay, schedule="cosine", patience=patience, seed=cell.seed)
    t0 = time.perf_counter()
    result = cell.train(model, (images[order], y[order]), train_config,
                        validate=validator(model, images[va], y[va], cfg.precision), param_groups=param_groups)
    scores = predict(model, cell.splits.test.images.to(dev), precision=cfg.precision)
    row = cell.row(scores, "mlp", result.epochs_run, time.perf_counter() - t0, result.history)
    return cell.finish(row, (train_idx, val_idx))
