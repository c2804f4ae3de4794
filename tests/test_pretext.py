"""sslab.pretext: the losses against their formulas, and each task learning on a small batch."""
from __future__ import annotations

import math

import pytest
import torch

from sslab.models import BackboneConfig
from sslab.pretext import (
    TASKS,
    RotationSettings,
    RotationTask,
    SiameseVAESettings,
    SiameseVAETask,
    SimCLRSettings,
    SimCLRTask,
    VAESettings,
    VAETask,
    build_task,
    check_method,
    kl_to_standard_normal,
    parse_value,
    reconstruction_error,
    setting_names,
    task_settings,
    triplet_loss,
)

TINY = BackboneConfig(in_channels=1, image_size=28, width=0.125)


def _images(n=16, seed=0) -> torch.Tensor:
    """uint8 images with a vertical brightness ramp plus noise: not rotation-symmetric."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=generator) * 0.3 + torch.linspace(0, 0.7, 28)[:, None]
    return (x.clamp(0, 1) * 255).to(torch.uint8)


# ---------------------------------------------------------------- formulas

def test_kl_is_zero_for_the_standard_normal():
    kl = kl_to_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5))
    assert kl.shape == (3,)
    assert torch.equal(kl, torch.zeros(3))


def test_kl_on_a_hand_computed_case():
    # μ = (1, 2), log σ² = (0, ln 2): -½[(1 + 0 − 1 − 1) + (1 + ln 2 − 4 − 2)] = 3 − ½ ln 2
    mu = torch.tensor([[1.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    assert kl_to_standard_normal(mu, logvar).item() == pytest.approx(3 - 0.5 * math.log(2), rel=1e-6)


def test_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 8, generator=generator)
    logvar = torch.randn(6, 8, generator=generator)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected, atol=1e-5)


def test_triplet_loss_active_and_inactive_margin():
    anchor = torch.zeros(2, 2)
    # Row 0: ‖a−p‖² = 2, ‖a−n‖² = 1 → 2 − 1 + 0.5 = 1.5 (margin violated).
    # Row 1: ‖a−p‖² = 1, ‖a−n‖² = 4 → 1 − 4 + 0.5 < 0 → 0 (margin met).
    positive = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    negative = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert triplet_loss(anchor, positive, negative).item() == pytest.approx(0.75)
    assert triplet_loss(anchor[1:], positive[1:], negative[1:]).item() == 0.0
    # A wider margin makes row 1 count too: 1 − 4 + 5 = 2 → mean (1 − 1 + 5, 2) = (6 + 2) / 2.
    assert triplet_loss(anchor, positive, negative, margin=5.0).item() == pytest.approx(4.0)


def test_triplet_loss_uses_squared_distances():
    anchor, positive, negative = torch.zeros(1, 1), torch.tensor([[3.0]]), torch.tensor([[2.0]])
    # squared: 9 − 4 + 0.5 = 5.5 (plain L2 would give 3 − 2 + 0.5 = 1.5)
    assert triplet_loss(anchor, positive, negative).item() == pytest.approx(5.5)


def test_reconstruction_error_sums_per_image():
    target = torch.zeros(2, 3, 4, 4)
    recon = torch.zeros(2, 3, 4, 4)
    recon[0] = 0.5          # 48 pixels × 0.25
    recon[1, 0, 0, 0] = 1.0  # one pixel × 1
    assert reconstruction_error(recon, target).tolist() == [12.0, 1.0]


# ---------------------------------------------------------------- tasks

def test_build_task_makes_each_method():
    assert set(TASKS) == {"rotation", "vae", "siamese-vae", "simclr"}
    assert isinstance(build_task("rotation", TINY), RotationTask)
    assert type(build_task("vae", TINY)) is VAETask
    assert isinstance(build_task("siamese-vae", TINY), SiameseVAETask)
    assert isinstance(build_task("simclr", TINY), SimCLRTask)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"method='jigsaw'.*allowed: rotation, vae, siamese-vae"):
        build_task("jigsaw", TINY)
    assert check_method("vae") == "vae"


def test_study_defaults():
    vae = build_task("vae", TINY)
    assert vae.beta == 0.01 and vae.latent == 64
    siamese = build_task("siamese-vae", TINY)
    assert (siamese.beta, siamese.latent, siamese.triplet_weight, siamese.margin) == (0.01, 64, 5.0, 0.5)
    custom = build_task("siamese-vae", TINY, dict(latent=8, beta=0.5, triplet_weight=2.0, margin=1.0))
    assert (custom.beta, custom.latent, custom.triplet_weight, custom.margin) == (0.5, 8, 2.0, 1.0)


def test_all_tasks_share_the_backbone_geometry():
    shapes = {m: build_task(m, TINY).backbone.shapes for m in TASKS}
    assert shapes["rotation"] == shapes["vae"] == shapes["siamese-vae"] == shapes["simclr"]


@pytest.mark.parametrize("method, keys", [
    ("rotation", {"loss", "rot_acc"}),
    ("vae", {"loss", "recon", "kl"}),
    ("siamese-vae", {"loss", "recon", "kl", "triplet"}),
    ("simclr", {"loss", "contrastive_acc"}),
])
def test_loss_returns_the_named_scalars(method, keys):
    torch.manual_seed(0)
    task = build_task(method, TINY)
    out = task.loss(_images(8))
    assert set(out) == keys
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert out["loss"].requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != "loss"), "metrics are detached"
    if method == "rotation":
        assert 0.0 <= out["rot_acc"].item() <= 1.0
    if method == "vae":
        assert out["loss"].item() == pytest.approx(out["recon"].item() + 0.01 * out["kl"].item(), rel=1e-5)
    if method == "siamese-vae":
        expected = out["recon"].item() + 0.01 * out["kl"].item() + 5.0 * out["triplet"].item()
        assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", list(TASKS))
def test_evaluation_loss_is_deterministic(method):
    torch.manual_seed(0)
    task = build_task(method, TINY).eval()
    images = _images(8)
    with torch.no_grad():
        first, second = task.loss(images, train=False), task.loss(images, train=False)
    # The siamese triplet term draws its positive view and negative at random by definition,
    # so only its VAE terms are fixed; the other tasks are fixed entirely.
    keys = ("recon", "kl") if method == "siamese-vae" else tuple(first)
    for key in keys:
        assert first[key].item() == second[key].item(), key


def test_rotation_logits_and_vae_encode_decode_shapes():
    x = torch.rand(4, 1, 28, 28)
    assert build_task("rotation", TINY).logits(x).shape == (4, 4)
    vae = build_task("vae", TINY, VAESettings(latent=12))
    mu, logvar = vae.encode(x)
    assert mu.shape == (4, 12) and logvar.shape == (4, 12)
    assert vae.decode(mu).shape == (4, 1, 28, 28)


def test_rotation_accuracy_counts_correct_predictions():
    torch.manual_seed(0)
    task = build_task("rotation", TINY, RotationSettings(hidden=64)).eval()
    images = _images(4)
    with torch.no_grad():
        out = task.loss(images, train=False)
        from sslab.augment import rotate4, to_float
        rotated, target = rotate4(to_float(images))
        expected = (task.logits(rotated).argmax(1) == target).float().mean().item()
        expected_loss = torch.nn.functional.cross_entropy(task.logits(rotated), target).item()
    assert out["rot_acc"].item() == pytest.approx(expected)
    assert out["loss"].item() == pytest.approx(expected_loss, rel=1e-5)


def _train_steps(method: str, steps: int = 30, **settings) -> list:
    torch.manual_seed(0)
    task = build_task(method, TINY, settings)
    if method == "rotation":  # the study's optimisers: SGD + Nesterov for RotNet, Adam for the VAEs
        optimizer = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    images = _images(16)
    losses = []
    for _ in range(steps):
        out = task.loss(images)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


def test_rotation_loss_falls():
    losses = _train_steps("rotation", hidden=64)
    assert losses[0] == pytest.approx(math.log(4), abs=0.3), "starts near chance"
    assert sum(losses[-5:]) / 5 < 0.3, losses


@pytest.mark.parametrize("method", ["vae", "siamese-vae"])
def test_vae_losses_fall(method):
    losses = _train_steps(method)
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, losses


# ---------------------------------------------------------------- settings

def test_each_task_builds_itself_from_its_settings_block():
    rotation = build_task("rotation", TINY, RotationSettings(hidden=32, crop_padding=5, flip=False, degrees=3,
                                                             jitter=0.1))
    assert rotation.head.net[0][0].out_features == 32
    assert (rotation.augment.padding, rotation.augment.flip, rotation.augment.degrees, rotation.augment.jitter) == \
        (5, False, 3.0, 0.1)
    vae = build_task("vae", TINY, {"latent": 8, "beta": 0.5, "flip": False})
    assert (vae.head.mu.out_features, vae.beta, vae.augment.flip) == (8, 0.5, False)
    siamese = build_task("siamese-vae", TINY, SiameseVAESettings(positive_scale=0.3, positive_flip=False,
                                                                 positive_degrees=0, positive_jitter=0.4))
    positive = siamese.positive_augment
    assert (positive.crop, positive.scale, positive.flip, positive.degrees, positive.jitter) == \
        ("resized", (0.3, 1.0), False, 0.0, 0.4)
    simclr = build_task("simclr", TINY, SimCLRSettings(projection_dim=16, hidden=24, crop_scale=0.5,
                                                       jitter_strength=0.25, jitter_p=0.5, blur_p=0.4))
    assert [m.out_features for m in simclr.head.modules() if isinstance(m, torch.nn.Linear)] == [24, 16]
    views = simclr.augment
    assert (views.scale, views.brightness, views.contrast, views.jitter_p, views.blur_p) == \
        ((0.5, 1.0), 0.2, 0.2, 0.5, 0.4)
    assert views.blur_kernel == 3  # a blur asked for on 28 px images: a kernel of about a tenth of the image


def test_default_settings_build_the_tasks_of_before():
    """The defaults sized to the images are the views the tasks had as constructor defaults."""
    from sslab.augment import AugmentConfig, default_augment, simclr_augment
    for channels, size in ((1, 28), (3, 32), (3, 96), (1, 96)):
        config = BackboneConfig(channels, size, 0.125)
        assert build_task("rotation", config).augment == default_augment(size)
        assert build_task("simclr", config).augment == simclr_augment(size, channels)
    assert build_task("siamese-vae", TINY).positive_augment == AugmentConfig(crop="resized", scale=(0.6, 1.0),
                                                                             flip=True, degrees=10.0, jitter=0.2)
    assert build_task("vae", TINY).augment == AugmentConfig(crop="none", flip=True, degrees=0, jitter=0)


def test_siamese_loss_without_its_triplet_term_is_the_vae_loss():
    images = _images(8)
    losses = []
    for method, settings in (("vae", {}), ("siamese-vae", {"triplet_weight": 0})):
        torch.manual_seed(0)  # the same weights: the siamese task is the VAE's modules, built in the same order
        task = build_task(method, TINY, settings)
        torch.manual_seed(1)  # the same anchor flips and latent draws (the positive view is drawn after them)
        losses.append(task.loss(images))
    vae, siamese = losses
    assert siamese["triplet"].item() > 0  # it is computed, and weighted 0
    assert torch.equal(siamese["recon"], vae["recon"]) and torch.equal(siamese["kl"], vae["kl"])
    assert siamese["loss"].item() == vae["loss"].item()


def test_two_rotations_are_0_and_180_degrees_with_two_way_logits():
    torch.manual_seed(0)
    task = build_task("rotation", TINY, {"rotations": 2, "hidden": 64}).eval()
    assert task.images_per_sample == 2
    images = _images(4)
    x = images.float() / 255
    rotated, target = task.rotate(x)
    assert torch.equal(rotated, torch.cat([x, torch.rot90(x, 2, dims=(-2, -1))]))
    assert target.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with torch.no_grad():
        logits = task.logits(rotated)
        out = task.loss(images, train=False)
    assert logits.shape == (8, 2)
    assert out["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-5)
    assert out["rot_acc"].item() == pytest.approx((logits.argmax(1) == target).float().mean().item())
    assert build_task("rotation", TINY).images_per_sample == 4


def test_simclrs_temperature_reaches_the_nt_xent_logits(monkeypatch):
    from sslab.pretext import simclr as simclr_module
    seen = []
    real = simclr_module.nt_xent_logits

    def spy(z1, z2, temperature=0.5, gather=True):
        seen.append(temperature)
        return real(z1, z2, temperature, gather)

    monkeypatch.setattr(simclr_module, "nt_xent_logits", spy)
    images = _images(6)
    losses = {}
    for temperature in (0.5, 0.1):
        torch.manual_seed(0)
        task = build_task("simclr", TINY, {"temperature": temperature}).eval()
        with torch.no_grad():
            losses[temperature] = task.loss(images, train=False)["loss"].item()
    assert seen == [0.5, 0.1]
    assert losses[0.1] != pytest.approx(losses[0.5], rel=1e-3)


@pytest.mark.parametrize("method, values, message", [
    ("rotation", {"rotations": 3}, "rotations=3 is not allowed; allowed: 2 (0/180°) or 4 (0/90/180/270°)"),
    ("rotation", {"weight_decay": -1e-4}, "weight_decay=-0.0001 is not allowed; allowed: a number ≥ 0"),
    ("rotation", {"lr": 0}, "lr=0 is not allowed; allowed: a number > 0"),
    ("rotation", {"momentum": 1.0}, "momentum=1.0 is not allowed; allowed: a number in [0, 1)"),
    ("rotation", {"optimizer": "rmsprop"}, "optimizer='rmsprop' is not known; allowed: sgd, adam, adamw"),
    ("rotation", {"schedule": "poly"}, "schedule='poly' is not known; allowed: cosine, step, constant"),
    ("rotation", {"batch_size": 10 ** 9}, "batch_size=1000000000 is not allowed; allowed: an integer from 2 to "
                                          "100000000"),
    ("rotation", {"milestones": [0.7, 0.3]}, "milestones=[0.7, 0.3] is not allowed; allowed: increasing fractions"),
    ("rotation", {"warmup_epochs": 20000}, "warmup_epochs=20000 is not allowed; allowed: a number in [0, 10000]"),
    ("rotation", {"crop_padding": -1}, "crop_padding=-1 is not allowed; allowed: an integer from 0 to 100000000, "
                                       "or None for a twelfth of the image size"),
    ("rotation", {"flip": "yes"}, "flip='yes' is not allowed; allowed: True or False"),
    ("vae", {"latent": 0}, "latent=0 is not allowed; allowed: an integer from 1 to 100000000"),
    ("vae", {"beta": -1}, "beta=-1 is not allowed; allowed: a number ≥ 0"),
    ("siamese-vae", {"margin": -0.5}, "margin=-0.5 is not allowed; allowed: a number ≥ 0"),
    ("siamese-vae", {"positive_scale": 0}, "positive_scale=0 is not allowed; allowed: a number in (0, 1]"),
    ("simclr", {"temperature": 0}, "temperature=0 is not allowed; allowed: a number > 0"),
    ("simclr", {"jitter_p": 1.5}, "jitter_p=1.5 is not allowed; allowed: a number in [0, 1]"),
    ("simclr", {"grayscale_p": -0.1}, "grayscale_p=-0.1 is not allowed; allowed: a number in [0, 1]"),
    ("simclr", {"jitter_strength": 2}, "jitter_strength=2 is not allowed; allowed: a number in [0, 1.25], or None"),
    ("simclr", {"triplet_weight": 1}, "triplet_weight=1 is not allowed; allowed: a setting of simclr: optimizer, "
                                      "lr, momentum"),
])
def test_every_setting_is_range_checked_in_one_line(method, values, message):
    with pytest.raises(ValueError) as info:
        task_settings(method, values)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        build_task(method, TINY, values)


def test_settings_are_checked_under_the_name_the_caller_gives_and_normalised():
    with pytest.raises(ValueError, match=r"^--set margin=-1 is not allowed"):
        task_settings("siamese-vae", {"margin": -1}, lambda name: f"--set {name}")
    settings = task_settings("siamese-vae", {"triplet_weight": 10, "milestones": [0.5]})
    assert settings.triplet_weight == 10.0 and isinstance(settings.triplet_weight, float)
    assert settings.milestones == (0.5,)
    assert setting_names("siamese-vae")[:2] == ("optimizer", "lr") and "margin" in setting_names("siamese-vae")
    with pytest.raises(TypeError, match="settings=VAESettings.* is not allowed for siamese-vae"):
        build_task("siamese-vae", TINY, VAESettings())


@pytest.mark.parametrize("text, value", [
    ("10", 10), ("0.5", 0.5), ("1e-3", 1e-3), ("-2", -2), ("true", True), ("False", False), ("none", None),
    ("sgd", "sgd"), ("0.5,0.75", [0.5, 0.75]), ("[0.25, 0.5]", [0.25, 0.5]), ("[]", []), (" 3 ", 3),
])
def test_parse_value_reads_text_as_yaml_reads_a_plain_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)
