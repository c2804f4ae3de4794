"""A notebook's parameters: checked once, in the cell after the parameters cell, and what
follows from them (the one pretraining config per method that every notebook shares); and the
papermill parameter files (YAML) and ``-p`` values they are read from."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..checks import (MAX_COUNT, MAX_EPOCHS, MAX_STEPS, check_bool, check_choice, check_choice_list, check_int,
                      check_int_list, check_number, fail)
from ..data import check_dataset_name, load_dataset
from ..embed import SCORES as SCORE_FUNCTIONS
from ..evaluate import HEADS, PROTOCOLS, EvalConfig
from ..evaluate.cells import check_choice_folds, check_choice_margin
from ..evaluate.selection import SELECTIONS
from ..models import ALL_LAYERS, ARCHS, LAYERS_BY_ARCH, resolve_layer
from ..pretext import TASKS, setting_names
from ..precision import PRECISIONS, resolve_precision
from ..pretrain import METHODS, RANDOM_INIT, PretrainConfig, settings_by_method
from ..train import make_deterministic, resolve_device

SCORES = tuple(SCORE_FUNCTIONS)


def _name(parameter: str) -> str:
    return f"parameter {parameter}"


def _check_limit(value, parameter: str = "limit") -> Optional[int]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    return check_int(_name(parameter), value, 2, " (unlabeled images used for pretraining), or None for all",
                     maximum=MAX_COUNT)


def _check_epochs(value, parameter: str = "epochs") -> int:
    return check_int(_name(parameter), value, 1, " (pretraining epochs)", maximum=MAX_EPOCHS)


def _check_dataset(value) -> str:
    try:
        return check_dataset_name(value)
    except ValueError:
        fail(_name("dataset"), value, "fashion-mnist, cifar10, stl10 or folder:PATH")


def _check_device(value) -> torch.device:
    if not isinstance(value, str):
        fail(_name("device"), value, "auto, cpu, cuda or cuda:N")
    try:
        return resolve_device(value)
    except ValueError as exc:
        raise ValueError(f"parameter device={value!r} is not allowed: {exc}") from None


def _check_out(value) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        fail(_name("out"), value, "None (the repository's outputs/, or $SSLAB_OUTPUTS) or a folder path")
    return value or None


def _setting_name(setting: str) -> str:
    return f"{_name('pretext_settings')}: {setting}"


def _check_pretext_settings(value) -> dict:
    """A dict of pretext-task settings (name → value, e.g. ``{"triplet_weight": 10}``), each
    applied to every method that has it; papermill's ``-p`` hands it over as YAML text."""
    if isinstance(value, str):
        import yaml
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
        value = {} if value is None else value
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        fail(_name("pretext_settings"), value, "a dict of pretext-task settings, e.g. {'triplet_weight': 10} "
                                               "(the names: sslab/pretext/<task>.py)")
    settings_by_method(tuple(TASKS), value, _setting_name)  # each name some task has, each value in range
    return dict(value)


def _choice(parameter: str, choices):
    return lambda value: check_choice(_name(parameter), value, choices)


# name → checker; the notebooks' parameter cells use these names and nothing else.
CHECKS = {
    "dataset": _check_dataset,
    "methods": lambda v: check_choice_list(_name("methods"), v, tuple(TASKS), "pretext tasks"),
    "epochs": _check_epochs,
    "limit": _check_limit,
    "pretrain_epochs": lambda v: _check_epochs(v, "pretrain_epochs"),
    "pretrain_images": lambda v: _check_limit(v, "pretrain_images"),
    "pretext_settings": _check_pretext_settings,
    "device": _check_device,
    "interactive": lambda v: check_bool(_name("interactive"), v),
    "labels": lambda v: check_int(_name("labels"), v, 1, " (labeled images per class)"),
    "budgets": lambda v: tuple(sorted(check_int_list(_name("budgets"), v, 1, "labeled images per class"))),
    "seeds": lambda v: tuple(sorted(check_int_list(_name("seeds"), v, 0, "seeds"))),
    "layer": _choice("layer", ("auto",) + ALL_LAYERS),
    "backbone": _choice("backbone", ARCHS),
    "head": _choice("head", HEADS),
    "points": lambda v: check_int(_name("points"), v, 20, " (test images in each UMAP)"),
    "vae_latent": lambda v: check_bool(_name("vae_latent"), v),
    "score": _choice("score", SCORES),
    "examples": lambda v: check_int(_name("examples"), v, 1, " (images per gallery)"),
    "out": _check_out,
    "deterministic": lambda v: check_bool(_name("deterministic"), v),
    "precision": _choice("precision", PRECISIONS),
    "protocols": lambda v: check_choice_list(_name("protocols"), v, PROTOCOLS, "protocols"),
    "random_init": lambda v: check_bool(_name("random_init"), v),
    "sweep_setting": lambda v: v if isinstance(v, str) and v.isidentifier() else
    fail(_name("sweep_setting"), v, "the name of a pretext setting, e.g. triplet_weight (sslab/pretext/<task>.py)"),
    "sweep_values": lambda v: tuple(v) if isinstance(v, (list, tuple)) and len(v) >= 2 else
    fail(_name("sweep_values"), v, "a list of two values or more, e.g. [0, 1, 5, 20]"),
    "sweep_labels": lambda v: check_int(_name("sweep_labels"), v, 1, " (labeled images per class)", maximum=MAX_COUNT),
    "random_init_protocols": lambda v: check_choice_list(_name("random_init_protocols"), v, PROTOCOLS, "protocols"),
    "st_steps": lambda v: check_int(_name("st_steps"), v, 1, " (training steps of each self-training student)",
                                    maximum=MAX_STEPS),
    "choice_margin": lambda v: check_choice_margin(_name("choice_margin"), v),
    "choice_folds": lambda v: check_choice_folds(_name("choice_folds"), v),
    "fm_steps": lambda v: check_int(_name("fm_steps"), v, 1, " (FixMatch training steps)", maximum=MAX_STEPS),
    "lp_k": lambda v: check_int(_name("lp_k"), v, 1, " (neighbours of each image in label propagation's graph)",
                                maximum=MAX_COUNT),
    "backbone_lr_scale": lambda v: check_number(_name("backbone_lr_scale"), v, 0, 10, low_open=False,
                                                what=" (the backbone's learning rate over the head's when "
                                                     "fine-tuning; 0 freezes its weights)"),
    "selection": _choice("selection", SELECTIONS),
    "selections": lambda v: check_choice_list(_name("selections"), v, SELECTIONS,
                                              "ways of choosing the labeled images"),
    "val_per_class": lambda v: check_int(_name("val_per_class"), v, 0,
                                         " (labeled validation images per class; 0: none)", maximum=MAX_COUNT),
}
# Parameters that set a setting under a name of their own. Notebook 00 pretrains on the CPU in plain
# PyTorch: the epochs and limit of a parameter file (params/full.yml's 30 epochs on every image, sized
# for a GPU) must not reach it, so its parameters are called otherwise.
ALIASES = {"pretrain_epochs": "epochs", "pretrain_images": "limit"}


@dataclass
class LabSettings:
    """A notebook's checked parameters and what follows from them."""

    dataset: str = "fashion-mnist"
    methods: tuple = tuple(TASKS)
    epochs: int = 3
    limit: Optional[int] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    interactive: bool = True
    labels: Optional[int] = None
    budgets: tuple = ()
    seeds: tuple = (0,)
    layer: str = "auto"
    backbone: str = "alexnet"
    # pretext-task settings, name → value, each applied to every method that has it (sslab/pretext/<task>.py)
    pretext_settings: dict = field(default_factory=dict)
    head: str = "mlp"
    points: int = 2000
    vae_latent: bool = True
    score: str = "knn"
    examples: int = 8
    out: Optional[str] = None
    deterministic: bool = False
    precision: str = "auto"
    protocols: tuple = ("probe", "scratch")
    random_init: bool = False  # also evaluate the backbone as initialised (what pretraining adds)
    random_init_protocols: tuple = PROTOCOLS  # the protocols random-init gets (of those the notebook runs)
    sweep_setting: str = "triplet_weight"  # the pretext setting notebook 01 sweeps
    sweep_values: tuple = (0, 5)  # the setting off and the study's value
    sweep_labels: int = 4  # labeled images per class of the sweep's probe
    st_steps: int = EvalConfig.st_steps
    fm_steps: int = EvalConfig.fm_steps
    choice_margin: float = EvalConfig.choice_margin  # labelprop, selftrain: how clearly a candidate must beat the probe
    choice_folds: int = EvalConfig.choice_folds  # labelprop, selftrain: held-out splits their choices are judged on
    lp_k: int = EvalConfig.lp_k  # neighbours of each image in label propagation's k-NN graph
    backbone_lr_scale: float = EvalConfig.backbone_lr_scale  # fine-tuning: the backbone's lr over the head's
    selection: str = EvalConfig.selection  # which images are labeled (see sslab.evaluate.selection)
    selections: tuple = ("balanced",)  # the ways of choosing them a notebook compares
    val_per_class: int = EvalConfig.val_per_class  # 0: no validation images, every label counted
    given: tuple = ()  # the parameter names the notebook set (what frame() shows)

    def pretrain_config(self, method: str) -> PretrainConfig:
        """The one pretraining config of ``method`` that every notebook (and
        ``python -m sslab curve --pretrain-epochs E --limit L --set NAME=VALUE``) derives from the same
        parameters."""
        check_choice("method", method, METHODS)
        names = () if method == RANDOM_INIT else setting_names(method)
        settings = {name: value for name, value in self.pretext_settings.items() if name in names}
        return PretrainConfig(method=method, dataset=self.dataset, epochs=self.epochs, limit=self.limit,
                              precision=self.precision, backbone=self.backbone, settings=settings)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(layer=self.layer, head=self.head, precision=self.precision, st_steps=self.st_steps,
                          fm_steps=self.fm_steps, selection=self.selection, val_per_class=self.val_per_class,
                          lp_k=self.lp_k, backbone_lr_scale=self.backbone_lr_scale,
                          choice_margin=self.choice_margin, choice_folds=self.choice_folds)

    @property
    def run_methods(self) -> tuple:
        """The methods the notebook evaluates: ``methods``, and random-init when ``random_init``."""
        return self.methods + ((RANDOM_INIT,) if self.random_init else ())

    @property
    def resolved_layer(self) -> str:
        """``layer`` for this backbone (auto → conv4 on AlexNet, layer4 on ResNet-18)."""
        return resolve_layer(self.layer, self.backbone)

    @property
    def layers(self) -> tuple:
        """The layers this backbone offers."""
        return LAYERS_BY_ARCH[self.backbone]

    @property
    def resolved_precision(self) -> str:
        """``precision`` as the runs use it on ``device`` (auto → bf16 or fp32)."""
        return resolve_precision(self.precision, self.device)

    @property
    def splits(self):
        return load_dataset(self.dataset)

    def frame(self):
        """The notebook's parameters as checked, and the pretraining config they give (what
        produced this notebook's outputs), as a one-column table."""
        import pandas as pd
        names = self.given or [f for f in asdict(self) if f != "given"]
        values = {}
        for name in names:
            value = getattr(self, ALIASES.get(name, name))
            values[name] = ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        values["device"] = str(self.device)
        config = self.pretrain_config(self.methods[0]).resolved(self.device)
        values["pretraining images × epochs"] = f"{config.limit or 'all'} × {config.epochs}"
        values["backbone width"] = f"{config.width:g}"
        values["precision (resolved)"] = config.precision
        return pd.DataFrame({"value": values})


def check_notebook_params(**params) -> LabSettings:
    """Check a notebook's parameters (as papermill or a person set them) and return the
    :class:`LabSettings`. A bad value raises ``ValueError`` naming the parameter, the value and
    what is allowed — e.g. ``-p labels abc`` or an unknown method."""
    unknown = sorted(set(params) - set(CHECKS))
    if unknown:
        raise TypeError(f"unknown notebook parameter(s): {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    aliased = [name for name in ALIASES if name in params and ALIASES[name] in params]
    if aliased:
        raise TypeError(f"notebook parameters {aliased[0]} and {ALIASES[aliased[0]]} set the same setting; "
                        f"allowed: one of them")
    checked = {ALIASES.get(name, name): CHECKS[name](value) for name, value in params.items()}
    settings = LabSettings(**checked, given=tuple(params))
    try:  # a layer of another backbone (layer4 with alexnet) is refused here, not after pretraining
        settings.resolved_layer
    except ValueError:
        fail(_name("layer"), settings.layer, f"auto or a layer of {settings.backbone}: "
                                              f"{', '.join(LAYERS_BY_ARCH[settings.backbone])}")
    if settings.pretext_settings:  # each name must be a setting of a method the notebook pretrains
        settings_by_method(settings.run_methods, settings.pretext_settings, _setting_name)
    if "device" not in params:
        settings.device = resolve_device("auto")
    if settings.deterministic:
        make_deterministic()  # process-wide: feature extraction and the UMAP inputs repeat too
    from ..parallel import start_early
    start_early()  # the workers' fork server imports torch while the notebook's first cells run
    return settings


# ---------------------------------------------------------------- parameter files (YAML)

def load_params(path: Optional[str]) -> dict:
    """A papermill parameter file (YAML mapping) → dict; None → {}."""
    if not path:
        return {}
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--params={str(path)!r} does not exist; allowed: a YAML file such as params/full.yml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"--params={str(path)!r} is not allowed: {yaml_problem(exc)}; allowed: a YAML mapping of "
                         f"parameter: value, one per line, e.g. labels: 20") from None
    if not isinstance(data, dict):
        raise ValueError(f"--params={str(path)!r} must hold a mapping of parameter: value")
    return data


def yaml_problem(exc: Exception) -> str:
    """Where and what a YAML parse error is, in one line: ``line L column C: problem``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    if context and getattr(exc, "problem", None):
        problem += f" ({' '.join(str(context).split())})"
    if "constructor for the tag" in problem:
        problem += "; only plain values are read (numbers, text, lists), no !!python tags"
    return where + problem


def parse_parameter(name: str, text: str):
    """The value of ``-p NAME TEXT`` (YAML, as papermill reads it); a malformed one is one line."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"-p {name} {text!r} is not allowed: {yaml_problem(exc)}; allowed: a YAML value, e.g. "
                         f"-p labels 5, -p dataset cifar10, -p seeds '[0, 1]'") from None
