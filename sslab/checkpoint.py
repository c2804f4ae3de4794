"""The resume state of a training run: what :func:`sslab.train.fit` writes so that a run stopped
at any moment (Ctrl-C, a lost kernel, SIGKILL) goes on after the last checkpoint exactly as if
it had never stopped — weights, optimiser, epoch, the shuffling and augmentation random states,
early stopping (:class:`EarlyStopping`) and the result so far (:class:`FitResult`) — and when it
writes it (on a clock, not every epoch: on a GPU an epoch can take less time than writing the
state). Files are verified when read (:mod:`sslab.store`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import integrity, store

# Seconds between checkpoints that pretrain and the evaluation cells write (the last one is
# lost on a kill: at most this much training is done again).
CHECKPOINT_EVERY_S = 60.0


def check_checkpoint_every(value) -> float:
    from .checks import check_number
    return check_number("checkpoint_every", value, 0.0, low_open=False,
                        allowed="seconds ≥ 0 (0: after every epoch)")


class Checkpointer:
    """Where and when :func:`fit` writes its resume state: at the end of an epoch once ``every``
    seconds have passed since the last write (0: every epoch), and after the last epoch when
    ``last``. Only the process that ``writes`` touches the file."""

    def __init__(self, path: Optional[Path], every: float, last: bool, writes: bool = True,
                 provenance: Optional[dict] = None):
        self.path = None if path is None else Path(path)
        self.provenance = provenance
        self.every = check_checkpoint_every(every)
        self.last, self.writes = last, writes
        self.saved_at = time.monotonic()
        self.saved_epoch: Optional[int] = None

    def load(self, distributed=None, model: Optional[nn.Module] = None) -> Optional[dict]:
        """The resume state (None when there is none), verified: its bytes (sslab.store), what
        made it (``provenance``), that it is a training state, and that its weights fit ``model``."""
        if distributed is not None:
            state = distributed.load_checkpoint(self.path)  # rank 0 reads it, every rank gets it
        elif self.path is None or not self.path.is_file():
            return None
        else:  # RNG and generator states must be CPU tensors; load_state_dict moves the rest to the device.
            state = store.load_torch(self.path, map_location="cpu")
        if state is not None:
            if self.provenance is not None:
                integrity.check_provenance(state, self.path, self.provenance)
            self._check_fits(state, model)
            self.saved_epoch = state["epoch"]
        return state

    def _check_fits(self, state, model: Optional[nn.Module]) -> None:
        missing = [k for k in TRAINING_STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise integrity.ForeignFile(f"{self.path} is not a training checkpoint (it has no {', '.join(missing)}); "
                                        f"{integrity.remedy(self.path)}")
        if model is None:
            return
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state["model"].items() if torch.is_tensor(v)}
        if mine != theirs:
            odd = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k] != theirs[k]]
            raise integrity.ForeignFile(f"{self.path} holds the weights of another model ({odd[0]}: "
                                        f"{theirs.get(odd[0], 'absent')} there, {mine.get(odd[0], 'absent')} here); "
                                        f"{integrity.remedy(self.path)}")

    def maybe_save(self, state: Callable[[], dict], last_epoch: bool) -> None:
        due = (last_epoch and self.last) or time.monotonic() - self.saved_at >= self.every
        if self.path is not None and self.writes and due:
            snapshot = state()
            if self.provenance is not None:
                snapshot["provenance"] = self.provenance
            store.save_torch(self.path, snapshot)
            self.saved_at, self.saved_epoch = time.monotonic(), snapshot["epoch"]

    def describe_kept(self) -> str:
        if self.path is None or self.saved_epoch is None:
            return "no checkpoint of this run was written, so nothing of its training is kept"
        return f"the checkpoint after epoch {self.saved_epoch + 1} ({self.path}) is kept"


# ---------------------------------------------------------------- what a run resumes

@dataclass
class FitResult:
    """What :func:`sslab.train.fit` returns: one row per epoch, the best epoch and its score, and
    how the run went (epochs, seconds, the epoch it resumed from, its first loss)."""

    history: list = field(default_factory=list)
    best_epoch: int = -1
    best_metric: Optional[float] = None
    epochs_run: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    first_loss: Optional[float] = None  # the run's first step: what check_divergence compares with
    start_metric: Optional[float] = None  # the validation score of the starting weights (fit's validate_start)


# The epoch early stopping records for the weights a run starts from (fit's validate_start): a
# best_epoch of START_EPOCH with a best_metric is the start kept; without a best_metric, no score yet.
START_EPOCH = -1


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a better validation score (higher is better; 0:
    never stop), keeping the best epoch's weights to restore at the end. The starting weights,
    when scored, are epoch :data:`START_EPOCH`."""

    patience: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: Optional[dict] = None

    def update(self, score: Optional[float], epoch: int, state: Callable[[], dict]) -> None:
        """Record epoch ``epoch``'s score; ``state()`` gives the weights to keep when it is the best."""
        if score is not None and (self.best_metric is None or score > self.best_metric):
            self.best_metric, self.best_epoch, self.bad_epochs = float(score), epoch, 0
            if self.patience:
                self.best_state = state()
        else:
            self.bad_epochs += 1

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= self.patience


TRAINING_STATE_KEYS = ("model", "optimizer", "epoch", "generator", "rng", "history", "best_epoch", "best_metric",
                       "bad_epochs")


def training_state(model, optimizer, generator, early: EarlyStopping, result: FitResult, cfg, epoch: int,
                   device) -> dict:
    """Everything a resumed run needs to go on exactly as if it had never stopped. ``cfg``: the
    run's train config (a dataclass, stored whole)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "generator": generator.get_state(), "rng": _rng_state(device), "history": result.history,
            "best_epoch": early.best_epoch, "best_metric": early.best_metric, "best_state": early.best_state,
            "bad_epochs": early.bad_epochs, "stopped_early": early.should_stop, "config": asdict(cfg),
            "first_loss": result.first_loss, "start_metric": result.start_metric}


def resume(state: dict, model, optimizer, generator, early: EarlyStopping, result: FitResult, cfg, device) -> int:
    """Load a :func:`training_state` into the run; returns the epoch to start from (``cfg.epochs``,
    the train config's, when the run had stopped early)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    _set_rng_state(state["rng"], device)
    result.history = list(state["history"])
    early.best_epoch, early.best_metric = state["best_epoch"], state["best_metric"]
    early.best_state, early.bad_epochs = state.get("best_state"), state["bad_epochs"]
    result.resumed_from = state["epoch"] + 1
    result.first_loss = state.get("first_loss")
    result.start_metric = state.get("start_metric")
    # A run that had stopped early finishes as the first run would have.
    return cfg.epochs if state.get("stopped_early") else result.resumed_from


def start_metrics(path: Optional[Path], start, resumed: bool, history: Optional[list] = None) -> None:
    """metrics.jsonl holds the epochs before ``start`` when resuming, nothing otherwise. On resume
    it is rewritten from the checkpoint's ``history`` (the same rows), so a damaged line in it
    costs nothing."""
    if path is None:
        return
    if resumed and history is not None:
        store.write_jsonl(path, [row for row in history if row.get("epoch", -1) < start])
    elif resumed:
        store.truncate_jsonl(path, lambda row: row.get("epoch", -1) < start)
    elif Path(path).exists():
        Path(path).unlink()


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


