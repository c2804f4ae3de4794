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

τ is FixMatch's fixed 0.95 (``fm_threshold_mode="fixed"``) or FreeMatch's self-adaptive threshold
(``"freematch"``, :class:`SelfAdaptiveThreshold`): in a run of a few hundred steps from a probe
head, few pool images pass a fixed 0.95 early, and the adaptive threshold starts low and rises
with the model's confidence. FreeMatch rather than FlexMatch (Zhang et al., NeurIPS 2021): its
state is C + 1 numbers estimated from each step's batch, where FlexMatch's curriculum keeps
every pool image's latest prediction (state the size of the pool, indexed by image).

The starting classifier is a candidate too: it is scored on the validation images before the
first step and kept when no epoch's average beats it, so a cell never ends below its start on
the validation images (the row's ``kept``: ``"start"``, the epoch kept, or ``"last"`` without
validation images).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import rand_augment, random_affine, to_float
from ..checkpoint import START_EPOCH, FitResult
from ..train import TrainConfig
from .cells import Cell, EvalConfig, open_cell
from .end_to_end import classifier_from_probe
from .heads import ImageClassifier, predict
from .pool import pool_images
from .probe import validator


def fixmatch_unlabeled_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                            threshold: Union[float, torch.Tensor] = 0.95) -> tuple:
    """FixMatch's unlabeled loss (eq. 4): where the weak view's largest softmax probability is
    ≥ ``threshold`` (τ), its argmax is the hard label of the strong view. logits_weak and
    logits_strong: N×C for the same N unlabeled images; ``threshold``: one τ, or C of them, one
    per class (FreeMatch's τ_t(c)), an image then held to the τ of its argmax. Returns (loss,
    mask): the cross-entropy averaged over **all** N images, those under the threshold counting 0
    (the paper's 1/(μB) Σ 1[max q ≥ τ] H(q̂, p)), and the 0/1 mask N. No gradient reaches the
    weak branch."""
    with torch.no_grad():
        confidence, pseudo = logits_weak.detach().float().softmax(1).max(1)
        limit = threshold[pseudo] if torch.is_tensor(threshold) else threshold
        mask = (confidence >= limit).float()
    per_image = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
    return (per_image * mask).mean(), mask


def weak_view(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FixMatch's weak augmentation: a flip with probability ½ and a whole-pixel shift of up to
    12.5 % of the size, zeros coming in at the edges. Float N×C×H×W → the same."""
    return random_affine(x, flip_p=0.5, shift=max(1, round(0.125 * x.shape[-1])), generator=generator)


class SelfAdaptiveThreshold(nn.Module):
    """FreeMatch's self-adaptive threshold (Wang et al., ICLR 2023, "FreeMatch: Self-adaptive
    Thresholding for Semi-supervised Learning", eq. 5–9). Each step, from the softmax q of
    the unlabeled batch's weak views (μB×C), with momentum λ:

    - the global threshold τ_t = λ τ_{t−1} + (1 − λ) · mean_b max_c q_b(c), with τ_0 = 1/C;
    - the class-wise expectation p̃_t(c) = λ p̃_{t−1}(c) + (1 − λ) · mean_b q_b(c), with
      p̃_0(c) = 1/C;
    - the class thresholds τ_t(c) = p̃_t(c) / max_c′ p̃_t(c′) · τ_t, an image passing
      where max q ≥ τ_t(argmax q).

    The thresholds are updated with the batch before its mask is taken. τ_t and p̃_t are buffers
    (``global_threshold``, ``class_expectation``), so they are in the state a checkpoint keeps and
    a resumed run goes on from them."""

    def __init__(self, classes: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("global_threshold", torch.tensor(1.0 / classes))
        self.register_buffer("class_expectation", torch.full((classes,), 1.0 / classes))

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> torch.Tensor:
        """Take one batch's weak-view probabilities (N×C) into τ_t and p̃_t; returns τ_t(c) (C)."""
        probs = probs.detach().float()
        keep, take = self.momentum, 1.0 - self.momentum
        self.global_threshold.mul_(keep).add_(take * probs.max(1).values.mean())
        self.class_expectation.mul_(keep).add_(take * probs.mean(0))
        return self.class_thresholds()

    def class_thresholds(self) -> torch.Tensor:
        """τ_t(c) = p̃_t(c) / max p̃_t · τ_t: the most expected class at τ_t, the others below it."""
        return self.class_expectation / self.class_expectation.max() * self.global_threshold


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
    with its parts: ``sup``, ``unsup`` and ``mask`` (the share of unlabeled images above τ), and
    with an adaptive threshold ``tau`` (its global τ_t after the step's update).
    ``threshold``: the fixed τ, or a :class:`SelfAdaptiveThreshold` (a submodule, so its state is
    in this model's). The EMA takes each step's weights at the start of the next step."""

    def __init__(self, classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int,
                 threshold: Union[float, SelfAdaptiveThreshold], weight: float, ema: float):
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
        adaptive = isinstance(self.threshold, SelfAdaptiveThreshold)
        threshold = self.threshold.update(logits_weak.float().softmax(1)) if adaptive else self.threshold
        logits = self.classifier(torch.cat([labeled, rand_augment(weak_view(u))]))
        sup = F.cross_entropy(logits[:self.batch].float(), self.labeled_labels[pick])
        unsup, mask = fixmatch_unlabeled_loss(logits_weak, logits[self.batch:], threshold)
        out = {"loss": sup + self.weight * unsup, "sup": sup.detach(), "unsup": unsup.detach(), "mask": mask.mean()}
        if adaptive:
            out["tau"] = self.threshold.global_threshold.clone()
        return out


def fixmatch_cell(run, budget: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                  config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """FixMatch from ``run``'s backbone (and its probe head) with ``budget`` labeled images per
    class and the run's unlabeled pool; ``fm_steps`` steps of ``fm_batch`` labeled and ``fm_mu`` ×
    ``fm_batch`` unlabeled images; SGD with Nesterov momentum, cosine decay; the threshold of
    ``fm_threshold_mode``. Returns the test row of the weights' moving average at its best
    validation epoch, or of the start where no epoch beats it (``kept`` says which)."""
    return open_cell("fixmatch", run, budget, seed, layer, None, device, out, config, progress,
                     deterministic).computed(compute_fixmatch)


def compute_fixmatch(cell: Cell) -> dict:
    cfg, dev, splits = cell.cfg, cell.device, cell.splits
    t0 = time.perf_counter()
    train_idx, val_idx = cell.labeled_split()
    classifier = classifier_from_probe(cell)
    pool = pool_images(cell.run, (train_idx, val_idx)).to(dev)
    images, y = splits.train.images.to(dev), splits.train.labels.to(dev)
    tr, va = train_idx.to(dev), val_idx.to(dev)
    torch.manual_seed(cell.seed)  # the labeled draws and augmentations, whether the probe was just trained or found
    threshold = cfg.fm_threshold if cfg.fm_threshold_mode == "fixed" else \
        SelfAdaptiveThreshold(splits.train.num_classes, cfg.fm_sat_momentum).to(dev)
    model = FixMatch(classifier, images[tr], y[tr], cfg.fm_batch, threshold, cfg.fm_weight, cfg.fm_ema)
    unlabeled_per_step = cfg.fm_batch * cfg.fm_mu
    epochs = max(1, math.ceil(cfg.fm_steps * unlabeled_per_step / len(pool)))
    train_config = TrainConfig(epochs=epochs, batch_size=unlabeled_per_step, optimizer="sgd", lr=cfg.fm_lr,
                               momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay, schedule="cosine",
                               patience=epochs, seed=cell.seed, warmup_epochs=cfg.fm_warmup)
    groups = [{"params": list(classifier.backbone.parameters()), "lr_scale": cfg.fm_backbone_lr_scale},
              {"params": list(classifier.head.parameters()), "lr_scale": 1.0}]
    validate = validator(model.ema.module, images[va], y[va], cfg.precision)
    # The start (the probe head on the backbone; the average is its copy) is scored too, and kept
    # when no epoch beats it: patience = epochs, so fit restores whichever scored best.
    result = cell.train(model, (pool,), train_config, param_groups=groups, validate=validate, validate_start=True)
    scores = predict(model.ema.module, splits.test.images.to(dev), precision=cfg.precision)
    row = cell.row(scores, "mlp", result.epochs_run, time.perf_counter() - t0, result.history)
    row["fm_threshold_mode"] = cfg.fm_threshold_mode
    row["kept"] = kept(result, validated=validate is not None)
    if result.start_metric is not None:
        row["start_val_acc"] = result.start_metric
    return cell.finish(row, (train_idx, val_idx))


def kept(result: FitResult, validated: bool):
    """What a FixMatch cell ends on: ``"start"`` (no epoch beat the start on the validation images),
    the epoch kept (as numbered in the history, 0 = the first), or ``"last"`` (no validation images:
    the last epoch's average)."""
    if not validated:
        return "last"
    return "start" if result.best_epoch == START_EPOCH else result.best_epoch
