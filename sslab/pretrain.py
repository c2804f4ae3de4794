"""Pretraining a pretext task on a dataset's unlabeled pool, through the run store."""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed, integrity, store, stream
from .checkpoint import CHECKPOINT_EVERY_S, FitResult, check_checkpoint_every
from .checks import MAX_COUNT, MAX_EPOCHS, check_bool, check_choice, check_int, check_number, fail
from .data import check_dataset_name, folder_classes, image_shape, load_dataset
from .models import BackboneConfig, build_backbone, check_arch
from .pretext import TASKS, PretextTask, TaskSettings, build_task, setting_names, task_settings
from .precision import autocast, processor, resolve_precision
from .train import TrainConfig, fit, resolve_device

# The full study net (width 1) on CUDA; a quarter-width net on CPU, ~15× cheaper, so a
# laptop pretrains on all of Fashion-MNIST in minutes. The same for ResNet-18: at width 0.25 a
# SimCLR epoch on 20 000 Fashion-MNIST images costs 42 CPU-seconds in bf16 (docs/BENCHMARKS.md).
DEFAULT_WIDTH = {"cuda": 1.0, "cpu": 0.25}
# Not a pretext task: the backbone as initialised, with the seed of the run. Evaluated like a
# pretrained one, it shows what the protocols get without pretraining (what pretraining adds).
RANDOM_INIT = "random-init"
METHODS = tuple(TASKS) + (RANDOM_INIT,)


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; its hash names the run folder.

    ``settings``: the pretext task's settings (its block at the top of ``sslab/pretext/<task>.py``:
    optimiser, learning rate, batch size, schedule, the task's constants and views), name → value,
    e.g. ``{"lr": 0.01, "schedule": "step"}``; the ones not given take the block's defaults.
    :meth:`resolved` fills in every one, so a run's config.json lists them all and its hash
    covers them. ``batch_size``, ``lr`` and ``schedule`` read them back."""

    method: str = "rotation"
    dataset: str = "fashion-mnist"
    epochs: int = 3
    limit: Optional[int] = None
    image_size: Optional[int] = None
    width: Optional[float] = None
    seed: int = 0
    data_root: Optional[str] = None
    precision: str = "auto"  # bf16, fp32, or auto: bf16 where the hardware runs it natively
    # SyncBatchNorm under torchrun: batch statistics over all processes change the result
    sync_bn: bool = False
    backbone: str = "alexnet"  # alexnet (the study's) or resnet18
    settings: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> Optional[int]:
        return self.settings.get("batch_size")

    @property
    def lr(self) -> Optional[float]:
        return self.settings.get("lr")

    @property
    def schedule(self) -> Optional[str]:
        return self.settings.get("schedule")

    def resolved(self, device: torch.device) -> "PretrainConfig":
        """Fill method and device defaults and check every value, before any work starts."""
        check_choice("method", self.method, METHODS)
        check_dataset_name(self.dataset)
        if self.dataset.startswith("folder:"):
            folder_classes(self.dataset[len("folder:"):])  # missing folder, no train/, one class
        check_int("epochs", self.epochs, 1, maximum=MAX_EPOCHS)
        check_int("seed", self.seed, 0)
        if self.limit is not None:
            check_int("limit", self.limit, 2, maximum=MAX_COUNT)
        if self.image_size is not None:
            check_int("image_size", self.image_size, 16)
        if self.width is not None:
            check_number("width", self.width, 0, 4)
        check_bool("sync_bn", self.sync_bn)
        check_arch(self.backbone)
        if not isinstance(self.settings, dict):
            fail("settings", self.settings, "a dict of the pretext task's settings, name → value")
        values = asdict(self)
        values["width"] = float(self.width or DEFAULT_WIDTH.get(device.type, 1.0))
        values["precision"] = resolve_precision(self.precision, device)
        if self.method == RANDOM_INIT:  # nothing is trained: the training settings do not apply (the pool
            # does: protocols that use the unlabeled images take the run's)
            values.update(epochs=0, settings={}, sync_bn=False)
            return PretrainConfig(**values)
        settings = task_settings(self.method, self.settings)
        channels, size = image_shape(self.dataset, self.image_size)
        backbone = BackboneConfig(in_channels=channels, image_size=size, width=values["width"], arch=self.backbone)
        values["settings"] = asdict(settings.sized_to(backbone))
        return PretrainConfig(**values)

    def task_settings(self) -> TaskSettings:
        """The pretext task's settings block with this config's values (checked)."""
        return task_settings(self.method, self.settings)

    def train_config(self) -> TrainConfig:
        return self.task_settings().train_config(self.epochs, self.seed)


def settings_by_method(methods, values: dict, name: Callable[[str], str] = str) -> dict:
    """``values`` (setting name → value) shared out over ``methods``: ``{method: the settings of
    ``values`` it has, checked and in their canonical types}``. A name none of the methods has,
    or a value out of range, is the lab's one-line error (the setting spelled ``name(setting)``),
    before any data is loaded. ``random-init`` has no settings."""
    has = {method: setting_names(method) if method != RANDOM_INIT else () for method in methods}
    known = list(dict.fromkeys(n for names in has.values() for n in names))
    for key, value in values.items():
        if key not in known:
            allowed = (f"a setting of {', '.join(methods)}: {', '.join(known)}" if known else
                       f"none: {RANDOM_INIT} trains nothing, so it has no settings")
            # a name that is no identifier is quoted, so the message stays one line
            fail(name(key if isinstance(key, str) and key.isidentifier() else repr(key)), value, allowed)
    shared = {}
    for method, names in has.items():
        mine = {k: v for k, v in values.items() if k in names}
        checked = task_settings(method, mine, name) if names else None
        shared[method] = {k: getattr(checked, k) for k in mine}
    return shared


@dataclass
class Run:
    """A finished pretraining run in the store."""

    path: Path
    config: PretrainConfig
    metrics: list
    summary: dict

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def arch(self) -> str:
        """The backbone's architecture (alexnet, resnet18)."""
        return self.summary["backbone"].get("arch", "alexnet")

    def load_task(self, device="cpu") -> PretextTask:
        """The pretext task (backbone + heads) with the run's final weights, in eval mode."""
        if self.method == RANDOM_INIT:
            raise ValueError(f"run={self.path.name!r} is a random-init run: it has a backbone (load_backbone) but "
                             f"no pretext task")
        task = build_task(self.config.method, BackboneConfig(**self.summary["backbone"]), self.config.settings)
        task.load_state_dict(store.load_torch(self.path / "model.pt", expect=self.weights_provenance())["model"])
        return task.to(device).eval()

    def load_backbone(self, device="cpu") -> torch.nn.Module:
        """The run's pretrained backbone alone, in eval mode: the same weights as
        ``load_task().backbone`` without building the task's heads (at width 1.0 and 28 px,
        rotation's classifier holds 33.6 of its 36 M weights) and, for the same model.pt, without
        reading it again (the study's fine-tuning loads a backbone for each of its 63 cells)."""
        backbone = build_backbone(BackboneConfig(**self.summary["backbone"]))
        backbone.load_state_dict(_backbone_state(self.path / "model.pt", self.weights_provenance()))
        return backbone.to(device).eval()

    def weights_provenance(self) -> dict:
        """What this run's model.pt must record of what made it (see :func:`model_provenance`):
        weights of another method, backbone or config are refused, not loaded."""
        return model_provenance(self.config.method, self.summary["backbone"], store.folder_config_hash(self.path))


def model_provenance(method: str, backbone: dict, config_id: str, kind: str = "model") -> dict:
    """The provenance a run's model.pt (``kind="model"``) or checkpoint.pt (``"checkpoint"``)
    carries: the method, the backbone (arch, width, input) and the hash of the run's config."""
    return integrity.provenance(kind, method=method, backbone=dict(backbone), config=config_id)


_BACKBONE_STATES: dict = {}  # (model.pt, its mtime and size) → the backbone's part of its state, on the CPU


def _backbone_state(model_file: Path, expect: Optional[dict] = None) -> dict:
    stat = model_file.stat()
    key = (str(model_file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _BACKBONE_STATES:
        state = store.load_torch(model_file, expect=expect)["model"]
        prefix = "backbone."
        while len(_BACKBONE_STATES) >= 8:  # a sweep cycles through a few runs; memory stays bounded
            del _BACKBONE_STATES[next(iter(_BACKBONE_STATES))]
        _BACKBONE_STATES[key] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return _BACKBONE_STATES[key]


def load_run(path) -> Run:
    """A complete run folder → :class:`Run`; anything else is a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run={str(path)!r} is not a folder; allowed: a run folder under outputs/runs/")
    missing = [f for f in ("config.json", "model.pt", store.COMPLETE) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"run={str(path)!r} is not a complete run (missing {', '.join(missing)}); "
                         f"allowed: a folder written by a finished `python -m sslab pretrain`")
    raw = store.read_json(path / "config.json", required=("method", "dataset", "width"))
    names = {f.name for f in fields(PretrainConfig)}
    config = PretrainConfig(**{k: v for k, v in raw.items() if k in names})
    if config.method in TASKS:  # JSON gives lists for tuples: back to the types the resolved config holds
        config.settings = asdict(config.task_settings())
    summary = store.read_json(path / store.COMPLETE, required=("backbone", "images", "epochs_run"))
    return Run(path, config, store.read_jsonl(path / "metrics.jsonl"), summary)


def unlabeled_pool(config: PretrainConfig):
    """The unlabeled images a run trains on: the dataset's unlabeled pool, or ``limit`` of
    them drawn with a seeded shuffle. Returns ``(splits, pool)``."""
    splits = load_dataset(config.dataset, config.data_root, config.image_size)
    index = pool_index(config, len(splits.unlabeled))
    return splits, splits.unlabeled if index is None else splits.unlabeled.subset(index)


def pool_index(config: PretrainConfig, size: int) -> Optional[torch.Tensor]:
    """Which rows of the dataset's unlabeled split (``size`` rows) make a run's pool: None for
    all of them, else ``limit`` rows drawn with a shuffle seeded by the run's seed."""
    if config.limit is not None and config.limit > size:
        # Silently training on all of them would store a second run of the same images under
        # another name (the limit is part of the config).
        raise ValueError(f"limit={config.limit} is not allowed: {config.dataset} has {size} unlabeled images; "
                         f"allowed: 2 ≤ limit ≤ {size}, or no limit for all of them")
    if config.limit is None or config.limit == size:
        return None
    return torch.from_numpy(np.random.Generator(np.random.PCG64(config.seed)).permutation(size))[: config.limit]


EVAL_SEED = 0  # seeds the random draws of a task's test-set evaluation (see evaluate_task)
EVAL_BATCH = 512  # test images per batch of that evaluation (SimCLR's candidates are the batch's views)


@torch.no_grad()
def evaluate_task(task: PretextTask, images: torch.Tensor, batch_size: int = EVAL_BATCH,
                  precision: str = "fp32") -> dict:
    """The task's metrics on held-out images without augmentation (e.g. test rotation accuracy).

    Some tasks still draw random numbers here (siamese-vae's positive views and negatives), so
    the draws come from a fixed seed in a forked generator: the same weights always give the
    same test metrics, and the caller's random stream is left as it was."""
    task.eval()
    totals, count = {}, 0
    on_cuda = images.device.type == "cuda"
    with torch.random.fork_rng(devices=[images.device] if on_cuda else []), autocast(images.device, precision):
        torch.default_generator.manual_seed(EVAL_SEED)
        if on_cuda:
            with torch.cuda.device(images.device):
                torch.cuda.manual_seed(EVAL_SEED)
        for chunk in images.split(batch_size):
            out = task.loss(chunk, train=False)
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(chunk)
            count += len(chunk)
    return {f"test_{k}": v / count for k, v in totals.items()}


@dataclass
class _RunOptions:
    """How a run computes, not what it is: none of these is in the config hash."""

    progress: bool
    deterministic: bool
    eval_limit: int
    pool_memory: Optional[int]  # bytes the pool may take on the device; None: the device's default
    compile_loss: bool
    checkpoint_every: float  # seconds between checkpoints (0: every epoch)
    knn_monitor: bool = False  # kNN top-1 on labeled validation images after every epoch


def pretrain(config: PretrainConfig, device="auto", out: Optional[str] = None, force: bool = False,
             progress: bool = True, deterministic: bool = False, eval_limit: int = 10000,
             sync_bn: bool = False, pool_memory: Optional[float] = None, compile: bool = False,
             checkpoint_every: float = CHECKPOINT_EVERY_S, knn_monitor: bool = False) -> Run:
    """Pretrain ``config.method`` unless a complete run with the same config exists (then it is
    returned as is; ``force=True`` trains again into a fresh folder and replaces it only once
    the new run is complete). A run killed part-way resumes from its last checkpoint.

    Started by torchrun with several processes, it trains with DistributedDataParallel (see
    :mod:`sslab.distributed`; ``sync_bn``: SyncBatchNorm across them, CUDA only): rank 0 does
    everything below, the other ranks train beside it, and every rank returns the same Run.

    ``pool_memory``: GB of device memory the unlabeled images may take (default: half of what
    is free on CUDA, no limit on the CPU); a larger pool stays in pinned host memory and is
    streamed to the device chunk by chunk (:mod:`sslab.stream`) — same batches, same result.

    ``compile``: run the training loss through ``torch.compile``. Not part of the config: a
    compiled run trains the same model to rounding.

    ``checkpoint_every``: seconds between the checkpoints a run resumes from (0: after every
    epoch); the last epoch's is always written.

    ``knn_monitor``: after every epoch, the top-1 of a kNN classifier (k = 20) on the backbone's
    default-layer features, a bank of 100 labeled train images per class classifying 20 others
    per class, goes into metrics.jsonl as ``knn_acc`` (the curve contrastive-learning libraries
    watch; a second or two per epoch on a CPU). It changes no weight, so it is not in the config."""
    memory = check_pool_memory(pool_memory)
    check_checkpoint_every(checkpoint_every)
    check_bool("compile", compile)
    check_bool("sync_bn", sync_bn)
    check_bool("knn_monitor", knn_monitor)
    if sync_bn:  # part of the config: a synchronised run gets a folder of its own
        config = replace(config, sync_bn=True)
    ddp = distributed.from_environment(device, config.sync_bn)
    dev = resolve_device(device) if ddp is None else ddp.device
    config = config.resolved(dev)
    if compile and ddp is not None:
        raise ValueError("compile=True is not allowed under torchrun; allowed: one process, or compile=False")
    folder = run_folder(config, out)
    options = _RunOptions(progress, deterministic, eval_limit, memory, compile, checkpoint_every, knn_monitor)
    if ddp is not None:
        return ddp.pretrain(lambda: _pretrain_in_store(config, dev, folder, force, options, ddp),
                            lambda work: _train_into(config, dev, work, folder, options, ddp))
    return _pretrain_in_store(config, dev, folder, force, options)


def run_folder(config: PretrainConfig, out: Optional[str] = None) -> Path:
    """The store folder of a resolved config (see :meth:`PretrainConfig.resolved`)."""
    return store.run_dir("pretrain", config.method, config.dataset, asdict(config), out)


def find_run(config: PretrainConfig, device="auto", out: Optional[str] = None) -> tuple:
    """``(run, folder)``: the complete run ``pretrain(config, device)`` would return, without
    training it — ``run`` is None when the store has none (``folder`` is where it would be)."""
    folder = run_folder(config.resolved(resolve_device(device)), out)
    return (load_run(folder) if store.is_complete(folder) else None), folder


def _say_if_trained_differently(run: Run, ddp) -> Run:
    """The config hash leaves out how many processes trained a run (so a run resumes under
    another torchrun size), which scales its learning rate and global batch: say so when a run
    is reused by a call with another number of processes."""
    d = run.summary.get("distributed", {})
    trained, now = d.get("world_size", 1), 1 if ddp is None else ddp.world_size
    if trained != now and (ddp is None or ddp.is_main):
        print(f"reusing {run.path.name}, trained with {trained} process(es) (global batch "
              f"{d.get('global_batch_size', run.config.batch_size)}, lr × {d.get('lr_scale', 1)}); this call has "
              f"{now}. Another folder (--out) or --force trains it anew.", file=sys.stderr)
    return run


def check_pool_memory(pool_memory) -> Optional[int]:
    """``pool_memory`` in GB → bytes (None stays None: the device's own default)."""
    if pool_memory is None:
        return None
    if (isinstance(pool_memory, bool) or not isinstance(pool_memory, (int, float)) or not pool_memory >= 0
            or not math.isfinite(pool_memory * 2 ** 30)):
        raise ValueError(f"pool_memory={pool_memory!r} is not allowed; allowed: a finite number of GB ≥ 0 "
                         f"(0 streams everything from host memory), or None for half the free device memory")
    return int(pool_memory * 2 ** 30)


def _pretrain_in_store(config: PretrainConfig, dev: torch.device, folder: Path, force: bool, options: _RunOptions,
                       ddp=None) -> Run:
    if store.is_complete(folder) and not force:  # reading a complete run needs no write access
        return _say_if_trained_differently(load_run(folder), ddp)
    store.check_writable(folder.parent, "out")
    # The data is loaded (and kept in memory for training) before the run's folder exists, so a
    # missing dataset or a limit larger than the pool leaves nothing behind in the store.
    unlabeled_pool(config)
    with store.locked(folder):
        pending = folder.with_name(folder.name + ".new")
        if not store.is_complete(folder) and store.is_complete(pending):
            print(f"finishing an interrupted --force: {pending.name} replaces {folder.name}", file=sys.stderr)
            _replace_folder(pending, folder)
        if store.is_complete(folder) and not force:  # another process finished it while we waited
            return _say_if_trained_differently(load_run(folder), ddp)
        work = folder
        if force and store.is_complete(folder):
            work = folder.with_name(folder.name + ".new")
        return _train_into(config, dev, work, folder, options, ddp)


def _train_into(config: PretrainConfig, dev: torch.device, work: Path, final: Path, options: _RunOptions,
                ddp=None) -> Optional[Run]:
    """Train into ``work`` and return the complete Run (``None`` on torchrun ranks other than 0,
    which write nothing)."""
    if ddp is not None:
        ddp.begin_training(work)  # rank 0 calls the other ranks to train beside it
    main = ddp is None or ddp.is_main
    torch.manual_seed(config.seed)
    splits, pool = unlabeled_pool(config)
    backbone = BackboneConfig(in_channels=pool.channels, image_size=pool.image_size, width=config.width,
                              arch=config.backbone)
    if config.method == RANDOM_INIT:
        return _store_random_init(config, dev, work, final, splits, backbone) if main else None
    if image_shape(config.dataset, config.image_size) != (pool.channels, pool.image_size):
        # The settings were sized to the predicted shape; training on another would not be the config's run.
        raise RuntimeError(f"dataset={config.dataset!r} gave {pool.channels}×{pool.image_size} px images where "
                           f"{image_shape(config.dataset, config.image_size)} (channels, px) were expected")
    task = build_task(config.method, backbone, config.settings).to(dev)
    identity = store.config_hash(asdict(config))  # what the run's weights and checkpoints record
    if main:
        work.mkdir(parents=True, exist_ok=True)
        store.write_json(work / "config.json", asdict(config))
    # Under torchrun the pool stays in host memory; each rank copies its shard of every epoch to its device.
    if ddp is None:
        # On the device when the pool fits its memory limit; otherwise streamed from pinned host memory.
        allowed = stream.pool_memory_default(dev) if options.pool_memory is None else options.pool_memory
        data = stream.place((pool.images,), dev, allowed)
        if isinstance(data, stream.StreamedData):
            print(f"streaming {len(pool)} images ({stream.nbytes((pool.images,)) / 2 ** 30:.3g} GB) from host "
                  f"memory in chunks: over the device memory limit of {allowed / 2 ** 30:.3g} GB", file=sys.stderr)
    else:
        data = (pool.images,)
    train_config = config.train_config() if ddp is None else ddp.scale_lr(config.train_config())
    if options.compile_loss:  # never under torchrun: pretrain refuses that
        # An instance attribute shadows the method: fit's train_step calls the compiled loss. Compiled
        # once per batch size (an epoch's last batch is smaller): traced with a dynamic batch size,
        # the augmentations' torch.rand(n) fails on the CPU.
        task.loss = torch.compile(task.loss, dynamic=False)
    result: FitResult = fit(task, data, train_config, dev, checkpoint=work / "checkpoint.pt",
                            metrics_path=work / "metrics.jsonl", progress=options.progress,
                            desc=f"pretrain {config.method}", images_per_sample=task.images_per_sample,
                            deterministic=options.deterministic, distributed=ddp,
                            checkpoint_every=options.checkpoint_every, precision=config.precision,
                            validate=knn_monitor_of(splits, config, dev) if options.knn_monitor else None,
                            monitor="knn_acc",
                            provenance=model_provenance(config.method, asdict(backbone), identity, "checkpoint"))
    if options.compile_loss:
        del task.loss  # the test-set evaluation below runs eagerly (no second compile for eval mode)
    ranks = None if ddp is None else ddp.summary(config.batch_size, ddp.state_hashes(task))
    if not main:
        return None
    test_images = splits.test.images[:options.eval_limit].to(dev)
    test_metrics = evaluate_task(task, test_images, precision=config.precision)
    store.save_torch(work / "model.pt", {"model": task.state_dict(), "backbone": asdict(backbone),
                                         "method": config.method},
                     provenance=model_provenance(config.method, asdict(backbone), identity))
    summary = {"backbone": asdict(backbone), "device": str(dev), "processor": processor(dev), "images": len(pool),
               "precision": config.precision, "compiled": options.compile_loss,
               "epochs_run": result.epochs_run, "train_seconds": round(result.seconds, 3),
               "resumed_from_epoch": result.resumed_from, "final": result.history[-1] if result.history else {},
               **{k: round(v, 6) for k, v in test_metrics.items()}}
    if ranks is not None:
        summary["distributed"] = ranks
    store.write_json(work / store.COMPLETE, summary)
    store.remove(work / "checkpoint.pt")
    if work != final:
        _replace_folder(work, final)
    return load_run(final)


def _store_random_init(config: PretrainConfig, dev: torch.device, work: Path, final: Path, splits,
                      backbone: BackboneConfig) -> Run:
    """A random-init "run": the backbone as ``build_backbone`` initialises it under the run's seed,
    stored like a pretrained one (so every protocol evaluates it the same way)."""
    net = build_backbone(backbone)  # after torch.manual_seed(config.seed)
    identity = store.config_hash(asdict(config))
    work.mkdir(parents=True, exist_ok=True)
    store.write_json(work / "config.json", asdict(config))
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    store.save_torch(work / "model.pt", {"model": state, "backbone": asdict(backbone), "method": config.method},
                     provenance=model_provenance(config.method, asdict(backbone), identity))
    store.write_json(work / store.COMPLETE, {"backbone": asdict(backbone), "device": str(dev), "images": 0,
                                             "precision": config.precision, "epochs_run": 0, "train_seconds": 0.0,
                                             "resumed_from_epoch": 0, "final": {}})
    if work != final:
        _replace_folder(work, final)
    return load_run(final)


def knn_monitor_of(splits, config: PretrainConfig, device):
    """``validate`` for :func:`fit` that scores a pretext task's backbone by kNN on labeled images
    the pretraining never sees the labels of (see ``pretrain(knn_monitor=...)``)."""
    from .data import label_budget_split, max_per_class
    from .models import DEFAULT_LAYER, extract_features, knn_predict
    labels = splits.train.labels
    query_per_class = min(20, max(1, max_per_class(labels) // 6))
    bank_per_class = min(100, max_per_class(labels, query_per_class))
    bank, query = label_budget_split(labels, bank_per_class, seed=0, val_per_class=query_per_class)
    images, targets = splits.train.images.to(device), labels.to(device)
    layer = DEFAULT_LAYER[config.backbone]

    def validate(task) -> dict:
        feats = [extract_features(task.backbone, images[i.to(device)], layer, 4, device, precision=config.precision)
                 for i in (bank, query)]
        scores = knn_predict(feats[0], targets[bank.to(device)], feats[1], splits.train.num_classes)
        return {"knn_acc": float((scores.argmax(1) == targets[query.to(device)]).float().mean())}
    return validate


def _replace_folder(new: Path, old: Path) -> None:
    """Swap a complete ``new`` run in for ``old`` (used by ``force``): the old one is removed
    only after the new one is complete."""
    import shutil
    trash = old.with_name(old.name + ".old")
    if trash.exists():
        shutil.rmtree(trash)
    if old.exists():  # absent when a kill came between the two renames
        old.rename(trash)
    new.rename(old)
    shutil.rmtree(trash, ignore_errors=True)


def describe(run: Run) -> str:
    s = run.summary
    if run.method == RANDOM_INIT:
        return f"{RANDOM_INIT}: the {run.arch} backbone as initialised with seed {run.config.seed}, not trained"
    metrics = ", ".join(f"{k[5:]}={v:.4g}" for k, v in s.items() if k.startswith("test_"))
    precision = f" in {s['precision']}" if "precision" in s else ""
    where = f"{s['device']} ({s['processor']})" if s.get("processor") else s["device"]
    return (f"{run.method}: {s['images']} images, {s['epochs_run']} epochs, {s['train_seconds']:.0f} s on "
            f"{where}{precision}; test {metrics}")
