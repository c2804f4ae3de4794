"""The step benchmark: the real pretraining step against a minimal plain-PyTorch step.

For each pretext task and resolution, in one process, the real pretraining step
(:func:`sslab.train.train_step`, the very function ``fit`` calls: batch gather, device-side
augmentation, rotations, autocast, optimiser step, metric sums) against a minimal plain-PyTorch
step on the same model and batch (data already on the device as float, only the augmentation
the task itself needs: the four rotations for rotation, the positive view for siamese-vae; the
same optimiser type and settings; the loss from the task's own loss functions). Steps are timed
one by one (CUDA events on CUDA, ``time.perf_counter`` on CPU, where every op is synchronous),
sslab and reference alternate (every step on CPU, in rounds on CUDA) so a change of machine
load hits both, and the median step gives images/s. Model FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from sslab.augment import rotate4
from sslab.checks import check_choice
from sslab.models import BackboneConfig
from sslab.precision import PRECISIONS, autocast, memory_format, resolve_precision
from sslab.pretext import (TASKS, build_task, check_method, kl_to_standard_normal, reconstruction_error,
                           task_settings, triplet_loss)
from sslab.pretext.simclr import nt_xent_loss
from sslab.pretrain import DEFAULT_WIDTH, PretrainConfig
from sslab.train import lr_factor, make_optimizer, prepare_model, resolve_device, train_step

# Images per source image, as ``pretrain`` counts them for its images/s: the 4 rotated copies
# for rotation; siamese-vae counts its source images (its encoder also sees each one's positive
# view, which is why its GFLOP/img is about 1.6× the VAE's).
VIEWS = {"rotation": 4, "simclr": 2}
# Colour unless the size is the lab's grey 28 px (Fashion-MNIST); 32 px ~ CIFAR-10, 96 px ~ STL-10.
GREY_SIZES = (28,)
# --quick on CPU: batches of 64 and a quarter-width net: twelve configurations in about a minute on 2 cores,
# batches large enough that the step is not all per-step overhead (as the lab's own batches are not).
QUICK_BATCH = {"rotation": 64, "vae": 64, "siamese-vae": 64, "simclr": 64}
QUICK_WIDTH = 0.25


@dataclass
class BenchConfig:
    """What the step benchmark measures. ``batch_size``/``width`` None → the lab's defaults for the
    device (each task's settings block's batch size, width 1.0 on CUDA, 0.25 on CPU), or the quick ones."""

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
    precision: str = "auto"  # of the sslab and reference steps; the fp32 step is always measured too

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
        check_choice("precision", self.precision, PRECISIONS)
        return self

    def batch_for(self, method: str) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return QUICK_BATCH.get(method, 32) if self.quick else task_settings(method).batch_size

    def width_for(self, device: torch.device) -> float:
        if self.width is not None:
            return float(self.width)
        if self.quick:
            return QUICK_WIDTH
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
    """One task × resolution: sslab's step against the reference step in the same precision, and
    sslab's step in fp32 (the gain the precision gives)."""

    method: str
    size: int
    channels: int
    batch_size: int
    views: int
    width: float
    compiled: bool
    precision: str
    sslab_img_s: float
    reference_img_s: float
    ratio: float
    fp32_img_s: float
    gain: float  # sslab img/s over sslab's own step in fp32
    sslab_ms: float
    reference_ms: float
    fp32_ms: float
    gflop_per_image: float
    sslab_tflops: float
    reference_tflops: float
    sslab_peak_mib: Optional[float]
    reference_peak_mib: Optional[float]
    warmup_s: float  # wall time of both variants' warm-up; includes compilation under --compile
    steps: int
    sslab_step_ms: list = field(default_factory=list)
    reference_step_ms: list = field(default_factory=list)
    fp32_step_ms: list = field(default_factory=list)


# ---------------------------------------------------------------- the reference step

def reference_loss(task, method: str, x: torch.Tensor, rotation_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The task's objective on a float batch ``x`` already on the device, without the lab's
    plumbing: no anchor augmentation, no metrics. Uses the task's modules and loss functions, so
    model, loss and FLOPs are the task's own."""
    if method == "rotation":
        rotated, _ = rotate4(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            rotated = rotated.contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(task.logits(rotated).float(), rotation_labels)
    if method == "simclr":  # the two views are the objective itself, so they are part of the reference
        views = torch.cat([task.augment.apply(x), task.augment.apply(x)])
        if x.is_contiguous(memory_format=torch.channels_last):
            views = views.contiguous(memory_format=torch.channels_last)
        z = task.project(views)
        return nt_xent_loss(*z.float().chunk(2), task.temperature)
    mu, logvar = task.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    loss = reconstruction_error(task.decode(z).float(), x).mean() + task.beta * kl_to_standard_normal(mu, logvar).mean()
    if method == "siamese-vae":
        positive, _ = task.encode(task.positive_augment.apply(x))
        loss = loss + task.triplet_weight * triplet_loss(mu, positive, positive.roll(1, dims=0), task.margin)
    return loss


# ---------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
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
    """Time sslab's pretraining step and the reference step (both in the run's precision), and
    sslab's step in fp32, for one task at one resolution."""
    channels = 1 if size in GREY_SIZES else 3
    batch = config.batch_for(method)
    width = config.width_for(device)
    views = VIEWS.get(method, 1)
    precision = resolve_precision(config.precision, device)
    if config.compile:
        torch._dynamo.reset()  # a fresh compile cache per model, so no recompile limit is hit
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    task = build_task(method, BackboneConfig(channels, size, width)).to(device).train()
    fp32_task = copy.deepcopy(task)  # its own weights in the contiguous layout fp32 wants
    prepare_model(task, precision)  # what fit does first: channels_last for bf16
    train_cfg = PretrainConfig(method=method, epochs=1, width=width,
                               settings={"batch_size": batch}).resolved(device).train_config()

    def optimizer_of(model):
        return make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}],
                              train_cfg)
    optimizer, reference_optimizer, fp32_optimizer = optimizer_of(task), optimizer_of(task), optimizer_of(fp32_task)

    # A pool of four batches; sslab slices a fresh permutation of it into batches, as fit does per epoch.
    pool = torch.randint(0, 256, (4 * batch, channels, size, size), dtype=torch.uint8, generator=generator)
    pool = pool.to(device)
    total = config.warmup + config.steps
    indices = []
    while len(indices) < total + 1:
        indices += list(torch.tensor_split(torch.randperm(len(pool), generator=generator).to(device), 4))
    sums: dict = {}

    def lab_step(model, opt, step_precision):
        def step(i: int):
            lr = train_cfg.lr * lr_factor(train_cfg, i / total, 0.0)
            return train_step(model, (pool,), indices[i], opt, lr, sums, step_precision)
        return step
    sslab_step, fp32_step = lab_step(task, optimizer, precision), lab_step(fp32_task, fp32_optimizer, "fp32")

    x = pool[:batch].float().div(255.0).contiguous(memory_format=memory_format(precision))
    rotation_labels = torch.arange(4, device=device).repeat_interleave(batch) if method == "rotation" else None
    loss_fn = reference_loss

    def reference_run():
        with autocast(device, precision):
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
    synchronize(device)
    t0 = time.perf_counter()
    peaks = []
    for step in (sslab_step, reference_step, fp32_step):
        _reset_peak(device)
        time_steps(step, max(1, config.warmup), device)
        peaks.append(_peak_mib(device))
    synchronize(device)
    warmup_s = time.perf_counter() - t0

    images = batch * views
    seconds = {"sslab": [], "reference": [], "fp32": []}
    # On CPU every op is synchronous, so alternating every step costs nothing and spreads load changes
    # evenly; on CUDA a round ends in a synchronisation, so rounds stay long enough to keep the queue full.
    rounds = config.rounds or (config.steps if device.type == "cpu" else min(6, config.steps))
    done = config.warmup
    for count in [len(r) for r in _split(config.steps, rounds)]:
        for name, step in (("sslab", sslab_step), ("reference", reference_step), ("fp32", fp32_step)):
            seconds[name] += time_steps(step, count, device, offset=done)
        done += count
    if config.compile:
        del task.loss
    ours, theirs, fp32 = (StepTimes(seconds[name], images) for name in ("sslab", "reference", "fp32"))
    return BenchRow(
        method=method, size=size, channels=channels, batch_size=batch, views=views, width=width,
        compiled=config.compile, precision=precision, sslab_img_s=ours.images_per_s,
        reference_img_s=theirs.images_per_s, ratio=ours.images_per_s / theirs.images_per_s,
        fp32_img_s=fp32.images_per_s, gain=ours.images_per_s / fp32.images_per_s, sslab_ms=1000 * ours.median,
        reference_ms=1000 * theirs.median, fp32_ms=1000 * fp32.median, gflop_per_image=flops_per_step / images / 1e9,
        sslab_tflops=flops_per_step / ours.median / 1e12, reference_tflops=flops_per_step / theirs.median / 1e12,
        sslab_peak_mib=peaks[0], reference_peak_mib=peaks[1], warmup_s=warmup_s, steps=len(seconds["sslab"]),
        **{f"{name}_step_ms": [round(1000 * t, 3) for t in seconds[name]] for name in seconds})


def _split(n: int, parts: int) -> list:
    parts = max(1, min(parts, n))
    return [range(n)[i::parts] for i in range(parts)]


def measure_steps(config: BenchConfig, device="auto", progress: bool = True) -> list:
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
                      f"{row.reference_img_s:>10.0f} img/s  ratio {row.ratio:.2f}  ({row.precision}; sslab in fp32 "
                      f"{row.fp32_img_s:.0f} img/s, gain {row.gain:.2f}×)", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- tables

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: Sequence[BenchRow]) -> str:
    """The step benchmark as a fixed-width table."""
    header = (f"{'method':<12} {'px':>3} {'ch':>2} {'batch':>5} {'views':>5} {'prec':>4} {'sslab img/s':>12} "
              f"{'ref img/s':>10} {'ratio':>5} {'fp32 img/s':>10} {'gain':>5} {'GFLOP/img':>9} {'sslab TFLOP/s':>13} "
              f"{'peak MiB sslab/ref':>18}")
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = f"{_fmt(r.sslab_peak_mib, '.0f')}/{_fmt(r.reference_peak_mib, '.0f')}"
        lines.append(f"{r.method:<12} {r.size:>3} {r.channels:>2} {r.batch_size:>5} {r.views:>5} {r.precision:>4} "
                     f"{r.sslab_img_s:>12.0f} {r.reference_img_s:>10.0f} {r.ratio:>5.2f} {r.fp32_img_s:>10.0f} "
                     f"{r.gain:>5.2f} {r.gflop_per_image:>9.4f} {r.sslab_tflops:>13.3f} {peak:>18}")
    return "\n".join(lines)

