"""What every pretext task shares: a backbone, its input preparation, the loss contract, and what
every task's block of settings shares (the optimiser's checks, reading a value typed as text)."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable

import torch
import torch.nn as nn

from ..augment import AugmentConfig, default_augment, to_float
from ..checks import MAX_COUNT, MAX_EPOCHS, check_bool, check_choice, check_int, check_number, fail
from ..models import BackboneConfig, build_backbone
from ..train import TrainConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


class TaskSettings:
    """What the settings blocks at the top of each task's file share (each block is a dataclass:
    :class:`~sslab.pretext.rotation.RotationSettings` …). Every field changes what a run learns, so
    every one is in the run's config and hash (``PretrainConfig.settings``) and settable:
    ``--set NAME=VALUE``, the notebooks' ``pretext_settings``, ``PretrainConfig(settings={...})``.
    A field that is None by default is sized to the images or the backbone (:meth:`sized_to`)."""

    def checked(self, name: Callable[[str], str] = str):
        """The same settings with every value checked (a bad one raises the lab's one-line error,
        the setting spelled ``name(setting)``, e.g. ``--set lr``) and in its canonical type (10 →
        10.0 for a number, a list of milestones → a tuple), so equal settings hash equally."""
        return replace(self, **self._check_training(name), **self._check_task(name))

    def _check_task(self, name: Callable[[str], str]) -> dict:
        return {}

    def _check_training(self, name: Callable[[str], str]) -> dict:
        return dict(
            optimizer=check_choice(name("optimizer"), self.optimizer, OPTIMIZERS),
            lr=check_number(name("lr"), self.lr),
            momentum=check_number(name("momentum"), self.momentum, 0, 1, low_open=False, high_open=True),
            nesterov=check_bool(name("nesterov"), self.nesterov),
            weight_decay=check_number(name("weight_decay"), self.weight_decay, 0, low_open=False),
            batch_size=check_int(name("batch_size"), self.batch_size, 2, maximum=MAX_COUNT),
            schedule=check_choice(name("schedule"), self.schedule, SCHEDULES),
            milestones=check_milestones(name("milestones"), self.milestones),
            gamma=check_number(name("gamma"), self.gamma, 0, 1),
            warmup_epochs=check_number(name("warmup_epochs"), self.warmup_epochs, 0, MAX_EPOCHS, low_open=False),
        )

    def sized_to(self, backbone: BackboneConfig):
        """The settings with every None (sized to the images or the backbone) filled in for
        ``backbone``'s input size, channels, width and architecture."""
        return self

    def train_config(self, epochs: int, seed: int) -> TrainConfig:
        """The training loop's settings for a run of ``epochs`` under ``seed``."""
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                           momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay,
                           schedule=self.schedule, milestones=tuple(self.milestones), gamma=self.gamma,
                           warmup_epochs=self.warmup_epochs, seed=seed)

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))


def check_milestones(name: str, value) -> tuple:
    """Fractions of a run, each in (0, 1), increasing (where a step schedule divides the lr)."""
    items = list(value) if isinstance(value, (list, tuple)) else None
    if (items is None or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in items)
            or items != sorted(set(items))):
        fail(name, value, "increasing fractions of the run, each in (0, 1), e.g. 0.5,0.75 (an empty list: none)")
    return tuple(float(v) for v in items)


def check_optional_int(name: str, value, minimum: int, what: str) -> int | None:
    """None (``what``: how the task sizes it) or an integer from ``minimum`` to MAX_COUNT."""
    return None if value is None else check_int(name, value, minimum, f", or None for {what}", maximum=MAX_COUNT)


def check_optional_number(name: str, value, low: float, high: float, what: str, **bounds) -> float | None:
    """None (``what``: how the task sizes it) or a number in the interval from ``low`` to ``high``
    (open or closed as in :func:`~sslab.checks.check_number`)."""
    return None if value is None else check_number(name, value, low, high, what=f", or None for {what}", **bounds)


def check_probability(name: str, value) -> float:
    return check_number(name, value, 0, 1, low_open=False)


def parse_value(text: str):
    """A setting's value typed as text, read the way YAML reads a plain value: ``10`` → 10,
    ``0.5`` and ``1e-3`` → floats, ``true``/``false`` → bools, ``none``/``null`` → None,
    ``0.5,0.75`` or ``[0.5, 0.75]`` → a list of those, anything else → the text itself."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(item) for item in inner.split(",")] if inner else []
    if "," in text:
        return [parse_value(item) for item in text.split(",")]
    lowered = text.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class PretextTask(nn.Module):
    """A pretext task owns a backbone (:func:`sslab.models.build_backbone`: the config's ``arch``,
    AlexNet or ResNet-18) and the heads it trains, each sized from ``backbone.out_dim``. Its
    settings (a :class:`TaskSettings` block) are ``self.settings``, every None sized to the
    backbone.

    ``loss(images)`` takes a uint8 batch N×C×H×W on the training device and returns a dict of
    named scalar tensors; ``"loss"`` is what the optimiser minimises, the rest are metrics.
    ``loss(images, train=False)`` skips the random augmentation (evaluation on test images).
    ``images_per_sample``: how many images the network sees per source image (for images/s).
    """

    name = "pretext"
    images_per_sample = 1

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

