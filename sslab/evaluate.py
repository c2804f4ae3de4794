"""Measuring what pretraining buys: probes on frozen features, the scratch baseline,
fine-tuning, top-1/top-5, and label-budget curves.

Every evaluation cell (method × protocol × budget × seed) is a run in the store
(``outputs/runs/eval-…``: config, metrics, split indices), found again by its config, so a
sweep run twice only computes what is missing. For one budget and seed every method sees
the same labeled and validation images (:func:`sslab.data.label_budget_split`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import store
from .augment import default_augment, to_float
from .data import DatasetSplits, label_budget_split, load_dataset
from .models import LAYERS, AlexNetBackbone, BackboneConfig, ClassifierHead, check_layer, pooled_dim, pooled_features
from .pretrain import Run, load_run
from .train import CHECKPOINT_EVERY_S, FitResult, TrainConfig, fit, resolve_device

PROBES = ("mlp", "linear", "knn")
PROTOCOLS = ("probe", "scratch", "finetune")
BUDGETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class EvalConfig:
    """How one evaluation cell trains. ``val_per_class`` labeled images per class (disjoint from
    the budget and the test split) drive early stopping; ``samples_per_epoch`` makes an epoch
    of a tiny budget a fixed number of augmented views rather than a handful of images."""

    layer: str = "conv4"
    probe: str = "mlp"
    grid: int = 4
    hidden: int = 200
    val_per_class: int = 10
    # Heads on frozen features (mlp, linear).
    probe_epochs: int = 60
    probe_lr: float = 1e-3
    probe_patience: int = 10
    # End-to-end (scratch baseline, fine-tuning).
    epochs: int = 30
    lr: float = 1e-3
    patience: int = 8
    finetune_epochs: int = 15
    finetune_lr: float = 1e-4
    backbone_lr_scale: float = 0.1
    batch_size: int = 128
    samples_per_epoch: int = 1024
    weight_decay: float = 5e-4
    knn_k: int = 20
    knn_temperature: float = 0.07

    def validate(self) -> "EvalConfig":
        check_layer(self.layer)
        check_probe(self.probe)
        for name in ("grid", "hidden", "probe_epochs", "epochs", "finetune_epochs", "batch_size", "knn_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer ≥ 1")
        if isinstance(self.val_per_class, bool) or not isinstance(self.val_per_class, int) or self.val_per_class < 1:
            raise ValueError(f"val_per_class={self.val_per_class!r} is not allowed; allowed: an integer ≥ 1")
        return self


def check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"probe={probe!r} is not known; allowed: {', '.join(PROBES)}")
    return probe


def check_budgets(budgets, name: str = "budgets") -> list:
    return _check_int_values(budgets, name, 1, "labeled images per class")


def check_seeds(seeds, name: str = "seeds") -> list:
    return _check_int_values(seeds, name, 0, "seeds")


def _check_int_values(values, name: str, minimum: int, what: str) -> list:
    """One integer or a list of them, each ≥ ``minimum`` and none repeated: a repeated budget or
    seed would count the same cell twice in a table's mean and spread."""
    items = list(values) if isinstance(values, (list, tuple)) else [values]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in items):
        raise ValueError(f"{name}={values!r} is not allowed; allowed: integers ≥ {minimum} ({what})")
    if len(set(int(v) for v in items)) < len(items):
        raise ValueError(f"{name}={values!r} is not allowed; allowed: {what} without repeats")
    return [int(v) for v in items]


# ---------------------------------------------------------------- metrics

def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> Optional[float]:
    """Fraction of rows whose target is among the ``k`` largest logits; None when there are
    fewer than ``k`` classes (top-k is then not defined)."""
    if logits.shape[1] < k:
        return None
    top = logits.topk(k, dim=1).indices
    return float((top == targets[:, None]).any(dim=1).float().mean())


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, classes: int) -> torch.Tensor:
    """classes×classes counts; row = true class, column = predicted class."""
    index = targets.long() * classes + predictions.long()
    return torch.bincount(index.cpu(), minlength=classes * classes).reshape(classes, classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """top-1, top-5, per-class accuracy and the confusion matrix of ``logits`` (N×classes)."""
    logits, targets = logits.float().cpu(), targets.cpu()
    classes = logits.shape[1]
    confusion = confusion_matrix(logits.argmax(1), targets, classes)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    return {"top1": topk_accuracy(logits, targets, 1), "top5": topk_accuracy(logits, targets, 5),
            "per_class": per_class, "confusion": confusion.tolist()}


# ---------------------------------------------------------------- features

@torch.no_grad()
def extract_features(backbone: AlexNetBackbone, images: torch.Tensor, layer: str = "conv4", grid: int = 4,
                     device=None, batch_size: int = 1024) -> torch.Tensor:
    """Frozen ``layer`` features of uint8 ``images``, average-pooled to grid×grid and flattened
    (N×D float32, on the images' device). The backbone runs in eval mode, so BN statistics
    are used, not updated."""
    device = device or images.device
    was_training = backbone.training
    backbone.eval()
    on_cuda = torch.device(device).type == "cuda"
    parts = []
    for chunk in images.split(batch_size):
        x = to_float(chunk.to(device, non_blocking=True))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            parts.append(pooled_features(backbone, x, layer, grid).float())
    backbone.train(was_training)
    return torch.cat(parts)


_FEATURES: dict = {}


def run_features(run: Run, split: str = "test", layer: str = "conv4", grid: int = 4, device="auto",
                 index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Features of a whole split (``train`` or ``test``) for a pretrained run, computed once per
    run, layer and grid, kept in memory (rows selected with ``index``) and in the run folder,
    so the next process (each notebook is one) reads them instead of recomputing."""
    dev = resolve_device(device)
    check_layer(layer)
    key = (str(run.path), split, layer, grid, str(dev))
    if key not in _FEATURES:
        cache = Path(run.path) / f"features-{split}-{layer}-g{grid}-{dev.type}.pt"
        if cache.is_file():
            _FEATURES[key] = store.load_torch(cache)["features"].to(dev)
        else:
            splits = _splits_for(run.config)
            images = getattr(splits, split).images
            _FEATURES[key] = extract_features(run.load_backbone(dev), images, layer, grid, dev)
            try:
                store.save_torch(cache, {"features": _FEATURES[key].cpu()})
            except OSError:  # a read-only store still works, only slower
                pass
    feats = _FEATURES[key]
    return feats if index is None else feats[index.to(feats.device)]


@torch.no_grad()
def vae_latents(run: Run, split: str = "test", device="auto", limit: Optional[int] = None) -> torch.Tensor:
    """The VAE encoder's latent means μ for a split's images (N×latent)."""
    dev = resolve_device(device)
    task = run.load_task(dev)
    if not hasattr(task, "encode"):
        raise ValueError(f"run={run.path.name!r} is a {run.method} run; latent means need a vae or siamese-vae run")
    images = getattr(_splits_for(run.config), split).images
    if limit is not None:
        images = images[:limit]
    return torch.cat([task.encode(to_float(chunk.to(dev)))[0].float().cpu() for chunk in images.split(1024)])


def _splits_for(config) -> DatasetSplits:
    return load_dataset(config.dataset, config.data_root, config.image_size)


# ---------------------------------------------------------------- heads and models

class FeatureProbe(nn.Module):
    """A head on frozen, standardised features: ``mlp`` (the study's three FC layers) or
    ``linear``. ``loss(features N×D, labels N)`` → cross-entropy and accuracy."""

    def __init__(self, in_dim: int, classes: int, kind: str = "mlp", hidden: int = 200,
                 mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("mean", mean if mean is not None else torch.zeros(in_dim))
        self.register_buffer("std", std if std is not None else torch.ones(in_dim))
        self.head = ClassifierHead(in_dim, classes, hidden) if kind == "mlp" else nn.Linear(in_dim, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features.float() - self.mean) / self.std)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self(features)
        return {"loss": F.cross_entropy(logits.float(), labels),
                "acc": (logits.argmax(1) == labels).float().mean().detach()}


class ImageClassifier(nn.Module):
    """Backbone + pooled ``layer`` features + :class:`FeatureProbe`, trained end to end on
    augmented images (the scratch baseline and fine-tuning). ``loss(images uint8, labels)``."""

    def __init__(self, backbone: AlexNetBackbone, probe: FeatureProbe, layer: str, grid: int, augment=None):
        super().__init__()
        self.backbone = backbone
        self.probe = probe
        self.layer = layer
        self.grid = grid
        self.augment = augment or default_augment(backbone.config.image_size)
        self.channels_last = False

    def forward(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = to_float(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if train:
            x = self.augment.apply(x)
        return self.probe(pooled_features(self.backbone, x, self.layer, self.grid))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self(images, train=True)
        return {"loss": F.cross_entropy(logits.float(), labels),
                "acc": (logits.argmax(1) == labels).float().mean().detach()}


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    on_cuda = inputs.device.type == "cuda"
    outs = []
    for chunk in inputs.split(batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            outs.append(model(chunk).float())
    return torch.cat(outs)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (N×classes) from a cosine-similarity kNN with exp(sim / T) weighted votes
    (Wu et al. 2018). No training."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in query.split(2048):
        sims = F.normalize(chunk.float(), dim=1) @ bank.T
        top_sim, top_idx = sims.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(chunk.shape[0], classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def _repeat_to(n: int, samples: int, device) -> torch.Tensor:
    """Indices 0..n-1 repeated so one epoch holds about ``samples`` (at least n)."""
    return torch.arange(n, device=device).repeat(max(1, math.ceil(samples / n)))


# ---------------------------------------------------------------- one cell

_SHARED_FIELDS = ("layer", "grid", "hidden", "val_per_class", "batch_size", "samples_per_epoch", "weight_decay")
_HEAD_FIELDS = ("probe_epochs", "probe_lr", "probe_patience")
# The EvalConfig settings each kind of cell trains with, and so the ones in its stored key: a
# setting a cell does not use (the sweep's probe kind for a scratch cell, k of kNN for a
# fine-tuning cell) must not make the same cell count as a new one.
CELL_FIELDS = {
    "knn": ("layer", "grid", "val_per_class", "knn_k", "knn_temperature"),
    "probe": ("probe",) + _SHARED_FIELDS + _HEAD_FIELDS,
    "scratch": _SHARED_FIELDS + ("epochs", "lr", "patience"),
    "finetune": _SHARED_FIELDS + _HEAD_FIELDS + ("patience", "finetune_epochs", "finetune_lr", "backbone_lr_scale"),
}


def _cell_config(kind: str, method: str, dataset: str, budget: int, seed: int, cfg: EvalConfig, **extra) -> dict:
    fields = asdict(cfg)
    return {"stage": "eval", "protocol": kind, "method": method, "dataset": dataset, "budget": budget,
            "seed": seed, **{k: fields[k] for k in CELL_FIELDS[kind]}, **extra}


_WEIGHT_DIGESTS: dict = {}


def pretrained_id(run: Run) -> str:
    """What an evaluation cell records of the pretrained net it used: the run folder's name and a
    digest of its weights file, so a run trained again under the same name (``--force``) does
    not reuse cells computed from the old weights."""
    import hashlib
    model = run.path / "model.pt"
    stat = model.stat()
    key = (str(model.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _WEIGHT_DIGESTS:
        digest = hashlib.sha256()
        with open(model, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _WEIGHT_DIGESTS[key] = digest.hexdigest()[:12]
    return f"{run.path.name}@{_WEIGHT_DIGESTS[key]}"


def _cached_cell(config: dict, out):
    folder = store.run_dir("eval", f"{config['method']}-{config['protocol']}", config["dataset"], config, out)
    if store.is_complete(folder):
        return folder, store.read_json(folder / "metrics.json")
    return folder, None


def _locked_cell(cell: dict, out, compute) -> dict:
    """The stored row of ``cell``, computing it with ``compute(folder)`` when missing. A lock on
    the cell's folder makes a second process (another notebook, another shard) wait and then
    reuse the row instead of computing the same cell again."""
    folder, cached = _cached_cell(cell, out)
    if cached is not None:
        return cached
    with store.locked(folder):
        folder, cached = _cached_cell(cell, out)
        if cached is not None:
            return cached
        return compute(folder)


def _finish_cell(folder: Path, config: dict, row: dict, split: tuple, head_state: Optional[dict] = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    store.write_json(folder / "config.json", config)
    store.save_torch(folder / "split.pt", {"train": split[0], "val": split[1]})
    if head_state is not None:
        store.save_torch(folder / "head.pt", head_state)
    row = {**row, "run": str(folder)}
    store.write_json(folder / "metrics.json", row)
    store.write_json(folder / store.COMPLETE, {"top1": row["top1"], "top5": row["top5"]})
    return row


def _row(method, protocol, probe, cfg, budget, seed, metrics, classes, epochs, seconds, history=None) -> dict:
    return {"method": method, "protocol": protocol, "probe": probe, "layer": cfg.layer, "budget": budget,
            "seed": seed, "top1": metrics["top1"], "top5": metrics["top5"], "epochs": epochs,
            "seconds": round(seconds, 3), "per_class": metrics["per_class"], "confusion": metrics["confusion"],
            "classes": list(classes), "history": history or []}


def budget_split(splits: DatasetSplits, budget: int, seed: int, val_per_class: int):
    """The labeled and validation indices into ``splits.train`` for one budget and seed — the
    same for every method (a paired comparison)."""
    return label_budget_split(splits.train.labels, budget, seed, val_per_class)


def probe_run(run, labels: int, seed: int = 0, layer: str = "conv4", probe: str = "mlp", device="auto",
              out=None, config: Optional[EvalConfig] = None, progress: bool = False,
              deterministic: bool = False) -> dict:
    """Train a ``probe`` head on frozen ``layer`` features of ``run`` with ``labels`` images per
    class; return the test-set result row (top-1, top-5, per-class accuracy, confusion)."""
    run = run if isinstance(run, Run) else load_run(run)
    cfg = replace(config or EvalConfig(), layer=layer, probe=probe).validate()
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    cell = _cell_for(run.method, "probe", budget, seed, run, None, cfg)

    def compute(folder: Path) -> dict:
        dev = resolve_device(device)
        if probe == "knn":
            splits = _splits_for(run.config)
            train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
            y = splits.train.labels.to(dev)
            feats, test_feats = run_features(run, "train", layer, cfg.grid, dev), _test_features(run, cfg, dev)
            t0 = time.perf_counter()
            scores = knn_predict(feats[train_idx.to(dev)], y[train_idx.to(dev)], test_feats,
                                 splits.train.num_classes, cfg.knn_k, cfg.knn_temperature)
            row = _row(run.method, "probe", probe, cfg, budget, seed,
                       classification_metrics(scores, splits.test.labels.to(dev)), splits.train.classes, 0,
                       time.perf_counter() - t0)
            return _finish_cell(folder, cell, row, (train_idx, val_idx))
        head = _new_head(run, budget, seed, probe, cfg, dev)
        t0 = time.perf_counter()
        fit_result = fit(head.model, head.train, _head_train_config(cfg, len(head.train[0]), seed), dev,
                         validate=_validator(head.model, *head.val), progress=progress, desc="probe",
                         deterministic=deterministic)
        row = _head_row(head, cfg, fit_result, time.perf_counter() - t0, dev)
        return _finish_cell(folder, cell, row, head.split, {"head": head.model.state_dict()})

    return _locked_cell(cell, out, compute)


def probe_cells_together(items: Sequence[tuple], cfg: EvalConfig, device="auto", out=None,
                         deterministic: bool = False) -> int:
    """Compute the missing probe cells among ``items`` = [(run, budget, seed, probe kind)] with
    their heads trained together (:mod:`sslab.probe_batch`), in groups of heads whose epochs have
    the same steps; each cell is stored exactly as :func:`probe_run` stores it, so a later
    ``probe_run`` (or a fine-tuning cell that needs the probe) finds it. ``knn`` cells are left to
    ``probe_run``. The cells' locks are taken in a fixed order, so two processes never deadlock
    and never compute the same cell twice. Returns how many cells were computed."""
    import contextlib

    from .probe_batch import train_heads
    from .train import make_deterministic
    if deterministic:
        make_deterministic()
    dev = resolve_device(device)
    wanted = {}
    for run, budget, seed, kind in items:
        if kind == "knn":
            continue
        cell = _cell_for(run.method, "probe", budget, seed, run, None, replace(cfg, probe=kind).validate())
        folder, cached = _cached_cell(cell, out)
        if cached is None:
            wanted[str(folder)] = (run, budget, seed, kind, cell, folder)
    if len(wanted) < 2:
        return 0  # one cell: probe_run is the same work
    computed = 0
    with contextlib.ExitStack() as locks:
        for key in sorted(wanted):
            locks.enter_context(store.locked(wanted[key][5]))
        groups: dict = {}
        stats: dict = {}
        for key in sorted(wanted):
            run, budget, seed, kind, cell, folder = wanted[key]
            if _cached_cell(cell, out)[1] is not None:
                continue  # another process computed it while we waited for its lock
            head = _new_head(run, budget, seed, kind, cfg, dev, stats)
            groups.setdefault((kind, len(head.train[0]), len(head.val[0]), head.train[0].shape[1]), []).append(
                (head, cell, folder))
        for (kind, n, _, _), entries in groups.items():
            started = time.perf_counter()
            results = train_heads([h.model for h, _, _ in entries], [h.train for h, _, _ in entries],
                                  [h.val for h, _, _ in entries], _head_train_config(cfg, n),
                                  [h.seed for h, _, _ in entries], dev)
            share = (time.perf_counter() - started) / len(entries)
            for (head, cell, folder), result in zip(entries, results):
                row = _head_row(head, replace(cfg, probe=kind), result, share, dev)
                row["trained_with"] = len(entries)  # heads in its batch
                _finish_cell(folder, cell, row, head.split, {"head": head.model.state_dict()})
                computed += 1
    return computed


def _validator(model, inputs, targets):
    def validate(m):
        return {"val_acc": topk_accuracy(predict(model, inputs), targets, 1)}
    return validate


@dataclass
class _ProbeHead:
    """One probe cell ready to train: its fresh head, the epoch-ordered training features and
    labels, the validation features and labels, and the split it was drawn from."""

    run: Run
    budget: int
    seed: int
    model: FeatureProbe
    train: tuple
    val: tuple
    split: tuple
    classes: list


def _new_head(run: Run, budget: int, seed: int, kind: str, cfg: EvalConfig, dev, stats: Optional[dict] = None
              ) -> _ProbeHead:
    """The probe cell (run, budget, seed) built the same way whether its head trains alone
    (:func:`probe_run`) or with others (:func:`probe_cells_together`), so both start from the
    same weights and see the same data. ``stats`` caches each run's standardisation."""
    splits = _splits_for(run.config)
    train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
    feats = run_features(run, "train", cfg.layer, cfg.grid, dev)
    stats = {} if stats is None else stats
    if run.path.name not in stats:
        # Standardise with statistics of every train image's features: no labels involved.
        stats[run.path.name] = (feats.mean(0), feats.std(0).clamp(min=1e-6))
    mean, std = stats[run.path.name]
    y = splits.train.labels.to(dev)
    order = train_idx.to(dev)[_repeat_to(len(train_idx), cfg.samples_per_epoch, dev)]
    torch.manual_seed(seed)
    model = FeatureProbe(feats.shape[1], splits.train.num_classes, kind, cfg.hidden, mean, std).to(dev)
    val = val_idx.to(dev)
    return _ProbeHead(run, budget, seed, model, (feats[order], y[order]), (feats[val], y[val]),
                      (train_idx, val_idx), list(splits.train.classes))


def _head_train_config(cfg: EvalConfig, samples: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(epochs=cfg.probe_epochs, batch_size=min(cfg.batch_size, samples), optimizer="adam",
                       lr=cfg.probe_lr, weight_decay=cfg.weight_decay, schedule="cosine",
                       patience=cfg.probe_patience, seed=seed)


def _test_features(run: Run, cfg: EvalConfig, dev) -> torch.Tensor:
    return run_features(run, "test", cfg.layer, cfg.grid, dev)


def _head_row(head: _ProbeHead, cfg: EvalConfig, result: FitResult, seconds: float, dev) -> dict:
    """The test-set result row of a trained probe head."""
    test_y = _splits_for(head.run.config).test.labels.to(dev)
    metrics = classification_metrics(predict(head.model, _test_features(head.run, cfg, dev)), test_y)
    return _row(head.run.method, "probe", cfg.probe, cfg, head.budget, head.seed, metrics, head.classes,
                result.epochs_run, seconds, result.history)


def scratch_run(dataset: str, labels: int, seed: int = 0, like: Optional[Run] = None, width: Optional[float] = None,
                image_size: Optional[int] = None, layer: str = "conv4", device="auto", out=None,
                config: Optional[EvalConfig] = None, data_root: Optional[str] = None, progress: bool = False,
                deterministic: bool = False) -> dict:
    """The supervised baseline: the same backbone (shaped ``like`` a pretrained run), randomly
    initialised, with the same classifier head, trained end to end on the same labeled images
    with the same augmentation, schedule and early stopping."""
    cfg = replace(config or EvalConfig(), layer=layer).validate()
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    dev = resolve_device(device)
    if like is not None:
        dataset, data_root = like.config.dataset, like.config.data_root
        width, image_size = like.config.width, like.config.image_size
    from .pretrain import DEFAULT_WIDTH
    width = float(width or DEFAULT_WIDTH.get(dev.type, 1.0))
    cell = _cell_config("scratch", "scratch", dataset, budget, seed, cfg, width=width, image_size=image_size)

    def compute(folder: Path) -> dict:
        splits = load_dataset(dataset, data_root, image_size)
        torch.manual_seed(seed)
        backbone = AlexNetBackbone(BackboneConfig(splits.train.channels, splits.train.image_size, width))
        head = FeatureProbe(pooled_dim(backbone, layer, cfg.grid), splits.train.num_classes, "mlp", cfg.hidden)
        model = ImageClassifier(backbone, head, layer, cfg.grid).to(dev)
        return _train_end_to_end(model, splits, "scratch", "scratch", cfg, budget, seed, cfg.epochs, cfg.lr, None,
                                 folder, cell, dev, progress, deterministic)

    return _locked_cell(cell, out, compute)


def finetune_run(run, labels: int, seed: int = 0, layer: str = "conv4", device="auto", out=None,
                 config: Optional[EvalConfig] = None, progress: bool = False, deterministic: bool = False) -> dict:
    """Fine-tuning: the pretrained backbone plus its trained ``mlp`` probe head (trained first if
    missing), trained together with a small learning rate, the backbone ``backbone_lr_scale``
    times slower than the head, ``finetune_epochs`` (15, as in the study) with early stopping."""
    run = run if isinstance(run, Run) else load_run(run)
    cfg = replace(config or EvalConfig(), layer=layer, probe="mlp").validate()
    budget, seed = check_budgets(labels, "labels")[0], check_seeds(seed, "seed")[0]
    cell = _cell_for(run.method, "finetune", budget, seed, run, None, cfg)

    def compute(folder: Path) -> dict:
        dev = resolve_device(device)
        probe_row = probe_run(run, budget, seed, layer, "mlp", dev, out, cfg, deterministic=deterministic)
        splits = _splits_for(run.config)
        backbone = run.load_backbone(dev)
        feats = run_features(run, "train", layer, cfg.grid, dev)
        head = FeatureProbe(feats.shape[1], splits.train.num_classes, "mlp", cfg.hidden).to(dev)
        head.load_state_dict(store.load_torch(Path(probe_row["run"]) / "head.pt", map_location=dev)["head"])
        model = ImageClassifier(backbone, head, layer, cfg.grid).to(dev)
        # The augmentation draws from torch's global generator: seed it here, or the result would
        # depend on whether the probe head above was trained just now or found stored.
        torch.manual_seed(seed)
        groups = [{"params": list(model.backbone.parameters()), "lr_scale": cfg.backbone_lr_scale},
                  {"params": list(model.probe.parameters()), "lr_scale": 1.0}]
        return _train_end_to_end(model, splits, run.method, "finetune", cfg, budget, seed, cfg.finetune_epochs,
                                 cfg.finetune_lr, groups, folder, cell, dev, progress, deterministic)

    return _locked_cell(cell, out, compute)


def _train_end_to_end(model, splits, method, protocol, cfg, budget, seed, epochs, lr, groups, folder, cell, dev,
                      progress, deterministic=False) -> dict:
    train_idx, val_idx = budget_split(splits, budget, seed, cfg.val_per_class)
    images = splits.train.images.to(dev)
    y = splits.train.labels.to(dev)
    tr, va = train_idx.to(dev), val_idx.to(dev)
    order = tr[_repeat_to(len(tr), cfg.samples_per_epoch, dev)]
    train_cfg = TrainConfig(epochs=epochs, batch_size=min(cfg.batch_size, len(order)), optimizer="adam", lr=lr,
                            weight_decay=cfg.weight_decay, schedule="cosine", patience=cfg.patience, seed=seed)
    t0 = time.perf_counter()
    result = fit(model, (images[order], y[order]), train_cfg, dev, param_groups=groups,
                 validate=_validator(model, images[va], y[va]), progress=progress, desc=protocol,
                 checkpoint=folder / "checkpoint.pt", deterministic=deterministic,
                 checkpoint_every=CHECKPOINT_EVERY_S, checkpoint_last=False)
    metrics = classification_metrics(predict(model, splits.test.images.to(dev)), splits.test.labels.to(dev))
    row = _row(method, protocol, "mlp", cfg, budget, seed, metrics, splits.train.classes, result.epochs_run,
               time.perf_counter() - t0, result.history)
    row = _finish_cell(folder, cell, row, (train_idx, val_idx))
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    return row


# ---------------------------------------------------------------- tables and curves

TABLE_COLUMNS = ("method", "protocol", "probe", "layer", "budget", "seed", "top1", "top5", "epochs", "seconds")


class ResultTable:
    """A tidy table of evaluation rows (one per method × protocol × budget × seed)."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = [dict(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def tidy(self) -> list:
        return [{k: r.get(k) for k in TABLE_COLUMNS} for r in self.rows]

    def to_pandas(self):
        import pandas as pd
        return pd.DataFrame(self.tidy())

    def summary(self) -> list:
        """Mean and standard deviation over seeds per method × protocol × budget."""
        groups: dict = {}
        for r in self.rows:
            groups.setdefault((r["method"], r["protocol"], r["budget"]), []).append(r)
        out = []
        for (method, protocol, budget), rows in sorted(groups.items(), key=_summary_order):
            entry = {"method": method, "protocol": protocol, "budget": budget, "n": len(rows)}
            for metric in ("top1", "top5"):
                values = np.array([r[metric] for r in rows if r[metric] is not None], dtype=float)
                entry[f"{metric}_mean"] = float(values.mean()) if values.size else None
                entry[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
            out.append(entry)
        return out

    def paired_gain(self, metric: str = "top1") -> list:
        """Per method and budget: mean ± std over seeds of (method − scratch) on the same split."""
        scratch = {(r["budget"], r["seed"]): r[metric] for r in self.rows if r["protocol"] == "scratch"}
        groups: dict = {}
        for r in self.rows:
            if r["protocol"] == "scratch" or (r["budget"], r["seed"]) not in scratch or r[metric] is None:
                continue
            groups.setdefault((r["method"], r["protocol"], r["budget"]), []).append(
                r[metric] - scratch[(r["budget"], r["seed"])])
        out = []
        for (method, protocol, budget), diffs in sorted(groups.items(), key=_summary_order):
            d = np.array(diffs)
            out.append({"method": method, "protocol": protocol, "budget": budget, "n": len(d),
                        f"gain_{metric}_mean": float(d.mean()),
                        f"gain_{metric}_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                        "wins": int((d > 0).sum())})
        return out

    def format(self) -> str:
        """The summary as a fixed-width text table (accuracies in %)."""
        lines = [f"{'method':<14}{'protocol':<10}{'labels':>7}{'top-1 %':>16}{'top-5 %':>16}{'seeds':>7}"]
        for e in self.summary():
            def cell(metric):
                if e[f"{metric}_mean"] is None:
                    return "-"
                return f"{100 * e[f'{metric}_mean']:.1f} ± {100 * e[f'{metric}_std']:.1f}"
            lines.append(f"{e['method']:<14}{e['protocol']:<10}{e['budget']:>7}{cell('top1'):>16}{cell('top5'):>16}"
                         f"{e['n']:>7}")
        return "\n".join(lines)

    def save(self, stem: Path) -> tuple:
        """Write ``stem.csv`` (the tidy table) and ``stem.json`` (all rows, with per-class
        accuracy, confusion matrices, summary and paired gains). Returns both paths."""
        import csv
        import io
        stem = Path(stem)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(self.tidy())
        store.write_text(stem.with_suffix(".csv"), buffer.getvalue())
        store.write_json(stem.with_suffix(".json"), {"rows": self.rows, "summary": self.summary(),
                                                     "paired_gain_top1": self.paired_gain("top1"),
                                                     "paired_gain_top5": self.paired_gain("top5")})
        return stem.with_suffix(".csv"), stem.with_suffix(".json")

    @classmethod
    def load(cls, path) -> "ResultTable":
        return cls(store.read_json(Path(path).with_suffix(".json"))["rows"])


def _summary_order(item):
    (method, protocol, budget) = item[0]
    return (protocol == "scratch", method, PROTOCOLS.index(protocol) if protocol in PROTOCOLS else 9, budget)


def curve_cells(methods: Sequence[str], budgets, seeds, scratch: bool, finetune: bool) -> list:
    """Every (method, protocol, budget, seed) a sweep computes, in a fixed order."""
    cells = []
    for budget in budgets:
        for seed in seeds:
            for method in methods:
                cells.append((method, "probe", budget, seed))
                if finetune:
                    cells.append((method, "finetune", budget, seed))
            if scratch:
                cells.append(("scratch", "scratch", budget, seed))
    return cells


def label_curve(pretrained_runs, budgets=BUDGETS, seeds=(0, 1, 2), layer: str = "conv4", probe: str = "mlp",
                scratch: bool = True, finetune: bool = False, device="auto", out=None,
                config: Optional[EvalConfig] = None, name: Optional[str] = None, progress: bool = True,
                shard: Optional[tuple] = None, deterministic: bool = False,
                batch_probes: bool = True) -> ResultTable:
    """Accuracy against labels per class for each pretrained run (and the scratch baseline).

    ``pretrained_runs``: Runs (or run folders) of one dataset. Every method is evaluated on
    the same labeled/validation images for a given budget and seed. Features are extracted
    once per run and layer. Writes ``outputs/tables/<name>.csv`` and ``.json`` and returns
    the :class:`ResultTable`. ``shard=(i, n)`` computes only every n-th cell starting at i.
    ``batch_probes``: train the probe heads the sweep needs together, in batched groups
    (:func:`probe_cells_together`; the same training as one at a time, to rounding), before
    the cells are read in order; ``False`` trains each one alone in :func:`probe_run`.
    """
    runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
    if not runs and not scratch:
        raise ValueError("label_curve needs at least one pretrained run or scratch=True")
    datasets = {r.config.dataset for r in runs}
    if len(datasets) > 1:
        raise ValueError(f"pretrained_runs mix datasets ({', '.join(sorted(datasets))}); allowed: runs of one dataset")
    budgets, seeds = check_budgets(budgets), check_seeds(seeds)
    check_layer(layer)
    check_probe(probe)
    cfg = replace(config or EvalConfig(), layer=layer, probe=probe).validate()
    by_method = {r.method: r for r in runs}
    cells = curve_cells(list(by_method), budgets, seeds, scratch, finetune)
    if shard is not None:
        index, count = shard
        cells = cells[index::count]
    like = runs[0] if runs else None
    if batch_probes:
        # Every probe head this sweep needs (fine-tuning starts from the mlp probe) trains in
        # batched groups first; the loop below then finds those cells stored.
        needed = [(by_method[m], b, s, probe if protocol == "probe" else "mlp")
                  for m, protocol, b, s in cells if protocol in ("probe", "finetune")]
        probe_cells_together(needed, cfg, device, out, deterministic)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cells), desc="label curve", unit="cell", leave=False)
    for method, protocol, budget, seed in cells:
        if bar is not None:
            bar.set_postfix_str(f"{method} {protocol} k={budget} seed={seed}")
        if protocol == "scratch":
            rows.append(scratch_run(like.config.dataset if like else "fashion-mnist", budget, seed, like=like,
                                    layer=layer, device=device, out=out, config=cfg, deterministic=deterministic))
        elif protocol == "finetune":
            rows.append(finetune_run(by_method[method], budget, seed, layer, device, out, cfg,
                                     deterministic=deterministic))
        else:
            rows.append(probe_run(by_method[method], budget, seed, layer, probe, device, out, cfg,
                                  deterministic=deterministic))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = ResultTable(rows)
    if shard is None:
        stem = name or default_table_name(runs, budgets, seeds, layer, probe, scratch, finetune, cfg)
        table.path = table.save(store.outputs_root(out) / "tables" / stem)[0]
    return table


def default_table_name(runs, budgets, seeds, layer: str, probe: str, scratch: bool, finetune: bool,
                       config: Optional[EvalConfig] = None) -> str:
    """``curve-<dataset>-<layer>-<probe>[-finetune]-<8 hex>``: the hash of the pretraining runs, the
    budgets, seeds and protocols and the evaluation settings, so two different sweeps never write
    over each other's table (and the same sweep, run again, rewrites its own)."""
    dataset = runs[0].config.dataset if runs else "fashion-mnist"
    settings = asdict(replace(config or EvalConfig(), layer=layer, probe=probe))
    digest = store.config_hash({"runs": sorted(r.path.name for r in runs), "budgets": sorted(budgets),
                                "seeds": sorted(seeds), "scratch": scratch, "finetune": finetune,
                                "settings": settings})[:8]
    return f"curve-{store.slug(dataset)}-{layer}-{probe}{'-finetune' if finetune else ''}-{digest}"


def _cell_for(method: str, protocol: str, budget: int, seed: int, run: Optional[Run], like: Optional[Run],
              cfg: EvalConfig) -> dict:
    """The stored config of one cell: what :func:`probe_run` and :func:`finetune_run` store, and
    what :func:`scratch_run` stores for a net shaped ``like`` that run."""
    if protocol == "scratch":
        return _cell_config("scratch", "scratch", like.config.dataset, budget, seed, cfg,
                            width=like.config.width, image_size=like.config.image_size)
    if protocol == "finetune":
        return _cell_config("finetune", run.method, run.config.dataset, budget, seed, replace(cfg, probe="mlp"),
                            pretrained=pretrained_id(run))
    kind = "knn" if cfg.probe == "knn" else "probe"
    return _cell_config(kind, run.method, run.config.dataset, budget, seed, cfg, pretrained=pretrained_id(run))


def merge_curve(pretrained_runs, budgets=BUDGETS, seeds=(0, 1, 2), layer: str = "conv4", probe: str = "mlp",
                scratch: bool = True, finetune: bool = False, out=None, config: Optional[EvalConfig] = None,
                name: Optional[str] = None):
    """Collect a sweep computed by shards: ``(table, missing)`` where ``missing`` lists the cells
    not computed yet. The table is written only when nothing is missing."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
    cfg = replace(config or EvalConfig(), layer=layer, probe=probe).validate()
    by_method = {r.method: r for r in runs}
    like = runs[0] if runs else None
    rows, missing = [], []
    for method, protocol, budget, seed in curve_cells(list(by_method), check_budgets(budgets), check_seeds(seeds),
                                                      scratch, finetune):
        cell = _cell_for(method, protocol, budget, seed, by_method.get(method), like, cfg)
        _, cached = _cached_cell(cell, out)
        if cached is None:
            missing.append(f"{method} {protocol} labels={budget} seed={seed}")
        else:
            rows.append(cached)
    table = ResultTable(rows)
    if not missing:
        stem = name or default_table_name(runs, check_budgets(budgets), check_seeds(seeds), layer, probe, scratch,
                                          finetune, cfg)
        table.path = table.save(store.outputs_root(out) / "tables" / stem)[0]
    return table, missing
