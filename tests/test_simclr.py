"""sslab.pretext.simclr and SimCLR's views in sslab.augment: NT-Xent against hand computations and
a loop-by-loop reference, the view augmentation, the task learning, and the loss gathered across
two processes (gloo) equal to one process on the whole batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sslab.augment import SimCLRAugment, gaussian_blur, hue_shift, random_grayscale, simclr_augment
from sslab.models import BackboneConfig
from sslab.pretext import NTXentLoss, SimCLRSettings, SimCLRTask, build_task, nt_xent_loss
from sslab.pretext import simclr as simclr_module
from sslab.pretext.simclr import nt_xent_logits

TINY = BackboneConfig(in_channels=1, image_size=28, width=0.125)


def _patterns(n=16, channels=1, size=28, seed=0) -> torch.Tensor:
    """uint8 images of random 4×4 patterns blown up to ``size``: distinct images whose identity
    survives a crop and a flip, so the views of one image can be matched."""
    generator = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, channels, 4, 4, generator=generator), size=size, mode="bilinear",
                      align_corners=False)
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def _loop_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out term by term (Chen et al. 2020, eq. 1), in float64 Python."""
    views = [list(map(float, row)) for row in torch.cat([z1, z2])]
    n2 = len(views)
    half = n2 // 2

    def cosine(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    total = 0.0
    for i in range(n2):
        j = (i + half) % n2  # the other view of the same image
        denominator = sum(math.exp(cosine(views[i], views[k]) / temperature) for k in range(n2) if k != i)
        total += -math.log(math.exp(cosine(views[i], views[j]) / temperature) / denominator)
    return total / n2


# ---------------------------------------------------------------- NT-Xent

def test_nt_xent_on_hand_computed_batches():
    # Two images whose views are the unit vectors e1 and e2 (N = 2, D = 2).
    # Views agree: each anchor's positive has cosine 1, its two negatives cosine 0, so every one
    # of the four anchors has ℓ = −log(e^{1/τ} / (e^{1/τ} + 2)) = log(1 + 2e^{−1/τ}).
    e = torch.eye(2)
    assert nt_xent_loss(e, e, 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    assert nt_xent_loss(e, e, 1.0).item() == pytest.approx(math.log(1 + 2 * math.exp(-1)), rel=1e-6)
    # Views swapped: each positive has cosine 0, and one negative (the other image's other view)
    # cosine 1: ℓ = −log(1 / (1 + 1 + e^{1/τ})) = log(2 + e^{1/τ}).
    swapped = e.flip(0)
    assert nt_xent_loss(e, swapped, 0.5).item() == pytest.approx(math.log(2 + math.exp(2)), rel=1e-6)
    # Cosine similarity: the length of a projection does not matter.
    assert nt_xent_loss(3 * e, 0.5 * e, 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)


def test_nt_xent_matches_the_loop_reference_on_a_random_batch():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    for temperature in (0.1, 0.5, 2.0):
        expected = _loop_reference(z1.double(), z2.double(), temperature)
        assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-5)
        assert NTXentLoss(temperature)(z1, z2).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_is_symmetric_in_the_views_and_blind_to_the_batch_order():
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    loss = nt_xent_loss(z1, z2).item()
    assert nt_xent_loss(z2, z1).item() == pytest.approx(loss, rel=1e-6)
    order = torch.randperm(8, generator=generator)
    assert nt_xent_loss(z1[order], z2[order]).item() == pytest.approx(loss, rel=1e-6)
    # Pairing view 1 of one image with view 2 of another is a different problem.
    assert nt_xent_loss(z1, z2.roll(1, 0)).item() != pytest.approx(loss, rel=1e-3)


def test_temperature_sharpens_the_loss():
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(5, 3, generator=generator)
    z2 = z1 + 0.1 * torch.randn(5, 3, generator=generator)  # positives close, negatives random
    # A very high temperature flattens every logit: a uniform guess among the 2N − 1 candidates.
    assert nt_xent_loss(z1, z2, 1e6).item() == pytest.approx(math.log(2 * 5 - 1), rel=1e-4)
    # With each positive the nearest candidate, a colder temperature only lowers the loss, towards 0.
    logits, targets = nt_xent_logits(z1, z2, 1.0)
    assert torch.equal(logits.argmax(1), targets)
    losses = [nt_xent_loss(z1, z2, t).item() for t in (2.0, 1.0, 0.5, 0.1, 0.01)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 1e-3
    with pytest.raises(ValueError, match=r"temperature=0 is not allowed; allowed: a number > 0"):
        nt_xent_loss(z1, z2, 0)


def test_nt_xent_logits_exclude_each_anchor_itself():
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    logits, targets = nt_xent_logits(z, z + 1, 0.5)
    assert logits.shape == (6, 6) and targets.tolist() == [3, 4, 5, 0, 1, 2]
    assert torch.isneginf(logits.diagonal()).all()
    assert torch.isfinite(logits[~torch.eye(6, dtype=torch.bool)]).all()
    with pytest.raises(ValueError, match=r"z1 \(3, 4\) and z2 \(2, 4\) are not allowed"):
        nt_xent_logits(z, z[:2])


# ---------------------------------------------------------------- views

@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 96)])
def test_view_keeps_shape_dtype_device_and_range_and_repeats_from_a_seed(channels, size):
    x = _patterns(6, channels, size).float() / 255
    augment = simclr_augment(size, channels)
    view = augment.apply(x, torch.Generator().manual_seed(5))
    assert view.shape == x.shape and view.dtype == x.dtype and view.device == x.device
    assert view.min() >= 0 and view.max() <= 1
    assert torch.equal(view, augment.apply(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(view, augment.apply(x, torch.Generator().manual_seed(6)))
    assert not torch.equal(view, x)


def test_view_settings_follow_the_image():
    grey = simclr_augment(28, 1)
    assert (grey.saturation, grey.hue, grey.grayscale_p, grey.blur_p) == (0.0, 0.0, 0.0, 0.0)
    assert (grey.brightness, grey.contrast, grey.jitter_p, grey.scale) == (0.4, 0.4, 0.8, (0.08, 1.0))
    cifar = simclr_augment(32, 3)  # the paper's CIFAR-10 setting: strength 0.5, no blur
    assert (cifar.brightness, cifar.saturation, cifar.hue, cifar.grayscale_p, cifar.blur_p) == (0.4, 0.4, 0.1, 0.2, 0.0)
    large = simclr_augment(96, 3)  # strength 1, blur with a kernel of about a tenth of the image
    assert (large.brightness, large.hue, large.blur_p, large.blur_kernel) == (0.8, 0.2, 0.5, 11)
    grey = simclr_augment(96, 1)  # grey at any size: brightness and contrast 0.4; blur from 64 px
    assert (grey.brightness, grey.contrast, grey.blur_p, grey.blur_kernel) == (0.4, 0.4, 0.5, 11)


def test_view_settings_given_replace_the_sized_ones():
    views = simclr_augment(32, 3, strength=0.25, crop_scale=0.5, jitter_p=0.3, grayscale_p=0.0, blur_p=0.2, flip=False)
    assert (views.brightness, views.contrast, views.saturation, views.hue) == (0.2, 0.2, 0.2, 0.05)
    assert (views.scale, views.jitter_p, views.grayscale_p, views.flip) == ((0.5, 1.0), 0.3, 0.0, False)
    assert (views.blur_p, views.blur_kernel) == (0.2, 5)  # 2·round(0.05·32 = 1.6) + 1
    assert simclr_augment(96, 3, blur_p=0.0).blur_kernel == 0


def test_gaussian_blur_matches_torchvision_per_image():
    from torchvision.transforms.functional import gaussian_blur as tv_blur
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 1.5, 0.0])
    out = gaussian_blur(x, sigma, 7)
    for i in range(2):
        expected = tv_blur(x[i], [7, 7], [float(sigma[i])] * 2)
        assert torch.allclose(out[i], expected, atol=1e-5), i
    assert torch.equal(out[2], x[2]), "sigma 0 leaves the image as it is"
    with pytest.raises(ValueError, match=r"kernel_size=4 is not allowed; allowed: an odd integer ≥ 3"):
        gaussian_blur(x, sigma, 4)


def test_random_grayscale_and_hue_shift():
    from torchvision.transforms.functional import rgb_to_grayscale
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(random_grayscale(x, p=1.0), rgb_to_grayscale(x, 3), atol=1e-6)
    assert torch.equal(random_grayscale(x, p=0.0), x)
    grey_images = x[:, :1]
    assert torch.equal(random_grayscale(grey_images, p=1.0), grey_images)
    # Mid-range colours (no clamping): a hue shift keeps the luma, and shifting back restores the image.
    mid = 0.4 + 0.2 * x
    shift = torch.tensor([0.1, -0.2, 0.25, 0.0])
    shifted = hue_shift(mid, shift)
    luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    assert torch.allclose((shifted * luma).sum(1), (mid * luma).sum(1), atol=1e-5)
    assert not torch.allclose(shifted[0], mid[0], atol=1e-3)
    assert torch.allclose(hue_shift(shifted, -shift), mid, atol=1e-5)


def test_view_with_everything_off_is_the_image():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = SimCLRAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter_p=0.0, grayscale_p=0.0)
    assert torch.allclose(plain.apply(x), x, atol=1e-5)


# ---------------------------------------------------------------- the task

def test_task_loss_and_accuracy_match_nt_xent_on_its_views():
    torch.manual_seed(0)
    task = build_task("simclr", TINY).eval()
    images = _patterns(8)
    with torch.no_grad():
        out = task.loss(images, train=False)
        again = task.loss(images, train=False)
        # The same two seeded views, written out.
        x = images.float() / 255
        generator = torch.Generator().manual_seed(simclr_module.EVAL_VIEW_SEED)
        v1, v2 = task.augment.apply(x, generator), task.augment.apply(x, generator)
        z = task.project(torch.cat([v1, v2]))
        expected = _loop_reference(z[:8].double(), z[8:].double(), 0.5)
        logits, targets = nt_xent_logits(z[:8], z[8:], 0.5)
    assert set(out) == {"loss", "contrastive_acc"}
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["contrastive_acc"].item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert out["loss"].item() == again["loss"].item(), "evaluation is deterministic"
    assert task.project(x).shape == (8, 128)


def test_task_defaults_and_bad_temperature():
    task = SimCLRTask(TINY)
    assert task.temperature == 0.5
    linears = [m for m in task.head.modules() if isinstance(m, torch.nn.Linear)]
    # Linear-BN-ReLU-Linear from the backbone's flattened pool5 to 128.
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(task.backbone.out_dim, task.backbone.out_dim),
                                                                  (task.backbone.out_dim, 128)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in task.head.modules()) == 1
    small = SimCLRTask(TINY, SimCLRSettings(temperature=0.2, projection_dim=32, hidden=64))
    assert small.project(torch.rand(4, 1, 28, 28)).shape == (4, 32)
    with pytest.raises(ValueError, match=r"temperature=-1 is not allowed"):
        SimCLRTask(TINY, SimCLRSettings(temperature=-1))


def test_task_loss_falls_on_a_tiny_set():
    torch.manual_seed(0)
    # Milder views than the defaults, so 40 steps on 16 images are enough to learn to match them.
    # (crops keeping 40-100 % of the area, brightness and contrast 0.8 × 0.25 = 0.2)
    task = build_task("simclr", TINY, {"crop_scale": 0.4, "jitter_strength": 0.25})
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    images = _patterns(16)

    def evaluation() -> dict:
        task.eval()
        with torch.no_grad():
            out = task.loss(images, train=False)
        task.train()
        return {k: v.item() for k, v in out.items()}

    before = evaluation()
    assert before["loss"] == pytest.approx(math.log(2 * 16 - 1), abs=0.2), "starts near chance"
    for _ in range(40):
        loss = task.loss(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluation()
    assert after["loss"] < before["loss"] - 0.7, (before, after)
    assert after["contrastive_acc"] > before["contrastive_acc"] + 0.3, (before, after)


def test_evaluation_never_gathers_across_processes(monkeypatch):
    """Under torchrun rank 0 evaluates the test set alone: a collective there would wait forever."""
    def no_collectives(x):
        raise AssertionError("gathered")

    monkeypatch.setattr(simclr_module, "_gathers", lambda: True)
    monkeypatch.setattr(simclr_module, "_gather_rows", no_collectives)
    task = build_task("simclr", TINY)
    task.loss(_patterns(4), train=False)
    with pytest.raises(AssertionError, match="gathered"):
        task.loss(_patterns(4), train=True)


# ---------------------------------------------------------------- two processes

def _batch():
    """Inputs of both views (2 × 10 rows) and the weights of a linear projection to 4 dims."""
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(10, 6, generator=generator), torch.randn(10, 6, generator=generator),
            torch.randn(4, 6, generator=generator))


def _two_process_worker(rank: int, world: int, rendezvous: str, result_path: str, splits: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        x1, x2, weight = _batch()
        results = {}
        for name, split, reduction in (("even", splits[0], "mean"), ("uneven", splits[1], "sum")):
            w = weight.clone().requires_grad_(True)
            rows = slice(sum(split[:rank]), sum(split[:rank + 1]))
            z1, z2 = x1[rows] @ w.T, x2[rows] @ w.T
            logits, targets = nt_xent_logits(z1, z2, 0.5)
            loss = F.cross_entropy(logits, targets, reduction=reduction)
            loss.backward()
            # What DistributedDataParallel does with the gradients: average them over the processes
            # (for the summed loss, add them).
            grad = w.grad.clone()
            dist.all_reduce(grad)
            if reduction == "mean":
                grad /= world
            losses = [torch.zeros(()) for _ in range(world)]
            dist.all_gather(losses, loss.detach())
            results[name] = (torch.stack(losses), grad)
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradients_over_two_processes_equal_one_process(tmp_path):
    splits = ([5, 5], [6, 4])  # rows per process: an even split, and the near-equal one shards can make
    mp.spawn(_two_process_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "result.pt"), splits),
             nprocs=2, join=True)
    results = torch.load(tmp_path / "result.pt")

    x1, x2, weight = _batch()
    for name, reduction in (("even", "mean"), ("uneven", "sum")):
        w = weight.clone().requires_grad_(True)
        logits, targets = nt_xent_logits(x1 @ w.T, x2 @ w.T, 0.5)
        full = F.cross_entropy(logits, targets, reduction=reduction)
        full.backward()
        losses, grad = results[name]
        combined = losses.mean() if reduction == "mean" else losses.sum()
        assert combined.item() == pytest.approx(full.item(), rel=1e-5), name
        assert torch.allclose(grad, w.grad, rtol=1e-4, atol=1e-6), name
    # Without the gather each process would see only its own 2 × 5 views: a different loss.
    local = [nt_xent_loss(x1[rows] @ weight.T, x2[rows] @ weight.T, 0.5).item() for rows in (slice(0, 5), slice(5, 10))]
    assert sum(local) / 2 != pytest.approx(results["even"][0].mean().item(), rel=1e-3)


def test_nt_xent_logits_stay_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = nt_xent_logits(z1, z2, 0.5)
        loss = nt_xent_loss(z1, z2, 0.5)
    assert logits.dtype == torch.float32
    assert loss.item() == pytest.approx(_loop_reference(z1.double(), z2.double(), 0.5), rel=1e-5)
