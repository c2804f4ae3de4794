"""sslab.models' ResNet-18 backbone: geometry of both stems, channels by width, torchvision's
ResNet-18 as the reference, every pretext task learning on it, a checkpoint round trip, and the
architecture-aware layer names."""
from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from sslab import store
from sslab.models import (
    DEFAULT_LAYER,
    LAYERS,
    LAYERS_BY_ARCH,
    AlexNetBackbone,
    BackboneConfig,
    ResNet18Backbone,
    build_backbone,
    check_layer,
    pooled_dim,
    pooled_features,
)
from sslab.pretext import build_task

WIDTH = 0.125
# Channels at width 0.125: stem 64 → 8, then 64, 128, 256, 512 → 8, 16, 32, 64.
CHANNELS = dict(layer1=8, layer2=16, layer3=32, layer4=64, pool=64)
# Spatial sizes by hand: CIFAR stem (3×3 stride 1, no pool), then stages of stride 1, 2, 2, 2
# (3×3 convs with padding 1: s → ⌈s/2⌉): 28 → 28, 14, 7, 4; 32 → 32, 16, 8, 4. ImageNet stem at
# 96 px: 7×7 stride 2 pad 3 → 48, max-pool 3/2 pad 1 → 24, then 24, 12, 6, 3. pool is global: 1.
SPATIAL = {
    28: dict(layer1=28, layer2=14, layer3=7, layer4=4, pool=1),
    32: dict(layer1=32, layer2=16, layer3=8, layer4=4, pool=1),
    96: dict(layer1=24, layer2=12, layer3=6, layer4=3, pool=1),
}
GEOMETRIES = [(1, 28), (3, 32), (3, 96)]


def _config(channels=1, size=28, width=WIDTH) -> BackboneConfig:
    return BackboneConfig(in_channels=channels, image_size=size, width=width, arch="resnet18")


def _images(channels, size, n=2, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {(c, s): build_backbone(_config(c, s)).eval() for c, s in GEOMETRIES}


@pytest.mark.parametrize("channels, size", GEOMETRIES)
def test_each_tap_has_the_expected_shape(backbones, channels, size):
    backbone = backbones[(channels, size)]
    assert isinstance(backbone, ResNet18Backbone)
    x = _images(channels, size, n=3)
    with torch.no_grad():
        for layer in LAYERS_BY_ARCH["resnet18"]:
            expected = (3, CHANNELS[layer], SPATIAL[size][layer], SPATIAL[size][layer])
            feats = backbone.features(x, layer)
            assert tuple(feats.shape) == expected, layer
            assert backbone.shapes[layer] == expected[1:], f"shapes[{layer!r}] disagrees with the forward pass"
        assert torch.allclose(backbone.features(x, "pool"), backbone.features(x, "layer4").mean((2, 3), keepdim=True),
                              atol=1e-6)
        assert torch.equal(backbone(x), backbone.features(x, "pool"))
    assert backbone.out_dim == CHANNELS["pool"]


def test_stems_by_image_size():
    def first_conv(size):
        return next(m for m in build_backbone(_config(3, size)).modules() if isinstance(m, torch.nn.Conv2d))

    cifar, imagenet = first_conv(63), first_conv(64)
    assert (cifar.kernel_size, cifar.stride) == ((3, 3), (1, 1))
    assert (imagenet.kernel_size, imagenet.stride) == ((7, 7), (2, 2))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in build_backbone(_config(3, 32)).modules())
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in build_backbone(_config(3, 96)).modules()) == 1


@pytest.mark.parametrize("width, expected", [
    (1.0, (64, 64, 128, 256, 512)),
    (0.25, (16, 16, 32, 64, 128)),
    (0.05, (8, 8, 8, 13, 26)),  # never below 8 channels
])
def test_width_scales_every_channel_count(width, expected):
    config = _config(1, 28, width)
    assert tuple(config.channels()) == expected
    backbone = build_backbone(config)
    assert [backbone.shapes[name][0] for name in ("layer1", "layer2", "layer3", "layer4")] == list(expected[1:])
    assert backbone.stem[0].out_channels == expected[0]
    assert backbone.out_dim == expected[4]


def test_full_width_matches_torchvision_resnet18():
    """At width 1 and 96 px it is torchvision's ResNet-18 without its classifier: the same weights
    (renamed) give the same layer4 map on the same (shifted and scaled) input."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    ours = build_backbone(_config(3, 96, 1.0)).eval()
    renamed = {}
    for name, value in reference.state_dict().items():
        if name.startswith("fc."):
            continue
        name = name.replace("downsample", "shortcut")
        name = name.replace("conv1.", "stem.0.", 1) if name.startswith("conv1.") else name
        name = name.replace("bn1.", "stem.1.", 1) if name.startswith("bn1.") else name
        renamed[name] = value
    ours.load_state_dict(renamed)  # strict: every weight and buffer has its counterpart
    x = _images(3, 96, n=2)
    with torch.no_grad():
        r = (x - 0.5) * 4.0
        r = reference.maxpool(reference.relu(reference.bn1(reference.conv1(r))))
        r = reference.layer4(reference.layer3(reference.layer2(reference.layer1(r))))
        assert torch.allclose(ours.features(x, "layer4"), r, atol=1e-4)
    # The CIFAR stem differs only in its first conv: 3×3 instead of 7×7 weights.
    cifar = build_backbone(_config(3, 32, 1.0))
    count = sum(p.numel() for p in cifar.parameters())
    stem_difference = 64 * 3 * (49 - 9)  # the CIFAR stem's 3×3 first conv against the ImageNet 7×7
    assert count == sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc.")) - stem_difference


def test_a_new_backbone_has_untouched_batchnorm_statistics():
    backbone = build_backbone(_config(1, 28))
    assert backbone.training
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 1 + 4 * 4 + 3  # stem, two per block, and three shortcut convs
    for bn in norms:
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


# ---------------------------------------------------------------- names and configs

def test_layer_names_by_arch():
    assert LAYERS == LAYERS_BY_ARCH["alexnet"] == ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")
    assert LAYERS_BY_ARCH["resnet18"] == ("layer1", "layer2", "layer3", "layer4", "pool")
    assert DEFAULT_LAYER == {"alexnet": "conv4", "resnet18": "layer4"}
    assert check_layer("layer3", "resnet18") == "layer3"
    with pytest.raises(ValueError, match=r"layer='conv4' is not known; allowed: layer1, layer2, layer3, layer4, pool "
                                         r"\(the layers of arch='resnet18'\)"):
        check_layer("conv4", "resnet18")
    with pytest.raises(ValueError, match=r"layer='layer4' is not known; allowed: conv1, .*pool5"):
        check_layer("layer4")
    with pytest.raises(ValueError, match="allowed: layer1"):
        build_backbone(_config()).features(_images(1, 28), "conv4")


def test_unknown_arch_names_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"arch='vgg16' is not known; allowed: alexnet, resnet18"):
        build_backbone(BackboneConfig(1, 28, WIDTH, arch="vgg16"))
    with pytest.raises(ValueError, match=r"arch='vgg16' is not known; allowed: alexnet, resnet18"):
        check_layer("conv1", "vgg16")


def test_a_backbone_class_refuses_a_config_of_another_arch():
    with pytest.raises(ValueError, match=r"arch='resnet18' is not allowed for the alexnet class.*build_backbone"):
        AlexNetBackbone(_config())
    with pytest.raises(ValueError, match=r"arch='alexnet' is not allowed for the resnet18 class"):
        ResNet18Backbone(BackboneConfig(1, 28, WIDTH))


def test_config_round_trips_and_old_configs_are_alexnets():
    config = _config(3, 32, 0.25)
    assert BackboneConfig(**asdict(config)) == config
    assert isinstance(build_backbone(BackboneConfig(**asdict(config))), ResNet18Backbone)
    saved_before_arch = {"in_channels": 1, "image_size": 28, "width": 0.25}
    old = BackboneConfig(**saved_before_arch)
    assert old.arch == "alexnet" and isinstance(build_backbone(old), AlexNetBackbone)
    assert BackboneConfig(1, 28, 0.25).arch == "alexnet"


@pytest.mark.parametrize("layer, grid, expected", [
    ("layer4", 2, 64 * 4), ("layer1", 1, 8), ("layer3", 4, 32 * 16),
    ("pool", 4, 64), ("pool", 1, 64),  # a global pool has no grid: always C values
])
def test_pooled_features_match_pooled_dim(backbones, layer, grid, expected):
    backbone = backbones[(1, 28)]
    x = _images(1, 28, n=3)
    with torch.no_grad():
        feats = pooled_features(backbone, x, layer, grid)
        reference = F.adaptive_avg_pool2d(backbone.features(x, layer), grid if layer != "pool" else 1).flatten(1)
    assert feats.shape == (3, expected) and pooled_dim(backbone, layer, grid) == expected
    assert torch.allclose(feats, reference)


# ---------------------------------------------------------------- the pretext tasks on it

def _patterns(n=16, size=28, seed=0) -> torch.Tensor:
    """uint8 grey images: a vertical ramp (not rotation-symmetric) plus a random 4×4 pattern blown
    up to ``size`` (distinct images whose identity survives a crop)."""
    generator = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.rand(n, 1, 4, 4, generator=generator), size=size, mode="bilinear", align_corners=False)
    x = 0.4 * blobs + torch.linspace(0, 0.6, size)[:, None]
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def _train(task, images, optimizer, steps) -> list:
    losses = []
    for _ in range(steps):
        out = task.loss(images)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


def test_rotation_learns_on_resnet18():
    torch.manual_seed(0)
    task = build_task("rotation", _config(), {"hidden": 64})
    assert task.head.net[0][0].in_features == task.backbone.out_dim == 64
    losses = _train(task, _patterns(16), torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9, nesterov=True), 25)
    assert losses[0] == pytest.approx(math.log(4), abs=0.3), "starts near chance"
    assert sum(losses[-5:]) / 5 < 0.3, losses


@pytest.mark.parametrize("method", ["vae", "siamese-vae"])
def test_vae_losses_fall_on_resnet18(method):
    torch.manual_seed(0)
    task = build_task(method, _config())
    assert task.head.mu.in_features == task.backbone.out_dim
    assert task.decode(torch.zeros(2, task.latent)).shape == (2, 1, 28, 28)
    losses = _train(task, _patterns(16), torch.optim.Adam(task.parameters(), lr=1e-3), 25)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses


def test_simclr_learns_on_resnet18():
    torch.manual_seed(0)
    # milder views than the defaults: crops keeping 40-100 % of the area, brightness and contrast 0.8 × 0.25 = 0.2
    task = build_task("simclr", _config(), {"crop_scale": 0.4, "jitter_strength": 0.25})
    images = _patterns(16)

    def evaluation() -> float:
        task.eval()
        with torch.no_grad():
            loss = task.loss(images, train=False)["loss"].item()
        task.train()
        return loss

    before = evaluation()
    assert before == pytest.approx(math.log(31), abs=0.2), "starts near chance among 2N − 1 = 31 candidates"
    # 60 steps: after 40 the loss had fallen by 0.6 on an Intel Xeon but by 0.28 on an AMD EPYC,
    # whose float32 kernels sum in another order (after 60 steps: by 1.0 there, on one thread as here)
    _train(task, images, torch.optim.Adam(task.parameters(), lr=3e-3), 60)
    assert evaluation() < before - 0.6


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    task = build_task("rotation", _config(3, 32), {"hidden": 32})
    x = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    _train(task, x, torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9), 2)  # moves the BN statistics too
    task.eval()
    store.save_torch(tmp_path / "model.pt", {"model": task.state_dict(), "backbone": asdict(task.backbone.config)})
    saved = store.load_torch(tmp_path / "model.pt")
    torch.manual_seed(1)  # a differently initialised copy, so equal outputs come from the loaded weights
    loaded = build_task("rotation", BackboneConfig(**saved["backbone"]), {"hidden": 32})
    loaded.load_state_dict(saved["model"])
    loaded.eval()
    images = _images(3, 32, n=4, seed=3)
    with torch.no_grad():
        assert isinstance(loaded.backbone, ResNet18Backbone)
        assert torch.equal(loaded.backbone.features(images, "layer3"), task.backbone.features(images, "layer3"))
        assert torch.equal(loaded.logits(images), task.logits(images))
