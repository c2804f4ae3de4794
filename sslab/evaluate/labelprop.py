"""The labelprop protocol: label propagation on a k-NN graph of frozen features (Zhou et al.,
NeurIPS 2004, "Learning with Local and Global Consistency"; the k-NN, γ and graph form of
Iscen et al., CVPR 2019, "Label Propagation for Deep Semi-supervised Learning").

The graph's nodes are the budget's labeled images and the run's unlabeled pool (the images it
pretrained on; never a test image, and never the validation images). Labels spread over the
graph from the labeled nodes; test images are then classified **inductively**, each by its k
nearest nodes' propagated labels, so a test image never influences another's label. Nothing is
trained: seconds per cell on a CPU. The graph (:mod:`.graph`) is built once per run, layer and
pool for all the budgets and seeds of a sweep (:mod:`.pool`).

Where labels are less scarce, a head trained on them classifies better than a vote of pool
neighbours (at 64 labels per class on rotation's features, the probe is 2 to 3 points above the
graph alone). So the cell weighs the two: its test scores are w · the probe's class probabilities
+ (1 − w) · the graph's, with w chosen on the validation images among ``lp_probe_weights`` —
never on the test images (with ``choice_folds`` > 1, also on more held-out splits of the labeled
and validation images: :mod:`.choice`). With the weights (0,) it is the graph alone. With ``choice_margin`` > 0
a weight below 1 is taken only where it beats the probe alone by that many standard errors on the
validation images (:func:`.probe.chosen_on_validation`).
"""
from __future__ import annotations

import time
from typing import Optional

from .cells import Cell, EvalConfig, open_cell
from .choice import HeldOut, chosen, held_out_scores
from .graph import propagate_cell
from .pool import pool_graph, pool_keep
from .probe import probe_probabilities, trained_probe


def labelprop_cell(run, budget: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                   config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Label propagation from ``budget`` labeled images per class over ``run``'s unlabeled pool, on
    frozen ``layer`` features; the test images classified inductively. Returns the test-set result
    row (with the validation accuracy as ``val_acc``)."""
    return open_cell("labelprop", run, budget, seed, layer, None, device, out, config, progress,
                     deterministic).computed(compute_labelprop)


def compute_labelprop(cell: Cell) -> dict:
    """The graph's vote on the test images, weighed against the probe's prediction: the class
    scores w · probe + (1 − w) · graph with w the weight of ``lp_probe_weights`` that classifies the
    validation images best (nearest ½ first on a tie; without validation images, the one nearest
    ½). With ``lp_probe_weights`` (0,) it is Zhou et al.'s label propagation alone."""
    t0 = time.perf_counter()
    result, split = labelprop_of(cell)
    val_y = cell.splits.train.labels[split[1]].to(cell.device)
    graph_val, graph_test = result.query_scores
    weights = sorted(cell.cfg.lp_probe_weights, key=lambda w: (abs(w - 0.5), w))
    probe_val = probe_test = None
    if any(w > 0 for w in weights):
        head = trained_probe(cell)
        probe_val = probe_probabilities(head, cell.features("train", split[1]), cell.cfg.precision)
        probe_test = probe_probabilities(head, cell.features("test"), cell.cfg.precision)
    # each weight judged on the validation images and, with choice_folds > 1, on more held-out splits
    held = held_out_scores(cell, probe_val, graph_val, split) if probe_val is not None else \
        [HeldOut(None, graph_val, val_y)]
    weight, choice_acc = chosen(held, {w: lambda s, w=w: mixed(w, s.probe, s.graph) for w in weights},
                                default=1.0 if 1.0 in weights else None, margin=cell.cfg.choice_margin)
    row = cell.row(mixed(weight, probe_test, graph_test), "graph", 0, time.perf_counter() - t0)
    test_y = cell.splits.test.labels.to(cell.device)
    val_acc = float((mixed(weight, probe_val, graph_val).argmax(1) == val_y).float().mean()) if len(val_y) else None
    row.update(val_acc=val_acc, probe_weight=weight, graph_top1=float((graph_test.argmax(1) == test_y).float().mean()),
               choice_acc=choice_acc, choice_images=sum(len(s.labels) for s in held))
    return cell.finish(row, split)


def mixed(weight: float, probe, graph):
    """w · the probe's class probabilities + (1 − w) · the graph's (the graph alone at w = 0)."""
    return graph if weight == 0 else weight * probe + (1 - weight) * graph


def labelprop_of(cell: Cell) -> tuple:
    """``(Propagated, (train indices, validation indices))`` of one cell, queries = (validation,
    test) features; self-training uses it as a teacher."""
    train_idx, val_idx = cell.labeled_split()
    graph, rows = pool_graph(cell.run, cell.cfg, cell.device)
    dev, cfg = cell.device, cell.cfg
    keep = pool_keep(rows, len(graph.nodes), (train_idx, val_idx), dev)
    y = cell.splits.train.labels.to(dev)
    result = propagate_cell(graph, keep, cell.features("train", train_idx), y[train_idx.to(dev)],
                            [cell.features("train", val_idx), cell.features("test")], cell.splits.train.num_classes,
                            cfg.lp_alpha, cfg.lp_gamma, cfg.lp_iterations, [None, graph.test_neighbours],
                            balance=cfg.lp_balance)
    return result, (train_idx, val_idx)
