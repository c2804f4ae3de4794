"""SimCLR: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020.

Two random views of every image go through the backbone and a small projection MLP; the NT-Xent
loss pulls each view's projection towards the other view's and away from the other 2N − 2 views
in the batch. Under torchrun the projections of every process join the negatives, as in the
paper (its global batch of 4096 spans many accelerators).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..augment import SimCLRAugment, simclr_augment, simclr_blur_p, simclr_jitter_strength
from ..checks import MAX_COUNT, check_bool, check_int, check_number
from ..models import BackboneConfig, backbone_out_dim
from .base import PretextTask, TaskSettings, check_optional_int, check_optional_number, check_probability

# The seed of train=False's two views: every evaluation of the same weights sees the same pairs.
EVAL_VIEW_SEED = 0


@dataclass
class SimCLRSettings(TaskSettings):
    """Every setting of SimCLR pretraining (``--set NAME=VALUE``; see :class:`TaskSettings`)."""

    # -- optimiser: SGD momentum 0.9 with cosine decay, the best of Adam 1e-3/3e-3 and SGD 0.06/0.3 (batch 256)
    # and SGD 0.12 (batch 512) by kNN accuracy after 3 epochs on 20k Fashion-MNIST images (CPU, width 0.25)
    optimizer: str = "sgd"  # sgd, adam or adamw
    lr: float = 0.06  # peak learning rate (that comparison's best)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 penalty on every weight
    batch_size: int = 256  # source images per step, two views of each (every other view is a negative)
    schedule: str = "cosine"  # cosine decay per step (the paper's); step: ×gamma at the milestones; constant
    milestones: tuple = (0.24, 0.48, 0.71)  # fractions of the run where `step` multiplies by gamma
    gamma: float = 0.1  # the step schedule's factor
    warmup_epochs: float = 0.0  # epochs of linear warm-up to the peak
    # -- the task (Chen et al. 2020)
    temperature: float = 0.5  # τ of NT-Xent: cosine similarities are divided by it (the paper's CIFAR-10 value)
    projection_dim: int = 128  # size of the projection the loss reads (the paper's)
    hidden: Optional[int] = None  # the projection MLP's hidden width; None: the backbone's output size, at most 2048
    # -- the two views (appendix A; sslab.augment.simclr_augment)
    crop_scale: float = 0.08  # smallest fraction of the area a random resized crop keeps (the paper's 8 %)
    flip: bool = True  # horizontal flip with probability 0.5
    jitter_strength: Optional[float] = None  # s: brightness/contrast/saturation 0.8·s, hue 0.2·s; None: 1.0 for
    # colour images from 64 px (the paper's ImageNet value), 0.5 otherwise (its CIFAR-10 value)
    jitter_p: float = 0.8  # probability of the colour jitter (the paper's)
    grayscale_p: float = 0.2  # probability of a greyscale view, colour images only (the paper's)
    blur_p: Optional[float] = None  # probability of a Gaussian blur; None: 0.5 from 64 px, none below (the paper's)

    def _check_task(self, name) -> dict:
        return dict(temperature=check_number(name("temperature"), self.temperature),
                    projection_dim=check_int(name("projection_dim"), self.projection_dim, 1, maximum=MAX_COUNT),
                    hidden=check_optional_int(name("hidden"), self.hidden, 1, "the backbone's output size"),
                    crop_scale=check_number(name("crop_scale"), self.crop_scale, 0, 1),
                    flip=check_bool(name("flip"), self.flip),
                    # up to 1.25: brightness and contrast factors 1 ± 0.8·s must stay ≥ 0
                    jitter_strength=check_optional_number(name("jitter_strength"), self.jitter_strength, 0, 1.25,
                                                          "0.5 or 1.0 by image size", low_open=False),
                    jitter_p=check_probability(name("jitter_p"), self.jitter_p),
                    grayscale_p=check_probability(name("grayscale_p"), self.grayscale_p),
                    blur_p=check_optional_number(name("blur_p"), self.blur_p, 0, 1, "0.5 from 64 px, 0 below",
                                                 low_open=False))

    def sized_to(self, backbone: BackboneConfig) -> "SimCLRSettings":
        size, channels = backbone.image_size, backbone.in_channels
        return replace(self, hidden=self.hidden or min(2048, backbone_out_dim(backbone)),
                       jitter_strength=(simclr_jitter_strength(size, channels) if self.jitter_strength is None
                                        else self.jitter_strength),
                       blur_p=simclr_blur_p(size) if self.blur_p is None else self.blur_p)

    def augment(self, backbone: BackboneConfig) -> SimCLRAugment:
        return simclr_augment(backbone.image_size, backbone.in_channels, self.jitter_strength, self.crop_scale,
                              self.jitter_p, self.grayscale_p, self.blur_p, self.flip)


class _AllGather(torch.autograd.Function):
    """Every process's N×D rows stacked in rank order (world·N×D), differentiable: the backward
    sums over processes the gradient each one's loss sends to the stacked rows (one all-reduce)
    and hands each process the part for its own rows (as lightly's GatherLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _gather_rows(x: torch.Tensor) -> tuple:
    """``(rows of every process stacked in rank order, this process's first row in them)``, with
    gradients flowing back to each process's own rows (:class:`_AllGather`). Processes may hold
    one row more or less than each other (near-equal shards), so rows are padded to the largest
    count for the collective and cut back after it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    parts = _AllGather.apply(padded).chunk(world)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), sum(counts[:rank])


def _gathers() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> tuple:
    """The NT-Xent classification problem behind :func:`nt_xent_loss`: ``(logits, targets)``.

    ``z1``, ``z2``: N×D projections of the two views of the same N images (row i of each is a
    positive pair). Every one of the 2N views is an anchor; its candidates are all the views of
    the batch, itself excluded (its logit is −inf): logits 2N×2M (M = N, or the global batch
    under torchrun with ``gather``), cosine similarity / ``temperature`` in fp32; targets 2N,
    the column of the anchor's positive. Anchors are ordered view 1 then view 2, candidates
    view 1 of all processes (rank order) then view 2 of all processes."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} are not allowed; allowed: two N×D "
                         f"tensors of the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not allowed; allowed: a number > 0")
    n = z1.shape[0]
    # In fp32 even inside a bf16 autocast: bf16 keeps ~3 digits, and the loss is a softmax over
    # differences of these logits. The 2N×2M product is small next to the backbone.
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        if gather and _gathers():
            # Both views side by side (N×2D): one collective instead of two.
            both, offset = _gather_rows(torch.cat([z1, z2], dim=1))
            all1, all2 = both.split(z1.shape[1], dim=1)
        else:
            all1, all2, offset = z1, z2, 0
        m = all1.shape[0]
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature
    local = torch.arange(n, device=z1.device) + offset
    own = torch.cat([local, local + m])  # each anchor's own column
    targets = torch.cat([local + m, local])  # its positive: the same image's other view
    logits = logits.masked_fill(F.one_hot(own, 2 * m).bool(), float("-inf"))
    return logits, targets


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020,
    eq. 1): with s(u, v) the cosine similarity and τ the temperature,

        ℓ(i, j) = −log [ exp(s(z_i, z_j)/τ) / Σ_{k ≠ i} exp(s(z_i, z_k)/τ) ]

    over the 2N views, averaged over all 2N ordered positive pairs (i, j) — both directions.

    ``z1``, ``z2``: N×D projections of the two views (row i of each from the same image) → a
    scalar. Symmetric in the two views. Under torchrun (``gather`` and a process group of more
    than one process) the other processes' projections are added to the candidates and each
    process averages over its own 2N anchors; DistributedDataParallel's gradient average then
    makes the step the one a single process would take on the whole batch."""
    logits, targets = nt_xent_logits(z1, z2, temperature, gather)
    return F.cross_entropy(logits, targets)


class NTXentLoss(nn.Module):
    """:func:`nt_xent_loss` as a module, with its temperature (and whether to gather across
    processes) fixed at construction. ``forward(z1 N×D, z2 N×D)`` → scalar."""

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not allowed; allowed: a number > 0")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, self.temperature, self.gather_distributed)


class ProjectionHead(nn.Module):
    """SimCLR's projection g(·): Linear-BN-ReLU-Linear (one hidden layer). Input N×D (the
    backbone's last map, flattened), output N×``out_dim``. The loss reads this output; the
    representation kept for downstream tasks is the backbone's, before it (paper, section 4.2)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SimCLRTask(PretextTask):
    """Contrastive learning of two augmented views (SimCLR).

    ``loss(images)``: uint8 N×C×H×W → two views of each image (:class:`SimCLRAugment`, settings
    by size from :func:`simclr_augment`) → backbone → :class:`ProjectionHead` → N×128 per view →
    :func:`nt_xent_loss` at ``temperature``. Returns ``loss`` and ``contrastive_acc``: the
    fraction of the 2N views whose nearest other view (highest logit) is their positive, among
    the 2N − 1 candidates (2M − 1 under torchrun).

    ``loss(images, train=False)``: the same two kinds of view, drawn from a generator seeded
    with :data:`EVAL_VIEW_SEED` on the images' device, so the same weights always give the same
    numbers; it never gathers across processes (under torchrun rank 0 evaluates alone).

    ``settings.hidden``: the projection's hidden width; default the backbone's ``out_dim`` (the
    paper's choice, 2048 for its ResNet-50), capped at 2048 for the AlexNet's wide flattened pool5.
    """

    name = "simclr"
    settings_class = SimCLRSettings
    images_per_sample = 2  # the two views

    def __init__(self, backbone_config: BackboneConfig, settings: SimCLRSettings | None = None):
        settings = (settings or self.settings_class()).checked().sized_to(backbone_config)
        super().__init__(backbone_config, settings.augment(backbone_config))
        self.settings = settings
        self.temperature = settings.temperature
        self.head = ProjectionHead(self.backbone.out_dim, settings.hidden, settings.projection_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Float images → N×projection_dim projections."""
        return self.head(self.backbone(x))

    def loss(self, images: torch.Tensor, train: bool = True) -> dict:
        x = self.prepare(images)
        generator = None
        if not train:
            generator = torch.Generator(device=x.device).manual_seed(EVAL_VIEW_SEED)
        views = torch.cat([self.augment.apply(x, generator), self.augment.apply(x, generator)])
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        # One forward for both views: BatchNorm normalises them together, as the paper's
        # implementation does on each accelerator.
        z1, z2 = self.project(views).chunk(2)
        logits, targets = nt_xent_logits(z1, z2, self.temperature, gather=train)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(1) == targets).float().mean()
        return {"loss": loss, "contrastive_acc": accuracy.detach()}
