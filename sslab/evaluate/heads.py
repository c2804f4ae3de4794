"""The classifiers every protocol trains: a head on frozen features, the same head on a
backbone trained end to end, and the kNN vote that trains nothing."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import default_augment, to_float
from ..models import ClassifierHead, pooled_features
from ..precision import autocast

HEADS = ("mlp", "linear", "knn")


class FeatureHead(nn.Module):
    """A classifier on frozen, standardised features: ``mlp`` (the study's three fully connected
    layers) or ``linear``. ``forward(features N×D)`` → logits N×classes; ``loss(features,
    labels N)`` → cross-entropy and accuracy."""

    def __init__(self, in_dim: int, classes: int, kind: str = "mlp", hidden: int = 200,
                 mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("mean", mean if mean is not None else torch.zeros(in_dim))
        self.register_buffer("std", std if std is not None else torch.ones(in_dim))
        self.classifier = ClassifierHead(in_dim, classes, hidden) if kind == "mlp" else nn.Linear(in_dim, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features.float() - self.mean) / self.std)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self(features)
        return {"loss": F.cross_entropy(logits.float(), labels),
                "acc": (logits.argmax(1) == labels).float().mean().detach()}


def trainable_spread(std: torch.Tensor) -> torch.Tensor:
    """The features' spreads for a head whose backbone trains too (fine-tuning, FixMatch, the
    self-training student): each at least 1 % of their mean. A feature (nearly) constant on the
    train images would otherwise be divided by ~0 and, once the backbone moves it, reach the head
    thousands of spreads away. On frozen features (the probe) such a feature never moves."""
    return std.clamp(min=0.01 * float(std.float().mean()))


class ImageClassifier(nn.Module):
    """Backbone + pooled ``layer`` features + :class:`FeatureHead`, trained end to end on
    augmented images (the scratch baseline, fine-tuning). ``forward(images uint8 N×C×H×W)`` →
    logits; ``loss(images, labels)`` → cross-entropy and accuracy on augmented views."""

    def __init__(self, backbone: nn.Module, head: FeatureHead, layer: str, grid: int, augment=None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layer = layer
        self.grid = grid
        self.augment = augment or default_augment(backbone.config.image_size)
        self.channels_last = False

    def forward(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = to_float(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if train:
            x = self.augment.apply(x)
        return self.head(pooled_features(self.backbone, x, self.layer, self.grid))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self(images, train=True)
        return {"loss": F.cross_entropy(logits.float(), labels),
                "acc": (logits.argmax(1) == labels).float().mean().detach()}


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024, precision: str = "fp32") -> torch.Tensor:
    """``model``'s logits (float32) for ``inputs``, in eval mode, batch by batch, in ``precision``."""
    model.eval()
    outs = []
    for chunk in inputs.split(batch_size):
        with autocast(inputs.device, precision):
            outs.append(model(chunk).float())
    return torch.cat(outs)
