"""The fixmatch protocol: FixMatch (Sohn et al., NeurIPS 2020, "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence").

The classifier (a backbone, pretrained or random-init, with the lab's head, started from the
method's probe head as fine-tuning is) trains end to end on the budget's labeled images and the
run's unlabeled pool at once: cross-entropy on weakly augmented labeled images, plus, for μ
unlabeled images per labeled one, the prediction on a weak view (flip + shift) taken as a hard
label for a strong view (RandAugment + Cutout, :func:`sslab.augment.rand_augment`) wherever it
is confident (≥ τ). An exponential moving average of the weights is what is validated and
tested. Training runs in :func:`sslab.train.fit` (resumable, early stopping on the validation
images), one step per μB unlabeled images.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import store
from ..augment import rand_augment, random_affine, to_float
from ..pretrain import Run, load_run
from ..checkpoint import CHECKPOINT_EVERY_S
from ..train import TrainConfig, fit, resolve_device
from .cells import (EvalConfig, budget_split, cell_config, cell_provenance, check_budgets, check_seeds, computed_once,
                    finish_cell, pretrained_id, result_row)
from .end_to_end import classifier_from_probe
from .features import dataset_splits
from .heads import ImageClassifier, predict
from .labelprop import pool_images
from .metrics import classification_metrics
from .probe import validator


def fixmatch_unlabeled_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                            threshold: float = 0.95) -> tuple:
    """FixMatch's unlabeled loss (eq. 4): where the weak view's largest softmax probability is
    ≥ ``threshold`` (τ), its argmax is the hard label of the strong view. logits_weak and
    logits_strong: N×C for the same N unlabeled images. Returns (loss, mask): the cross-entropy
    averaged over **all** N images, those under the threshold counting 0 (the paper's
    1/(μB) Σ 1[max q ≥ τ] H(q̂, p)), and the 0/1 mask N. No gradient reaches the weak branch."""
    with torch.no_grad():
        confidence, pseudo = logits_weak.detach().float().softmax(1).max(1)
        mask = (confidence >= threshold).float()
    per_image = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
    return (per_image * mask).mean(), mask


def weak_view(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FixMatch's weak augmentation: a flip with probability ½ and a whole-pixel shift of up to
    12.5 % of the size, zeros coming in at the edges. Float N×C×H×W → the same."""
    return random_affine(x, flip_p=0.5, shift=max(1, round(0.125 * x.shape[-1])), generator=generator)


class ModelEMA(nn.Module):
    """An exponential moving average of a model's weights (FixMatch §4 evaluates one); its
    BatchNorm buffers are copied from the model, not averaged. ``module`` is the averaged copy."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            averaged[name].lerp_(p.detach(), 1 - self.decay)
        buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            buffers[name].copy_(b)


class FixMatch(nn.Module):
    """The FixMatch step as a model for :func:`fit`: ``loss(unlabeled uint8 μB×C×H×W)`` draws B
    labeled images itself (torch's generator, which fit's checkpoints keep) and returns the loss
    with its parts: ``sup``, ``unsup`` and ``mask`` (the share of unlabeled images above τ).
    The EMA takes each step's weights at the start of the next step."""

    def __init__(self, classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int,
                 threshold: float, weight: float, ema: float):
        super().__init__()
        self.classifier = classifier
        self.ema = ModelEMA(classifier, ema)
        self.register_buffer("labeled_images", images)
        self.register_buffer("labeled_labels", labels)
        self.batch, self.threshold, self.weight = batch, threshold, weight

    def loss(self, unlabeled: torch.Tensor) -> dict:
        self.ema.update(self.classifier)
        pick = torch.randint(len(self.labeled_labels), (self.batch,), device=unlabeled.device)
        labeled = weak_view(to_float(self.labeled_images[pick]))
        u = to_float(unlabeled)
        with torch.no_grad():
            logits_weak = self.classifier(weak_view(u))
        logits = self.classifier(torch.cat([labeled, rand_augment(weak_view(u))]))
        sup = F.cross_entropy(logits[:self.batch].float(), self.labeled_labels[pick])
        unsup, mask = fixmatch_unlabeled_loss(logits_weak, logits[self.batch:], self.threshold)
        return {"loss": sup + self.weight * unsup, "sup": sup.detach(), "unsup": unsup.detach(),
                "mask": mask.mean()}


def fixmatch_key(run: Run, budget: int, seed: int, cfg: EvalConfig) -> dict:
    return cell_config("fixmatch", run.method, run.config.dataset, budget, seed, cfg, pretrained=pretrained_id(run))


def fixmatch_cell(run, labels: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                  config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """FixMatch from ``run``'s backbone (and its probe head) with ``labels`` images per class and
    the run's unlabeled pool; ``fm_steps`` steps of ``fm_batch`` labeled and ``fm_mu`` ×
    ``fm_batch`` unlabeled images; SGD with Nesterov momentum, cosine decay. Returns the test row
    of the weights' moving average at its best validation epoch."""
    run = run if isinstance(run, Run) else load_run(run)
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    dev = resolve_device(device)
    cfg = (config or EvalConfig()).with_(layer=layer, head="mlp").resolved(dev, run.arch)
    key = fixmatch_key(run, budget, seed, cfg)

    def compute(folder: Path) -> dict:
        t0 = time.perf_counter()
        splits = dataset_splits(run.config)
        train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
        classifier = classifier_from_probe(run, budget, seed, cfg, dev, out, deterministic)
        pool = pool_images(run, (train_idx, val_idx)).to(dev)
        images, y = splits.train.images.to(dev), splits.train.labels.to(dev)
        tr, va = train_idx.to(dev), val_idx.to(dev)
        torch.manual_seed(seed)  # the labeled draws and augmentations, whether the probe was just trained or found
        model = FixMatch(classifier, images[tr], y[tr], cfg.fm_batch, cfg.fm_threshold, cfg.fm_weight, cfg.fm_ema)
        unlabeled_per_step = cfg.fm_batch * cfg.fm_mu
        epochs = max(1, math.ceil(cfg.fm_steps * unlabeled_per_step / len(pool)))
        schedule = TrainConfig(epochs=epochs, batch_size=unlabeled_per_step, optimizer="sgd", lr=cfg.fm_lr,
                               momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay, schedule="cosine",
                               patience=epochs, seed=seed)
        groups = [{"params": list(classifier.backbone.parameters()), "lr_scale": 1.0},
                  {"params": list(classifier.head.parameters()), "lr_scale": 1.0}]
        result = fit(model, (pool,), schedule, dev, param_groups=groups,
                     validate=validator(model.ema.module, images[va], y[va], cfg.precision), progress=progress,
                     desc="fixmatch", checkpoint=folder / "checkpoint.pt", deterministic=deterministic,
                     checkpoint_every=CHECKPOINT_EVERY_S, checkpoint_last=False, precision=cfg.precision,
                     provenance=cell_provenance("checkpoint", key))
        test = predict(model.ema.module, splits.test.images.to(dev), precision=cfg.precision)
        row = result_row(run.method, "fixmatch", "mlp", cfg, budget, seed,
                         classification_metrics(test, splits.test.labels.to(dev)), splits.train.classes,
                         result.epochs_run, time.perf_counter() - t0, result.history)
        row = finish_cell(folder, key, row, (train_idx, val_idx))
        store.remove(folder / "checkpoint.pt")
        return row

    return computed_once(key, out, compute)
