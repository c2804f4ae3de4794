"""Choices judged on more held-out images than the validation set: label propagation's weight on
the probe and self-training's teacher.

Both choices compare candidates built from the same two classifiers, the budget's probe head and
the graph's propagated labels, so they can be judged again on other splits of the same labeled
images without training anything large. With ``choice_folds`` F = 1 a candidate is judged on the
cell's validation images alone (the study's rule). A hundred validation images tell apart
candidates a few tenths of a point apart only by chance (docs/results.md), so with F > 1 the choice
also counts F − 1 more splits of the cell's labeled and validation images together: each holds out
as many images of each class as the validation set has (other ones, in turn) and trains a probe head
and propagates labels from the rest, which holds as many images of each class as the cell's own
labeled set. Each candidate is so judged on F × the validation images, built each time from as
many labels as the cell's own. The test images are still classified by the cell's own probe and
graph, from its own labeled images; no test image is involved in any split.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
import torch

from .batched_heads import train_heads
from .cells import Cell
from .graph import propagate_cell
from .pool import pool_graph, pool_keep
from .probe import chosen_on_validation, head_train_config, new_probe, probe_probabilities


@dataclass
class HeldOut:
    """The probe's and the graph's class scores (V×classes) on one split's held-out images, and
    their labels (V)."""

    probe: torch.Tensor
    graph: torch.Tensor
    labels: torch.Tensor


def holdout_splits(train_idx: torch.Tensor, val_idx: torch.Tensor, labels: torch.Tensor, folds: int,
                   seed: int) -> list:
    """The F − 1 extra splits ``[(train indices, held-out indices)]`` of the labeled and validation
    images ``train_idx`` ∪ ``val_idx`` (indices into ``labels``): split r holds out, for each class,
    as many of its images as ``val_idx`` has, taken in turn from a seeded permutation of the class's
    images (chunk r − 1, wrapping around), and trains on the others — so each split's training set
    has the class counts of ``train_idx``. None without validation images or with ``folds`` ≤ 1."""
    if folds <= 1 or len(val_idx) == 0:
        return []
    generator = torch.Generator().manual_seed(int(seed))
    both = torch.cat([train_idx, val_idx]).cpu()
    y, val_y = labels[both], labels[val_idx.cpu()]
    held = [[] for _ in range(folds - 1)]
    for c in y.unique().tolist():
        members = both[y == c]
        members = members[torch.randperm(len(members), generator=generator)]
        count = int((val_y == c).sum())
        for r in range(folds - 1):
            held[r].append(members[(r * count + torch.arange(count)) % len(members)])
    splits = []
    for chunks in held:
        out = torch.cat(chunks).sort().values
        kept = both[~torch.isin(both, out)].sort().values
        splits.append((kept, out))
    return splits


def held_out_scores(cell: Cell, val_probe: torch.Tensor, val_graph: torch.Tensor, split: tuple) -> list:
    """:class:`HeldOut` of every split the cell's choices count: first the cell's own validation
    images (``val_probe``, ``val_graph``: its probe's and graph's scores there), then each of the
    ``choice_folds`` − 1 extra splits of :func:`holdout_splits`, with a probe head trained as the
    cell's own is (the same recipe, early stopping on the split's held-out images; the extra heads
    train together) and labels propagated from the split's training images over the cell's graph,
    which keeps none of the labeled or validation images (``split``: the cell's own)."""
    cfg, dev = cell.cfg, cell.device
    labels = cell.splits.train.labels
    train_idx, val_idx = split
    scores = [HeldOut(val_probe, val_graph, labels[val_idx].to(dev))]
    extra = holdout_splits(train_idx, val_idx, labels, cfg.choice_folds, cell.seed)
    if not extra:
        return scores
    as_probe = replace(cell, cfg=replace(cfg, head="mlp"))  # the head trained_probe gives the cell
    probes = [new_probe(as_probe, split=fold) for fold in extra]
    train_heads([p.model for p in probes], [p.train for p in probes], [p.val for p in probes],
                head_train_config(cfg, len(probes[0].train[0])), [cell.seed * 1000 + r + 1 for r in range(len(extra))],
                dev, precision=cfg.precision)
    graph, rows = pool_graph(cell.run, cfg, dev)
    keep = pool_keep(rows, len(graph.nodes), split, dev)
    for probe, (fold_train, _) in zip(probes, extra):
        x_held, y_held = probe.val
        propagated = propagate_cell(graph, keep, cell.features("train", fold_train), labels[fold_train].to(dev),
                                    [x_held], cell.splits.train.num_classes, cfg.lp_alpha, cfg.lp_gamma,
                                    cfg.lp_iterations, balance=cfg.lp_balance)
        scores.append(HeldOut(probe_probabilities(probe.model.eval(), x_held, cfg.precision),
                              propagated.query_scores[0], y_held))
    return scores


def chosen(held: list, candidates: dict, default=None, margin: float = 0.0) -> tuple:
    """:func:`.probe.chosen_on_validation` of ``candidates`` (name → a function of one
    :class:`HeldOut`, in order of preference) judged on every split's held-out images together."""
    labels = torch.cat([s.labels for s in held])
    return chosen_on_validation({name: pooled(held, f)[0] for name, f in candidates.items()}, labels, default, margin)


def pooled(scores: list, candidate) -> tuple:
    """``(class scores, labels)`` of a ``candidate`` (a function of one :class:`HeldOut`, e.g. the
    probe's scores or a mix) over every split's held-out images, concatenated: what
    :func:`.probe.chosen_on_validation` judges it on."""
    return torch.cat([candidate(s) for s in scores]), torch.cat([s.labels for s in scores])
