"""Frozen features of a pretrained backbone: computed once per run, split, layer and grid, kept
in memory and in the run folder, so every protocol and every notebook reads the same ones."""
from __future__ import annotations

import sys
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


def run_features(run: Run, split: str = "test", layer: str = "conv4", grid: int = 4, device="auto",
                 index: Optional[torch.Tensor] = None, precision: str = "fp32") -> torch.Tensor:
    """Features of a whole split (``train`` or ``test``) for a pretrained run, computed once per
    run, layer, grid and precision, kept in memory (rows selected with ``index``) and in the run
    folder, so the next process (each notebook is one) reads them instead of recomputing."""
    dev = resolve_device(device)
    check_layer(layer, run.arch)
    weights = integrity.file_digest(Path(run.path) / "model.pt")  # new weights (--force): new features
    key = (str(run.path), weights, split, layer, grid, str(dev), precision)
    if key not in _FEATURES:
        cache = Path(run.path) / f"features-{split}-{layer}-g{grid}-{dev.type}-{precision}.pt"
        made_by = integrity.provenance("features", model=weights, split=split, layer=layer, grid=grid,
                                       precision=precision)
        feats = _cached_features(cache, made_by)
        if feats is None:
            images = getattr(dataset_splits(run.config), split).images
            feats = extract_features(run.load_backbone(dev), images, layer, grid, dev, precision=precision)
            try:
                store.save_torch(cache, {"features": feats.cpu()}, provenance=made_by)
            except (OSError, RuntimeError):  # a read-only or full store still works, only slower
                pass
        _FEATURES[key] = feats.to(dev)
    feats = _FEATURES[key]
    return feats if index is None else feats[index.to(feats.device)]


def _cached_features(cache: Path, made_by: dict) -> Optional[torch.Tensor]:
    """The features in ``cache`` if it is intact and was made by ``made_by`` (these weights, split,
    layer, grid and precision); None otherwise, and a cache that fails is computed again."""
    if not cache.is_file():
        return None
    try:
        feats = store.load_torch(cache, expect=made_by).get("features")
    except integrity.ForeignFile:  # made from other weights (the run was trained again): simply stale
        return None
    except integrity.CorruptCheckpoint as exc:  # damaged or unsafe: a cache is rebuilt, never trusted
        print(f"rebuilding the feature cache: {str(exc).split('; ')[0]}", file=sys.stderr)
        return None
    return feats if torch.is_tensor(feats) else None
