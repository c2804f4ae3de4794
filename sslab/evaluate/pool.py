"""A pretraining run's unlabeled pool as the protocols use it: which rows of the dataset it is,
its images without a cell's labeled and validation images, its features and its k-NN graph
(built once per process for a run, layer and graph setting, and shared by every budget and seed
of a sweep)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from .. import integrity, store
from ..pretrain import Run, pool_index
from .features import dataset_splits, cached_features
from .graph import SPARE_NEIGHBOURS, PoolGraph, Projection, build_pool_graph, knn_search

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
    feats = cached_features(run, split, cfg.layer, cfg.grid, dev, index=rows, precision=cfg.precision)
    return feats, (rows if split == "train" else None)


def pool_images(run: Run, leave_out: tuple) -> torch.Tensor:
    """The uint8 images of ``run``'s pool, without the cell's labeled and validation images
    (``leave_out``: train indices) where the pool is the train split."""
    split, rows = pool_rows(run)
    keep = pool_keep(rows if split == "train" else None, len(rows), leave_out, "cpu")
    return getattr(dataset_splits(run.config), split).images[rows[keep]]


def pool_graph(run: Run, cfg, dev) -> tuple:
    """``(PoolGraph, pool rows into the train split or None)`` of the run's pool, built once for a
    run, layer, precision and graph setting and kept in memory and in the run folder beside the
    features: every budget, seed, protocol and notebook (and every worker process) reuses it."""
    key = (str(run.path), cfg.layer, cfg.grid, cfg.precision, cfg.lp_k, cfg.lp_pca, str(dev))
    if key not in _GRAPHS:
        while len(_GRAPHS) >= 4:  # a sweep goes through a few runs; memory stays bounded
            del _GRAPHS[next(iter(_GRAPHS))]
        split, rows = pool_rows(run)
        weights = integrity.file_digest(Path(run.path) / "model.pt")
        made_by = integrity.provenance("graph", model=weights, split=split, layer=cfg.layer, grid=cfg.grid,
                                       precision=cfg.precision, k=cfg.lp_k, pca=cfg.lp_pca, pool=len(rows))
        cache = Path(run.path) / (f"graph-{cfg.layer}-g{cfg.grid}-{torch.device(dev).type}-{cfg.precision}"
                                  f"-k{cfg.lp_k}-pca{cfg.lp_pca}.pt")
        graph = _cached_graph(cache, made_by)
        if graph is None:
            feats, _ = pool_of(run, cfg, dev)
            graph = build_pool_graph(feats, cfg.lp_k, cfg.lp_pca or None)
            test = cached_features(run, "test", cfg.layer, cfg.grid, dev, precision=cfg.precision)
            graph.test_neighbours = knn_search(graph.project(test), graph.nodes, cfg.lp_k + SPARE_NEIGHBOURS)
            try:
                store.save_torch(cache, {"mean": graph.project.mean, "basis": graph.project.basis,
                                         "nodes": graph.nodes, "sims": graph.sims, "indices": graph.indices,
                                         "test_sims": graph.test_neighbours[0],
                                         "test_indices": graph.test_neighbours[1]}, provenance=made_by)
            except (OSError, RuntimeError):  # a read-only or full store still works, only slower
                pass
        graph = PoolGraph(Projection(graph.project.mean.to(dev), None if graph.project.basis is None else
                                     graph.project.basis.to(dev)), graph.nodes.to(dev), graph.sims.to(dev),
                          graph.indices.to(dev), tuple(t.to(dev) for t in graph.test_neighbours))
        _GRAPHS[key] = (graph, rows if split == "train" else None)
    return _GRAPHS[key]


def _cached_graph(cache: Path, made_by: dict) -> Optional[PoolGraph]:
    """The graph in ``cache`` if it is intact and was made from these weights and settings; None
    otherwise (a stale, damaged or foreign cache is built again, never trusted)."""
    if not cache.is_file():
        return None
    try:
        saved = store.load_torch(cache, expect=made_by)
    except integrity.ForeignFile:
        return None
    except integrity.CorruptCheckpoint as exc:
        print(f"rebuilding the graph cache: {str(exc).split('; ')[0]}", file=sys.stderr)
        return None
    needed = ("mean", "nodes", "sims", "indices", "test_sims", "test_indices")
    if any(not torch.is_tensor(saved.get(k)) for k in needed):
        return None  # written in another layout: built again
    return PoolGraph(Projection(saved["mean"], saved["basis"]), saved["nodes"], saved["sims"], saved["indices"],
                     (saved["test_sims"], saved["test_indices"]))


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
