"""sslab.pretext: the losses against their formulas, and each task learning on a small batch."""
from __future__ import annotations

import math

import pytest
import torch

from sslab.models import BackboneConfig
from sslab.pretext import (
    TASKS,
    RotationTask,
    SiameseVAETask,
    SimCLRTask,
    VAETask,
    build_task,
    check_method,
    kl_to_standard_normal,
    reconstruction_error,
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
    custom = build_task("siamese-vae", TINY, latent=8, beta=0.5, triplet_weight=2.0, margin=1.0)
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
    vae = build_task("vae", TINY, latent=12)
    mu, logvar = vae.encode(x)
    assert mu.shape == (4, 12) and logvar.shape == (4, 12)
    assert vae.decode(mu).shape == (4, 1, 28, 28)


def test_rotation_accuracy_counts_correct_predictions():
    torch.manual_seed(0)
    task = build_task("rotation", TINY, hidden=64).eval()
    images = _images(4)
    with torch.no_grad():
        out = task.loss(images, train=False)
        from sslab.augment import rotate4, to_float
        rotated, target = rotate4(to_float(images))
        expected = (task.logits(rotated).argmax(1) == target).float().mean().item()
        expected_loss = torch.nn.functional.cross_entropy(task.logits(rotated), target).item()
    assert out["rot_acc"].item() == pytest.approx(expected)
    assert out["loss"].item() == pytest.approx(expected_loss, rel=1e-5)


def _train_steps(method: str, steps: int = 30, **params) -> list:
    torch.manual_seed(0)
    task = build_task(method, TINY, **params)
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
