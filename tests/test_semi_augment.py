"""sslab.augment's strong view for FixMatch: every op against its formula on hand-made images,
and rand_augment's contract (shape, dtype, device, range, one seed → one result)."""
from __future__ import annotations

import pytest
import torch

from sslab.augment import (
    STRONG_OPS,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_sharpness,
    affine_warp,
    autocontrast,
    cutout,
    equalize,
    geometric_theta,
    posterize,
    rand_augment,
    solarize,
)


def _batch(n=8, channels=1, size=12, seed=0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _generator(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- rand_augment's contract

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_keeps_shape_dtype_device_and_range(device, dtype, channels):
    x = _batch(n=32, channels=channels).to(device, dtype)
    out = rand_augment(x, generator=torch.Generator(device=device).manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out.float()).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_rand_augment_is_reproducible_from_a_seed_and_leaves_its_input_alone():
    x = _batch(n=32)
    before = x.clone()
    first = rand_augment(x, generator=_generator(3))
    assert torch.equal(first, rand_augment(x, generator=_generator(3)))
    assert not torch.equal(first, rand_augment(x, generator=_generator(4)))
    assert torch.equal(x, before)


def test_rand_augment_draws_per_image():
    # The same image 64 times: with a choice per image, the copies come out different.
    x = _batch(n=1).expand(64, -1, -1, -1).contiguous()
    out = rand_augment(x, generator=_generator(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 32


def test_rand_augment_with_identity_only_and_no_cutout_changes_nothing():
    x = _batch()
    assert torch.equal(rand_augment(x, ops=("identity",), cutout_fraction=0.0, generator=_generator()), x)


def test_rand_augment_with_solarize_only_inverts_values_above_a_threshold_per_image():
    x = _batch(n=16)
    out = rand_augment(x, ops_per_image=1, ops=("solarize",), cutout_fraction=0.0, generator=_generator(1))
    for image, result in zip(x, out):
        inverted = ~torch.isclose(result, image)
        assert torch.allclose(result[inverted], 1 - image[inverted])
        if inverted.any() and (~inverted).any():  # one threshold per image splits its values
            assert image[inverted].min() >= image[~inverted].max() or torch.isclose(
                image[inverted].min(), image[~inverted].max())


def test_rand_augment_cutout_only_zeroes_one_square_per_image():
    x = _batch(n=16, size=16) * 0.5 + 0.5  # no zeros in the input: every zero is the hole
    out = rand_augment(x, ops=("identity",), cutout_fraction=0.5, generator=_generator(2))
    for result in out:
        hole = (result[0] == 0)
        if hole.any():
            rows, cols = hole.any(1).nonzero().squeeze(1), hole.any(0).nonzero().squeeze(1)
            assert hole[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all(), "one filled rectangle"
            assert len(rows) <= 8 and len(cols) <= 8


def test_rand_augment_names_an_unknown_op():
    with pytest.raises(ValueError, match="ops=.*allowed"):
        rand_augment(_batch(), ops=("identity", "invert_everything"))


def test_strong_ops_are_the_fixmatch_list():
    assert set(STRONG_OPS) == {"identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                               "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
                               "translate_y"}


# ---------------------------------------------------------------- each op on a hand-made image

def test_solarize_matches_its_formula():
    x = torch.tensor([[0.0, 0.2, 0.5], [0.7, 0.9, 1.0]])[None, None]
    assert torch.allclose(solarize(x, 0.6), torch.where(x >= 0.6, 1 - x, x))
    # One threshold per image.
    both = torch.cat([x, x])
    out = solarize(both, torch.tensor([0.6, 1.1]))
    assert torch.allclose(out[0], torch.where(x[0] >= 0.6, 1 - x[0], x[0]))
    assert torch.equal(out[1], x[0])


def test_posterize_keeps_the_top_bits():
    values = torch.tensor([0, 17, 100, 200, 255], dtype=torch.float32)
    x = (values / 255).reshape(1, 1, 1, 5)
    out = posterize(x, 4) * 255
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 16, 96, 192, 240]), atol=1e-3)
    assert torch.allclose(posterize(x, 8), x, atol=1e-6)


def test_autocontrast_stretches_each_channel_and_leaves_flat_ones():
    x = torch.tensor([[0.2, 0.4], [0.6, 0.3]])[None, None]
    assert torch.allclose(autocontrast(x), (x - 0.2) / 0.4)
    flat = torch.full((1, 1, 2, 2), 0.3)
    assert torch.equal(autocontrast(flat), flat)


def test_equalize_spreads_four_equally_common_levels_evenly():
    # Four levels, four pixels each: the cdf steps by a quarter → 0, 1/3, 2/3, 1.
    levels = torch.tensor([10, 40, 50, 200], dtype=torch.float32) / 255
    x = levels.repeat_interleave(4).reshape(1, 1, 4, 4)
    out = equalize(x)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).repeat_interleave(4), atol=1e-6)
    flat = torch.full((1, 1, 4, 4), 0.5)
    assert torch.equal(equalize(flat), flat)


def test_brightness_contrast_saturation_match_their_formulas():
    x = _batch(n=2, channels=3)
    assert torch.allclose(adjust_brightness(x, 0.5), x * 0.5)
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(adjust_contrast(x, 0.3), mean + 0.3 * (x - mean))
    assert torch.allclose(adjust_saturation(x, 0.0), grey.expand_as(x))
    assert torch.allclose(adjust_saturation(x, 1.0), x)
    g = _batch(n=2, channels=1)
    assert torch.equal(adjust_saturation(g, 0.0), g), "a grey image has no colour to take away"


def test_sharpness_blends_with_the_smoothed_image():
    x = _batch(n=2)
    assert torch.allclose(adjust_sharpness(x, 1.0), x, atol=1e-6)
    flat = torch.full((1, 1, 6, 6), 0.4)
    assert torch.allclose(adjust_sharpness(flat, 0.05), flat)
    # Factor 0 is the smoothed image itself: the centre pixel against the kernel by hand.
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = adjust_sharpness(x, 0.0)
    assert torch.allclose(smooth[0, 0, 5, 5], (x[0, 0, 4:7, 4:7] * kernel).sum(), atol=1e-6)
    assert torch.equal(smooth[:, :, 0], x[:, :, 0]), "the border is kept"


def test_cutout_zeroes_a_square():
    x = torch.ones(2, 1, 10, 10)
    out = cutout(x, torch.tensor([4.0, 2.0]), torch.tensor([5, 0]), torch.tensor([5, 9]))
    expected = torch.ones(2, 1, 10, 10)
    expected[0, :, 3:7, 3:7] = 0
    expected[1, :, 0:1, 8:10] = 0  # clipped at the corner
    assert torch.equal(out, expected)


def test_translate_moves_the_image_by_whole_pixels():
    x = _batch(n=1, size=8)
    out = affine_warp(x, geometric_theta("translate_x", torch.tensor([0.25])))  # 2 of 8 px
    assert torch.allclose(out[..., :, :6], x[..., :, 2:], atol=1e-5)
    assert torch.equal(out[..., :, 6:], torch.zeros(1, 1, 8, 2))
    out = affine_warp(x, geometric_theta("translate_y", torch.tensor([-0.125])))  # −1 px
    assert torch.allclose(out[..., 1:, :], x[..., :7, :], atol=1e-5)


def test_rotate_by_ninety_degrees_is_rot90():
    x = _batch(n=1, size=8)
    out = affine_warp(x, geometric_theta("rotate", torch.tensor([90.0])))
    assert any(torch.allclose(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5) for k in (1, 3))


def test_shear_x_shifts_rows_in_proportion_to_their_height():
    x = torch.zeros(1, 1, 9, 9)
    x[..., :, 4] = 1.0  # a vertical line
    out = affine_warp(x, geometric_theta("shear_x", torch.tensor([0.25])))
    middle = out[0, 0, 4]
    assert torch.allclose(middle, x[0, 0, 4], atol=1e-5), "the centre row does not move"
    assert not torch.allclose(out[0, 0, 0], x[0, 0, 0]), "the top row does"
