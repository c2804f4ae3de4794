"""The labelprop protocol: label propagation on a k-NN graph of frozen features (Zhou et al.,
NeurIPS 2004, "Learning with Local and Global Consistency"; the k-NN, γ and graph form of
Iscen et al., CVPR 2019, "Label Propagation for Deep Semi-supervised Learning").

The graph's nodes are the budget's labeled images and the run's unlabeled pool (the images it
pretrained on; never a test image, and never the validation images). Labels spread over the
graph from the labeled nodes; test images are then classified **inductively**, each by its k
nearest nodes' propagated labels, so a test image never influences another's label. Nothing is
trained: seconds per cell on a CPU. The graph (:mod:`.graph`) is built once per run, layer and
pool for all the budgets and seeds of a sweep (:mod:`.pool`).
"""
from __future__ import annotations

import time
from typing import Optional

from .cells import Cell, EvalConfig, open_cell
from .graph import propagate_cell
from .pool import pool_graph, pool_keep


def labelprop_cell(run, budget: int, seed: int = 0, layer: Optional[str] = None, device="auto", out=None,
                   config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Label propagation from ``budget`` labeled images per class over ``run``'s unlabeled pool, on
    frozen ``layer`` features; the test images classified inductively. Returns the test-set result
    row (with the validation accuracy as ``val_acc``)."""
    return open_cell("labelprop", run, budget, seed, layer, None, device, out, config, progress,
                     deterministic).computed(compute_labelprop)


def compute_labelprop(cell: Cell) -> dict:
    t0 = time.perf_counter()
    result, split = labelprop_of(cell)
    val_y = cell.splits.train.labels[split[1]].to(cell.device)
    row = cell.row(result.query_scores[1], "graph", 0, time.perf_counter() - t0)
    row["val_acc"] = float((result.query_scores[0].argmax(1) == val_y).float().mean()) if len(val_y) else None
    return cell.finish(row, split)


def labelprop_of(cell: Cell) -> tuple:
    """``(Propagated, (train indices, validation indices))`` of one cell, queries = (validation,
    test) features; self-training uses it as its teacher."""
    train_idx, val_idx = cell.labeled_split()
    graph, rows = pool_graph(cell.run, cell.cfg, cell.device)
    feats, dev, cfg = cell.features("train"), cell.device, cell.cfg
    keep = pool_keep(rows, len(graph.nodes), (train_idx, val_idx), dev)
    y = cell.splits.train.labels.to(dev)
    result = propagate_cell(graph, keep, feats[train_idx.to(dev)], y[train_idx.to(dev)],
                            [feats[val_idx.to(dev)], cell.features("test")], cell.splits.train.num_classes,
                            cfg.lp_alpha, cfg.lp_gamma, cfg.lp_iterations)
    return result, (train_idx, val_idx)
