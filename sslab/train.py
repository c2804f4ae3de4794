"""The one training loop every stage uses: pretraining, probes, the scratch baseline, fine-tuning.

Data sits on the training device as tensors; each epoch draws a seeded permutation and
slices batches from it. Augmentation happens inside the model's ``loss`` on the same device.
A run's precision (:mod:`sslab.precision`: bf16 autocast with channels_last, or fp32) is the
caller's to choose; epochs are timed with CUDA events on CUDA. :func:`fit` reads top to bottom;
its pieces (the epoch, the divergence check, the progress bar) are the small functions and
classes below it, and the batched probe trainer reuses them; the resume state (early stopping and
the result so far included) and when it is written are in :mod:`sslab.checkpoint`.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import store
from .checkpoint import (START_EPOCH, Checkpointer, EarlyStopping, FitResult, resume, start_metrics,
                         training_state)
from .checks import check_choice
from .precision import autocast


@dataclass
class TrainConfig:
    """Hyperparameters of one training run. ``milestones`` are fractions of the run at which a
    step schedule multiplies the learning rate by ``gamma`` (the study's 15/30/45 of 63 epochs
    ≈ 0.24/0.48/0.71)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple = (0.24, 0.48, 0.71)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    patience: int = 0
    seed: int = 0

    def validate(self) -> "TrainConfig":
        from .checks import check_int, check_number
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_number("lr", self.lr)
        check_choice("optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        check_choice("schedule", self.schedule, ("step", "cosine", "constant"))
        return self


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite or exploded (:func:`check_divergence`), or an update overflowed;
    the message says which checkpoint, if any, is kept."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU. Asking for CUDA where there is none is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asks for CUDA, but this machine has no usable CUDA device; "
                             f"allowed here: cpu, auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    return dev


def make_optimizer(param_groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names over ``param_groups``, in torch's fused form where it has one
    (float parameters on the CPU or CUDA): one kernel per step instead of one per tensor — the same
    update, 3–6× faster a step on the development CPU (docs/BENCHMARKS.md)."""
    options = dict(fused=True) if fusable(param_groups) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay, **options)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)


def fusable(param_groups) -> bool:
    """Whether every parameter of ``param_groups`` (a list of groups, or of tensors) is a float
    tensor on the CPU or a CUDA device: what torch's fused optimisers take."""
    params = [p for g in param_groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def lr_factor(cfg: TrainConfig, progress: float, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1) of the run (per step, so short runs decay too)."""
    if warmup > 0 and progress < warmup:
        return (progress + 1e-8) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Near-equal batches, never one tiny one at the end: each of the k near-equal chunks holds at
    least n // k ≥ 2 samples, since BatchNorm needs more than one."""
    return max(1, min(round(n / batch_size), n // 2))


def make_deterministic() -> None:
    """Make every later torch call in this process pick deterministic algorithms, so a CPU
    run repeats bit for bit (``--deterministic``, the notebooks' ``deterministic`` parameter).
    The setting is process-wide: torch has no per-call switch."""
    # cuBLAS reads this when its first handle is made; with it CUDA matmuls repeat too.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def prepare_model(model: nn.Module, precision: str) -> None:
    """For bf16: channels_last weights, and modules with a ``channels_last`` flag (the pretext
    tasks, the image classifier) switch their inputs to it too. Nothing changes for fp32."""
    if precision == "bf16":
        model.to(memory_format=torch.channels_last)
        for module in model.modules():
            if hasattr(module, "channels_last"):
                module.channels_last = True


def train_step(model: nn.Module, data: tuple, index: torch.Tensor, optimizer: torch.optim.Optimizer,
               lr: float, sums: dict, precision: str = "fp32") -> torch.Tensor:
    """One step of :func:`fit`: set every group's learning rate to ``lr`` × its ``lr_scale``, take
    rows ``index`` of each tensor in ``data``, minimise ``model.loss(*batch)["loss"]`` (under
    bf16 autocast for ``precision="bf16"``) and add every value ``model.loss`` returned to
    ``sums`` (as tensors, so nothing waits for the device). Returns the loss. The benchmark
    times exactly this function."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    batch = tuple(t[index] for t in data)
    with autocast(batch[0].device, precision):
        out = model.loss(*batch)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for key, value in out.items():
        value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        sums[key] = sums.get(key, 0.0) + value
    return loss


def fit(model: nn.Module, data: tuple, cfg: TrainConfig, device: torch.device, *,
        param_groups: Optional[list] = None,
        validate: Optional[Callable[[nn.Module], dict]] = None, monitor: str = "val_acc",
        checkpoint: Optional[Path] = None, metrics_path: Optional[Path] = None,
        progress: bool = True, desc: str = "train", images_per_sample: int = 1,
        deterministic: bool = False, distributed=None, checkpoint_every: float = 0.0,
        checkpoint_last: bool = True, precision: str = "fp32", provenance: Optional[dict] = None,
        validate_start: bool = False) -> FitResult:
    """Train ``model`` by minimising ``model.loss(*batch)["loss"]`` over ``data``.

    ``data``: tensors on ``device`` sharing their first dimension (each step passes one slice
    of each to ``model.loss``), or a :class:`sslab.stream.StreamedData` (the same batches,
    streamed from host memory). ``param_groups``: optimiser groups, each with an ``lr_scale``.
    ``validate(model)`` returns a dict holding ``monitor`` (higher is better): with
    ``cfg.patience`` > 0 training stops after that many epochs without improvement and the
    best epoch's weights are restored. ``checkpoint``: the resume state, written at the end of
    an epoch once ``checkpoint_every`` seconds have passed since the last (0: every epoch) and
    after the last epoch unless ``checkpoint_last=False``; if it exists, training resumes from
    it. ``metrics_path``: one JSON line per epoch. ``distributed``: a
    :class:`sslab.distributed.Distributed` under torchrun (rank 0 alone writes and shows
    progress), ``None`` for one process. ``precision``: ``fp32`` or ``bf16``
    (:func:`sslab.precision.resolve_precision` turns the lab's ``auto`` into one of them).
    ``provenance``: what the checkpoint records of the run that writes it
    (:func:`sslab.integrity.provenance`); a checkpoint recording something else is refused.
    ``validate_start``: the weights training starts from are a candidate too — validated before
    the first epoch (``result.start_metric``), they are what early stopping starts from (epoch
    −1), so with ``cfg.patience`` > 0 the run ends on them unless an epoch scores higher.
    """
    cfg.validate()
    if deterministic:
        make_deterministic()
    plan = EpochPlan.make(data, cfg, distributed)
    main = distributed is None or distributed.is_main
    saver = Checkpointer(checkpoint, checkpoint_every, checkpoint_last, writes=main, provenance=provenance)
    check_choice("precision", precision, ("fp32", "bf16"))
    prepare_model(model, precision)
    step_model = model if distributed is None else distributed.wrap(model)
    optimizer = make_optimizer(_param_groups(model, param_groups), cfg)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    early, result = EarlyStopping(cfg.patience), FitResult()
    state = saver.load(distributed, model)
    start = resume(state, model, optimizer, generator, early, result, cfg, device) if state else 0
    if validate_start and validate is not None and state is None:  # a resumed run has it in its checkpoint
        result.start_metric = validation_metrics(model, validate, device, precision).get(monitor)
        if result.start_metric is not None:
            early.update(result.start_metric, START_EPOCH, lambda: clone_state(model))
    start_metrics(metrics_path if main else None, result.resumed_from, state is not None, result.history)
    if state and main:
        print(f"resuming {desc} from {checkpoint} after epoch {result.resumed_from} of {cfg.epochs}", file=sys.stderr)
    bar = ProgressBar(progress and main, plan, start, f"{desc} ({precision})",
                      cfg.batch_size * plan.world * images_per_sample)
    for epoch in range(start, cfg.epochs):
        try:
            seconds, sums = train_epoch(model, step_model, data, plan, optimizer, cfg, generator, epoch, device,
                                      distributed, bar, precision)
        except RuntimeError as exc:  # an update too large for float32 fails in the optimiser
            raise overflow_divergence(exc, desc, epoch, cfg.lr, saver, bar) from exc
        check_weights(model, desc, epoch, cfg.lr, saver, bar)
        row = epoch_row(cfg, plan, epoch, sums, seconds, images_per_sample)
        if result.first_loss is None:  # under torchrun the first epoch's mean, the same on every rank
            result.first_loss = bar.first_loss if distributed is None else row.get("loss")
        check_divergence(row, desc, epoch, cfg.lr, saver, bar, result.first_loss)
        if validate is not None:
            row.update(validation_metrics(model, validate, device, precision))
            early.update(row.get(monitor), epoch, lambda: clone_state(model))
        result.history.append(row)
        if metrics_path is not None and main:
            store.append_jsonl(metrics_path, row)
        last_epoch = early.should_stop or epoch == cfg.epochs - 1
        saver.maybe_save(lambda: training_state(model, optimizer, generator, early, result, cfg, epoch, device),
                         last_epoch)
        if early.should_stop:
            break
    bar.close()
    return finish(model, early, result)


# ---------------------------------------------------------------- the pieces of fit

@dataclass
class EpochPlan:
    """How one epoch walks the data: ``n`` samples in ``steps`` near-equal batches (the same
    number on every process under torchrun), ``world`` processes."""

    n: int
    steps: int
    total_steps: int
    warmup: float
    world: int
    streamed: bool

    @classmethod
    def make(cls, data, cfg: TrainConfig, distributed) -> "EpochPlan":
        from .stream import StreamedData
        streamed = isinstance(data, StreamedData)
        if streamed and distributed is not None:
            raise ValueError("data=StreamedData is not allowed with distributed training; allowed: host tensors "
                             "(each rank copies its shard of every epoch to its device)")
        n = len(data) if streamed else data[0].shape[0]
        steps = batches_per_epoch(n, cfg.batch_size) if distributed is None else \
            distributed.steps_per_epoch(n, cfg.batch_size)
        return cls(n, steps, steps * cfg.epochs, cfg.warmup_epochs / cfg.epochs, 1 if distributed is None else
                   distributed.world_size, streamed)

    def batches(self, data, order: torch.Tensor, cfg: TrainConfig, epoch: int, device, distributed):
        """(tensors, rows) per step of one epoch, for the permutation ``order``."""
        if self.streamed:  # a streamed batch arrives whole on the device, so it is taken entire
            return ((batch, slice(None)) for batch in data.batches(torch.tensor_split(order, self.steps)))
        if distributed is None:
            epoch_data, order = data, order.to(device)
        else:
            epoch_data, order = distributed.epoch_data(data, order, cfg.seed, epoch)
        return ((epoch_data, index) for index in torch.tensor_split(order, self.steps))


def train_epoch(model, step_model, data, plan: EpochPlan, optimizer, cfg: TrainConfig, generator, epoch: int, device,
              distributed, bar: "ProgressBar", precision: str = "fp32") -> tuple:
    """Train one epoch of ``model`` (through ``step_model``, its DDP wrapper under torchrun); returns
    (seconds, the mean of every metric over its steps, averaged over processes)."""
    model.train()
    batches = plan.batches(data, torch.randperm(plan.n, generator=generator), cfg, epoch, device, distributed)
    sums: dict = {}
    timer = EpochTimer(device)
    for step, (step_data, index) in enumerate(batches):
        loss = train_step(step_model, step_data, index, optimizer, step_lr(cfg, plan, epoch, step), sums, precision)
        # (Not under DDP: a rank leaving early would leave the others waiting in the all-reduce.)
        if not bar.step(step, epoch, loss) and distributed is None:
            break
    seconds = timer.seconds()
    if distributed is not None:
        sums = distributed.average(sums)
        distributed.sync_buffers(model)
    return seconds, {k: float(v) / plan.steps for k, v in sums.items()}


def step_lr(cfg: TrainConfig, plan: EpochPlan, epoch: int, step: int) -> float:
    """The learning rate of step ``step`` of epoch ``epoch``: the schedule is per step, so a
    short run decays too."""
    return cfg.lr * lr_factor(cfg, (epoch * plan.steps + step) / plan.total_steps, plan.warmup)


def epoch_row(cfg: TrainConfig, plan: EpochPlan, epoch: int, means: dict, seconds: float,
              images_per_sample: int) -> dict:
    """One line of metrics.jsonl: the epoch, its last learning rate, the mean of every metric over
    its steps, and its speed."""
    lr = cfg.lr * lr_factor(cfg, (epoch + 1) * plan.steps / plan.total_steps - 1e-9, plan.warmup)
    return {"epoch": epoch, "lr": lr, **means, "seconds": round(seconds, 4),
            "images_per_s": round(plan.n * images_per_sample / max(seconds, 1e-9), 1)}


# An epoch whose mean loss is this many times the run's first loss has diverged, finite or not
# (an Adam VAE at lr 1e6 reaches 1e28 from 100 while every value stays finite).
DIVERGENCE_FACTOR = 1e3


def check_divergence(row: dict, desc: str, epoch: int, lr: float, saver: Optional["Checkpointer"] = None,
                     bar=None, reference: Optional[float] = None) -> None:
    """Stop with :class:`TrainingDiverged` when an epoch's mean loss or any metric is not finite,
    or its loss is more than :data:`DIVERGENCE_FACTOR` times the ``reference`` loss in absolute
    value (:func:`fit`: the loss of the run's first step, an untrained net's, or under torchrun
    the first epoch's mean, the same on every rank; the batched heads: their first epoch's). The
    diverged epoch's row and state are never stored."""
    loss = row.get("loss")
    finite = all(math.isfinite(v) for v in row.values() if isinstance(v, (int, float)))
    exploded = (finite and isinstance(loss, (int, float)) and isinstance(reference, (int, float)) and reference != 0
                and math.isfinite(reference) and abs(loss) > DIVERGENCE_FACTOR * abs(reference))
    if finite and not exploded:
        return
    became = f"{loss:.3g}, over {DIVERGENCE_FACTOR:g}× its first loss ({reference:.3g})," if exploded else f"{loss}"
    raise _diverged(f"{desc}: the loss became {became} in epoch {epoch + 1}", lr, saver, bar)


def overflow_divergence(exc: RuntimeError, desc: str, epoch: int, lr: float, saver: Optional["Checkpointer"] = None,
                        bar=None) -> RuntimeError:
    """The error to raise for ``exc``, raised during an epoch: :class:`TrainingDiverged` when an
    update overflowed float32 (torch: ``value cannot be converted ... without overflow``), else
    ``exc`` itself."""
    if "without overflow" not in str(exc):
        return exc
    return _diverged(f"{desc}: an update overflowed float32 in epoch {epoch + 1}", lr, saver, bar)


def check_weights(model: nn.Module, desc: str, epoch: int, lr: float, saver: Optional[Checkpointer] = None,
                  bar=None) -> None:
    """Stop with :class:`TrainingDiverged` when an update left a weight infinite or NaN: a fused
    optimiser step (one kernel) does not fail on an update too large for float32 as the per-tensor
    one does, it writes inf — checked once an epoch, so the epoch is never stored."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point()):
        raise _diverged(f"{desc}: an update overflowed float32 in epoch {epoch + 1}", lr, saver, bar)


def _diverged(what: str, lr: float, saver: Optional["Checkpointer"], bar) -> TrainingDiverged:
    if bar is not None:
        bar.close()
    kept = saver.describe_kept() if saver is not None else "nothing of this training is kept"
    return TrainingDiverged(f"{what}; {kept}. Lower the learning rate (lr={lr:g}; another lr trains in a run folder "
                           f"of its own) or check the input data.")


def clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def validation_metrics(model: nn.Module, validate: Callable[[nn.Module], dict], device, precision: str) -> dict:
    model.eval()
    with autocast(device, precision):
        return validate(model)


def finish(model: nn.Module, early: EarlyStopping, result: FitResult) -> FitResult:
    """The end of a run: the best epoch's weights restored (with early stopping), the result
    summarised, the model in eval mode."""
    if early.best_state is not None:
        model.load_state_dict(early.best_state)
    model.eval()
    return summarise(early, result)


def summarise(early: EarlyStopping, result: FitResult) -> FitResult:
    """``result`` with its best epoch and score, its epochs and its seconds filled in."""
    result.best_epoch, result.best_metric = early.best_epoch, early.best_metric
    result.epochs_run = len(result.history)
    result.seconds = float(sum(r["seconds"] for r in result.history))
    return result


def _param_groups(model: nn.Module, groups: Optional[list]) -> list:
    groups = groups if groups is not None else [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    return groups


class EpochTimer:
    """Seconds of an epoch: CUDA events on CUDA (the host runs ahead of the device), a host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000.0
        return time.perf_counter() - self.t0


class ProgressBar:
    """A tqdm bar over every step of the run with the epoch, the loss and images/s; a no-op when
    ``enabled`` is False. Reading the loss waits for the device, so it happens every 20 steps."""

    def __init__(self, enabled: bool, plan: EpochPlan, start_epoch, desc: str, images_per_step: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            initial = start_epoch * plan.steps
            self.bar = tqdm(total=plan.total_steps, initial=initial, desc=desc, unit="step", leave=False,
                            mininterval=1.0, file=sys.stderr)
        self.steps, self.images_per_step = plan.steps, images_per_step
        self.started = time.perf_counter()  # (tqdm's own start_t is on another clock: time.time)
        self.first_loss: Optional[float] = None  # of the first step it counts (read once: one wait)

    def step(self, step: int, epoch: int, loss: torch.Tensor) -> bool:
        """Count a step; False when the loss just read is not finite (the epoch can stop there)."""
        if self.first_loss is None:
            self.first_loss = float(loss.detach())
        if self.bar is None:
            return True
        self.bar.update(1)
        if step % 20 and step != self.steps - 1:
            return True
        value = float(loss.detach())
        rate = (self.bar.n - self.bar.initial) * self.images_per_step / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}", img_s=f"{rate:.0f}", refresh=False)
        return math.isfinite(value)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
