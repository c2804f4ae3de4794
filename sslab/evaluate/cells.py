"""Evaluation cells in the run store: one folder per (method, protocol, budget, seed) holding
its config, the labeled/validation split, the trained head and the result row. A cell is found
again by the hash of what it trains with, locked while computed, and never computed twice.

Every protocol enters through :func:`open_cell` and :meth:`Cell.computed`, which do what every
cell does (load the run, check the budget and the seed, resolve the device and the settings,
build the key, find the stored row or take the lock), and hands its ``compute(cell)`` a
:class:`Cell`: the labeled split, the dataset, the features, and the ending every trained
protocol shares (:meth:`Cell.train` in the cell's folder, :meth:`Cell.finish`). A protocol's
file holds its algorithm, not the store's plumbing."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from .. import integrity, store
from ..checks import MAX_COUNT, MAX_EPOCHS, MAX_STEPS, check_choice, check_int, check_int_list, check_number, fail
from ..data import DatasetSplits
from ..models import ALL_LAYERS, resolve_layer
from ..precision import PRECISIONS, processor, resolve_precision
from ..pretrain import Run, load_run
from ..checkpoint import CHECKPOINT_EVERY_S, FitResult
from ..train import TrainConfig, fit, resolve_device
from .features import dataset_splits, cached_features
from .heads import HEADS
from .metrics import classification_metrics
from .pool import pool_of
from .selection import EMBEDDED, MAX_STARTS, SELECTIONS, labeled_split, random_init_config


# FixMatch's thresholds: fixed τ (Sohn et al. 2020), or FreeMatch's self-adaptive τ_t(c) (Wang et al. 2023)
FM_THRESHOLD_MODES = ("fixed", "freematch")
# the self-training student's head: fresh, or the budget's probe head
ST_STARTS = ("fresh", "probe")
ST_PREDICTS = ("blend", "auto", "graph", "head", "both")


@dataclass
class EvalConfig:
    """How evaluation cells train. ``val_per_class`` labeled images per class (disjoint from the
    budget and the test split) drive early stopping; ``samples_per_epoch`` makes an epoch of a
    tiny budget a fixed number of (augmented) views rather than a handful of images."""

    layer: str = "auto"  # the backbone's layer the classifier reads; auto: conv4 (AlexNet), layer4 (ResNet-18)
    head: str = "mlp"
    grid: int = 4
    hidden: int = 200
    # which images are labeled (see .selection): balanced (k per class, the study's), uniform, typical, cover
    selection: str = "balanced"
    select_k: int = 20  # typical: neighbours of the typicality (TypiClust's)
    select_min_cluster: int = 5  # typical: clusters of at most this many images are dropped (TypiClust's)
    select_starts: int = 1  # typical: k-means++ starts, the lowest inertia kept (TypiClust's scikit-learn ran 10)
    select_purity: float = 0.95  # cover: the share of δ-balls that must stay pure (ProbCover's α)
    # labeled images per class held out for early stopping and choices; 0: none, every trained
    # protocol runs its fixed schedule and a budget of k labels per class is k × classes labels in all
    val_per_class: int = 10
    # probe: a head on frozen features (mlp, linear)
    probe_epochs: int = 60
    probe_lr: float = 1e-3
    probe_patience: int = 10
    # scratch: the same net from random weights, trained end to end
    scratch_epochs: int = 30
    scratch_lr: float = 1e-3
    scratch_patience: int = 8
    # finetune: the pretrained backbone and its probe head, trained end to end
    finetune_epochs: int = 15
    finetune_lr: float = 1e-4
    finetune_patience: int = 8
    backbone_lr_scale: float = 0.1
    # shared by the trained protocols
    batch_size: int = 128
    samples_per_epoch: int = 1024
    weight_decay: float = 5e-4
    # head = knn
    knn_k: int = 20
    knn_temperature: float = 0.07
    # labelprop: the k-NN graph (k, PCA dimensions, 0 = none) and the propagation (alpha, gamma, steps)
    lp_k: int = 20
    lp_pca: int = 128
    lp_alpha: float = 0.99
    lp_gamma: float = 3.0
    lp_iterations: int = 20
    # Sinkhorn steps that scale the pool's propagated distributions to equal class mass (Zhu,
    # Ghahramani & Lafferty's class mass normalisation, to a uniform prior); 0: none
    lp_balance: int = 0
    # the weights w of the probe against the graph (test scores w · probe + (1 − w) · graph), the
    # best on the validation images; (0.0,): the graph alone
    lp_probe_weights: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    # selftrain: rounds of (teacher labels the pool → a student trains on labeled + pseudo-labeled)
    st_rounds: int = 1
    st_per_class: int = 1000  # the teacher's most confident pseudo-labels per class (class-balanced)
    st_threshold: float = 0.0  # and only those at least this confident (0–1, the propagation's confidence)
    st_steps: int = 600
    st_lr: float = 1e-3
    st_labeled_fraction: float = 0.25  # the labeled images' share of every batch
    # the teacher: labelprop, probe, agree (both, where they agree) or auto (the best on the validation images)
    st_teacher: str = "auto"
    # the test prediction: blend (the best on the validation images of the first teacher, the
    # student's graph and the mean of the two), auto (of the student's graph, its head, both, the
    # teacher and the probe), or the student's graph, its head or both
    st_predict: str = "blend"
    # the student's head: fresh (random weights) or probe (the budget's probe head, as fine-tuning and
    # FixMatch start: linear probing then fine-tuning, Kumar et al. 2022)
    st_start: str = "fresh"
    # labelprop's weight and selftrain's test prediction leave the probe (weight 1; "probe") only
    # for a candidate that beats it on the validation images by more than this many standard
    # errors of the paired difference (probe.chosen_on_validation); 0: the best count, as in the study
    choice_margin: float = 0.0
    # labelprop's weight and selftrain's teacher are judged on the validation images and on
    # choice_folds − 1 more held-out splits of the labeled and validation images (.choice); 1: the
    # validation images alone, as in the study. 5: label propagation at or above the probe in every
    # method × budget mean of the grid, where it lost up to 0.3 points with 1 (docs/results.md)
    choice_folds: int = 5
    # fixmatch: steps of fm_batch labeled and fm_mu × fm_batch unlabeled images; threshold τ, weight λ_u
    fm_steps: int = 1000
    fm_batch: int = 32
    fm_mu: int = 7
    # the threshold: fixed (τ = fm_threshold, FixMatch's) or freematch (FreeMatch's self-adaptive τ_t(c),
    # moving averages of momentum λ = fm_sat_momentum; fm_threshold unused). freematch: at 400 steps and
    # 4 labels per class it gained +5.1 points over the probe against +2.3 for the fixed τ (protocol.md)
    fm_threshold_mode: str = "freematch"
    fm_threshold: float = 0.95
    # FreeMatch's 0.999 is for 2^20 steps; 0.95 averages the last ~20 steps (~4500 unlabeled images)
    # and leaves τ_0 = 1/C behind within ~60 steps, a small part of a run of a few hundred
    fm_sat_momentum: float = 0.95
    fm_weight: float = 1.0
    fm_lr: float = 0.03
    fm_ema: float = 0.99
    # the backbone's learning rate as a share of fm_lr (the head's is fm_lr), and a linear warm-up over
    # the first fm_warmup epochs (1.0 and 0: every weight at once at the full rate, FixMatch's own):
    # from a probe's start the full rate at once pulled the pretrained features away in the first
    # steps; these two gave the best validation top-1 of four variants tried (docs/protocol.md)
    fm_backbone_lr_scale: float = 0.1
    fm_warmup: float = 1.0
    # bf16 or fp32 (features, heads, end-to-end training); auto: bf16 where the hardware has it
    precision: str = "auto"

    def validate(self) -> "EvalConfig":
        check_choice("layer", self.layer, ("auto",) + ALL_LAYERS)
        check_choice("head", self.head, HEADS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("st_teacher", self.st_teacher, ("auto", "agree", "labelprop", "probe"))
        check_choice("st_predict", self.st_predict, ST_PREDICTS)
        check_choice("st_start", self.st_start, ST_STARTS)
        check_number("select_purity", self.select_purity, 0.0, 1.0, high_open=True)
        for name in ("probe_epochs", "scratch_epochs", "finetune_epochs"):
            check_int(name, getattr(self, name), 1, maximum=MAX_EPOCHS)
        for name in ("probe_patience", "scratch_patience", "finetune_patience"):
            check_int(name, getattr(self, name), 0, maximum=MAX_EPOCHS)
        for name in ("st_steps", "fm_steps", "lp_iterations", "st_rounds"):
            check_int(name, getattr(self, name), 1, maximum=MAX_STEPS)
        for name in ("grid", "hidden", "batch_size", "samples_per_epoch", "knn_k", "lp_k", "st_per_class", "fm_batch",
                     "fm_mu", "select_k"):
            check_int(name, getattr(self, name), 1, maximum=MAX_COUNT)
        for name in ("val_per_class", "select_min_cluster"):
            check_int(name, getattr(self, name), 0, maximum=MAX_COUNT)
        check_int("select_starts", self.select_starts, 1, " (k-means starts of the typical selection)",
                  maximum=MAX_STARTS)
        check_int("lp_balance", self.lp_balance, 0, " (Sinkhorn steps to equal class mass; 0: none)",
                  maximum=MAX_STEPS)
        check_int("lp_pca", self.lp_pca, 0, " (principal components of the graph's space; 0: all)", maximum=MAX_COUNT)
        check_number("st_threshold", self.st_threshold, 0.0, 1.0, low_open=False, high_open=True)
        check_number("st_labeled_fraction", self.st_labeled_fraction, 0.0, 1.0, high_open=True)
        check_number("fm_threshold", self.fm_threshold, 0.0, 1.0, low_open=False)
        check_number("fm_ema", self.fm_ema, 0.0, 1.0, low_open=False, high_open=True)
        check_choice("fm_threshold_mode", self.fm_threshold_mode, FM_THRESHOLD_MODES)
        check_number("fm_sat_momentum", self.fm_sat_momentum, 0.0, 1.0, low_open=False, high_open=True)
        for name in ("st_lr", "fm_lr", "fm_weight"):
            check_number(name, getattr(self, name))
        check_number("fm_backbone_lr_scale", self.fm_backbone_lr_scale, 0.0, 1.0, low_open=False)
        check_number("fm_warmup", self.fm_warmup, 0.0, float(MAX_EPOCHS), low_open=False)
        check_number("lp_alpha", self.lp_alpha, 0.0, 1.0, high_open=True)
        check_number("lp_gamma", self.lp_gamma)
        check_choice_margin("choice_margin", self.choice_margin)
        check_choice_folds("choice_folds", self.choice_folds)
        weights = self.lp_probe_weights
        if (not isinstance(weights, (tuple, list)) or not weights
                or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1 for w in weights)):
            fail("lp_probe_weights", weights, "a non-empty list of numbers in [0, 1], e.g. (0.0, 0.5, 1.0)")
        return self

    def resolved(self, device, arch: str = "alexnet") -> "EvalConfig":
        """The same settings with ``precision`` resolved for ``device`` and ``layer`` for the
        backbone ``arch`` (a cell's key holds the arithmetic and the layer it was computed with)."""
        return replace(self.validate(), precision=resolve_precision(self.precision, device),
                       layer=resolve_layer(self.layer, arch))

    def with_(self, **changes) -> "EvalConfig":
        """A copy with the given settings changed; None leaves a setting as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_choice_margin(name: str, value) -> float:
    """``choice_margin`` under ``name`` (a flag, a notebook parameter): standard errors, 0 to 10."""
    return check_number(name, value, 0.0, 10.0, low_open=False,
                        what=" (standard errors a candidate must beat the probe by on the validation images; 0: any)")


def check_choice_folds(name: str, value) -> int:
    """``choice_folds`` under ``name`` (a flag, a notebook parameter): held-out splits, 1 to 20."""
    return check_int(name, value, 1, " (held-out splits labelprop's weight and selftrain's teacher are chosen on; "
                                     "1: the validation images alone)", maximum=20)


def check_budgets(budgets, name: str = "budgets") -> list:
    """A non-empty list of distinct budgets: labeled images per class, each from 1 to MAX_COUNT."""
    items = list(check_int_list(name, budgets, 1, "labeled images per class"))
    check_int(name, max(items), 1, " (labeled images per class)", maximum=MAX_COUNT)
    return items


def check_seeds(seeds, name: str = "seeds") -> list:
    items = list(check_int_list(name, seeds, 0, "seeds"))
    check_int(name, max(items), 0, " (a seed)", maximum=MAX_COUNT)
    return items


_SHARED = ("layer", "grid", "hidden", "selection", "val_per_class", "batch_size", "samples_per_epoch", "weight_decay",
           "precision")
_PROBE = ("probe_epochs", "probe_lr", "probe_patience")
# The EvalConfig settings each kind of cell trains with, and so the ones in its stored key: a
# setting a cell does not use (the sweep's head for a scratch cell, k of kNN for a fine-tuning
# cell) must not make the same cell count as a new one.
CELL_FIELDS = {
    "knn": ("layer", "grid", "selection", "val_per_class", "knn_k", "knn_temperature", "precision"),
    "probe": ("head",) + _SHARED + _PROBE,
    "scratch": _SHARED + ("scratch_epochs", "scratch_lr", "scratch_patience"),
    "finetune": _SHARED + _PROBE + ("finetune_epochs", "finetune_lr", "finetune_patience", "backbone_lr_scale"),
    # labelprop weighs the graph against the probe (lp_probe_weights): the probe's settings count too
    "labelprop": ("layer", "grid", "selection", "val_per_class", "precision", "lp_k", "lp_pca", "lp_alpha",
                  "lp_gamma", "lp_iterations", "lp_balance", "lp_probe_weights", "choice_margin", "choice_folds",
                  "hidden", "batch_size", "samples_per_epoch", "weight_decay") + _PROBE,
}
CELL_FIELDS["selftrain"] = CELL_FIELDS["labelprop"] + ("st_rounds", "st_per_class", "st_threshold", "st_steps",
                                                       "st_lr", "st_labeled_fraction", "st_teacher", "st_predict",
                                                       "st_start")
CELL_FIELDS["fixmatch"] = ("head",) + _SHARED + _PROBE + ("fm_steps", "fm_batch", "fm_mu", "fm_threshold_mode",
                                                         "fm_threshold", "fm_sat_momentum", "fm_weight", "fm_lr",
                                                         "fm_ema", "fm_backbone_lr_scale", "fm_warmup")


# Settings in a cell's key only when they differ from these values (what cells stored before them did).
KEYED_WHEN_CHANGED = {"choice_margin": 0.0, "choice_folds": 1, "st_start": "fresh", "fm_backbone_lr_scale": 1.0,
                      "fm_warmup": 0.0, "select_starts": 1, "lp_balance": 0}


# The settings an embedded selection chooses with (the space of .graph, and its own constants).
SELECTION_FIELDS = {"typical": ("layer", "grid", "precision", "lp_pca", "select_k", "select_min_cluster",
                                "select_starts"),
                    "cover": ("layer", "grid", "precision", "lp_pca", "select_purity")}


def cell_key(kind: str, method: str, dataset: str, budget: int, seed: int, cfg: EvalConfig, **extra) -> dict:
    """The stored config of one cell: its protocol, method, dataset, budget, seed, the settings
    of ``cfg`` that ``kind`` trains with (:data:`CELL_FIELDS`) and chooses its labeled images with
    (:data:`SELECTION_FIELDS`), and ``extra`` (what it starts from)."""
    fields = asdict(cfg)
    names = CELL_FIELDS[kind] + SELECTION_FIELDS.get(cfg.selection, ())
    # A setting added after cells were stored is left out of the key at the value that means what
    # those cells did, so they stay found; any other value makes new cells.
    names = tuple(n for n in names if not (n in KEYED_WHEN_CHANGED and fields[n] == KEYED_WHEN_CHANGED[n]))
    return {"stage": "eval", "protocol": kind, "method": method, "dataset": dataset, "budget": budget,
            "seed": seed, **{k: fields[k] for k in dict.fromkeys(names)}, **extra}


# The protocols whose classifier is the mlp head, whatever head a sweep's probe uses.
MLP_PROTOCOLS = ("finetune", "selftrain", "fixmatch")


def protocol_key(protocol: str, run: Run, budget: int, seed: int, cfg: EvalConfig) -> dict:
    """The stored config of the ``protocol`` cell of ``run`` at ``budget`` and ``seed`` (for
    ``scratch``: the same backbone shape on the same dataset, from random weights)."""
    if protocol == "scratch":
        # an embedded selection of the scratch baseline reads the random-init backbone of this shape
        chosen_by = {"selected_by": store.run_dir("pretrain", "random-init", run.config.dataset,
                                                  asdict(random_init_config(run))).name} \
            if cfg.selection in EMBEDDED else {}
        return cell_key("scratch", "scratch", run.config.dataset, budget, seed, cfg, width=run.config.width,
                        image_size=run.config.image_size, backbone=run.arch, **chosen_by)
    if protocol in MLP_PROTOCOLS:
        cfg = replace(cfg, head="mlp")
    kind = "knn" if protocol == "probe" and cfg.head == "knn" else protocol
    return cell_key(kind, run.method, run.config.dataset, budget, seed, cfg, pretrained=pretrained_id(run))


def pretrained_id(run: Run) -> str:
    """What an evaluation cell records of the pretrained net it used: the run folder's name and a
    digest of its weights file, so a run trained again under the same name (``--force``) does
    not reuse cells computed from the old weights. (The sha256 the store verifies model.pt with,
    computed once per process.)"""
    return f"{run.path.name}@{integrity.file_digest(run.path / 'model.pt')[:12]}"


def cell_folder(config: dict, out) -> Path:
    return store.run_dir("eval", f"{config['method']}-{config['protocol']}", config["dataset"], config, out)


# What every stored row holds (:func:`result_row`, and what made it); a metrics.json without one
# of them is damaged.
ROW_KEYS = ("method", "protocol", "head", "layer", "budget", "seed", "top1", "top5", "epochs", "per_class",
            "confusion", "classes", "provenance")


def stored_row(config: dict, out) -> Optional[dict]:
    """The result row of a complete cell, or None. The row is read only once its metrics.json and
    split.pt verify — their bytes, and that they record this cell as the one that made them — so a
    result or a split copied from another cell is refused, never used."""
    folder = cell_folder(config, out)
    if not store.is_complete(folder):
        return None
    row = store.read_json(folder / "metrics.json", required=ROW_KEYS)
    integrity.check_provenance(row, folder / "metrics.json", cell_provenance("metrics", config))
    store.load_torch(folder / "split.pt", expect=cell_provenance("split", config))
    return {k: v for k, v in row.items() if k != "provenance"}


def computed_once(cell: dict, out, compute) -> dict:
    """The stored row of ``cell``, computing it with ``compute(folder)`` when missing. A lock on
    the cell's folder makes a second process (another notebook, another shard) wait and then
    reuse the row instead of computing the same cell again."""
    cached = stored_row(cell, out)
    if cached is not None:
        return cached
    folder = cell_folder(cell, out)
    with store.locked(folder):
        cached = stored_row(cell, out)
        return cached if cached is not None else compute(folder)


def finish_cell(folder: Path, config: dict, row: dict, split: tuple, head_state: Optional[dict] = None) -> dict:
    """Write a computed cell (config, split, head weights, row; complete.json last) and return its
    row. Every file records the cell that made it (:func:`cell_provenance`)."""
    folder.mkdir(parents=True, exist_ok=True)
    store.write_json(folder / "config.json", config)
    store.save_torch(folder / "split.pt", {"train": split[0], "val": split[1]},
                     provenance=cell_provenance("split", config))
    if head_state is not None:
        store.save_torch(folder / "head.pt", head_state, provenance=cell_provenance("head", config))
    row = {**row, "run": str(folder)}
    store.write_json(folder / "metrics.json", {**row, "provenance": cell_provenance("metrics", config)})
    store.write_json(folder / store.COMPLETE, {"top1": row["top1"], "top5": row["top5"]})
    return row


def cell_provenance(kind: str, config: dict) -> dict:
    """What a cell's ``kind`` of file (metrics, split, head, checkpoint) records: the cell it belongs to."""
    return integrity.provenance(kind, method=config["method"], protocol=config["protocol"],
                                config=store.config_hash(config))


def result_row(method, protocol, head, cfg: EvalConfig, budget, seed, metrics, classes, epochs, seconds,
               history=None) -> dict:
    """One row of a results table: what was evaluated and its test metrics."""
    return {"method": method, "protocol": protocol, "head": head, "layer": cfg.layer, "budget": budget,
            "seed": seed, "selection": cfg.selection, "val_per_class": cfg.val_per_class,
            "top1": metrics["top1"], "top5": metrics["top5"], "epochs": epochs,
            "seconds": round(seconds, 3), "per_class": metrics["per_class"], "confusion": metrics["confusion"],
            "classes": list(classes), "history": history or []}


def repeat_to(n: int, samples: int, device) -> torch.Tensor:
    """Indices 0..n-1 repeated so one epoch holds about ``samples`` (at least n)."""
    return torch.arange(n, device=device).repeat(max(1, math.ceil(samples / n)))


# ---------------------------------------------------------------- what every protocol's cell shares

_POOL_STATISTICS: dict = {}

@dataclass
class Cell:
    """One evaluation cell as its protocol computes it: the run (for scratch, the run whose dataset
    and backbone shape it copies), the budget (labeled images per class), the seed, the resolved
    settings, the device, the stored key and, while it is computed, its locked folder."""

    protocol: str
    run: Run
    budget: int
    seed: int
    cfg: EvalConfig
    device: torch.device
    out: Optional[str]
    key: dict
    progress: bool = False
    deterministic: bool = False
    folder: Optional[Path] = None

    @property
    def method(self) -> str:
        """What the cell's rows call its method: the run's method, ``scratch`` for the scratch baseline."""
        return "scratch" if self.protocol == "scratch" else self.run.method

    @property
    def splits(self) -> DatasetSplits:
        return dataset_splits(self.run.config)

    def labeled_split(self) -> tuple:
        """``(train indices, validation indices)`` into the train split: the budget's labeled
        images, chosen by the cell's selection (:mod:`.selection`; ``balanced``: the same for
        every method of a seed), and the validation images (none when ``val_per_class`` is 0)."""
        return labeled_split(self)

    def features(self, split: str = "train", rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The run's frozen features of rows ``rows`` of a split (None: all of them) at the cell's
        layer, grid and precision."""
        return cached_features(self.run, split, self.cfg.layer, self.cfg.grid, self.device, index=rows,
                               precision=self.cfg.precision)

    def pool_statistics(self) -> tuple:
        """The mean and spread (floored at 1e-6) of every feature over the run's unlabeled pool: how
        heads standardise their input, without a label involved."""
        key = (str(self.run.path), self.cfg.layer, self.cfg.grid, self.cfg.precision, str(self.device))
        if key not in _POOL_STATISTICS:
            feats, _ = pool_of(self.run, self.cfg, self.device)
            _POOL_STATISTICS[key] = (feats.mean(0), feats.std(0).clamp(min=1e-6))
        return _POOL_STATISTICS[key]

    def computed(self, compute) -> dict:
        """The cell's stored row, or ``compute(cell)``'s (computed once, under the cell's lock)."""
        return computed_once(self.key, self.out, lambda folder: compute(replace(self, folder=folder)))

    def train(self, model, data: tuple, train_config: TrainConfig, validate=None, param_groups=None,
              desc: Optional[str] = None, validate_start: bool = False) -> FitResult:
        """:func:`sslab.train.fit` as every trained cell runs it: resumable from ``checkpoint.pt`` in
        the cell's folder (written on the lab's clock, recording the cell), in the cell's precision.
        ``validate_start``: the starting weights are a candidate too (fit's)."""
        return fit(model, data, train_config, self.device, param_groups=param_groups, validate=validate,
                   progress=self.progress, desc=desc or self.protocol, checkpoint=self.folder / "checkpoint.pt",
                   deterministic=self.deterministic, checkpoint_every=CHECKPOINT_EVERY_S, checkpoint_last=False,
                   precision=self.cfg.precision, provenance=cell_provenance("checkpoint", self.key),
                   validate_start=validate_start)

    def row(self, scores: torch.Tensor, head: str, epochs: int, seconds: float, history=None) -> dict:
        """The result row of the test images' class scores (N×classes, in test-split order)."""
        metrics = classification_metrics(scores, self.splits.test.labels.to(scores.device))
        return result_row(self.method, self.protocol, head, self.cfg, self.budget, self.seed, metrics,
                          self.splits.train.classes, epochs, seconds, history)

    def finish(self, row: dict, split: tuple, head_state: Optional[dict] = None) -> dict:
        """Store the computed cell (:func:`finish_cell`; the row also says how many classes its
        labeled images cover) and drop its resume checkpoint."""
        row = {**row, "labeled_classes": int(self.splits.train.labels[split[0]].unique().numel()),
               "processor": processor(self.device)}  # a bf16 cell's last digits depend on it
        row = finish_cell(self.folder, self.key, row, split, head_state)
        store.remove(self.folder / "checkpoint.pt")
        return row


def open_cell(protocol: str, run, budget: int, seed: int = 0, layer: Optional[str] = None,
              head: Optional[str] = None, device="auto", out=None, config: Optional[EvalConfig] = None,
              progress: bool = False, deterministic: bool = False) -> Cell:
    """The :class:`Cell` of ``protocol`` for ``run`` (a Run or its folder) at ``budget`` labeled
    images per class and ``seed``, every value checked; ``layer`` and ``head`` override
    ``config``'s. Nothing is computed or written until :meth:`Cell.computed`."""
    run = run if isinstance(run, Run) else load_run(run)
    budget = check_int("budget", budget, 1, " (labeled images per class)", maximum=MAX_COUNT)
    seed = check_int("seed", seed, 0, " (a seed)", maximum=MAX_COUNT)
    dev = resolve_device(device)
    cfg = (config or EvalConfig()).with_(layer=layer, head=head)
    if protocol in MLP_PROTOCOLS:
        cfg = replace(cfg, head="mlp")
    cfg = cfg.resolved(dev, run.arch)
    return Cell(protocol, run, budget, seed, cfg, dev, out, protocol_key(protocol, run, budget, seed, cfg),
                progress, deterministic)
