"""Frozen features of a pretrained backbone: computed once per run, split, layer and grid, kept
in memory and in the run folder, so every protocol and every notebook reads the same ones."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
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
    files: set = field(default_factory=set)  # the files of added rows read or written: all in `values`


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
        _save_rows(cache, made_by, known, missing, new)
    return known.values[known.position[wanted].to(known.values.device)]


# Rows added to a cache that already holds at least this many times as many go to a file of their
# own beside it (``<cache>.more-<digest>.pt``): a sweep adds a few labeled images per cell, and
# writing the whole cache again each time (the pool's 20 000 rows, ~90 MB) cost more than the
# features themselves. Past _MORE_FILES such files, the next addition writes one whole cache again.
_MORE_RATIO = 2
_MORE_FILES = 64


def _more_files(cache: Path) -> list:
    return sorted(cache.parent.glob(f"{cache.stem}.more-*.pt"))


def _save_rows(cache: Path, made_by: dict, known: _Features, added: torch.Tensor, values: torch.Tensor) -> None:
    """Keep the rows just computed (``added``, their ``values``) in the run folder: alone in a
    file of their own when the cache already holds many more rows, else the whole cache in one
    file (the files of added rows this process has read or written then go, being in it)."""
    rows = (known.position >= 0).nonzero().squeeze(1)
    more = _more_files(cache)
    try:
        if cache.is_file() and len(rows) >= _MORE_RATIO * len(added) and len(more) < _MORE_FILES:
            digest = hashlib.blake2b(added.numpy().tobytes(), digest_size=6).hexdigest()
            path = cache.with_name(f"{cache.stem}.more-{digest}.pt")
            store.save_torch(path, {"rows": added, "features": values.cpu()}, provenance=made_by)
            known.files.add(path.name)
            return
        store.save_torch(cache, {"rows": rows, "features": known.values[known.position[rows]].cpu()},
                         provenance=made_by)
        for path in more:
            if path.name in known.files:
                store.remove(path)
    except (OSError, RuntimeError):  # a read-only or full store still works, only slower
        pass


def _cached_features(cache: Path, made_by: dict, rows: int, dev) -> _Features:
    """The rows in ``cache`` and in the files of rows added beside it, those that are intact and
    were made by ``made_by`` (these weights, split, layer, grid and precision); a file that fails
    is left out (its rows are computed again), never trusted."""
    known = _Features(torch.full((rows,), -1, dtype=torch.long), torch.zeros(0))
    parts = []
    for path in ([cache] if cache.is_file() else []) + _more_files(cache):
        saved = _read_rows(path, made_by)
        if saved is None:
            continue
        fresh = known.position[saved["rows"]] < 0  # a row in two files: the first one read counts
        known.position[saved["rows"][fresh]] = torch.arange(int(fresh.sum())) + sum(len(p) for p in parts)
        parts.append(saved["features"][fresh])
        known.files.add(path.name)
    if parts:
        known.values = torch.cat(parts).to(dev)
    return known


def _read_rows(path: Path, made_by: dict) -> Optional[dict]:
    try:
        saved = store.load_torch(path, expect=made_by)
    except integrity.ForeignFile:  # made from other weights (the run was trained again): simply stale
        return None
    except integrity.CorruptCheckpoint as exc:  # damaged or unsafe: a cache is rebuilt, never trusted
        print(f"rebuilding the feature cache: {str(exc).split('; ')[0]}", file=sys.stderr)
        return None
    if not torch.is_tensor(saved.get("features")) or not torch.is_tensor(saved.get("rows")):
        return None
    return saved
