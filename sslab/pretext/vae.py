"""Convolutional variational autoencoder: Kingma & Welling, "Auto-Encoding Variational
Bayes", ICLR 2014, with the study's AlexNet encoder and a β-weighted KL term
(Higgins et al., β-VAE, ICLR 2017)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment import AugmentConfig
from ..checks import MAX_COUNT, check_bool, check_int, check_number
from ..models import BackboneConfig, ConvDecoder, GaussianHead
from .base import PretextTask, TaskSettings


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample: -½ Σ (1 + log σ² − μ² − σ²). N×L → N."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_error(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each image's pixels. N×C×H×W → N."""
    return (recon - target).pow(2).flatten(1).sum(1)


@dataclass
class VAESettings(TaskSettings):
    """Every setting of VAE pretraining (``--set NAME=VALUE``; see :class:`TaskSettings`)."""

    # -- optimiser: the study's Adam 1e-3
    optimizer: str = "adam"  # sgd, adam or adamw
    lr: float = 1e-3  # peak learning rate (the study's)
    momentum: float = 0.9  # SGD momentum (used only with optimizer sgd)
    nesterov: bool = True  # Nesterov momentum (used only with optimizer sgd)
    weight_decay: float = 0.0  # L2 penalty on every weight (the study's Adam had none)
    batch_size: int = 128  # images per step
    schedule: str = "cosine"  # cosine decay per step; step: ×gamma at the milestones; constant
    milestones: tuple = (0.24, 0.48, 0.71)  # fractions of the run where `step` multiplies by gamma
    gamma: float = 0.1  # the step schedule's factor
    warmup_epochs: float = 0.0  # epochs of linear warm-up to the peak
    # -- the task
    latent: int = 64  # size of the latent code z (the study's)
    beta: float = 0.01  # weight of the KL term against the summed squared error (the study's β)
    # -- the view: only flipped, since the reconstruction target is the image the encoder sees
    flip: bool = True  # horizontal flip with probability 0.5

    def _check_task(self, name) -> dict:
        return dict(latent=check_int(name("latent"), self.latent, 1, maximum=MAX_COUNT),
                    beta=check_number(name("beta"), self.beta, 0, low_open=False),
                    flip=check_bool(name("flip"), self.flip))

    def augment(self) -> AugmentConfig:
        return AugmentConfig(crop="none", flip=self.flip, degrees=0, jitter=0)


class VAETask(PretextTask):
    """Encoder = the backbone → :class:`GaussianHead` (μ, log σ²; latent 64); decoder =
    :class:`ConvDecoder` back to the input size.

    ``loss(images)``: uint8 N×C×H×W → ``loss`` = mean over the batch of (summed squared
    reconstruction error + β·KL), with ``recon`` and ``kl`` reported separately (β = 0.01,
    the study's value; ``settings.beta``).
    """

    name = "vae"
    settings_class = VAESettings

    def __init__(self, backbone_config: BackboneConfig, settings: VAESettings | None = None):
        settings = (settings or self.settings_class()).checked().sized_to(backbone_config)
        super().__init__(backbone_config, settings.augment())
        self.settings = settings
        self.latent = settings.latent
        self.beta = settings.beta
        self.head = GaussianHead(self.backbone.out_dim, settings.latent)
        self.decoder = ConvDecoder(settings.latent, backbone_config.in_channels, backbone_config.image_size,
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
