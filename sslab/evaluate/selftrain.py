"""The selftrain protocol: pseudo-label self-training (Lee, ICML workshops 2013, "Pseudo-Label";
Xie et al., CVPR 2020, "Self-training with Noisy Student") with label propagation as the
teacher (Iscen et al., CVPR 2019, who alternate the two).

Each round: the teacher — label propagation over the run's unlabeled pool (:mod:`.labelprop`)
— labels the pool; its ``st_per_class`` most confident images of each class (class-balanced,
above ``st_threshold``) join the budget's labeled images; a student (the run's backbone with a
fresh head) trains end to end on them under strong augmentation (flip + shift + RandAugment,
the student's noise), the labeled images a fixed share ``st_labeled_fraction`` of every batch;
then label propagation in the student's own feature space gives the next round's teacher and,
after the last round, the test predictions (inductive, as in labelprop). Students train in
:func:`sslab.train.fit` (resumable, early stopping on the validation images); a finished
round's student is kept in the cell's folder, so an interrupted cell goes on from there.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from .. import store
from ..augment import rand_augment
from ..models import pooled_dim
from ..pretrain import Run, load_run
from ..checkpoint import CHECKPOINT_EVERY_S
from ..train import TrainConfig, fit, resolve_device
from .cells import (EvalConfig, cell_config, cell_provenance, check_budgets, check_seeds, computed_once, finish_cell,
                    pretrained_id, repeat_to, result_row)
from .features import dataset_splits, extract_features, run_features
from .fixmatch import weak_view
from .heads import FeatureHead, ImageClassifier, trainable_spread
from .labelprop import build_pool_graph, labelprop_of, pool_keep, pool_rows, propagate_cell
from .metrics import classification_metrics
from .probe import validator


def select_balanced(probs: torch.Tensor, confidence: torch.Tensor, per_class: int, threshold: float = 0.0) -> tuple:
    """Class-balanced confident pseudo-labels (Noisy Student §3): for every class, its at most
    ``per_class`` most confident images among those the teacher gives that class with
    ``confidence`` ≥ ``threshold``. A row the teacher knows nothing about (uniform: label
    propagation never reached it) is never chosen, whatever the threshold.
    probs N×C, confidence N → (indices M into probs, labels M)."""
    predicted = probs.argmax(1)
    informative = probs.max(1).values - probs.min(1).values > 1e-6
    chosen, labels = [], []
    for c in range(probs.shape[1]):
        members = ((predicted == c) & (confidence >= threshold) & informative).nonzero().squeeze(1)
        top = members[confidence[members].argsort(descending=True)[:per_class]]
        chosen.append(top)
        labels.append(torch.full((len(top),), c, dtype=torch.long, device=probs.device))
    return torch.cat(chosen), torch.cat(labels)


def propagation_confidence(probs: torch.Tensor) -> torch.Tensor:
    """1 − H(p)/log C ∈ [0, 1] per row (Iscen et al. eq. 11): 1 for a certain label, 0 for uniform."""
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(1)
    return 1 - entropy / math.log(probs.shape[1])


class StudentViews:
    """The student's noise: FixMatch's weak view (flip + shift), then RandAugment + Cutout."""

    def apply(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return rand_augment(weak_view(x, generator), generator=generator)


def selftrain_key(run: Run, budget: int, seed: int, cfg: EvalConfig) -> dict:
    return cell_config("selftrain", run.method, run.config.dataset, budget, seed, cfg, pretrained=pretrained_id(run))


def selftrain_cell(run, labels: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                   config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Self-training from ``run`` with ``labels`` images per class, ``st_rounds`` rounds (see the
    module's docstring). Returns the test-set result row; ``teacher_top1`` is the first
    teacher's (labelprop's) test top-1, ``pseudo_acc`` each round's pseudo-label accuracy."""
    run = run if isinstance(run, Run) else load_run(run)
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    dev = resolve_device(device)
    cfg = (config or EvalConfig()).with_(layer=layer, head="mlp").resolved(dev, run.arch)
    key = selftrain_key(run, budget, seed, cfg)

    def compute(folder: Path) -> dict:
        t0 = time.perf_counter()
        splits = dataset_splits(run.config)
        teacher, (train_idx, val_idx) = labelprop_of(run, budget, seed, cfg, dev)
        classes, n_lab = splits.train.num_classes, len(train_idx)
        test_y = splits.test.labels.to(dev)
        first_teacher = float((teacher.query_scores[1].argmax(1) == test_y).float().mean())
        split, rows = pool_rows(run)
        pool_source = getattr(splits, split).images
        keep = pool_keep(rows if split == "train" else None, len(rows), (train_idx, val_idx), "cpu")
        pool = pool_source[rows[keep]]
        pool_truth = splits.train.labels[rows[keep]] if split == "train" else None
        images, y = splits.train.images, splits.train.labels
        history, student = [], None
        for round_ in range(cfg.st_rounds):
            probs = teacher.probs[n_lab:]
            chosen, pseudo = select_balanced(probs, propagation_confidence(probs), cfg.st_per_class, cfg.st_threshold)
            chosen = chosen.cpu()
            student = train_student(run, cfg, seed, round_, images[train_idx].to(dev), y[train_idx].to(dev),
                                    pool[chosen].to(dev), pseudo.to(dev), images[val_idx].to(dev),
                                    y[val_idx].to(dev), folder, key, dev, progress, deterministic)
            teacher = student_propagation(student, cfg, dev, pool, images[train_idx], y[train_idx],
                                          [images[val_idx], splits.test.images], classes)
            history.append({"round": round_ + 1, "pseudo_labels": len(chosen),
                            "pseudo_acc": None if pool_truth is None else
                            float((pseudo.cpu() == pool_truth[chosen]).float().mean()),
                            "val_acc": float((teacher.query_scores[0].argmax(1).cpu() == y[val_idx]).float().mean())})
        row = result_row(run.method, "selftrain", "mlp", cfg, budget, seed,
                         classification_metrics(teacher.query_scores[1], test_y), splits.train.classes,
                         cfg.st_rounds, time.perf_counter() - t0, history)
        row["teacher_top1"] = first_teacher
        row = finish_cell(folder, key, row, (train_idx, val_idx))
        for round_ in range(cfg.st_rounds):
            store.remove(folder / f"student-{round_ + 1}.pt")
        return row

    return computed_once(key, out, compute)


def train_student(run: Run, cfg: EvalConfig, seed: int, round_: int, labeled: torch.Tensor, labels: torch.Tensor,
                  pseudo_images: torch.Tensor, pseudo_labels: torch.Tensor, val_images: torch.Tensor,
                  val_labels: torch.Tensor, folder: Path, key: dict, dev, progress: bool,
                  deterministic: bool) -> ImageClassifier:
    """One round's student: ``run``'s backbone and a fresh head (standardised like the probe's),
    trained on the labeled images (a ``st_labeled_fraction`` share of each epoch) and the pseudo-
    labeled ones; kept as ``student-<round>.pt`` in the cell's folder once trained."""
    saved = folder / f"student-{round_ + 1}.pt"
    splits = dataset_splits(run.config)
    feats = run_features(run, "train", cfg.layer, cfg.grid, dev, precision=cfg.precision)
    torch.manual_seed(seed + 1000 * round_)
    backbone = run.load_backbone(dev)
    head = FeatureHead(pooled_dim(backbone, cfg.layer, cfg.grid), splits.train.num_classes, "mlp", cfg.hidden,
                       feats.mean(0), trainable_spread(feats.std(0).clamp(min=1e-6)))
    student = ImageClassifier(backbone, head, cfg.layer, cfg.grid, augment=StudentViews()).to(dev)
    made_by = cell_provenance(f"student {round_ + 1}", key)
    if saved.is_file():
        student.load_state_dict(store.load_torch(saved, map_location=dev, expect=made_by)["student"])
        return student.eval()
    # The labeled images repeated to their share of an epoch of labeled + pseudo-labeled images.
    share = cfg.st_labeled_fraction
    repeats = max(len(labels), round(len(pseudo_labels) * share / (1 - share)))
    order = repeat_to(len(labels), repeats, dev)[:repeats]
    data = (torch.cat([labeled[order], pseudo_images]), torch.cat([labels[order], pseudo_labels]))
    steps_per_epoch = max(1, len(data[0]) // cfg.batch_size)
    epochs = max(1, round(cfg.st_steps / steps_per_epoch))
    schedule = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer="adam", lr=cfg.st_lr,
                           weight_decay=cfg.weight_decay, schedule="cosine", patience=epochs, seed=seed + round_)
    fit(student, data, schedule, dev, validate=validator(student, val_images, val_labels, cfg.precision),
        progress=progress, desc=f"selftrain round {round_ + 1}", checkpoint=folder / "checkpoint.pt",
        deterministic=deterministic, checkpoint_every=CHECKPOINT_EVERY_S, checkpoint_last=False,
        precision=cfg.precision, provenance=cell_provenance("checkpoint", key))
    store.save_torch(saved, {"student": student.state_dict()}, provenance=made_by)
    store.remove(folder / "checkpoint.pt")
    return student.eval()


def student_propagation(student: ImageClassifier, cfg: EvalConfig, dev, pool: torch.Tensor, labeled: torch.Tensor,
                        labels: torch.Tensor, queries: list, classes: int):
    """Label propagation in the student's feature space: its features of the pool, the labeled
    images and each query set (uint8 images), graph and propagation as in labelprop."""
    def features(images):
        return extract_features(student.backbone, images, cfg.layer, cfg.grid, dev, precision=cfg.precision)
    graph = build_pool_graph(features(pool), cfg.lp_k, cfg.lp_pca or None)
    keep = torch.ones(len(pool), dtype=torch.bool, device=dev)
    return propagate_cell(graph, keep, features(labeled), labels.to(dev), [features(q) for q in queries], classes,
                          cfg.lp_alpha, cfg.lp_gamma, cfg.lp_iterations)

