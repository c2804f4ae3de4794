"""Convolutional variational autoencoder: Kingma & Welling, "Auto-Encoding Variational
Bayes", ICLR 2014, with the study's AlexNet encoder and a β-weighted KL term
(Higgins et al., β-VAE, ICLR 2017)."""
from __future__ import annotations

import torch

from ..augment import AugmentConfig
from ..models import BackboneConfig, ConvDecoder, GaussianHead
from .base import PretextTask


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample: -½ Σ (1 + log σ² − μ² − σ²). N×L → N."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_error(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each image's pixels. N×C×H×W → N."""
    return (recon - target).pow(2).flatten(1).sum(1)


class VAETask(PretextTask):
    """Encoder = AlexNet conv stack → :class:`GaussianHead` (μ, log σ²; latent 64); decoder =
    :class:`ConvDecoder` back to the input size.

    ``loss(images)``: uint8 N×C×H×W → ``loss`` = mean over the batch of (summed squared
    reconstruction error + β·KL), with ``recon`` and ``kl`` reported separately (β = 0.01,
    the study's value).
    """

    name = "vae"

    def __init__(self, backbone_config: BackboneConfig, augment=None, latent: int = 64, beta: float = 0.01):
        # The VAE's own input is only flipped: the reconstruction target is the image it sees.
        super().__init__(backbone_config, augment or AugmentConfig(crop="none", flip=True, degrees=0, jitter=0))
        self.latent = latent
        self.beta = beta
        self.head = GaussianHead(self.backbone.out_dim, latent)
        self.decoder = ConvDecoder(latent, backbone_config.in_channels, backbone_config.image_size,
                                   width=backbone_config.width)

    def encode(self, x: torch.Tensor):
        """Float images → (μ, log σ²), each N×latent (computed in fp32 for a stable KL)."""
        mu, logvar = self.head(self.backbone(x))
        return mu.float(), logvar.float().clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def vae_terms(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon = self.decode(z).float()
        rec = reconstruction_error(recon, x.float()).mean()
        kl = kl_to_standard_normal(mu, logvar).mean()
        return mu, rec, kl

    def loss(self, images: torch.Tensor, train: bool = True) -> dict:
        x = self.prepare(images)
        if train:
            x = self.augment.apply(x)
        _, rec, kl = self.vae_terms(x)
        return {"loss": rec + self.beta * kl, "recon": rec.detach(), "kl": kl.detach()}
