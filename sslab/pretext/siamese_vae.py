"""Siamese-regularised VAE, the study's third pretext task: the VAE loss plus a triplet loss
on the latent means (Wang & Gupta, "Unsupervised Learning of Visual Representations using
Videos", ICCV 2015, for the triplet idea; Schroff et al., FaceNet, CVPR 2015, for the loss)."""
from __future__ import annotations

import torch

from ..augment import AugmentConfig
from ..models import BackboneConfig
from .vae import VAETask


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float = 0.5) -> torch.Tensor:
    """mean over N of max(0, ‖a − p‖² − ‖a − n‖² + margin), squared L2. Inputs N×L → scalar."""
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = (anchor - negative).pow(2).sum(1)
    return torch.relu(d_pos - d_neg + margin).mean()


class SiameseVAETask(VAETask):
    """VAE loss on the anchor images + λ·triplet on the latent means μ.

    Anchor = the image; positive = an augmented view of it (random resized crop, flip,
    jitter, small rotation); negative = another image of the batch (the batch rolled by a
    random offset, so never the anchor itself). ``loss(images)`` returns ``loss`` = VAE loss
    + λ·triplet, with ``recon``, ``kl`` and ``triplet``. λ = 5 and margin 0.5 (the study's values).
    """

    name = "siamese-vae"

    def __init__(self, backbone_config: BackboneConfig, augment=None, latent: int = 64, beta: float = 0.01,
                 triplet_weight: float = 5.0, margin: float = 0.5, positive_augment: AugmentConfig | None = None):
        super().__init__(backbone_config, augment, latent, beta)
        self.triplet_weight = triplet_weight
        self.margin = margin
        self.positive_augment = positive_augment or AugmentConfig(crop="resized", scale=(0.6, 1.0), flip=True,
                                                                  degrees=10.0, jitter=0.2)

    def loss(self, images: torch.Tensor, train: bool = True) -> dict:
        x = self.prepare(images)
        if train:
            x = self.augment.apply(x)
        mu, rec, kl = self.vae_terms(x)
        positive_mu, _ = self.encode(self.positive_augment.apply(x))
        n = x.shape[0]
        # Rolled by a random offset in [1, n): never the anchor itself. Drawn on the device, so the
        # step never waits for the host (and torch.compile sees no data-dependent Python int).
        shift = torch.randint(1, max(2, n), (1,), device=x.device)
        negative_mu = positive_mu[(torch.arange(n, device=x.device) + shift) % n]
        trip = triplet_loss(mu, positive_mu, negative_mu, self.margin)
        return {"loss": rec + self.beta * kl + self.triplet_weight * trip,
                "recon": rec.detach(), "kl": kl.detach(), "triplet": trip.detach()}
