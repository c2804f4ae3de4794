"""Frozen features of a pretrained backbone: computed once per run, split, layer and grid, kept
in memory and in the run folder, so every protocol and every notebook reads the same ones."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import integrity, store
from ..data import DatasetSplits, load_dataset
from ..models import check_layer, extract_features
from ..pretrain import Run
from ..train import resolve_device


def dataset_splits(config) -> DatasetSplits:
    """The dataset a pretraining (or evaluation) config names, loaded once per process."""
    return load_dataset(config.dataset, config.data_root, config.image_size)


_FEATURES: dict = {}


@dataclass
class _Features:
    """The rows of one split computed so far: ``position[i]`` is row i's place in ``values`` (−1:
    not computed yet)."""

    position: torch.Tensor
    values: torch.Tensor


def cached_features(run: Run, split: str = "test", layer: str = "conv4", grid: int = 4, device="auto",
                 index: Optional[torch.Tensor] = None, precision: str = "fp32") -> torch.Tensor:
    """Frozen features of rows ``index`` of a split (``train``, ``test`` or ``unlabeled``; None:
    every row) for a pretrained run, in ``index``'s order. Only the rows asked for are ever
    computed — a run's protocols read its pool, the test images and a few labeled ones, not every
    train image — once per run, layer, grid and precision, kept in memory and in the run folder,
    so the next process (each notebook is one; each worker of a sweep) reads them instead."""
    dev = resolve_device(device)
    check_layer(layer, run.arch)
    weights = integrity.file_digest(Path(run.path) / "model.pt")  # new weights (--force): new features
    key = (str(run.path), weights, split, layer, grid, str(dev), precision)
    images = getattr(dataset_splits(run.config), split).images
    cache = Path(run.path) / f"features-{split}-{layer}-g{grid}-{dev.type}-{precision}.pt"
    made_by = integrity.provenance("features", model=weights, split=split, layer=layer, grid=grid,
                                   precision=precision, rows=len(images))
    if key not in _FEATURES:
        _FEATURES[key] = _cached_features(cache, made_by, len(images), dev)
    known = _FEATURES[key]
    wanted = torch.arange(len(images)) if index is None else index.cpu()
    missing = wanted[known.position[wanted] < 0].unique()
    if len(missing):
        new = extract_features(run.load_backbone(dev), images[missing], layer, grid, dev, precision=precision)
        known.position[missing] = torch.arange(len(missing)) + len(known.values)
        known.values = torch.cat([known.values.to(dev), new]) if len(known.values) else new
        rows = (known.position >= 0).nonzero().squeeze(1)
        try:
            store.save_torch(cache, {"rows": rows, "features": known.values[known.position[rows].to(dev)].cpu()},
                             provenance=made_by)
        except (OSError, RuntimeError):  # a read-only or full store still works, only slower
            pass
    return known.values[known.position[wanted].to(known.values.device)]


def _cached_features(cache: Path, made_by: dict, rows: int, dev) -> _Features:
    """The rows in ``cache`` if it is intact and was made by ``made_by`` (these weights, split,
    layer, grid and precision); none otherwise — a cache that fails is computed again."""
    empty = _Features(torch.full((rows,), -1, dtype=torch.long), torch.zeros(0))
    if not cache.is_file():
        return empty
    try:
        saved = store.load_torch(cache, expect=made_by)
    except integrity.ForeignFile:  # made from other weights (the run was trained again): simply stale
        return empty
    except integrity.CorruptCheckpoint as exc:  # damaged or unsafe: a cache is rebuilt, never trusted
        print(f"rebuilding the feature cache: {str(exc).split('; ')[0]}", file=sys.stderr)
        return empty
    if not torch.is_tensor(saved.get("features")) or not torch.is_tensor(saved.get("rows")):
        return empty
    empty.position[saved["rows"]] = torch.arange(len(saved["rows"]))
    return _Features(empty.position, saved["features"].to(dev))
