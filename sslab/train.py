"""The one training loop every stage uses: pretraining, probes, the scratch baseline, fine-tuning.

Data sits on the training device as tensors; each epoch draws a seeded permutation and
slices batches from it. Augmentation happens inside the model's ``loss`` on the same device.
On CUDA the loop runs under bf16 autocast with channels_last weights and times epochs with
CUDA events; on CPU it runs in fp32.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import store


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
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer ≥ 1")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} is not allowed; allowed: a positive number")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r} is not known; allowed: sgd, adam, adamw")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule={self.schedule!r} is not known; allowed: step, cosine, constant")
        return self


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000.0
        return time.perf_counter() - self.t0


def prepare_model(model: nn.Module, device: torch.device) -> None:
    """On CUDA: channels_last weights, and modules with a ``channels_last`` flag (the pretext
    tasks) switch their inputs to it too. Nothing changes on CPU."""
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        for module in model.modules():
            if hasattr(module, "channels_last"):
                module.channels_last = True


def train_step(model: nn.Module, data: tuple, index: torch.Tensor, optimizer: torch.optim.Optimizer,
               lr: float, on_cuda: bool, sums: dict) -> torch.Tensor:
    """One step of :func:`fit`: set every group's learning rate to ``lr`` × its ``lr_scale``, take
    rows ``index`` of each tensor in ``data``, minimise ``model.loss(*batch)["loss"]`` (bf16
    autocast on CUDA) and add every value ``model.loss`` returned to ``sums`` (as tensors, so
    nothing waits for the device). Returns the loss. The benchmark times exactly this function."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    batch = tuple(t[index] for t in data)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        out = model.loss(*batch)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for key, value in out.items():
        value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        sums[key] = sums.get(key, 0.0) + value
    return loss


@dataclass
class FitResult:
    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_metric: Optional[float] = None
    epochs_run: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def make_deterministic() -> None:
    """Make every later torch call in this process pick deterministic algorithms, so a CPU
    run repeats bit for bit (``--deterministic``, the notebooks' ``deterministic`` parameter).
    The setting is process-wide: torch has no per-call switch."""
    # cuBLAS reads this when its first handle is made; with it CUDA matmuls repeat too.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# Seconds between checkpoints that pretrain and the evaluation cells write (the last one is
# lost on a kill: at most this much training is done again).
CHECKPOINT_EVERY_S = 60.0


def check_checkpoint_every(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"checkpoint_every={value!r} is not allowed; allowed: seconds ≥ 0 (0: after every epoch)")
    return float(value)


def fit(model: nn.Module, data: tuple, cfg: TrainConfig, device: torch.device, *,
        param_groups: Optional[list] = None,
        validate: Optional[Callable[[nn.Module], dict]] = None, monitor: str = "val_acc",
        checkpoint: Optional[Path] = None, metrics_path: Optional[Path] = None,
        progress: bool = True, desc: str = "train", images_per_sample: int = 1,
        deterministic: bool = False, distributed=None, checkpoint_every: float = 0.0,
        checkpoint_last: bool = True) -> FitResult:
    """Train ``model`` by minimising ``model.loss(*batch)["loss"]`` over ``data``.

    ``data``: a tuple of tensors on ``device`` sharing their first dimension; each step passes
    one slice of each to ``model.loss``. Or a :class:`sslab.stream.StreamedData` (data larger
    than the device's memory budget, kept in host memory): the same permutation's batches are
    then copied to the device chunk by chunk while the previous chunk trains — the same
    images in the same order, so the result is the same. ``validate(model)`` (optional) returns a dict with
    ``monitor`` (higher is better): with ``cfg.patience`` > 0 training stops after that many
    epochs without improvement, and the best epoch's weights are restored at the end.
    ``checkpoint``: where the full training state (model, optimiser, epoch, RNG, early-stopping
    state) is written atomically at the end of an epoch; if it exists when ``fit`` starts,
    training resumes from it. It is written after every epoch with ``checkpoint_every=0``, else
    only once that many seconds have passed since ``fit`` started or last wrote it (on a GPU an
    epoch can take less time than writing the state, so every epoch would be mostly saving), and
    always after the last epoch unless ``checkpoint_last=False`` (for a caller whose next step
    is seconds long: losing it costs less than writing it). ``metrics_path``: one JSON line per epoch.
    ``distributed``: a :class:`sslab.distributed.Distributed` when torchrun started several
    processes: each rank trains on its shard of every epoch's permutation inside
    DistributedDataParallel; rank 0 alone writes the checkpoint and metrics and shows progress.
    ``None`` (one process) takes the plain path.
    """
    cfg.validate()
    check_checkpoint_every(checkpoint_every)
    if deterministic:
        make_deterministic()
    from .stream import StreamedData
    streamed = isinstance(data, StreamedData)
    if streamed and distributed is not None:
        raise ValueError("data=StreamedData is not allowed with distributed training; allowed: host tensors "
                         "(each rank copies its shard of every epoch to its device)")
    n = len(data) if streamed else data[0].shape[0]
    if distributed is None:
        steps = batches_per_epoch(n, cfg.batch_size)
    else:
        steps = distributed.steps_per_epoch(n, cfg.batch_size)
        if not distributed.is_main:
            metrics_path, progress = None, False  # rank 0 alone writes metrics and shows progress
    total_steps = steps * cfg.epochs
    warmup = cfg.warmup_epochs / cfg.epochs if cfg.epochs else 0.0
    on_cuda = device.type == "cuda"
    prepare_model(model, device)
    # Steps run through DDP's forward when distributed; weights, optimiser and checkpoints stay the task's own.
    step_model = model if distributed is None else distributed.wrap(model)
    world = 1 if distributed is None else distributed.world_size
    groups = param_groups if param_groups is not None else [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    optimizer = make_optimizer(groups, cfg)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    result = FitResult()
    best_state = None
    bad_epochs = 0
    start_epoch = 0

    state = None
    if distributed is not None:
        state = distributed.load_checkpoint(checkpoint)  # rank 0 reads it, every rank gets it
    elif checkpoint is not None and Path(checkpoint).is_file():
        # On the CPU: RNG and generator states must be CPU tensors; weights and optimiser state
        # are copied onto the model's device by load_state_dict.
        state = store.load_torch(checkpoint, map_location="cpu")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        _set_rng_state(state["rng"], device)
        start_epoch = state["epoch"] + 1
        result.history = list(state["history"])
        result.best_epoch, result.best_metric = state["best_epoch"], state["best_metric"]
        best_state = state.get("best_state")
        bad_epochs = state["bad_epochs"]
        result.resumed_from = start_epoch
        if metrics_path is not None:
            store.truncate_jsonl(metrics_path, lambda row: row.get("epoch", -1) < start_epoch)
        if distributed is None or distributed.is_main:
            print(f"resuming {desc} from {checkpoint} after epoch {start_epoch} of {cfg.epochs}", file=sys.stderr)
        if state.get("stopped_early"):
            start_epoch = cfg.epochs  # it had stopped early: finish as the first run would have
    elif metrics_path is not None and Path(metrics_path).exists():
        Path(metrics_path).unlink()

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_epoch * steps, desc=desc, unit="step", leave=False,
                   mininterval=1.0, file=sys.stderr)
    bar_started = time.perf_counter()  # (tqdm's own start_t is on another clock: time.time)
    timer = _Timer(device)
    stopped_early = False
    last_saved = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        if not streamed:
            if distributed is None:
                epoch_data, order = data, order.to(device)
            else:
                epoch_data, order = distributed.epoch_data(data, order, cfg.seed, epoch)
        chunks = torch.tensor_split(order, steps)
        # (tensors, rows) per step: a streamed batch arrives whole, so it is taken entire.
        batches = (((batch, slice(None)) for batch in data.batches(chunks)) if streamed
                   else ((epoch_data, index) for index in chunks))
        sums: dict = {}
        timer.start()
        for step, (step_data, index) in enumerate(batches):
            factor = lr_factor(cfg, (epoch * steps + step) / total_steps, warmup)
            loss = train_step(step_model, step_data, index, optimizer, cfg.lr * factor, on_cuda, sums)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == steps - 1:
                    # (Not under DDP: a rank leaving early would leave the others waiting in the all-reduce.)
                    if distributed is None and not torch.isfinite(loss.detach()):
                        break
                    elapsed = max(time.perf_counter() - bar_started, 1e-9)
                    rate = (bar.n - bar.initial) * cfg.batch_size * world * images_per_sample / elapsed
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4g}", img_s=f"{rate:.0f}", refresh=False)
        seconds = timer.seconds()
        if distributed is not None:
            sums = distributed.average(sums)
            distributed.sync_buffers(model)
        row = {k: float(v) / len(chunks) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in row.values()):
            if bar is not None:
                bar.close()
            where = f"; the last good checkpoint ({checkpoint}) is kept" if checkpoint else ""
            raise TrainingDiverged(f"{desc}: the loss became {row.get('loss')} in epoch {epoch + 1}{where}. "
                                   f"Lower the learning rate (lr={cfg.lr}) or check the input data.")
        row = {"epoch": epoch, "lr": cfg.lr * lr_factor(cfg, (epoch + 1) * steps / total_steps - 1e-9, warmup),
               **row, "seconds": round(seconds, 4), "images_per_s": round(n * images_per_sample / max(seconds, 1e-9), 1)}
        if validate is not None:
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                row.update(validate(model))
            score = row.get(monitor)
            if score is not None and (result.best_metric is None or score > result.best_metric):
                result.best_metric, result.best_epoch, bad_epochs = float(score), epoch, 0
                if cfg.patience:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
        result.history.append(row)
        if metrics_path is not None:
            store.append_jsonl(metrics_path, row)
        stopped_early = bool(cfg.patience) and validate is not None and bad_epochs >= cfg.patience
        last_epoch = stopped_early or epoch == cfg.epochs - 1
        due = (last_epoch and checkpoint_last) or time.monotonic() - last_saved >= checkpoint_every
        if checkpoint is not None and due and (distributed is None or distributed.is_main):
            store.save_torch(checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "generator": generator.get_state(), "rng": _rng_state(device), "history": result.history,
                "best_epoch": result.best_epoch, "best_metric": result.best_metric, "best_state": best_state,
                "bad_epochs": bad_epochs, "stopped_early": stopped_early, "config": asdict(cfg)})
            last_saved = time.monotonic()
        if stopped_early:
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.epochs_run = len(result.history)
    result.seconds = float(sum(r["seconds"] for r in result.history))
    model.eval()
    return result
