"""Rotation prediction (RotNet): Gidaris, Singh & Komodakis, "Unsupervised Representation
Learning by Predicting Image Rotations", ICLR 2018."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment import rotate4
from ..models import BackboneConfig, RotationHead
from .base import PretextTask


class RotationTask(PretextTask):
    """Each image is shown at 0/90/180/270 degrees and the net predicts which.

    ``loss(images)``: uint8 N×C×H×W → augmented (crop, flip, jitter, small rotation) →
    4N rotated copies → backbone pool5 → :class:`RotationHead` → 4N×4 logits. Returns
    ``loss`` (4-way cross-entropy, mean over the 4N copies) and ``rot_acc`` (fraction of
    copies whose rotation is predicted right).
    """

    name = "rotation"

    def __init__(self, backbone_config: BackboneConfig, augment=None, hidden: int | None = None):
        super().__init__(backbone_config, augment)
        hidden = hidden or max(64, int(round(4096 * backbone_config.width)))
        self.head = RotationHead(self.backbone.out_dim, hidden)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (already rotated) → N×4 rotation logits."""
        return self.head(self.backbone(x))

    def loss(self, images: torch.Tensor, train: bool = True) -> dict:
        x = self.prepare(images)
        if train:
            x = self.augment.apply(x)
        rotated, target = rotate4(x)
        logits = self.logits(rotated)
        loss = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "rot_acc": accuracy.detach()}
