"""A pretraining run's unlabeled pool as the protocols use it: which rows of the dataset it is,
its images without a cell's labeled and validation images, its features and its k-NN graph
(built once per process for a run, layer and graph setting, and shared by every budget and seed
of a sweep)."""
from __future__ import annotations

from typing import Optional

import torch

from ..pretrain import Run, pool_index
from .features import dataset_splits, run_features
from .graph import build_pool_graph

_GRAPHS: dict = {}


def pool_rows(run: Run) -> tuple:
    """``(split, rows)``: where ``run``'s unlabeled pool (its limit and seed) is — the rows of the
    dataset's ``train`` split when the pool is the train split with its labels hidden (a cell then
    leaves its own labeled and validation images out), else of its ``unlabeled`` split."""
    splits = dataset_splits(run.config)
    index = pool_index(run.config, len(splits.unlabeled))
    rows = torch.arange(len(splits.unlabeled)) if index is None else index
    return ("train" if splits.pool_is_train else "unlabeled"), rows


def pool_of(run: Run, cfg, dev) -> tuple:
    """``(pool features P×D, pool rows into the train split or None)`` of ``run``'s pool."""
    split, rows = pool_rows(run)
    feats = run_features(run, split, cfg.layer, cfg.grid, dev, precision=cfg.precision)
    return feats[rows.to(feats.device)], (rows if split == "train" else None)


def pool_images(run: Run, leave_out: tuple) -> torch.Tensor:
    """The uint8 images of ``run``'s pool, without the cell's labeled and validation images
    (``leave_out``: train indices) where the pool is the train split."""
    split, rows = pool_rows(run)
    keep = pool_keep(rows if split == "train" else None, len(rows), leave_out, "cpu")
    return getattr(dataset_splits(run.config), split).images[rows[keep]]


def pool_graph(run: Run, cfg, dev) -> tuple:
    """``(PoolGraph, pool rows into the train split or None)`` of the run's pool, built once per
    process for a run, layer, precision and graph setting (every budget and seed reuses it)."""
    key = (str(run.path), cfg.layer, cfg.grid, cfg.precision, cfg.lp_k, cfg.lp_pca, str(dev))
    if key not in _GRAPHS:
        while len(_GRAPHS) >= 4:  # a sweep goes through a few runs; memory stays bounded
            del _GRAPHS[next(iter(_GRAPHS))]
        feats, rows = pool_of(run, cfg, dev)
        _GRAPHS[key] = (build_pool_graph(feats, cfg.lp_k, cfg.lp_pca or None), rows)
    return _GRAPHS[key]


def pool_keep(rows: Optional[torch.Tensor], size: int, leave_out: tuple, device) -> torch.Tensor:
    """Which pool images a cell's graph keeps: all but the cell's labeled and validation images
    (``leave_out``: train indices) where the pool is the train split."""
    keep = torch.ones(size, dtype=torch.bool, device=device)
    if rows is not None:
        dropped = torch.zeros(int(rows.max()) + 1, dtype=torch.bool)
        for index in leave_out:
            dropped[index[index < len(dropped)]] = True
        keep &= ~dropped[rows].to(device)
    return keep
