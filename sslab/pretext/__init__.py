"""The pretext tasks. A new task is one file here (its settings block and its module) plus one
line in ``TASKS``."""
from __future__ import annotations

from typing import Callable, Optional, Union

from ..checks import fail
from ..models import BackboneConfig
from .base import PretextTask, TaskSettings, parse_value
from .rotation import RotationSettings, RotationTask
from .siamese_vae import SiameseVAESettings, SiameseVAETask, triplet_loss
from .simclr import NTXentLoss, SimCLRSettings, SimCLRTask, nt_xent_loss
from .vae import VAESettings, VAETask, kl_to_standard_normal, reconstruction_error

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


def setting_names(method: str) -> tuple:
    """The names of ``method``'s settings, in the order of its block."""
    return TASKS[check_method(method)].settings_class.names()


def task_settings(method: str, values: Optional[dict] = None, name: Callable[[str], str] = str) -> TaskSettings:
    """``method``'s settings block with ``values`` (setting name → value) in place of the defaults,
    every value checked and in its canonical type. A name the method does not have, or a bad
    value, is the lab's one-line error with the setting spelled ``name(setting)``."""
    cls = TASKS[check_method(method)].settings_class
    values = dict(values or {})
    names = cls.names()
    for key, value in values.items():
        if key not in names:
            fail(name(str(key)), value, f"a setting of {method}: {', '.join(names)}")
    return cls(**values).checked(name)


def build_task(method: str, backbone_config: BackboneConfig,
               settings: Union[TaskSettings, dict, None] = None) -> PretextTask:
    """``method``'s task for ``backbone_config``, built from ``settings``: its settings block, or a
    dict of the settings that differ from the block's defaults (None: all defaults)."""
    cls = TASKS[check_method(method)]
    if settings is None or isinstance(settings, dict):
        settings = task_settings(method, settings)
    elif type(settings) is not cls.settings_class:
        raise TypeError(f"settings={type(settings).__name__}(...) is not allowed for {method}; allowed: "
                        f"{cls.settings_class.__name__}, a dict of its settings, or None")
    return cls(backbone_config, settings)


__all__ = ["TASKS", "PretextTask", "TaskSettings", "RotationTask", "RotationSettings", "VAETask", "VAESettings",
           "SiameseVAETask", "SiameseVAESettings", "SimCLRTask", "SimCLRSettings", "build_task", "check_method",
           "setting_names", "task_settings", "parse_value", "kl_to_standard_normal", "reconstruction_error",
           "triplet_loss", "nt_xent_loss", "NTXentLoss"]
