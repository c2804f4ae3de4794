"""SimCLR: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020.

Two random views of every image go through the backbone and a small projection MLP; the NT-Xent
loss pulls each view's projection towards the other view's and away from the other 2N − 2 views
in the batch. Under torchrun the projections of every process join the negatives, as in the
paper (its global batch of 4096 spans many accelerators).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..augment import SimCLRAugment, simclr_augment
from ..models import BackboneConfig
from .base import PretextTask

# The seed of train=False's two views: every evaluation of the same weights sees the same pairs.
EVAL_VIEW_SEED = 0


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

    ``hidden``: the projection's hidden width; default the backbone's ``out_dim`` (the paper's
    choice, 2048 for its ResNet-50), capped at 2048 for the AlexNet's wide flattened pool5.
    """

    name = "simclr"

    def __init__(self, backbone_config: BackboneConfig, augment: SimCLRAugment | None = None,
                 temperature: float = 0.5, projection_dim: int = 128, hidden: int | None = None):
        super().__init__(backbone_config,
                         augment or simclr_augment(backbone_config.image_size, backbone_config.in_channels))
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not allowed; allowed: a number > 0")
        self.temperature = temperature
        hidden = hidden or min(2048, self.backbone.out_dim)
        self.head = ProjectionHead(self.backbone.out_dim, hidden, projection_dim)

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
