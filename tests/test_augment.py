"""sslab.augment: batched augmentations checked against plain torch references."""
from __future__ import annotations

import pytest
import torch

from sslab.augment import (AugmentConfig, color_jitter, default_augment, hflip, random_affine, rotate4, rotate_copies,
                           to_float)


def _batch(n=6, channels=3, size=12, seed=0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _generator(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_rotate4_matches_torch_rot90(dtype):
    x = (_batch(n=5, channels=2, size=7) * 255).to(dtype)
    rotated, labels = rotate4(x)
    assert rotated.shape == (20, 2, 7, 7) and rotated.dtype == dtype
    assert labels.dtype == torch.int64
    for k in range(4):
        assert torch.equal(rotated[k * 5:(k + 1) * 5], torch.rot90(x, k, dims=(-2, -1))), f"k={k}"
        assert labels[k * 5:(k + 1) * 5].tolist() == [k] * 5


def test_two_rotations_are_the_image_and_its_180_degree_turn():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    rotated, labels = rotate_copies(x, 2)
    assert torch.equal(rotated[:2], x) and torch.equal(rotated[2:], x.flip(-1).flip(-2))
    assert labels.tolist() == [0, 0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(rotate_copies(x, 4), rotate4(x)))
    with pytest.raises(ValueError, match=r"rotations=3 is not allowed; allowed: 2 \(0/180°\) or 4"):
        rotate_copies(x, 3)


def test_rotate4_on_a_hand_made_image():
    # 0 1      90° counter-clockwise:  1 3
    # 2 3                              0 2
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    rotated, _ = rotate4(x)
    assert rotated[1, 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]
    assert rotated[2, 0].tolist() == [[3.0, 2.0], [1.0, 0.0]]
    assert rotated[3, 0].tolist() == [[2.0, 0.0], [3.0, 1.0]]


def test_to_float_scales_uint8():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    y = torch.rand(3)
    assert to_float(y) is y


def _check_keeps_form(out: torch.Tensor, x: torch.Tensor):
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.isfinite(out).all()


def test_random_affine_keeps_shape_dtype_device_and_range():
    x = _batch(n=16)
    out = random_affine(x, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), degrees=15, translate=0.1, flip_p=0.5,
                        generator=_generator(2))
    _check_keeps_form(out, x)
    assert not torch.allclose(out, x), "a random warp changes the images"


def test_random_affine_identity_returns_the_input():
    x = _batch(n=4, size=16)
    out = random_affine(x, scale=(1.0, 1.0), degrees=0.0, translate=0.0, flip_p=0.0, generator=_generator(3))
    assert torch.allclose(out, x, atol=1e-5)


def test_random_affine_with_flip_only_mirrors():
    x = _batch(n=4, size=16)
    out = random_affine(x, flip_p=1.0, generator=_generator(3))
    assert torch.allclose(out, x.flip(-1), atol=1e-5)


def test_random_affine_small_rotation_stays_close():
    # A 1-degree rotation of a smooth image barely changes it; a wrong angle unit (radians) would not.
    ramp = torch.linspace(0, 1, 32)
    x = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).expand(2, 1, 32, 32).contiguous()
    out = random_affine(x, degrees=1.0, generator=_generator(4))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert (out[inner] - x[inner]).abs().max() < 0.02


def test_color_jitter_keeps_form_and_changes_colours():
    x = _batch(n=8) * 0.8 + 0.1
    out = color_jitter(x.clone(), 0.3, 0.3, 0.3, generator=_generator(6))
    _check_keeps_form(out, x)
    assert not torch.allclose(out, x)


def test_color_jitter_with_zero_strength_is_identity():
    x = _batch(n=4)
    assert torch.allclose(color_jitter(x, 0.0, 0.0, 0.0), x)


def test_color_jitter_saturation_leaves_grey_images_alone():
    x = _batch(n=4, channels=1)
    out = color_jitter(x, brightness=0.0, contrast=0.0, saturation=0.5, generator=_generator(7))
    assert torch.allclose(out, x)


def test_augmentations_leave_their_input_untouched():
    x = _batch(n=4, channels=1)
    x[0, 0, 0, 0] = 1.5  # out of range on purpose: an in-place clamp would change it
    before = x.clone()
    color_jitter(x, 0.0, 0.0, 0.5, generator=_generator(7))
    color_jitter(x, 0.3, 0.3, 0.3, generator=_generator(7))
    random_affine(x, scale=(0.5, 1.0), degrees=10, flip_p=0.5, generator=_generator(7))
    hflip(x, 0.5, _generator(7))
    rotate4(x)
    assert torch.equal(x, before)


def test_color_jitter_stays_in_range_for_extreme_inputs():
    x = torch.ones(4, 3, 8, 8)
    out = color_jitter(x, 0.9, 0.9, 0.9, generator=_generator(8))
    assert out.max() <= 1.0 and out.min() >= 0.0


def test_hflip_probabilities():
    x = _batch()
    assert torch.equal(hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(hflip(x, p=0.0), x)
    half = hflip(_batch(n=200, size=4), p=0.5, generator=_generator(9))
    flipped = (half == _batch(n=200, size=4).flip(-1)).flatten(1).all(1).sum().item()
    assert 60 < flipped < 140, "about half of the images are flipped"


@pytest.mark.parametrize("crop", ["pad", "resized", "none"])
def test_augment_config_views_keep_form(crop):
    x = _batch(n=8, size=28)
    out = AugmentConfig(crop=crop).apply(x.clone(), _generator(10))
    _check_keeps_form(out, x)


def test_augment_config_rejects_unknown_crop():
    with pytest.raises(ValueError, match=r"crop='zoom'.*allowed: pad, resized, none"):
        AugmentConfig(crop="zoom").apply(_batch())


def test_default_augment_scales_padding_with_image_size():
    assert default_augment(28).padding == 2
    assert default_augment(96).padding == 8


def test_random_affine_shift_is_a_window_of_the_padded_image():
    # The pad-and-crop folded into the warp: each image is a whole-pixel shift with zeros coming in.
    x = _batch(n=60, channels=2, size=10) + 0.5
    out = random_affine(x, shift=3, generator=_generator(2))
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    shifts = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(7) for dx in range(7)
                   if torch.allclose(out[i], padded[i, :, dy:dy + 10, dx:dx + 10], atol=1e-5)]
        assert matches, f"image {i} is not a shifted window of its padded self"
        shifts.add(matches[0])
    assert len(shifts) > 10, "each image gets its own random offset"
    only_crop = AugmentConfig(crop="pad", padding=3, flip=False, degrees=0, jitter=0)
    out = only_crop.apply(x, _generator(2))
    assert all(any(torch.allclose(out[i], padded[i, :, dy:dy + 10, dx:dx + 10], atol=1e-5)
                   for dy in range(7) for dx in range(7)) for i in range(len(x)))


def test_the_affine_resample_is_the_same_inside_bf16_autocast():
    # The training step runs the augmentation under bf16 autocast on CUDA; the same ATen
    # kernels under CPU autocast show whether the sampling grid drops to bf16.
    from sslab.augment import default_augment
    x = torch.rand(16, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    plain = default_augment(96).apply(x, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = default_augment(96).apply(x, generator=torch.Generator().manual_seed(1))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=1e-6)
