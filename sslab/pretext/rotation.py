"""Rotation prediction (RotNet): Gidaris, Singh & Komodakis, "Unsupervised Representation
Learning by Predicting Image Rotations", ICLR 2018."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from ..augment import AugmentConfig, default_augment, rotate_copies
from ..checks import check_bool, check_number, fail
from ..models import BackboneConfig, RotationHead
from .base import PretextTask, TaskSettings, check_optional_int


@dataclass
class RotationSettings(TaskSettings):
    """Every setting of rotation pretraining (``--set NAME=VALUE``; see :class:`TaskSettings`)."""

    # -- optimiser: the study's SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch 150; the study
    # started at lr 0.01 and divided it by 10 at epochs 15/30/45 of 63, the lab's short runs decay a higher
    # peak along a cosine (over a handful of epochs a step schedule barely decays)
    optimizer: str = "sgd"  # sgd, adam or adamw
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum (the study's)
    nesterov: bool = True  # Nesterov momentum (the study's)
    weight_decay: float = 5e-4  # L2 penalty on every weight (the study's)
    batch_size: int = 150  # source images per step, each shown at every rotation (the study's 150 × 4)
    schedule: str = "cosine"  # cosine decay per step; step: ×gamma at the milestones (the study's); constant
    milestones: tuple = (0.24, 0.48, 0.71)  # fractions of the run where `step` decays: the study's 15/30/45 of 63
    gamma: float = 0.1  # the step schedule's factor (the study's ÷10)
    warmup_epochs: float = 0.0  # epochs of linear warm-up to the peak (the study had none)
    # -- the task
    rotations: int = 4  # angles each image is shown at: 4 = 0/90/180/270° (RotNet), 2 = 0/180°
    hidden: Optional[int] = None  # the head's two hidden layers; None: RotNet's 4096 × backbone width, ≥ 64
    # -- the view each rotation is applied to: the study's augmentations
    crop_padding: Optional[int] = None  # random shift of up to this many pixels; None: image size / 12, ≥ 2
    flip: bool = True  # horizontal flip with probability 0.5
    degrees: float = 10.0  # random rotation in ±degrees (small: it must not blur the 90° steps)
    jitter: float = 0.2  # brightness, contrast and saturation factors in 1 ± jitter

    def _check_task(self, name) -> dict:
        if self.rotations not in (2, 4) or isinstance(self.rotations, bool):
            fail(name("rotations"), self.rotations, "2 (0/180°) or 4 (0/90/180/270°)")
        return dict(rotations=int(self.rotations),
                    hidden=check_optional_int(name("hidden"), self.hidden, 1, "4096 × the backbone width"),
                    crop_padding=check_optional_int(name("crop_padding"), self.crop_padding, 0,
                                                    "a twelfth of the image size"),
                    flip=check_bool(name("flip"), self.flip),
                    degrees=check_number(name("degrees"), self.degrees, 0, 180, low_open=False),
                    jitter=check_number(name("jitter"), self.jitter, 0, 1, low_open=False))

    def sized_to(self, backbone: BackboneConfig) -> "RotationSettings":
        return replace(self, hidden=self.hidden or max(64, int(round(4096 * backbone.width))),
                       crop_padding=(default_augment(backbone.image_size).padding if self.crop_padding is None
                                     else self.crop_padding))

    def augment(self) -> AugmentConfig:
        return AugmentConfig(crop="pad", padding=self.crop_padding, flip=self.flip, degrees=self.degrees,
                             jitter=self.jitter)


class RotationTask(PretextTask):
    """Each image is shown at 0/90/180/270 degrees (or 0/180 with ``rotations=2``) and the net
    predicts which.

    ``loss(images)``: uint8 N×C×H×W → augmented (crop, flip, jitter, small rotation) →
    R·N rotated copies (R = ``settings.rotations``) → backbone pool5 → :class:`RotationHead` →
    R·N×R logits. Returns ``loss`` (R-way cross-entropy, mean over the copies) and ``rot_acc``
    (fraction of copies whose rotation is predicted right).
    """

    name = "rotation"
    settings_class = RotationSettings

    def __init__(self, backbone_config: BackboneConfig, settings: RotationSettings | None = None):
        settings = (settings or self.settings_class()).checked().sized_to(backbone_config)
        super().__init__(backbone_config, settings.augment())
        self.settings = settings
        self.rotations = self.images_per_sample = settings.rotations
        self.head = RotationHead(self.backbone.out_dim, settings.hidden, classes=settings.rotations)

    def rotate(self, x: torch.Tensor):
        """Float images N×C×H×W → (their rotated copies R·N×C×H×W, rotation-major, and labels R·N)."""
        return rotate_copies(x, self.rotations)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (already rotated) → N×R rotation logits."""
        return self.head(self.backbone(x))

    def loss(self, images: torch.Tensor, train: bool = True) -> dict:
        x = self.prepare(images)
        if train:
            x = self.augment.apply(x)
        rotated, target = self.rotate(x)
        logits = self.logits(rotated)
        loss = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "rot_acc": accuracy.detach()}
