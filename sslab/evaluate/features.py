"""Frozen features of a pretrained backbone: computed once per run, split, layer and grid, kept
in memory and in the run folder, so every protocol and every notebook reads the same ones."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .. import store
from ..augment import to_float
from ..data import DatasetSplits, load_dataset
from ..models import check_layer, pooled_features
from ..pretrain import Run
from ..train import autocast, resolve_device


def dataset_splits(config) -> DatasetSplits:
    """The dataset a pretraining (or evaluation) config names, loaded once per process."""
    return load_dataset(config.dataset, config.data_root, config.image_size)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, layer: str = "conv4", grid: int = 4,
                     device=None, batch_size: int = 1024) -> torch.Tensor:
    """Frozen ``layer`` features of uint8 ``images``, average-pooled to grid×grid and flattened
    (N×D float32, on the images' device). The backbone runs in eval mode, so BN statistics
    are used, not updated."""
    device = device or images.device
    was_training = backbone.training
    backbone.eval()
    parts = []
    for chunk in images.split(batch_size):
        x = to_float(chunk.to(device, non_blocking=True))
        with autocast(device):
            parts.append(pooled_features(backbone, x, layer, grid).float())
    backbone.train(was_training)
    return torch.cat(parts)


_FEATURES: dict = {}


def run_features(run: Run, split: str = "test", layer: str = "conv4", grid: int = 4, device="auto",
                 index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Features of a whole split (``train`` or ``test``) for a pretrained run, computed once per
    run, layer and grid, kept in memory (rows selected with ``index``) and in the run folder,
    so the next process (each notebook is one) reads them instead of recomputing."""
    dev = resolve_device(device)
    check_layer(layer)
    key = (str(run.path), split, layer, grid, str(dev))
    if key not in _FEATURES:
        cache = Path(run.path) / f"features-{split}-{layer}-g{grid}-{dev.type}.pt"
        if cache.is_file():
            _FEATURES[key] = store.load_torch(cache)["features"].to(dev)
        else:
            images = getattr(dataset_splits(run.config), split).images
            _FEATURES[key] = extract_features(run.load_backbone(dev), images, layer, grid, dev)
            try:
                store.save_torch(cache, {"features": _FEATURES[key].cpu()})
            except OSError:  # a read-only store still works, only slower
                pass
    feats = _FEATURES[key]
    return feats if index is None else feats[index.to(feats.device)]
