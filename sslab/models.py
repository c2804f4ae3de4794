"""The study's BatchNorm AlexNet, sized to the input, its heads and the VAE decoder.

Geometry (Krizhevsky et al. 2012, with BatchNorm as in Gidaris et al. 2018, RotNet):
conv 64-192-384-256-256 with kernels 11/5/3/3/3, max-pools after conv1, conv2 and conv5,
then fc 4096-4096. Images of 64 px and more use the ImageNet stem (11×11, stride 4);
28-63 px images use a CIFAR stem (5×5, stride 1) so that small images keep a spatial
map worth probing. ``width`` scales every channel count (1.0 = the study's net), which is
how a CPU run stays affordable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")


@dataclass
class BackboneConfig:
    """Everything that fixes the backbone's shape."""

    in_channels: int = 1
    image_size: int = 28
    width: float = 1.0

    def channels(self):
        return [max(8, int(round(c * self.width))) for c in (64, 192, 384, 256, 256)]

    @property
    def imagenet_stem(self) -> bool:
        return self.image_size >= 64


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def check_layer(layer: str) -> str:
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r} is not known; allowed: {', '.join(LAYERS)}")
    return layer


class AlexNetBackbone(nn.Module):
    """BatchNorm AlexNet conv stack. ``forward(x)`` maps float images N×C×H×W in [0, 1] to the
    pool5 map; ``features(x, layer)`` returns the activation after ``layer`` (``conv1`` … ``conv5``
    after BN + ReLU, or ``pool5``)."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        c1, c2, c3, c4, c5 = config.channels()
        if config.imagenet_stem:
            conv1 = nn.Sequential(nn.Conv2d(config.in_channels, c1, 11, 4, padding=2, bias=False),
                                  nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
            pool = dict(kernel_size=3, stride=2)
        else:
            conv1 = _conv_bn(config.in_channels, c1, 5)
            pool = dict(kernel_size=3, stride=2, padding=1)
        self.conv1 = conv1
        self.pool1 = nn.MaxPool2d(**pool)
        self.conv2 = _conv_bn(c1, c2, 5)
        self.pool2 = nn.MaxPool2d(**pool)
        self.conv3 = _conv_bn(c2, c3, 3)
        self.conv4 = _conv_bn(c3, c4, 3)
        self.conv5 = _conv_bn(c4, c5, 3)
        self.pool5 = nn.MaxPool2d(**pool)
        # The layer shapes, from one blank image in eval mode: in training mode it would leave its
        # statistics in every BatchNorm's running averages of a net not yet trained.
        with torch.no_grad():
            self.eval()
            probe = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
            self.shapes = {name: tuple(t.shape[1:]) for name, t in self._taps(probe, "pool5").items()}
            self.train()

    def _taps(self, x: torch.Tensor, until: str) -> dict:
        # Centre on 0 so the first BN sees a symmetric input; BN takes care of the scale.
        x = (x - 0.5) * 4.0
        out = {}
        x = self.conv1(x); out["conv1"] = x
        if until == "conv1":
            return out
        x = self.conv2(self.pool1(x)); out["conv2"] = x
        if until == "conv2":
            return out
        x = self.conv3(self.pool2(x)); out["conv3"] = x
        if until == "conv3":
            return out
        x = self.conv4(x); out["conv4"] = x
        if until == "conv4":
            return out
        x = self.conv5(x); out["conv5"] = x
        if until == "conv5":
            return out
        out["pool5"] = self.pool5(x)
        return out

    def features(self, x: torch.Tensor, layer: str = "conv4") -> torch.Tensor:
        check_layer(layer)
        return self._taps(x, layer)[layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, "pool5")

    @property
    def out_dim(self) -> int:
        c, h, w = self.shapes["pool5"]
        return c * h * w


def _fc_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class RotationHead(nn.Module):
    """RotNet's AlexNet head: flattened pool5 → fc-BN-ReLU → fc-BN-ReLU → 4 rotation logits
    (Gidaris et al. 2018). Input N×D (D = pool5 size), output N×4."""

    def __init__(self, in_dim: int, hidden: int = 4096, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(_fc_bn(in_dim, hidden), _fc_bn(hidden, hidden), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class ClassifierHead(nn.Module):
    """The study's classifier: three fully connected layers (the first two with BN + ReLU),
    randomly initialised, on flattened features. Input N×D, output N×classes."""

    def __init__(self, in_dim: int, classes: int, hidden: int = 200, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(_fc_bn(in_dim, hidden), nn.Dropout(dropout), _fc_bn(hidden, hidden),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class GaussianHead(nn.Module):
    """VAE encoder head (Kingma & Welling 2014): flattened pool5 N×D → (μ, log σ²), each N×latent."""

    def __init__(self, in_dim: int, latent: int = 64):
        super().__init__()
        self.mu = nn.Linear(in_dim, latent)
        self.logvar = nn.Linear(in_dim, latent)

    def forward(self, x: torch.Tensor):
        x = x.flatten(1)
        return self.mu(x), self.logvar(x)


def _upsampling_steps(size: int) -> int:
    """How many ×2 transposed convolutions take a small grid (≥ 4 px) exactly to ``size``."""
    steps = 0
    while size % (2 ** (steps + 1)) == 0 and size // (2 ** (steps + 1)) >= 4:
        steps += 1
    return steps


class ConvDecoder(nn.Module):
    """Transposed-conv decoder: latent N×L → images N×C×S×S in [0, 1] (sigmoid output)."""

    def __init__(self, latent: int, out_channels: int, image_size: int, width: float = 1.0):
        super().__init__()
        steps = _upsampling_steps(image_size)
        self.start = image_size // (2 ** steps)
        channels = [max(8, int(round(c * width))) for c in (256, 192, 128, 64, 32, 32, 32)][: steps + 1]
        self.fc = nn.Sequential(nn.Linear(latent, channels[0] * self.start ** 2), nn.ReLU(inplace=True))
        layers = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels[-1], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.channels0 = channels[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.channels0, self.start, self.start)
        return torch.sigmoid(self.net(x))


def pooled_features(backbone: AlexNetBackbone, x: torch.Tensor, layer: str, grid: int) -> torch.Tensor:
    """``layer`` features average-pooled to a ``grid``×``grid`` map and flattened (N×C·grid²), so a
    classifier head on any layer stays small."""
    feats = backbone.features(x, layer)
    if feats.shape[-1] != grid or feats.shape[-2] != grid:
        feats = F.adaptive_avg_pool2d(feats, grid)
    return feats.flatten(1)


def pooled_dim(backbone: AlexNetBackbone, layer: str, grid: int) -> int:
    return backbone.shapes[check_layer(layer)][0] * grid * grid
