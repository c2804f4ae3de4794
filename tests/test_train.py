"""sslab.train (and the checkpoint files of sslab.store): the loop learns, schedules, stops
on NaN, stops early, and checkpoints round-trip."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn as nn

from sslab import integrity, store
from sslab.train import TrainConfig, TrainingDiverged, batches_per_epoch, fit, lr_factor, resolve_device

CPU = torch.device("cpu")


class LinearRegression(nn.Module):
    """y ≈ x·w: ``loss(x, y)`` is the mean squared error (and a metric, to check averaging)."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.linear = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.calls = 0

    def loss(self, x, y):
        self.calls += 1
        error = (self.linear(x).squeeze(1) - y).pow(2).mean()
        return {"loss": error, "const": torch.tensor(2.0)}


def _regression_data(n=256, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])[:dim]
    return x, x @ w, w


def _config(**overrides) -> TrainConfig:
    values = dict(epochs=8, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
                  schedule="constant")
    values.update(overrides)
    return TrainConfig(**values)


def test_fit_reduces_the_loss_and_writes_one_metrics_line_per_epoch(tmp_path):
    x, y, w = _regression_data()
    model = LinearRegression()
    metrics = tmp_path / "metrics.jsonl"
    result = fit(model, (x, y), _config(), CPU, metrics_path=metrics, progress=False)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 8 and result.epochs_run == 8
    assert losses[-1] < 0.01 * losses[0], losses
    assert torch.allclose(model.linear.weight[0], w, atol=0.05)
    assert model.calls == 8 * batches_per_epoch(256, 32)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(8))
    assert [r["loss"] for r in rows] == pytest.approx(losses)
    assert all(r["const"] == pytest.approx(2.0) for r in rows), "metrics are averaged over the epoch's steps"
    assert all(r["lr"] == pytest.approx(0.05) for r in rows)
    assert not model.training, "fit leaves the model in eval mode"


def test_fit_is_repeatable_with_the_same_seed():
    x, y, _ = _regression_data()
    weights = []
    for _ in range(2):
        model = LinearRegression()
        fit(model, (x, y), _config(epochs=2, seed=3), CPU, progress=False)
        weights.append(model.linear.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_fit_runs_with_a_progress_bar(capsys):
    x, y, _ = _regression_data(n=64)
    result = fit(LinearRegression(), (x, y), _config(epochs=2), CPU, progress=True, desc="regression")
    assert result.epochs_run == 2
    shown = capsys.readouterr().err
    steps = 2 * batches_per_epoch(64, 32)  # one bar over every step of the run
    assert any("regression" in line and f"/{steps} " in line for line in shown.split("\r")), shown


def test_batches_per_epoch_never_leaves_a_tiny_last_batch():
    assert batches_per_epoch(256, 32) == 8
    assert batches_per_epoch(257, 32) == 8
    assert batches_per_epoch(10, 128) == 1
    assert batches_per_epoch(100, 30) == 3


def test_step_schedule_factors():
    cfg = TrainConfig(schedule="step", milestones=(0.24, 0.48, 0.71), gamma=0.1)
    assert lr_factor(cfg, 0.0, 0.0) == 1.0
    assert lr_factor(cfg, 0.2399, 0.0) == 1.0
    assert lr_factor(cfg, 0.24, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 0.5, 0.0) == pytest.approx(0.01)
    assert lr_factor(cfg, 0.99, 0.0) == pytest.approx(0.001)


def test_cosine_schedule_factors():
    cfg = TrainConfig(schedule="cosine")
    assert lr_factor(cfg, 0.0, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 0.25, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, 0.5, 0.0) == pytest.approx(0.5)
    assert lr_factor(cfg, 1.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, 1.5, 0.0) == pytest.approx(0.0, abs=1e-12), "never rises again past the end"


def test_warmup_and_constant_factors():
    assert lr_factor(TrainConfig(schedule="constant"), 0.7, 0.0) == 1.0
    cfg = TrainConfig(schedule="cosine")
    assert lr_factor(cfg, 0.05, 0.1) == pytest.approx(0.5, rel=1e-6)
    assert lr_factor(cfg, 0.0, 0.1) < 1e-6


def test_cosine_schedule_is_applied_per_step(tmp_path):
    x, y, _ = _regression_data(n=64)
    result = fit(LinearRegression(), (x, y), _config(epochs=4, schedule="cosine"), CPU, progress=False)
    # The logged lr is the one at the end of each epoch: cos at 1/4, 2/4, 3/4 and 4/4 of the run.
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3, 4)]
    assert [r["lr"] for r in result.history] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(epochs=0), "epochs=0"),
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(optimizer="rmsprop"), "optimizer='rmsprop' is not known; allowed: sgd, adam, adamw"),
    (dict(schedule="linear"), "schedule='linear' is not known; allowed: step, cosine, constant"),
])
def test_train_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError) as info:
        _config(**overrides).validate()
    assert message in str(info.value)


class DivergesAfter(LinearRegression):
    """A model whose loss becomes NaN once it has taken ``good_steps`` steps."""

    def __init__(self, good_steps: int):
        super().__init__()
        self.good_steps = good_steps

    def loss(self, x, y):
        out = super().loss(x, y)
        if self.calls > self.good_steps:
            out["loss"] = out["loss"] * float("nan")
        return out


@pytest.mark.parametrize("progress", [False, True])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, progress):
    x, y, _ = _regression_data(n=64)
    checkpoint = tmp_path / "checkpoint.pt"
    model = DivergesAfter(good_steps=2 * batches_per_epoch(64, 32))  # two good epochs, then NaN
    with pytest.raises(TrainingDiverged) as info:
        fit(model, (x, y), _config(epochs=5), CPU, checkpoint=checkpoint, progress=progress)
    message = str(info.value)
    assert "nan" in message and "epoch 3" in message and str(checkpoint) in message and "lr=0.05" in message
    state = store.load_torch(checkpoint)
    assert state["epoch"] == 1, "the last good epoch's checkpoint is kept"
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(state["history"]) == 2
    # The kept checkpoint is what torch itself loads without running any code.
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1


def test_infinite_loss_also_stops():
    x, y, _ = _regression_data(n=64)

    class Infinite(LinearRegression):
        def loss(self, x, y):
            out = super().loss(x, y)
            out["loss"] = out["loss"] + float("inf")
            return out

    with pytest.raises(TrainingDiverged, match="inf"):
        fit(Infinite(), (x, y), _config(epochs=2), CPU, progress=False)


class ScriptedValidation:
    """Returns the given validation accuracies in turn and records the weights it saw."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.seen = []

    def __call__(self, model):
        self.seen.append(model.linear.weight.detach().clone())
        return {"val_acc": self.scores[len(self.seen) - 1]}


def test_early_stopping_restores_the_best_weights():
    x, y, _ = _regression_data()
    validate = ScriptedValidation([0.1, 0.5, 0.3, 0.2, 0.9, 0.95])
    model = LinearRegression()
    result = fit(model, (x, y), _config(epochs=6, patience=2, lr=0.01), CPU, validate=validate, progress=False)
    assert result.epochs_run == 4, "two epochs without improvement after the best one stop the run"
    assert result.best_epoch == 1 and result.best_metric == pytest.approx(0.5)
    assert torch.equal(model.linear.weight, validate.seen[1])
    assert not torch.equal(validate.seen[1], validate.seen[3]), "the weights did move after the best epoch"
    assert [row["val_acc"] for row in result.history] == [0.1, 0.5, 0.3, 0.2]


def test_without_patience_training_runs_to_the_end():
    x, y, _ = _regression_data(n=64)
    validate = ScriptedValidation([0.5, 0.1, 0.1, 0.1])
    result = fit(LinearRegression(), (x, y), _config(epochs=4, patience=0), CPU, validate=validate, progress=False)
    assert result.epochs_run == 4 and result.best_epoch == 0


def test_validate_start_keeps_the_starting_weights_when_no_epoch_beats_them():
    x, y, _ = _regression_data(n=64)
    validate = ScriptedValidation([0.6, 0.5, 0.6, 0.4])  # the start, then epochs 0–2 (a tie is no better)
    model = LinearRegression()
    result = fit(model, (x, y), _config(epochs=3, patience=3), CPU, validate=validate, progress=False,
                 validate_start=True)
    assert result.start_metric == 0.6 and result.best_metric == 0.6 and result.best_epoch == -1
    assert result.epochs_run == 3 and [row["val_acc"] for row in result.history] == [0.5, 0.6, 0.4]
    assert not model.linear.weight.any(), "the starting weights (zeros) are restored"
    assert validate.seen[3].any(), "the weights did move"


def test_validate_start_gives_way_to_an_epoch_that_beats_it_and_counts_towards_patience():
    x, y, _ = _regression_data(n=64)
    validate = ScriptedValidation([0.4, 0.3, 0.7, 0.5])
    model = LinearRegression()
    result = fit(model, (x, y), _config(epochs=3, patience=3), CPU, validate=validate, progress=False,
                 validate_start=True)
    assert (result.start_metric, result.best_epoch, result.best_metric) == (0.4, 1, 0.7)
    assert torch.equal(model.linear.weight, validate.seen[2])
    # Patience 1: an epoch no better than the start is one without improvement.
    validate = ScriptedValidation([0.9, 0.3, 0.95])
    result = fit(LinearRegression(), (x, y), _config(epochs=2, patience=1), CPU, validate=validate,
                 progress=False, validate_start=True)
    assert result.epochs_run == 1 and result.best_epoch == -1
    # Without it, the same scores start from the first epoch.
    validate = ScriptedValidation([0.3, 0.95])
    result = fit(LinearRegression(), (x, y), _config(epochs=2, patience=1), CPU, validate=validate, progress=False)
    assert result.start_metric is None and result.best_epoch == 1 and len(validate.seen) == 2


def test_validate_start_resumes_with_the_start_from_the_checkpoint(tmp_path):
    """A resumed run does not score its resumed weights as a start: the start's score and weights
    come back from the checkpoint, and the run ends as one run straight through."""
    x, y, _ = _regression_data(n=96)
    steps = batches_per_epoch(96, 32)
    straight = LinearRegression()
    fit(straight, (x, y), _config(epochs=3, patience=3), CPU, validate=ScriptedValidation([0.9, 0.5, 0.6, 0.7]),
        progress=False, validate_start=True)
    assert not straight.linear.weight.any()

    class Interrupted(LinearRegression):
        def loss(self, x, y):
            if self.calls == 2 * steps:
                raise KeyboardInterrupt
            return super().loss(x, y)

    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(Interrupted(), (x, y), _config(epochs=3, patience=3), CPU, validate=ScriptedValidation([0.9, 0.5, 0.6]),
            checkpoint=checkpoint, progress=False, validate_start=True)
    assert store.load_torch(checkpoint)["start_metric"] == 0.9
    validate = ScriptedValidation([0.7])  # epoch 2 alone
    resumed = LinearRegression()
    result = fit(resumed, (x, y), _config(epochs=3, patience=3), CPU, validate=validate, checkpoint=checkpoint,
                 progress=False, validate_start=True)
    assert result.resumed_from == 2 and len(validate.seen) == 1
    assert (result.start_metric, result.best_epoch) == (0.9, -1) and not resumed.linear.weight.any()


def test_fit_resumes_from_its_checkpoint(tmp_path):
    """An interrupted run resumed from its checkpoint ends with the same weights as one run straight through."""
    x, y, _ = _regression_data(n=96)
    straight = LinearRegression()
    fit(straight, (x, y), _config(epochs=4), CPU, progress=False)

    class Interrupted(LinearRegression):
        def loss(self, x, y):
            if self.calls == 2 * batches_per_epoch(96, 32):
                raise KeyboardInterrupt
            return super().loss(x, y)

    checkpoint, metrics = tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl"
    with pytest.raises(KeyboardInterrupt):
        fit(Interrupted(), (x, y), _config(epochs=4), CPU, checkpoint=checkpoint, metrics_path=metrics,
            progress=False)
    assert store.load_torch(checkpoint)["epoch"] == 1
    resumed = LinearRegression()
    result = fit(resumed, (x, y), _config(epochs=4), CPU, checkpoint=checkpoint, metrics_path=metrics,
                 progress=False)
    assert result.resumed_from == 2
    assert torch.allclose(resumed.linear.weight, straight.linear.weight, atol=1e-6)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2, 3]


def test_checkpoint_every_spaces_checkpoints_in_time_and_keeps_the_last_epochs(tmp_path, monkeypatch):
    """With ``checkpoint_every`` seconds, an epoch writes the checkpoint only once that long has
    passed since the last write; the last epoch's is written unless ``checkpoint_last=False``."""
    x, y, _ = _regression_data(n=96)
    clock = [0.0]
    monkeypatch.setattr("sslab.checkpoint.time.monotonic", lambda: clock[0])
    saved_epochs = []
    save = store.save_torch

    def recording_save(path, state):
        saved_epochs.append(state["epoch"])
        clock[0] += 1.0  # a save takes "1 s"
        return save(path, state)

    monkeypatch.setattr("sslab.checkpoint.store.save_torch", recording_save)

    class TenSecondEpochs(LinearRegression):
        def loss(self, x, y):
            if self.calls % batches_per_epoch(96, 32) == 0:
                clock[0] += 10.0
            return super().loss(x, y)

    fit(TenSecondEpochs(), (x, y), _config(epochs=8), CPU, checkpoint=tmp_path / "a.pt", progress=False,
        checkpoint_every=25)
    # epochs end at 10, 20, 30 (save, 31), 41, 51, 61 (save, 62), 72, 82 (last epoch: saved)
    assert saved_epochs == [2, 5, 7]
    saved_epochs.clear()
    fit(TenSecondEpochs(), (x, y), _config(epochs=8), CPU, checkpoint=tmp_path / "b.pt", progress=False,
        checkpoint_every=25, checkpoint_last=False)
    assert saved_epochs == [2, 5]
    saved_epochs.clear()
    fit(TenSecondEpochs(), (x, y), _config(epochs=3), CPU, checkpoint=tmp_path / "c.pt", progress=False)
    assert saved_epochs == [0, 1, 2]  # the default: after every epoch
    with pytest.raises(ValueError, match=r"checkpoint_every=-1 is not allowed; allowed: seconds ≥ 0"):
        fit(LinearRegression(), (x, y), _config(), CPU, checkpoint=tmp_path / "d.pt", checkpoint_every=-1)


# ---------------------------------------------------------------- checkpoints (sslab.store)

def test_checkpoint_round_trip(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model(torch.randn(2, 1, 5, 5))  # move the BN running stats off their defaults
    path = tmp_path / "sub" / "model.pt"
    store.save_torch(path, {"model": model.state_dict(), "epoch": 3, "config": {"lr": 0.1, "name": "x"}})
    loaded = store.load_torch(path)
    assert loaded["epoch"] == 3 and loaded["config"] == {"lr": 0.1, "name": "x"}
    assert loaded["model"].keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value), key
    copy = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    copy.load_state_dict(torch.load(path, weights_only=True)["model"])
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values()))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt", "model.pt.sha256"], \
        "no temporary file is left behind (only the file and its checksum)"


def test_save_torch_replaces_atomically(tmp_path, monkeypatch):
    """While the new file is being written, a reader of the path still gets the whole old one;
    afterwards, the whole new one (a temporary file renamed over it, never a file half written)."""
    path = tmp_path / "state.pt"
    store.save_torch(path, {"v": torch.tensor([1])})
    seen_while_writing = []
    real_save = torch.save

    def save_and_look(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        seen_while_writing.append(store.load_torch(path)["v"].tolist())

    monkeypatch.setattr(torch, "save", save_and_look)
    store.save_torch(path, {"v": torch.tensor([2])})
    monkeypatch.undo()
    assert seen_while_writing == [[1]]
    assert store.load_torch(path)["v"].tolist() == [2]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # no temporary file left


class _NotAWeight:
    pass


def test_load_torch_refuses_code_and_names_corrupt_files(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"object": _NotAWeight()}, unsafe)
    with pytest.raises(integrity.CorruptCheckpoint, match="unsafe.pt"):
        store.load_torch(unsafe)
    truncated = tmp_path / "truncated.pt"
    store.save_torch(truncated, {"w": torch.zeros(100)})
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(integrity.CorruptCheckpoint, match="truncated.pt"):
        store.load_torch(truncated)
    with pytest.raises(FileNotFoundError):
        store.load_torch(tmp_path / "missing.pt")


# ---------------------------------------------------------------- devices

def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_cuda_names_the_device(device):
    with pytest.raises(ValueError) as info:
        resolve_device(device)
    message = str(info.value)
    assert f"device={device!r}" in message and "allowed here: cpu, auto" in message


@pytest.mark.parametrize("device", ["tpu", "gpu", 3])
def test_resolve_device_rejects_unknown_devices(device):
    with pytest.raises(ValueError, match=r"device=.*allowed: auto, cpu, cuda"):
        resolve_device(device)


def test_progress_bar_shows_the_images_per_second_the_epoch_measured(monkeypatch):
    import tqdm.auto
    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)

    class SlowRegression(LinearRegression):
        def loss(self, x, y):
            time.sleep(0.002)  # each step takes a measurable time
            return super().loss(x, y)

    x, y, _ = _regression_data(n=256)
    result = fit(SlowRegression(), (x, y), _config(epochs=2), CPU, progress=True)
    shown = float(dict(item.split("=") for item in bars[0].postfix.split(", "))["img_s"])
    measured = result.history[-1]["images_per_s"]
    assert measured / 3 < shown < measured * 3
