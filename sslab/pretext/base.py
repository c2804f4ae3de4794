"""What every pretext task shares: a backbone, its input preparation and the loss contract."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..augment import AugmentConfig, default_augment, to_float
from ..models import BackboneConfig, build_backbone


class PretextTask(nn.Module):
    """A pretext task owns a backbone (:func:`sslab.models.build_backbone`: the config's ``arch``,
    AlexNet or ResNet-18) and the heads it trains, each sized from ``backbone.out_dim``.

    ``loss(images)`` takes a uint8 batch N×C×H×W on the training device and returns a dict of
    named scalar tensors; ``"loss"`` is what the optimiser minimises, the rest are metrics.
    ``loss(images, train=False)`` skips the random augmentation (evaluation on test images).
    """

    name = "pretext"

    def __init__(self, backbone_config: BackboneConfig, augment: AugmentConfig | None = None):
        super().__init__()
        self.backbone = build_backbone(backbone_config)
        self.augment = augment or default_augment(backbone_config.image_size)
        self.channels_last = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, images: torch.Tensor, train: bool = True) -> dict:
        raise NotImplementedError("each pretext task defines its loss")
