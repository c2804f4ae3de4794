"""How fast the lab trains: ``python -m sslab bench``.

Two measurements, both printed as a table last and optionally written as JSON:

* **Step benchmark** (default). For each pretext task and resolution, in one process, the
  real pretraining step (:func:`sslab.train.train_step`, the very function ``fit`` calls:
  batch gather, device-side augmentation, rotations, autocast, optimiser step, metric
  sums) against a minimal plain-PyTorch step on the same model and batch (data already on
  the device as float, only the augmentation the task itself needs: the four rotations for
  rotation, the positive view for siamese-vae; same optimiser type and settings). Steps are
  timed one by one (CUDA events on CUDA, ``time.perf_counter`` on CPU, where every op is
  synchronous), sslab and reference alternate (every step on CPU, in rounds on CUDA) so a
  change of machine load hits both, and the median step gives images/s. Model FLOPs come from
  ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward.
* **Study timing** (``--study``): the whole study — pretraining per method, feature
  extraction, probes, scratch baselines, fine-tuning, UMAP — phase by phase, in a fresh
  outputs folder so nothing is reused from the run store.

Runs with torch and torchvision alone; UMAP is timed only where umap-learn is installed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .models import BackboneConfig
from .pretext import TASKS, build_task, check_method
from .pretrain import METHOD_DEFAULTS, PretrainConfig
from .train import lr_factor, make_optimizer, prepare_model, resolve_device, train_step

# Images per source image, as ``pretrain`` counts them for its images/s: the 4 rotated copies
# for rotation; siamese-vae counts its source images (its encoder also sees each one's positive
# view, which is why its GFLOP/img is about 1.6× the VAE's).
VIEWS = {"rotation": 4}
# Colour unless the size is the lab's grey 28 px (Fashion-MNIST); 32 px ~ CIFAR-10, 96 px ~ STL-10.
GREY_SIZES = (28,)
# --quick on CPU: small batches and a quarter-width net, so nine configurations take ~2 minutes on 2 cores.
QUICK_BATCH = {"rotation": 16, "vae": 32, "siamese-vae": 32}
QUICK_WIDTH = 0.25


@dataclass
class BenchConfig:
    """What the step benchmark measures. ``batch_size``/``width`` None → the lab's defaults for the
    device (``METHOD_DEFAULTS`` batch sizes, width 1.0 on CUDA, 0.25 on CPU), or the quick ones."""

    methods: tuple = tuple(TASKS)
    sizes: tuple = (28, 32, 96)
    batch_size: Optional[int] = None
    width: Optional[float] = None
    steps: int = 60
    warmup: int = 10
    rounds: Optional[int] = None
    compile: bool = False
    quick: bool = False
    seed: int = 0

    def validate(self) -> "BenchConfig":
        if not self.methods:
            raise ValueError(f"methods={self.methods!r} is empty; allowed: one or more of {', '.join(TASKS)}")
        for method in self.methods:
            check_method(method)
        if not self.sizes:
            raise ValueError("sizes=() is empty; allowed: image sizes ≥ 16, e.g. 28,32,96")
        for size in self.sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 16:
                raise ValueError(f"sizes={list(self.sizes)!r}: {size!r} is not allowed; allowed: integers ≥ 16")
        for name, minimum in (("steps", 1), ("warmup", 0), ("rounds", 1)):
            value = getattr(self, name)
            if name == "rounds" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer ≥ {minimum}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 2):
            raise ValueError(f"batch_size={self.batch_size!r} is not allowed; allowed: an integer ≥ 2 "
                             f"(BatchNorm needs more than one image)")
        if self.width is not None and not (isinstance(self.width, (int, float)) and 0 < self.width <= 4):
            raise ValueError(f"width={self.width!r} is not allowed; allowed: a number in (0, 4]")
        return self

    def batch_for(self, method: str) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return QUICK_BATCH[method] if self.quick else METHOD_DEFAULTS[method]["batch_size"]

    def width_for(self, device: torch.device) -> float:
        if self.width is not None:
            return float(self.width)
        if self.quick:
            return QUICK_WIDTH
        from .pretrain import DEFAULT_WIDTH
        return float(DEFAULT_WIDTH.get(device.type, 1.0))


def quick_config(**changes) -> BenchConfig:
    """``--quick``: few steps, small batches and a quarter-width net (a couple of minutes on 2 CPU cores)."""
    return replace(BenchConfig(steps=16, warmup=2, quick=True), **changes)


@dataclass
class StepTimes:
    """Per-step seconds of one variant and what they give."""

    seconds: list
    images_per_step: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.median


@dataclass
class BenchRow:
    """One task × resolution: sslab's step against the reference step."""

    method: str
    size: int
    channels: int
    batch_size: int
    views: int
    width: float
    compiled: bool
    sslab_img_s: float
    reference_img_s: float
    ratio: float
    sslab_ms: float
    reference_ms: float
    gflop_per_image: float
    sslab_tflops: float
    reference_tflops: float
    sslab_peak_mib: Optional[float]
    reference_peak_mib: Optional[float]
    warmup_s: float  # wall time of both variants' warm-up; includes compilation under --compile
    steps: int
    sslab_step_ms: list = field(default_factory=list)
    reference_step_ms: list = field(default_factory=list)


# ---------------------------------------------------------------- the reference step

def reference_loss(task, method: str, x: torch.Tensor, rotation_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The task's objective written plainly on a float batch ``x`` already on the device: no
    anchor augmentation, no metrics. Uses the task's modules, so model and FLOPs are the same."""
    if method == "rotation":
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        if x.is_contiguous(memory_format=torch.channels_last):
            rotated = rotated.contiguous(memory_format=torch.channels_last)
        logits = task.head(task.backbone(rotated))
        return F.cross_entropy(logits.float(), rotation_labels)
    mu, logvar = task.head(task.backbone(x))
    mu, logvar = mu.float(), logvar.float()
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    recon = task.decoder(z).float()
    rec = (recon - x).pow(2).flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    loss = rec + task.beta * kl
    if method == "siamese-vae":
        positive, _ = task.head(task.backbone(task.positive_augment.apply(x)))
        positive = positive.float()
        negative = positive.roll(1, dims=0)
        triplet = torch.relu((mu - positive).pow(2).sum(1) - (mu - negative).pow(2).sum(1) + task.margin).mean()
        loss = loss + task.triplet_weight * triplet
    return loss


# ---------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], object], count: int, device: torch.device, offset: int = 0) -> list:
    """Seconds of each of ``count`` calls ``step(i)``. On CUDA each step is bracketed by events
    and the host never waits in between (so a host-bound loop shows up as device idle time);
    on CPU every op is synchronous and a host clock per step is exact."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            step(offset + i)
            end.record()
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) / 1000.0 for begin, end in events]
    seconds = []
    for i in range(count):
        t0 = time.perf_counter()
        step(offset + i)
        seconds.append(time.perf_counter() - t0)
    return seconds


def count_flops(run: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``run()`` (a forward pass returning a loss) plus its backward pass."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        run().backward()
    return int(counter.get_total_flops())


def _peak_mib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_rss_mib() -> Optional[float]:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes); None where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


# ---------------------------------------------------------------- one configuration

def bench_one(method: str, size: int, device: torch.device, config: BenchConfig) -> BenchRow:
    """Time sslab's pretraining step and the reference step for one task at one resolution."""
    channels = 1 if size in GREY_SIZES else 3
    batch = config.batch_for(method)
    width = config.width_for(device)
    views = VIEWS.get(method, 1)
    on_cuda = device.type == "cuda"
    if config.compile:
        torch._dynamo.reset()  # a fresh compile cache per model, so no recompile limit is hit
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    task = build_task(method, BackboneConfig(channels, size, width)).to(device)
    prepare_model(task, device)  # what fit does first: channels_last on CUDA
    task.train()
    train_cfg = PretrainConfig(method=method, epochs=1, batch_size=batch, width=width).resolved(device).train_config()
    optimizer = make_optimizer([{"params": [p for p in task.parameters() if p.requires_grad], "lr_scale": 1.0}],
                               train_cfg)
    reference_optimizer = make_optimizer([{"params": [p for p in task.parameters() if p.requires_grad]}], train_cfg)

    # A pool of four batches; sslab slices a fresh permutation of it into batches, as fit does per epoch.
    pool = torch.randint(0, 256, (4 * batch, channels, size, size), dtype=torch.uint8, generator=generator)
    pool = pool.to(device)
    total = config.warmup + config.steps
    indices = []
    while len(indices) < total + 1:
        indices += list(torch.tensor_split(torch.randperm(len(pool), generator=generator).to(device), 4))
    sums: dict = {}

    def sslab_step(i: int):
        lr = train_cfg.lr * lr_factor(train_cfg, i / total, 0.0)
        return train_step(task, (pool,), indices[i], optimizer, lr, on_cuda, sums)

    x = pool[:batch].float().div(255.0)
    if on_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    rotation_labels = torch.arange(4, device=device).repeat_interleave(batch) if method == "rotation" else None
    loss_fn = reference_loss

    def reference_run():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            return loss_fn(task, method, x, rotation_labels)

    def reference_step(i: int):
        loss = reference_run()
        reference_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        reference_optimizer.step()
        return loss

    flops_per_step = count_flops(reference_run)
    task.zero_grad(set_to_none=True)

    if config.compile:
        # An instance attribute shadows the method, so train_step calls the compiled loss.
        task.loss = torch.compile(task.loss)
        loss_fn = torch.compile(reference_loss)

    # Warm-up (the first step compiles under --compile), each variant with its own peak memory.
    _synchronize(device)
    t0 = time.perf_counter()
    _reset_peak(device)
    time_steps(sslab_step, max(1, config.warmup), device)
    sslab_peak = _peak_mib(device)
    _reset_peak(device)
    time_steps(reference_step, max(1, config.warmup), device)
    reference_peak = _peak_mib(device)
    _synchronize(device)
    warmup_s = time.perf_counter() - t0

    images = batch * views
    sslab_seconds, reference_seconds = [], []
    # On CPU every op is synchronous, so alternating every step costs nothing and spreads load changes
    # evenly; on CUDA a round ends in a synchronisation, so rounds stay long enough to keep the queue full.
    rounds = config.rounds or (config.steps if device.type == "cpu" else min(6, config.steps))
    per_round = [len(r) for r in _split(config.steps, rounds)]
    done = config.warmup
    for count in per_round:
        sslab_seconds += time_steps(sslab_step, count, device, offset=done)
        reference_seconds += time_steps(reference_step, count, device, offset=done)
        done += count
    if config.compile:
        del task.loss
    ours, theirs = StepTimes(sslab_seconds, images), StepTimes(reference_seconds, images)
    return BenchRow(
        method=method, size=size, channels=channels, batch_size=batch, views=views, width=width,
        compiled=config.compile, sslab_img_s=ours.images_per_s, reference_img_s=theirs.images_per_s,
        ratio=ours.images_per_s / theirs.images_per_s, sslab_ms=1000 * ours.median,
        reference_ms=1000 * theirs.median, gflop_per_image=flops_per_step / images / 1e9,
        sslab_tflops=flops_per_step / ours.median / 1e12, reference_tflops=flops_per_step / theirs.median / 1e12,
        sslab_peak_mib=sslab_peak, reference_peak_mib=reference_peak, warmup_s=warmup_s,
        steps=len(sslab_seconds), sslab_step_ms=[round(1000 * s, 3) for s in sslab_seconds],
        reference_step_ms=[round(1000 * s, 3) for s in reference_seconds])


def _split(n: int, parts: int) -> list:
    parts = max(1, min(parts, n))
    return [range(n)[i::parts] for i in range(parts)]


def run_bench(config: BenchConfig, device="auto", progress: bool = True) -> list:
    """Every method × size of ``config`` → :class:`BenchRow` list."""
    config.validate()
    dev = resolve_device(device)
    rows = []
    for size in config.sizes:
        for method in config.methods:
            row = bench_one(method, size, dev, config)
            rows.append(row)
            if progress:
                print(f"  {method:<12} {size:>3} px  sslab {row.sslab_img_s:>10.0f} img/s  reference "
                      f"{row.reference_img_s:>10.0f} img/s  ratio {row.ratio:.2f}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- study timing

@dataclass
class StudyConfig:
    """The study whose wall time ``--study`` measures. Defaults = the issue's full Fashion-MNIST
    study: three tasks × 30 epochs on all 60k images, 7 budgets × 3 seeds of probe and scratch
    baseline, fine-tuning, UMAP of 2000 test points. ``eval`` overrides fields of
    :class:`sslab.evaluate.EvalConfig`."""

    methods: tuple = tuple(TASKS)
    dataset: str = "fashion-mnist"
    epochs: int = 30
    limit: Optional[int] = None
    batch_size: Optional[int] = None
    width: Optional[float] = None
    budgets: tuple = (1, 2, 4, 8, 16, 32, 64)
    seeds: tuple = (0, 1, 2)
    layer: str = "conv4"
    scratch: bool = True
    finetune: bool = True
    umap_points: int = 2000
    data_root: Optional[str] = None
    eval: dict = field(default_factory=dict)
    probes_alone: bool = True  # also time the probe sweep one head at a time, for comparison


def quick_study(**changes) -> StudyConfig:
    """A small study for 2 CPU cores: 1 epoch on 2000 images, three budgets, one seed, shorter
    end-to-end trainings."""
    base = StudyConfig(epochs=1, limit=2000, budgets=(1, 8, 64), seeds=(0,), umap_points=1000,
                       eval={"epochs": 10, "finetune_epochs": 5})
    return replace(base, **changes)


@dataclass
class PhaseRow:
    phase: str
    count: int
    seconds: float
    detail: str = ""


class _Phase:
    """Wall time of a block, the device synchronised at both ends."""

    def __init__(self, rows: list, device: torch.device, phase: str, progress: bool):
        self.rows, self.device, self.phase, self.progress = rows, device, phase, progress
        self.count, self.detail = 0, ""

    def __enter__(self):
        _synchronize(self.device)
        if self.progress:
            print(f"  {self.phase} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, kind, value, traceback):
        _synchronize(self.device)
        if kind is None:
            self.rows.append(PhaseRow(self.phase, self.count, time.perf_counter() - self.t0, self.detail))
            if self.progress:  # as it happens, so a study stopped by a time limit still shows its phases
                print(f"  {self.phase}: {self.rows[-1].seconds:.1f} s  {self.detail}", file=sys.stderr, flush=True)
        elif kind is KeyboardInterrupt:
            self.rows.append(PhaseRow(f"{self.phase} (stopped)", self.count, time.perf_counter() - self.t0,
                                      f"interrupted here after {self.count} done; {self.detail}".rstrip("; ")))
        return False


class StudyInterrupted(KeyboardInterrupt):
    """The study was interrupted (Ctrl-C, a time limit's SIGINT); ``rows`` holds the phases that
    finished, the one that was stopped, and the total so far."""

    def __init__(self, rows: list):
        super().__init__("study interrupted")
        self.rows = rows


def time_study(config: StudyConfig, device="auto", out: Optional[str] = None, progress: bool = True) -> list:
    """Run the whole study in a fresh outputs folder (a temporary one unless ``out`` is given) and
    return one :class:`PhaseRow` per phase, then ``total``. Interrupted (Ctrl-C, SIGINT), it
    raises :class:`StudyInterrupted` with the rows so far."""
    from . import evaluate
    from .data import load_dataset
    from .pretrain import pretrain

    dev = resolve_device(device)
    for method in config.methods:
        check_method(method)
    cfg = replace(evaluate.EvalConfig(layer=config.layer), **config.eval).validate()
    budgets, seeds = evaluate.check_budgets(list(config.budgets)), evaluate.check_seeds(list(config.seeds))
    scratch_folder = None
    if out is None:
        scratch_folder = tempfile.mkdtemp(prefix="sslab-bench-study-")
        out = scratch_folder
    elif any(Path(out).iterdir() if Path(out).is_dir() else ()):
        raise ValueError(f"out={out!r} is not empty; allowed: a new or empty folder, so no result is reused "
                         f"from an earlier run")
    rows: list = []
    started = time.perf_counter()
    try:
        with _Phase(rows, dev, "load data", progress) as phase:
            splits = load_dataset(config.dataset, config.data_root)
            phase.count = len(splits.train) + len(splits.test)
            phase.detail = f"{config.dataset}: {len(splits.train)} train, {len(splits.test)} test images"
        runs = []
        for method in config.methods:
            with _Phase(rows, dev, f"pretrain {method}", progress) as phase:
                pre = PretrainConfig(method=method, dataset=config.dataset, epochs=config.epochs, limit=config.limit,
                                     batch_size=config.batch_size, width=config.width, data_root=config.data_root)
                run = pretrain(pre, device=dev, out=out, progress=False)
                runs.append(run)
                phase.count = run.summary["epochs_run"]
                seen = run.summary["images"] * run.summary["epochs_run"]
                fit_s = run.summary["train_seconds"]
                phase.detail = (f"{run.summary['images']} images × {run.summary['epochs_run']} epochs: {fit_s:.1f} s "
                                f"in fit ({seen / max(fit_s, 1e-9):.0f} images/s), the rest setup + test-set "
                                f"pretext evaluation")
        with _Phase(rows, dev, "features", progress) as phase:
            for run in runs:
                for split in ("train", "test"):
                    phase.count += len(evaluate.run_features(run, split, cfg.layer, cfg.grid, dev))
            phase.detail = f"{cfg.layer} pooled {cfg.grid}×{cfg.grid}, train + test, {len(runs)} nets"
        cells = [(run, budget, seed) for budget in budgets for seed in seeds for run in runs]
        sweep = f"{cfg.probe} head, {len(budgets)} budgets × {len(seeds)} seeds × {len(runs)} methods"
        phases = [("probes", out, True, "heads trained together")]
        if config.probes_alone:  # fresh cells in their own store: nothing reused from the phase above
            phases.append(("probes one at a time", str(Path(out) / "probes-alone"), False,
                           "the same cells each trained alone (for comparison; not in a sweep)"))
        for name, store_at, together, how in phases:
            with _Phase(rows, dev, name, progress) as phase:
                if together:  # as label_curve runs them: heads trained in batched groups, then read back
                    evaluate.probe_cells_together([(*cell, cfg.probe) for cell in cells], cfg, dev, store_at)
                for run, budget, seed in cells:
                    evaluate.probe_run(run, budget, seed, cfg.layer, cfg.probe, dev, store_at, cfg)
                    phase.count += 1
                phase.detail = f"{sweep}, {how}"
        if config.scratch:
            with _Phase(rows, dev, "scratch", progress) as phase:
                for budget in budgets:
                    for seed in seeds:
                        evaluate.scratch_run(config.dataset, budget, seed, like=runs[0], layer=cfg.layer, device=dev,
                                             out=out, config=cfg)
                        phase.count += 1
                phase.detail = f"{len(budgets)} budgets × {len(seeds)} seeds, up to {cfg.epochs} epochs"
        if config.finetune:
            with _Phase(rows, dev, "finetune", progress) as phase:
                for budget in budgets:
                    for seed in seeds:
                        for run in runs:
                            evaluate.finetune_run(run, budget, seed, cfg.layer, dev, out, cfg)
                            phase.count += 1
                phase.detail = f"up to {cfg.finetune_epochs} epochs per cell"
        if config.umap_points:
            rows.extend(_time_umap(runs, splits, cfg, dev, config.umap_points, progress))
    except KeyboardInterrupt:
        rows.append(_total_row(rows, started, "up to the interruption"))
        raise StudyInterrupted(rows) from None
    finally:
        if scratch_folder is not None:
            shutil.rmtree(scratch_folder, ignore_errors=True)
    rows.append(_total_row(rows, started))
    return rows


def _total_row(rows: list, started: float, until: str = "") -> PhaseRow:
    comparison = sum(r.seconds for r in rows if r.phase == "probes one at a time")
    detail = "wall time of everything above" + (" but the one-at-a-time comparison" if comparison else "")
    return PhaseRow("total", 0, time.perf_counter() - started - comparison, f"{detail} {until}".rstrip())


def _time_umap(runs, splits, cfg, dev, points: int, progress: bool) -> list:
    try:
        import umap  # noqa: F401
    except ImportError:
        return [PhaseRow("umap", 0, 0.0, "skipped: umap-learn is not installed")]
    from . import evaluate
    from .embed import stratified_sample, umap_2d
    rows: list = []
    with _Phase(rows, dev, "umap", progress) as phase:
        index = torch.from_numpy(stratified_sample(splits.test.labels, points))
        for run in runs:
            umap_2d(evaluate.run_features(run, "test", cfg.layer, cfg.grid, dev, index=index))
            phase.count += 1
        phase.detail = f"{len(index)} test points per method"
    return rows


# ---------------------------------------------------------------- params files

def read_params(path) -> dict:
    """A flat papermill parameter file (``key: value`` per line, YAML) → dict. Uses PyYAML when it
    is installed; otherwise reads numbers, booleans, strings and ``[a, b]`` lists itself."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"params={str(path)!r} does not exist; allowed: a YAML file such as params/full.yml")
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"params={str(path)!r} is not a mapping of parameters; allowed: `key: value` lines")
        return data
    data = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if not line or line == "---":
            continue
        if ":" not in line:
            raise ValueError(f"params={str(path)!r} line {number}: {line!r} is not `key: value`")
        key, value = (part.strip() for part in line.split(":", 1))
        data[key] = _parse_scalar(value)
    return data


def _parse_scalar(text: str):
    if text.startswith("[") and text.endswith("]"):
        return [_parse_scalar(v.strip()) for v in text[1:-1].split(",") if v.strip()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("null", "~", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


STUDY_KEYS = {f.name for f in fields(StudyConfig)} - {"eval"}
# The notebooks' parameter names (params/*.yml) where they differ from StudyConfig's.
PARAM_ALIASES = {"points": "umap_points"}


def study_from_params(params: dict, base: StudyConfig) -> tuple:
    """Parameters → (StudyConfig, ignored keys). Keys named like :class:`StudyConfig` fields set
    them (``methods`` may be a comma-separated string; the notebooks' ``points`` is
    ``umap_points``); keys named like EvalConfig fields (``probe``, ``layer`` …) go to ``eval``;
    anything else (``labels``, ``examples``, ``device`` …) is reported back as ignored."""
    from .evaluate import EvalConfig
    eval_keys = {f.name for f in fields(EvalConfig)}
    changes, evals, ignored = {}, dict(base.eval), []
    for key, value in params.items():
        key = PARAM_ALIASES.get(key, key)
        if key in STUDY_KEYS:
            if key in ("methods", "budgets", "seeds") and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                value = value if key == "methods" else [int(v) for v in value]
            if key in ("methods", "budgets", "seeds") and isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            changes[key] = tuple(value) if isinstance(value, list) else value
        elif key in eval_keys:
            evals[key] = value
        else:
            ignored.append(key)
    return replace(base, **changes, eval=evals), ignored


# ---------------------------------------------------------------- tables

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: Sequence[BenchRow]) -> str:
    """The step benchmark as a fixed-width table."""
    header = (f"{'method':<12} {'px':>3} {'ch':>2} {'batch':>5} {'views':>5} {'sslab img/s':>12} {'ref img/s':>10} "
              f"{'ratio':>5} {'GFLOP/img':>9} {'sslab TFLOP/s':>13} {'ref TFLOP/s':>11} {'peak MiB sslab/ref':>18}")
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = f"{_fmt(r.sslab_peak_mib, '.0f')}/{_fmt(r.reference_peak_mib, '.0f')}"
        lines.append(f"{r.method:<12} {r.size:>3} {r.channels:>2} {r.batch_size:>5} {r.views:>5} "
                     f"{r.sslab_img_s:>12.0f} {r.reference_img_s:>10.0f} {r.ratio:>5.2f} {r.gflop_per_image:>9.4f} "
                     f"{r.sslab_tflops:>13.3f} {r.reference_tflops:>11.3f} {peak:>18}")
    return "\n".join(lines)


def format_study(rows: Sequence[PhaseRow]) -> str:
    width = max([22] + [len(r.phase) for r in rows])
    lines = [f"{'phase':<{width}} {'count':>6} {'seconds':>9}  detail", "-" * (width + 50)]
    for r in rows:
        count = "" if r.phase == "total" else r.count
        lines.append(f"{r.phase:<{width}} {count:>6} {r.seconds:>9.1f}  {r.detail}")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": _cpu_name()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_avg_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- command line

def _list_of(kind, name: str):
    def parse(text: str):
        values = [v.strip() for v in text.split(",") if v.strip()]
        try:
            values = [kind(v) for v in values]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}={text!r}: allowed: comma-separated values, "
                                             f"e.g. {'28,32,96' if kind is int else ','.join(TASKS)}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"--{name}={text!r}: allowed: at least one value")
        return values
    return parse


def add_bench_command(sub, formatter) -> None:
    p = sub.add_parser(
        "bench", formatter_class=formatter,
        help="time the pretraining step against a plain-PyTorch reference, or the whole study phase by phase",
        description="Step benchmark (default): per pretext task and resolution, images/s of the real pretraining "
                    "step (sslab.train.train_step) and of a minimal plain-PyTorch step on the same model and batch, "
                    "their ratio, model FLOPs per image, TFLOP/s and peak device memory. img/s counts the images "
                    "the network sees (4 rotated copies per image for rotation), as `pretrain` does.\n\n"
                    "--study: the whole study (pretraining per method, features, probes, scratch, fine-tuning, UMAP) "
                    "timed phase by phase in a fresh outputs folder.")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="small batches, width 0.25, few steps (step benchmark: 1-2 min on 2 CPU cores, see --threads); "
                        "with --study: 1 epoch on 2000 images, budgets 1,8,64, seed 0")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table (and machine info) as JSON")
    p.add_argument("--methods", type=_list_of(str, "methods"), default=None,
                   help=f"comma-separated pretext tasks (default: {','.join(TASKS)})")
    p.add_argument("--sizes", type=_list_of(int, "sizes"), default=None,
                   help="comma-separated image sizes, 28 px grey, others colour (default: 28,32,96)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 60, quick 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, quick 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="sslab and reference alternate in this many rounds (default: every step on CPU, so a "
                        "change of machine load hits both alike; 6 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the pretrain defaults, rotation 150, VAEs 128; quick 16/32)")
    p.add_argument("--width", type=float, default=None, help="AlexNet width (default: 1.0 CUDA, 0.25 CPU/quick)")
    p.add_argument("--compile", action="store_true", help="torch.compile the sslab loss and the reference loss")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and synthetic images")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice). On a busy shared machine 1 thread "
                        "gives steadier numbers: threads that wait on each other while descheduled slow every op")
    study = p.add_argument_group("study timing")
    study.add_argument("--study", action="store_true", help="time the whole study phase by phase instead")
    study.add_argument("--params", default=None, metavar="FILE",
                       help="papermill parameter file (e.g. params/full.yml) to take the study settings from")
    study.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default 30, quick 1)")
    study.add_argument("--limit", type=int, default=None, help="unlabeled images per pretraining (default: all)")
    study.add_argument("--budgets", type=_list_of(int, "budgets"), default=None,
                       help="labels per class (default 1,2,4,8,16,32,64)")
    study.add_argument("--seeds", type=_list_of(int, "seeds"), default=None, help="seeds (default 0,1,2)")
    study.add_argument("--no-finetune", dest="finetune", action="store_false", default=None, help="skip fine-tuning")
    study.add_argument("--no-scratch", dest="scratch", action="store_false", default=None,
                       help="skip the scratch baselines")
    study.add_argument("--no-probes-alone", dest="probes_alone", action="store_false", default=None,
                       help="skip timing the probe sweep one head at a time (the comparison with batched heads)")
    study.add_argument("--umap-points", type=int, default=None, help="test points per UMAP (0 = skip; default 2000)")
    study.add_argument("--dataset", default=None, help="dataset (default fashion-mnist)")
    study.add_argument("--data-root", default=None, help="folder to look in first for the dataset")
    study.add_argument("--out", default=None,
                       help="empty folder for the study's runs (default: a temporary folder, removed afterwards)")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args) -> int:
    device = resolve_device(args.device)
    if args.threads is not None:
        if isinstance(args.threads, bool) or args.threads < 1:
            raise ValueError(f"threads={args.threads!r} is not allowed; allowed: an integer ≥ 1")
        torch.set_num_threads(args.threads)
    command = "python -m sslab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "python -m sslab bench"
    info = {**machine_info(device), "command": command}
    if args.study:
        return _cmd_study(args, device, info)
    values = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup), ("rounds", args.rounds)) if v is not None}
    base = quick_config() if args.quick else BenchConfig()
    values.update({k: tuple(v) for k, v in (("methods", args.methods), ("sizes", args.sizes)) if v is not None})
    config = replace(base, batch_size=args.batch_size,
                     width=args.width, compile=args.compile, seed=args.seed, **values).validate()
    _busy_note(device, info)
    print(f"bench on {_describe(info)}: {len(config.methods) * len(config.sizes)} configurations, "
          f"{config.warmup} warm-up + {config.steps} timed steps each", file=sys.stderr, flush=True)
    rows = run_bench(config, device)
    info["max_rss_mib"] = max_rss_mib()
    if hasattr(os, "getloadavg"):
        info["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        _write_json(args.json, {"machine": info, "config": asdict(config), "rows": [asdict(r) for r in rows]})
    print(f"# {info['command']}")
    print(f"# {_describe(info)}; width {config.width_for(device)}; {config.steps} timed steps per variant "
          f"(median); compile {'on' if config.compile else 'off'}")
    print("# img/s counts images as pretrain does: ×4 rotated copies for rotation; siamese-vae counts each source "
          "image once though its encoder also sees the positive view; ratio = sslab / reference")
    if config.compile:
        print("# warm-up incl. compilation: " + ", ".join(f"{r.method} {r.size} px {r.warmup_s:.0f} s" for r in rows))
    print(format_rows(rows))
    return 0


def _cmd_study(args, device: torch.device, info: dict) -> int:
    config = quick_study() if args.quick else StudyConfig()
    ignored = []
    if args.params:
        config, ignored = study_from_params(read_params(args.params), config)
    flags = {"methods": tuple(args.methods) if args.methods else None, "epochs": args.epochs,
             "limit": args.limit, "budgets": tuple(args.budgets) if args.budgets else None,
             "seeds": tuple(args.seeds) if args.seeds else None, "finetune": args.finetune,
             "umap_points": args.umap_points, "dataset": args.dataset, "data_root": args.data_root,
             "batch_size": args.batch_size, "width": args.width, "probes_alone": args.probes_alone,
             "scratch": args.scratch}
    config = replace(config, **{k: v for k, v in flags.items() if v is not None})
    if isinstance(config.epochs, bool) or not isinstance(config.epochs, int) or config.epochs < 1:
        raise ValueError(f"epochs={config.epochs!r} is not allowed; allowed: an integer ≥ 1")
    if ignored:
        print(f"params: ignoring {', '.join(ignored)} (not study settings)", file=sys.stderr)
    _busy_note(device, info)
    print(f"study timing on {_describe(info)}: {asdict(config)}", file=sys.stderr, flush=True)
    try:
        rows, stopped = time_study(config, device, args.out), False
    except StudyInterrupted as interrupted:  # e.g. a time limit: what finished is still worth keeping
        rows, stopped = interrupted.rows, True
    info["max_rss_mib"] = max_rss_mib()
    if args.json:
        _write_json(args.json, {"machine": info, "study": asdict(config), "stopped": stopped,
                                "phases": [asdict(r) for r in rows]})
    print(f"# {info['command']}")
    print(f"# {_describe(info)}")
    if stopped:
        print("# STOPPED part-way (interrupted): the phases below are the ones reached")
    print(format_study(rows))
    return 130 if stopped else 0


def _busy_note(device: torch.device, info: dict) -> None:
    load, cores = info.get("load_avg_1min_at_start"), os.cpu_count() or 1
    if device.type == "cpu" and torch.get_num_threads() > 1 and load is not None and load >= cores:
        print(f"note: this machine is busy (load {load} on {cores} cores); with {torch.get_num_threads()} threads "
              f"per op, threads wait on each other while descheduled and timings get slow and noisy. "
              f"--threads 1 gives steadier numbers.", file=sys.stderr)


def _describe(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_threads']} threads)"
    return f"{info['device']} = {where}, torch {info['torch']}, {info['date']}"


def _write_json(path, data) -> None:
    from . import store
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_json(path, json.loads(json.dumps(data, default=str)))
    print(f"wrote {path}", file=sys.stderr)
