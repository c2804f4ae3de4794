"""The backbones (the study's BatchNorm AlexNet and a ResNet-18), sized to the input, their
heads and the VAE decoder.

Geometry (Krizhevsky et al. 2012, with BatchNorm as in Gidaris et al. 2018, RotNet):
conv 64-192-384-256-256 with kernels 11/5/3/3/3, max-pools after conv1, conv2 and conv5,
then fc 4096-4096. Images of 64 px and more use the ImageNet stem (11×11, stride 4);
28-63 px images use a CIFAR stem (5×5, stride 1) so that small images keep a spatial
map worth probing. ``width`` scales every channel count (1.0 = the study's net), which is
how a CPU run stays affordable.

ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016): BasicBlocks
in four stages of 64-128-256-512 channels, two blocks each, BatchNorm after every conv. From
64 px it has the ImageNet stem (7×7 stride-2 conv + 3×3 stride-2 max-pool); under 64 px the
CIFAR stem (one 3×3 stride-1 conv, no max-pool), as contrastive methods use it on CIFAR-10
(Chen et al. 2020, SimCLR, appendix B.9). ``width`` scales its channels the same way.

Every backbone takes float images N×C×H×W in [0, 1], has ``features(x, layer)`` (a tap by name,
see :data:`LAYERS_BY_ARCH`), ``forward(x)`` (the last map, which the pretext heads read
flattened), ``shapes`` (each tap's C×H×W) and ``out_dim`` (the flattened size of ``forward``).
:func:`build_backbone` makes the one a :class:`BackboneConfig` names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import to_float
from .precision import autocast

# The taps each architecture offers, in forward order.
LAYERS_BY_ARCH = {
    "alexnet": ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4", "pool"),
}
ARCHS = tuple(LAYERS_BY_ARCH)
LAYERS = LAYERS_BY_ARCH["alexnet"]  # the study's backbone: the names most of the lab offers
# The layer a classifier reads by default. AlexNet: conv4, the study's choice (RotNet's AlexNet
# features classify best around conv3-conv4 in Gidaris et al. 2018's ImageNet linear probes, and
# fall off towards conv5, where they specialise in the pretext). ResNet-18: layer4, the last residual
# stage, which classifies best on ResNets for rotation and contrastive pretexts alike (Kolesnikov,
# Zhai & Beyer, "Revisiting Self-Supervised Visual Representation Learning", CVPR 2019: unlike
# AlexNet's, ResNet features do not degrade towards the top, the skip connections keep them
# general). Taken before the global pool, average-pooled to the probe's grid, it keeps some
# spatial layout that ``pool`` averages away: on Fashion-MNIST (width 0.25, 3 epochs on 20k
# images, kNN at 4 labels per class) layer4 led for SimCLR (59.5 % vs 58.7 layer3, 55.1 pool) and
# tied layer2-3 for rotation (62.1 vs 62.3, 61.8; pool 55.5).
DEFAULT_LAYER = {"alexnet": "conv4", "resnet18": "layer4"}


@dataclass
class BackboneConfig:
    """Everything that fixes the backbone's shape."""

    in_channels: int = 1
    image_size: int = 28
    width: float = 1.0
    arch: str = "alexnet"  # one of ARCHS; configs saved before it existed are AlexNets

    def channels(self):
        """Channel counts scaled by ``width`` (never below 8). AlexNet: conv1 … conv5; ResNet-18:
        the stem, then layer1 … layer4."""
        full = (64, 64, 128, 256, 512) if self.arch == "resnet18" else (64, 192, 384, 256, 256)
        return [max(8, int(round(c * self.width))) for c in full]

    @property
    def imagenet_stem(self) -> bool:
        return self.image_size >= 64


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def check_arch(arch: str) -> str:
    if arch not in LAYERS_BY_ARCH:
        raise ValueError(f"arch={arch!r} is not known; allowed: {', '.join(ARCHS)}")
    return arch


def resolve_layer(layer: str, arch: str = "alexnet") -> str:
    """``auto`` → the backbone's default classifier layer (:data:`DEFAULT_LAYER`); a name is checked."""
    return DEFAULT_LAYER[check_arch(arch)] if layer == "auto" else check_layer(layer, arch)


ALL_LAYERS = tuple(dict.fromkeys(name for names in LAYERS_BY_ARCH.values() for name in names))


def check_layer(layer: str, arch: str = "alexnet") -> str:
    """``layer`` if ``arch`` has a tap of that name, else an error listing the ones it has."""
    allowed = LAYERS_BY_ARCH[check_arch(arch)]
    if layer not in allowed:
        raise ValueError(f"layer={layer!r} is not known; allowed: {', '.join(allowed)} (the layers of "
                         f"arch={arch!r})")
    return layer


def _check_arch_is(config: BackboneConfig, arch: str) -> None:
    # A run's saved config names its backbone: building another class from it would only fail
    # later, on loading its weights, with a list of missing keys.
    if config.arch != arch:
        raise ValueError(f"arch={config.arch!r} is not allowed for the {arch} class; allowed: {arch!r}, or "
                         f"build_backbone(config), which picks the class the config names")


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a map stored channels-last (and not also contiguous), else contiguous."""
    last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if last else torch.contiguous_format


class _GradInLayoutOf(torch.autograd.Function):
    """The identity, whose gradient comes back in its input's memory layout. A head flattens the
    channels-last pool5 map into a contiguous copy, so its gradient arrives contiguous; ReLU's
    backward over two layouts walks memory element by element, many times slower than over one.
    Only the layout changes, never a value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.layout = _layout(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=ctx.layout)


class AlexNetBackbone(nn.Module):
    """BatchNorm AlexNet conv stack. ``forward(x)`` maps float images N×C×H×W in [0, 1] to the
    pool5 map; ``features(x, layer)`` returns the activation after ``layer`` (``conv1`` … ``conv5``
    after BN + ReLU, or ``pool5``)."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        _check_arch_is(config, "alexnet")
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
            self.shapes = {name: tuple(t.shape[1:]) for name, t in self._taps(probe, "pool5", every=True).items()}
            self.train()

    def _taps(self, x: torch.Tensor, until: str, every: bool = False) -> dict:
        """The taps up to ``until``: that one, and with ``every`` each one before it too.

        A max-pool takes the largest value of each window and ReLU keeps the order of values, so
        ReLU then pool and pool then ReLU give the same map and, in the backward pass, the same
        gradients, bit for bit. Where a stage's own tap is not asked for, its ReLU runs after the
        pool that follows it, on a quarter of the values: a training step of the CPU default
        (quarter width, 28 px, bf16) is about a tenth faster (``python -m benchmarks.backbone_step``)."""
        # Centre on 0 so the first BN sees a symmetric input; BN takes care of the scale.
        x = (x - 0.5) * 4.0
        out = {}
        stages = (("conv1", self.conv1, self.pool1), ("conv2", self.conv2, self.pool2), ("conv3", self.conv3, None),
                  ("conv4", self.conv4, None), ("conv5", self.conv5, self.pool5))
        for name, stage, pool in stages:
            if pool is None or every or until == name:
                x = out[name] = stage(x)  # conv, BN, ReLU
                if name == until:
                    break
                if pool is not None:
                    x = pool(x)
            else:
                conv, bn, relu = stage
                x = relu(pool(bn(conv(x))))
                if name == "conv5":
                    x = _GradInLayoutOf.apply(x)
            if name == "conv5":
                out["pool5"] = x
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


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): 3×3 conv-BN-ReLU, 3×3 conv-BN, plus the shortcut
    (identity, or a 1×1 stride-``stride`` conv + BN where the shape changes), then ReLU.
    N×cin×H×W → N×cout×⌈H/stride⌉×⌈W/stride⌉."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18Backbone(nn.Module):
    """ResNet-18 conv stack (He et al. 2016), BatchNorm throughout, with the CIFAR stem under
    64 px and the ImageNet stem from 64 px (see the module docstring).

    ``features(x, layer)``: float images N×C×H×W in [0, 1] → the output of ``layer1`` …
    ``layer4`` (after each stage's last ReLU) or ``pool`` (global average of layer4, N×C×1×1).
    ``forward(x)`` is ``pool``, so ``out_dim`` is layer4's channel count (512 × width).
    Spatial sizes: 28 px → 28, 14, 7, 4; 32 px → 32, 16, 8, 4; 96 px → 24, 12, 6, 3.
    Classifiers read ``layer4`` by default (:data:`DEFAULT_LAYER` says why).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        _check_arch_is(config, "resnet18")
        self.config = config
        stem, c1, c2, c3, c4 = config.channels()
        if config.imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(config.in_channels, stem, 7, 2, padding=3, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        else:
            self.stem = _conv_bn(config.in_channels, stem, 3)
        self.layer1 = nn.Sequential(BasicBlock(stem, c1, 1), BasicBlock(c1, c1))
        self.layer2 = nn.Sequential(BasicBlock(c1, c2, 2), BasicBlock(c2, c2))
        self.layer3 = nn.Sequential(BasicBlock(c2, c3, 2), BasicBlock(c3, c3))
        self.layer4 = nn.Sequential(BasicBlock(c3, c4, 2), BasicBlock(c4, c4))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # torchvision's ResNet initialisation (He et al. 2015)
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Shapes from one blank image in eval mode, so no BatchNorm running average moves (as AlexNet).
        with torch.no_grad():
            self.eval()
            probe = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
            self.shapes = {name: tuple(t.shape[1:]) for name, t in self._taps(probe, "pool").items()}
            self.train()

    def _taps(self, x: torch.Tensor, until: str) -> dict:
        # The same input scaling as the AlexNet, so both backbones see the same numbers.
        x = self.stem((x - 0.5) * 4.0)
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
            if until == name:
                return out
        out["pool"] = F.adaptive_avg_pool2d(x, 1)
        return out

    def features(self, x: torch.Tensor, layer: str = "layer4") -> torch.Tensor:
        check_layer(layer, "resnet18")
        return self._taps(x, layer)[layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, "pool")

    @property
    def out_dim(self) -> int:
        return self.shapes["pool"][0]


BACKBONES = {"alexnet": AlexNetBackbone, "resnet18": ResNet18Backbone}


def build_backbone(config: BackboneConfig) -> nn.Module:
    """The backbone ``config.arch`` names (``alexnet`` or ``resnet18``), sized by ``config``."""
    return BACKBONES[check_arch(config.arch)](config)


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


# Taps that are global averages by construction: they have no grid to pool to.
GLOBAL_TAPS = ("pool",)


def _windows(size: int, out: int) -> list:
    """Adaptive pooling's windows along one axis: output i averages inputs [⌊i·size/out⌋, ⌈(i+1)·size/out⌉)."""
    return [((i * size) // out, -(-(i + 1) * size // out)) for i in range(out)]


class _GridAveragePool(torch.autograd.Function):
    """``F.adaptive_avg_pool2d(x, grid)`` for a small map on the CPU, whose backward adds each
    output's share to its window one output at a time, in the order torch's own kernel does: the
    same input gradient bit for bit, with whole-tensor operations. A head reads the pooled map
    flattened, so its gradient arrives contiguous while the map is channels-last, and torch's
    backward over the two layouts goes element by element; for conv4's 7 × 7 map pooled to 4 × 4
    this is several times faster (``python -m benchmarks.backbone_step``, docs/BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: int) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.layout = x.shape, x.dtype, _layout(x)
        return F.adaptive_avg_pool2d(x, grid)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        height, width = ctx.shape[-2:]
        grad_input = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device, memory_format=ctx.layout).zero_()
        for i, (h0, h1) in enumerate(_windows(height, grad.shape[-2])):
            for j, (w0, w1) in enumerate(_windows(width, grad.shape[-1])):
                grad_input[:, :, h0:h1, w0:w1] += grad[:, :, i:i + 1, j:j + 1] / (h1 - h0) / (w1 - w0)
        return grad_input, None


def average_pool_to_grid(feats: torch.Tensor, grid: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(feats, grid)``, the same values and gradients; on the CPU, a map of
    at most 8 × 8 that needs a gradient, pooled to a grid of 2 × 2 or more, takes
    :class:`_GridAveragePool`'s faster backward."""
    # (torch pools to one value per map as a mean, whose backward divides once)
    small = feats.dim() == 4 and feats.shape[-1] * feats.shape[-2] <= 64 and grid > 1
    if feats.requires_grad and feats.device.type == "cpu" and small:
        return _GridAveragePool.apply(feats, grid)
    return F.adaptive_avg_pool2d(feats, grid)


def pooled_features(backbone: nn.Module, x: torch.Tensor, layer: str, grid: int) -> torch.Tensor:
    """``layer`` features average-pooled to a ``grid``×``grid`` map and flattened (N×C·grid²), so a
    classifier head on any layer stays small. A global tap (ResNet-18's ``pool``, N×C×1×1) is
    returned as it is, N×C, whatever ``grid``: copying one value grid² times adds no information."""
    feats = backbone.features(x, layer)
    if layer not in GLOBAL_TAPS and (feats.shape[-1] != grid or feats.shape[-2] != grid):
        feats = average_pool_to_grid(feats, grid)
    return feats.flatten(1)


def pooled_dim(backbone: nn.Module, layer: str, grid: int) -> int:
    """The width of :func:`pooled_features`: C·grid², or C for a global tap."""
    channels = backbone.shapes[check_layer(layer, backbone.config.arch)][0]
    return channels if layer in GLOBAL_TAPS else channels * grid * grid


def backbone_out_dim(config: BackboneConfig) -> int:
    """``build_backbone(config).out_dim`` without real weights: the backbone is built on the meta
    device (shapes only), so it costs no memory and draws no random numbers."""
    with torch.device("meta"):
        return build_backbone(config).out_dim


# ---------------------------------------------------------------- frozen features and the kNN vote

@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, layer: str = "conv4", grid: int = 4,
                     device=None, batch_size: int = 1024, precision: str = "fp32") -> torch.Tensor:
    """Frozen ``layer`` features of uint8 ``images``, average-pooled to grid×grid and flattened
    (N×D float32, on ``device``), computed in ``precision``. The backbone runs in eval mode, so
    BN statistics are used, not updated."""
    device = device or images.device
    was_training = backbone.training
    backbone.eval()
    parts = []
    for chunk in images.split(batch_size):
        x = to_float(chunk.to(device, non_blocking=True))
        if precision == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            parts.append(pooled_features(backbone, x, layer, grid).float())
    backbone.train(was_training)
    return torch.cat(parts)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (N×classes) from a cosine-similarity kNN with exp(sim / T) weighted votes
    (Wu et al. 2018). No training."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    # fp32 even inside a bf16 autocast (the kNN monitor runs in one): bf16 similarities would tie
    with torch.autocast(query.device.type, enabled=False):
        for chunk in query.split(2048):
            sims = F.normalize(chunk.float(), dim=1) @ bank.T
            top_sim, top_idx = sims.topk(k, dim=1)
            weights = (top_sim / temperature).exp()
            votes = torch.zeros(chunk.shape[0], classes, device=chunk.device)
            votes.scatter_add_(1, train_labels[top_idx], weights)
            scores.append(votes)
    return torch.cat(scores)
