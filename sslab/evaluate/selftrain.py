"""The selftrain protocol: pseudo-label self-training (Lee, ICML workshops 2013, "Pseudo-Label";
Xie et al., CVPR 2020, "Self-training with Noisy Student") with label propagation, the probe, or
their agreement as the teacher (Iscen et al., CVPR 2019, alternate the graph with the network).

The teacher labels the pool; the validation images choose it (``st_teacher`` auto; with
``choice_folds`` > 1, more held-out splits of the labeled images too: :mod:`.choice`) among the
graph (:mod:`.labelprop`), the budget's probe head, and their agreement — their mean class
scores, where both predict the same class. Its ``st_per_class`` most confident images of each
class (class-balanced, above ``st_threshold``) join the budget's labeled images; a student (the
run's backbone with a fresh head) trains end to end on them under strong augmentation (flip +
shift + RandAugment, the student's noise), the labeled images a fixed share
``st_labeled_fraction`` of every batch; label propagation in the student's own feature space gives
the next round's teacher. The test prediction is chosen on the validation images (``st_predict``
auto) among the student's graph (inductive, as in labelprop), its head, both, the first
teacher's own prediction and the probe's — so a student that learned less than its teachers knew
does not replace them; with ``choice_margin`` > 0 another prediction replaces the probe's only
where it beats it by that many standard errors on the validation images. Students train in
:func:`sslab.train.fit` (resumable, early stopping on the validation images); a finished round's
student is kept in the cell's folder, so an interrupted cell goes on from there.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .. import store
from ..augment import rand_augment
from ..models import extract_features, pooled_dim
from ..train import TrainConfig
from .cells import Cell, EvalConfig, cell_provenance, open_cell, repeat_to
from .choice import chosen, held_out_scores
from .end_to_end import probe_head_to_train
from .fixmatch import weak_view
from .graph import build_pool_graph, propagate_cell
from .heads import FeatureHead, ImageClassifier, predict, trainable_spread
from .labelprop import labelprop_of
from .pool import pool_keep, pool_of, pool_rows
from .probe import chosen_on_validation, probe_probabilities, trained_probe, validator


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


def selftrain_cell(run, budget: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                   config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Self-training from ``run`` with ``budget`` labeled images per class, ``st_rounds`` rounds (see
    the module's docstring). Returns the test-set result row; ``teacher_top1`` is the first
    teacher's (labelprop's) test top-1, ``pseudo_acc`` each round's pseudo-label accuracy."""
    return open_cell("selftrain", run, budget, seed, layer, None, device, out, config, progress,
                     deterministic).computed(compute_selftrain)


def compute_selftrain(cell: Cell) -> dict:
    cfg, dev, splits = cell.cfg, cell.device, cell.splits
    t0 = time.perf_counter()
    result, (train_idx, val_idx) = labelprop_of(cell)
    classes = splits.train.num_classes
    val_y, test_y = splits.train.labels[val_idx].to(dev), splits.test.labels.to(dev)
    split, rows = pool_rows(cell.run)
    keep = pool_keep(rows if split == "train" else None, len(rows), (train_idx, val_idx), "cpu")
    pool = getattr(splits, split).images[rows[keep]]
    pool_truth = splits.train.labels[rows[keep]] if split == "train" else None
    candidates = teachers(cell, result, keep, val_idx)
    name = chosen_teacher(cell, candidates, (train_idx, val_idx), val_y)
    teacher = candidates[name]
    images, y = splits.train.images, splits.train.labels
    history, student = [], None
    for round_ in range(cfg.st_rounds):
        chosen, pseudo = select_balanced(teacher.pool, teacher.confidence, cfg.st_per_class, cfg.st_threshold)
        chosen = chosen.cpu()
        student = train_student(cell, round_, images[train_idx].to(dev), y[train_idx].to(dev), pool[chosen].to(dev),
                                pseudo.to(dev), images[val_idx].to(dev), y[val_idx].to(dev))
        propagated = student_propagation(student, cfg, dev, pool, images[train_idx], y[train_idx],
                                         [images[val_idx], splits.test.images], classes)
        history.append({"round": round_ + 1, "teacher": name, "pseudo_labels": len(chosen),
                        "pseudo_acc": None if pool_truth is None else
                        float((pseudo.cpu() == pool_truth[chosen]).float().mean()),
                        "val_acc": _accuracy(propagated.query_scores[0], val_y)})
        # the next round learns from the student's graph: its pool images come after the labeled ones
        teacher, name = graph_teacher(propagated, len(propagated.probs) - len(propagated.pool_rows)), "student graph"
    # The test prediction: the student's graph, its head, both, the first teacher's own prediction,
    # the probe it started from, or the teacher and the student's graph together.
    head_val, head_test = (predict(student, x.to(dev), precision=cfg.precision).softmax(1)
                           for x in (images[val_idx], splits.test.images))
    first = candidates[history[0]["teacher"]]
    graph_val, graph_test = propagated.query_scores
    every = {"student graph": (graph_val, graph_test),
             "student both": ((head_val + graph_val) / 2, (head_test + graph_test) / 2),
             "student head": (head_val, head_test), "teacher": (first.val, first.test),
             "teacher+student": ((first.val + graph_val) / 2, (first.test + graph_test) / 2)}
    if "probe" in candidates:
        every["probe"] = (candidates["probe"].val, candidates["probe"].test)
    finals = {k: every[k] for k in prediction_order(cfg.st_predict) if k in every}
    # choice_margin: leave the probe (auto) or the teacher (blend) only on evidence
    predicted_by, val_acc = chosen_on_validation({k: v[0] for k, v in finals.items()}, val_y,
                                                 default="probe" if "probe" in finals else "teacher",
                                                 margin=cfg.choice_margin)
    row = cell.row(finals[predicted_by][1], "mlp", cfg.st_rounds, time.perf_counter() - t0, history)
    row.update(teacher=history[0]["teacher"], teacher_top1=_accuracy(first.test, test_y), predicted_by=predicted_by,
               val_acc=val_acc, student_graph_top1=_accuracy(propagated.query_scores[1], test_y),
               student_head_top1=_accuracy(head_test, test_y),
               predictions={k: {"val": _accuracy(v[0], val_y), "test": _accuracy(v[1], test_y)}
                            for k, v in every.items()})
    row = cell.finish(row, (train_idx, val_idx))
    for round_ in range(cfg.st_rounds):
        store.remove(cell.folder / f"student-{round_ + 1}.pt")
    return row


TEACHERS = ("agree", "labelprop", "probe")
# st_predict's candidates, preferred first (a tie, or no validation images, takes the first)
PREDICTIONS = {"blend": ("teacher+student", "student graph", "teacher"),
               "auto": ("student graph", "student both", "student head", "teacher", "probe"),
               "graph": ("student graph",), "head": ("student head",), "both": ("student both",)}


def teacher_order(setting: str) -> tuple:
    """The teachers ``st_teacher`` lets the validation images choose from, in order of preference
    (a tie, or no validation images, takes the first): all three for ``auto``, else the one."""
    return TEACHERS if setting == "auto" else (setting,)


def prediction_order(setting: str) -> tuple:
    """The test predictions ``st_predict`` lets the validation images choose from, preferred first:
    for ``blend`` the mean of the first teacher's and the student graph's class scores, the student's
    graph and the teacher; for ``auto`` the student's graph, its head, both, the teacher and the
    probe; else the one."""
    return PREDICTIONS[setting]


@dataclass
class Teacher:
    """A teacher's class scores for the kept pool images (P×C, pool order) with how confident it is
    of each (P; below 0: never pseudo-labeled), and for the validation and test images."""

    pool: torch.Tensor
    confidence: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def chosen_teacher(cell: Cell, candidates: dict, split: tuple, val_y: torch.Tensor) -> str:
    """The teacher of ``st_teacher``'s choices that classifies the validation images best — and, with
    ``choice_folds`` > 1, the held-out images of more splits of the labeled and validation images
    (:mod:`.choice`: there the probe and the graph are trained again from each split's labels)."""
    order = teacher_order(cell.cfg.st_teacher)
    if len(order) == 1:
        return order[0]
    held = held_out_scores(cell, candidates["probe"].val, candidates["labelprop"].val, split)
    judge = {"labelprop": lambda s: s.graph, "probe": lambda s: s.probe, "agree": lambda s: (s.graph + s.probe) / 2}
    return chosen(held, {t: judge[t] for t in order})[0]


def graph_teacher(propagated, labeled: int) -> Teacher:
    """Label propagation as a teacher: its distributions over the pool nodes (after the ``labeled``
    labeled nodes) and their certainty :func:`propagation_confidence`."""
    probs = propagated.probs[labeled:]
    return Teacher(probs, propagation_confidence(probs), *propagated.query_scores)


def teachers(cell: Cell, result, keep: torch.Tensor, val_idx: torch.Tensor) -> dict:
    """The three teachers a self-training cell can learn from: ``labelprop`` (the graph, as in
    Iscen et al.), ``probe`` (the budget's probe head on the frozen features, confidence its largest
    probability) and ``agree`` (their mean, keeping only pool images where both predict the same
    class: pseudo-labels two different classifiers vouch for)."""
    graph = graph_teacher(result, len(result.probs) - len(result.pool_rows))
    if cell.cfg.st_teacher == "labelprop":
        return {"labelprop": graph}
    head, precision, dev = trained_probe(cell), cell.cfg.precision, cell.device
    pool_features, _ = pool_of(cell.run, cell.cfg, dev)
    on_pool = probe_probabilities(head, pool_features[keep.to(pool_features.device)], precision)
    probe = Teacher(on_pool, on_pool.max(1).values,
                    probe_probabilities(head, cell.features("train", val_idx), precision),
                    probe_probabilities(head, cell.features("test"), precision))
    return {"labelprop": graph, "probe": probe, "agree": agreement(graph, probe)}


def agreement(first: Teacher, second: Teacher) -> Teacher:
    """Two teachers' mean class scores, confident (the mean's largest probability) only where both
    predict the same class; elsewhere confidence −1, so the image is never pseudo-labeled."""
    mean = (first.pool + second.pool) / 2
    agree = first.pool.argmax(1) == second.pool.argmax(1)
    confidence = torch.where(agree, mean.max(1).values, torch.full_like(mean[:, 0], -1.0))
    return Teacher(mean, confidence, (first.val + second.val) / 2, (first.test + second.test) / 2)


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    return float((scores.argmax(1) == labels).float().mean()) if len(labels) else None


def train_student(cell: Cell, round_: int, labeled: torch.Tensor, labels: torch.Tensor, pseudo_images: torch.Tensor,
                  pseudo_labels: torch.Tensor, val_images: torch.Tensor, val_labels: torch.Tensor) -> ImageClassifier:
    """One round's student: the cell's backbone and a fresh head (standardised like the probe's; with
    ``st_start`` probe, the budget's probe head),
    trained on the labeled images (a ``st_labeled_fraction`` share of each epoch) and the pseudo-
    labeled ones; kept as ``student-<round>.pt`` in the cell's folder once trained."""
    cfg, dev, seed = cell.cfg, cell.device, cell.seed
    saved = cell.folder / f"student-{round_ + 1}.pt"
    mean, std = cell.pool_statistics()
    torch.manual_seed(seed + 1000 * round_)
    backbone = cell.run.load_backbone(dev)
    if cfg.st_start == "probe":
        # the probe's head already reads the backbone's features: the first steps' gradients do not
        # come from a random head and distort them (linear probing, then fine-tuning: Kumar et al. 2022)
        head = probe_head_to_train(cell)
    else:
        head = FeatureHead(pooled_dim(backbone, cfg.layer, cfg.grid), cell.splits.train.num_classes, "mlp",
                           cfg.hidden, mean, trainable_spread(std))
    student = ImageClassifier(backbone, head, cfg.layer, cfg.grid, augment=StudentViews()).to(dev)
    made_by = cell_provenance(f"student {round_ + 1}", cell.key)
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
    train_config = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer="adam", lr=cfg.st_lr,
                               weight_decay=cfg.weight_decay, schedule="cosine", patience=epochs, seed=seed + round_)
    cell.train(student, data, train_config, validate=validator(student, val_images, val_labels, cfg.precision),
               desc=f"selftrain round {round_ + 1}")
    store.save_torch(saved, {"student": student.state_dict()}, provenance=made_by)
    store.remove(cell.folder / "checkpoint.pt")
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
                          cfg.lp_alpha, cfg.lp_gamma, cfg.lp_iterations, balance=cfg.lp_balance)

