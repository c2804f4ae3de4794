"""Siamese-regularised VAE, the study's third pretext task: the VAE loss plus a triplet loss
on the latent means (Wang & Gupta, "Unsupervised Learning of Visual Representations using
Videos", ICCV 2015, for the triplet idea; Schroff et al., FaceNet, CVPR 2015, for the loss)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment import AugmentConfig
from ..checks import check_bool, check_number
from ..models import BackboneConfig
from .vae import VAESettings, VAETask


@dataclass
class SiameseVAESettings(VAESettings):
    """Every setting of siamese-VAE pretraining (``--set NAME=VALUE``; see :class:`TaskSettings`):
    the VAE's (:class:`~sslab.pretext.vae.VAESettings`: optimiser, latent, β, flip), and:"""

    triplet_weight: float = 5.0  # λ, the triplet loss's weight against the VAE loss (the study's 5)
    margin: float = 0.5  # the triplet margin on squared distances (the study's)
    # -- the positive: an augmented view of the anchor (the study's random crop + resize, flip, jitter, rotation)
    positive_scale: float = 0.6  # smallest fraction of the area its random resized crop keeps (up to all of it)
    positive_flip: bool = True  # horizontal flip with probability 0.5
    positive_degrees: float = 10.0  # random rotation in ±degrees
    positive_jitter: float = 0.2  # brightness, contrast and saturation factors in 1 ± jitter

    def _check_task(self, name) -> dict:
        return dict(super()._check_task(name),
                    triplet_weight=check_number(name("triplet_weight"), self.triplet_weight, 0, low_open=False),
                    margin=check_number(name("margin"), self.margin, 0, low_open=False),
                    positive_scale=check_number(name("positive_scale"), self.positive_scale, 0, 1),
                    positive_flip=check_bool(name("positive_flip"), self.positive_flip),
                    positive_degrees=check_number(name("positive_degrees"), self.positive_degrees, 0, 180,
                                                  low_open=False),
                    positive_jitter=check_number(name("positive_jitter"), self.positive_jitter, 0, 1, low_open=False))

    def positive_augment(self) -> AugmentConfig:
        return AugmentConfig(crop="resized", scale=(self.positive_scale, 1.0), flip=self.positive_flip,
                             degrees=self.positive_degrees, jitter=self.positive_jitter)


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
    + λ·triplet, with ``recon``, ``kl`` and ``triplet``. λ = 5 and margin 0.5 (the study's values;
    ``settings.triplet_weight``, ``settings.margin``).
    """

    name = "siamese-vae"
    settings_class = SiameseVAESettings

    def __init__(self, backbone_config: BackboneConfig, settings: SiameseVAESettings | None = None):
        super().__init__(backbone_config, settings or SiameseVAESettings())
        self.triplet_weight = self.settings.triplet_weight
        self.margin = self.settings.margin
        self.positive_augment = self.settings.positive_augment()

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
