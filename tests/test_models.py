"""sslab.models: the AlexNet backbone's geometry at 28, 32 and 96 px, its taps, heads and decoder."""
from __future__ import annotations

import copy

import pytest
import torch

from sslab.models import (
    LAYERS,
    AlexNetBackbone,
    BackboneConfig,
    ClassifierHead,
    ConvDecoder,
    GaussianHead,
    RotationHead,
    backbone_out_dim,
    build_backbone,
    check_layer,
    pooled_dim,
    pooled_features,
)

WIDTH = 0.125
# Channels at width 0.125: 64, 192, 384, 256, 256 scaled, never below 8.
CHANNELS = dict(conv1=8, conv2=24, conv3=48, conv4=32, conv5=32, pool5=32)
# Spatial sizes worked out by hand from the geometry:
#   28/32 px (CIFAR stem: 5×5 stride 1, pools 3/2 pad 1): s → s → s/2 → s/4 … → s/8 (rounded up)
#   96 px (ImageNet stem: 11×11 stride 4 pad 2 → 23; pools 3/2 no pad: 23 → 11 → 5 → 2)
SPATIAL = {
    28: dict(conv1=28, conv2=14, conv3=7, conv4=7, conv5=7, pool5=4),
    32: dict(conv1=32, conv2=16, conv3=8, conv4=8, conv5=8, pool5=4),
    96: dict(conv1=23, conv2=11, conv3=5, conv4=5, conv5=5, pool5=2),
}
GEOMETRIES = [(1, 28), (3, 32), (3, 96)]


def _images(channels, size, n=2, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {(c, s): AlexNetBackbone(BackboneConfig(in_channels=c, image_size=s, width=WIDTH)).eval()
            for c, s in GEOMETRIES}


@pytest.mark.parametrize("channels, size", GEOMETRIES)
def test_each_layer_tap_has_the_expected_shape(backbones, channels, size):
    backbone = backbones[(channels, size)]
    x = _images(channels, size, n=3)
    with torch.no_grad():
        for layer in LAYERS:
            expected = (3, CHANNELS[layer], SPATIAL[size][layer], SPATIAL[size][layer])
            feats = backbone.features(x, layer)
            assert tuple(feats.shape) == expected, layer
            assert backbone.shapes[layer] == expected[1:], f"shapes[{layer!r}] disagrees with the forward pass"
        assert torch.equal(backbone(x), backbone.features(x, "pool5"))
    assert backbone.out_dim == CHANNELS["pool5"] * SPATIAL[size]["pool5"] ** 2


def test_conv_taps_are_after_relu(backbones):
    backbone = backbones[(1, 28)]
    with torch.no_grad():
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            feats = backbone.features(_images(1, 28), layer)
            assert feats.min() >= 0 and feats.max() > 0, layer


def test_full_width_is_the_studys_alexnet():
    config = BackboneConfig(in_channels=3, image_size=96, width=1.0)
    assert config.channels() == [64, 192, 384, 256, 256]
    assert config.imagenet_stem
    backbone = AlexNetBackbone(config)
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [11, 5, 3, 3, 3]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert convs[0].stride == (4, 4)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules()) == 5
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in backbone.modules()) == 3
    assert backbone.shapes["pool5"] == (256, 2, 2)


def test_small_images_use_the_stride_one_stem():
    config = BackboneConfig(in_channels=1, image_size=28, width=1.0)
    assert not config.imagenet_stem
    conv1 = next(m for m in AlexNetBackbone(config).modules() if isinstance(m, torch.nn.Conv2d))
    assert conv1.stride == (1, 1) and conv1.in_channels == 1


def test_check_layer_lists_the_valid_layers(backbones):
    assert check_layer("conv3") == "conv3"
    with pytest.raises(ValueError, match=r"layer='fc6'.*allowed: conv1, conv2, conv3, conv4, conv5, pool5"):
        check_layer("fc6")
    with pytest.raises(ValueError, match="allowed: conv1"):
        backbones[(1, 28)].features(_images(1, 28), "conv6")


@pytest.mark.parametrize("channels, size", GEOMETRIES)
def test_heads_output_shapes(backbones, channels, size):
    backbone = backbones[(channels, size)]
    with torch.no_grad():
        pool5 = backbone(_images(channels, size, n=4))
    rotation = RotationHead(backbone.out_dim, hidden=32)
    assert rotation(pool5).shape == (4, 4)
    classifier = ClassifierHead(backbone.out_dim, classes=10)
    assert classifier(pool5).shape == (4, 10)
    linears = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(backbone.out_dim, 200), (200, 200), (200, 10)]
    mu, logvar = GaussianHead(backbone.out_dim, latent=16)(pool5)
    assert mu.shape == (4, 16) and logvar.shape == (4, 16)


@pytest.mark.parametrize("channels, size", GEOMETRIES)
def test_conv_decoder_returns_the_input_size(channels, size):
    decoder = ConvDecoder(latent=16, out_channels=channels, image_size=size, width=WIDTH)
    out = decoder(torch.randn(3, 16))
    assert out.shape == (3, channels, size, size)
    assert out.min() >= 0 and out.max() <= 1, "sigmoid output, same range as the images"


@pytest.mark.parametrize("layer, grid", [("conv4", 2), ("conv1", 1), ("pool5", 4)])
def test_pooled_features_match_pooled_dim(backbones, layer, grid):
    backbone = backbones[(1, 28)]
    with torch.no_grad():
        feats = pooled_features(backbone, _images(1, 28, n=3), layer, grid)
    assert feats.shape == (3, pooled_dim(backbone, layer, grid))
    assert pooled_dim(backbone, layer, grid) == CHANNELS[layer] * grid * grid


def test_a_new_backbone_has_untouched_batchnorm_statistics():
    backbone = AlexNetBackbone(BackboneConfig(1, 28, 0.25))
    assert backbone.training
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 5
    for bn in norms:
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 96)])
def test_backbone_out_dim_is_the_built_backbones_and_draws_no_random_numbers(arch, channels, size):
    config = BackboneConfig(channels, size, WIDTH, arch=arch)
    state = torch.get_rng_state()
    dim = backbone_out_dim(config)
    assert torch.equal(torch.get_rng_state(), state)
    assert dim == build_backbone(config).out_dim


def _as_written(backbone, x, layer):
    """The taps by the stages as written: conv, BN, ReLU, then the pool that follows."""
    x = (x - 0.5) * 4.0
    stages = (("conv1", backbone.conv1, backbone.pool1), ("conv2", backbone.conv2, backbone.pool2),
              ("conv3", backbone.conv3, None), ("conv4", backbone.conv4, None), ("conv5", backbone.conv5, None))
    for name, stage, pool in stages:
        for module in stage:
            x = module(x)
        if name == layer:
            return x
        if pool is not None:
            x = pool(x)
    return backbone.pool5(x)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 96)])
def test_relu_after_the_pool_gives_the_same_values_and_gradients_bit_for_bit(precision, channels, size):
    from sslab.precision import autocast
    from sslab.train import prepare_model
    torch.manual_seed(0)
    backbone = AlexNetBackbone(BackboneConfig(in_channels=channels, image_size=size, width=WIDTH)).train()
    prepare_model(backbone, precision)
    twin = copy.deepcopy(backbone)
    images = torch.rand(8, channels, size, size)
    for layer in ("conv1", "conv2", "conv4", "pool5"):
        grads = []
        runs = ((backbone, lambda m, x: m.features(x, layer)), (twin, lambda m, x: _as_written(m, x, layer)))
        for model, run in runs:
            model.zero_grad(set_to_none=True)
            x = images.clone().requires_grad_(True)
            with autocast(torch.device("cpu"), precision):
                out = run(model, x)
            # a head reads it flattened, so its gradient comes back in another layout
            (out.float().flatten(1) * torch.linspace(-1, 1, out[0].numel())).sum().backward()
            grads.append((out.detach(), x.grad, [p.grad for p in model.parameters()],
                          [b.clone() for b in model.buffers()]))
        (out_a, gx_a, gp_a, buf_a), (out_b, gx_b, gp_b, buf_b) = grads
        assert torch.equal(out_a, out_b), layer
        assert out_a.min() >= 0 and out_a.max() > 0, layer  # after the ReLU, and not all zero
        assert torch.equal(gx_a, gx_b), layer
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(gp_a, gp_b)), layer
        assert all(torch.equal(a, b) for a, b in zip(buf_a, buf_b)), layer  # BatchNorm's running statistics


def test_pool5_gradient_comes_back_in_the_maps_layout():
    from sslab.models import _GradInLayoutOf
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = _GradInLayoutOf.apply(x)
    assert torch.equal(y, x)
    (y.flatten(1) * torch.arange(75.0)).sum().backward()  # the flattened copy's gradient is contiguous
    assert x.grad.is_contiguous(memory_format=torch.channels_last) and not x.grad.is_contiguous()
    assert torch.equal(x.grad, torch.arange(75.0).view(1, 3, 5, 5).expand(4, -1, -1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size, grid", [(7, 4), (8, 4), (5, 4), (7, 2), (3, 4), (6, 1), (4, 2)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_grid_pool_matches_torchs_adaptive_average_pool_bit_for_bit(dtype, size, grid, layout):
    from sslab.models import average_pool_to_grid
    generator = torch.Generator().manual_seed(size * 10 + grid)
    maps = torch.randn(6, 5, size, size, generator=generator).to(dtype).contiguous(memory_format=layout)
    weights = torch.randn(6, 5 * grid * grid, generator=generator).to(dtype)
    results = []
    for pool in (average_pool_to_grid, torch.nn.functional.adaptive_avg_pool2d):
        x = maps.clone().requires_grad_(True)
        y = pool(x, grid)
        (y.flatten(1) * weights).sum().backward()  # flattened, as a head reads it: a contiguous gradient
        results.append((y.detach(), x.grad))
    (y_lab, g_lab), (y_torch, g_torch) = results
    assert y_lab.shape == (6, 5, grid, grid)
    assert torch.equal(y_lab, y_torch)
    assert torch.equal(g_lab, g_torch)
    assert g_lab.is_contiguous(memory_format=layout)


def test_grid_pool_windows_are_adaptive_poolings():
    from sslab.models import _windows
    assert _windows(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]  # overlapping: 7 / 4 is not whole
    assert _windows(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert _windows(3, 4) == [(0, 1), (0, 2), (1, 3), (2, 3)]  # a grid larger than the map
