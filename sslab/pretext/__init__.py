"""The pretext tasks. A new task is one file here plus one line in ``TASKS``."""
from __future__ import annotations

from ..models import BackboneConfig
from .base import PretextTask
from .rotation import RotationTask
from .siamese_vae import SiameseVAETask, triplet_loss
from .simclr import NTXentLoss, SimCLRTask, nt_xent_loss
from .vae import VAETask, kl_to_standard_normal, reconstruction_error

TASKS = {
    "rotation": RotationTask,
    "vae": VAETask,
    "siamese-vae": SiameseVAETask,
    "simclr": SimCLRTask,
}


def check_method(method: str) -> str:
    if method not in TASKS:
        raise ValueError(f"method={method!r} is not known; allowed: {', '.join(TASKS)}")
    return method


def build_task(method: str, backbone_config: BackboneConfig, **params) -> PretextTask:
    return TASKS[check_method(method)](backbone_config, **params)


__all__ = ["TASKS", "PretextTask", "RotationTask", "VAETask", "SiameseVAETask", "SimCLRTask", "build_task",
           "check_method", "kl_to_standard_normal", "reconstruction_error", "triplet_loss", "nt_xent_loss",
           "NTXentLoss"]
