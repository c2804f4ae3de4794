"""Reliability: killed runs resume, files can be trusted, concurrent runs share one folder,
--deterministic repeats bit for bit, a failed --force leaves the complete run alone.

The command-line tests run a real ``python -m sslab pretrain`` on a tiny image folder
(2 classes of noise, 32 px, width 0.125) so each run takes seconds on 2 CPU cores.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sslab import integrity, store
from sslab.cli import main
from sslab.models import BackboneConfig
from sslab.pretext import build_task
from sslab.pretrain import PretrainConfig, load_run, pretrain
from sslab.train import TrainConfig, fit

REPO = Path(__file__).resolve().parent.parent


def make_image_folder(root: Path, classes: int = 2, train_per_class: int = 32, test_per_class: int = 4,
                      size: int = 32, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` of grey noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def pretrain_command(images: Path, out: Path, epochs: int, *extra: str) -> list:
    return [sys.executable, "-m", "sslab", "pretrain", "--dataset", f"folder:{images}", "--epochs", str(epochs),
            "--width", "0.125", "--device", "cpu", "--out", str(out), "--no-progress", "--checkpoint-every", "0",
            *extra]


def start(command: list, log: Path, **env: str) -> subprocess.Popen:
    """Start ``command`` with stdout/stderr in files (a full pipe would block the child)."""
    return subprocess.Popen(command, cwd=REPO, stdout=open(log.with_suffix(".out"), "w"),
                            stderr=open(log.with_suffix(".err"), "w"), env={**os.environ, **env})


def finish(process: subprocess.Popen, log: Path, timeout: float = 240) -> tuple:
    rc = process.wait(timeout=timeout)
    return rc, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def run_folders(out: Path) -> list:
    return sorted(p for p in (out / "runs").iterdir() if p.is_dir()) if (out / "runs").is_dir() else []


def epochs_in(folder: Path) -> list:
    return [row["epoch"] for row in store.read_jsonl(folder / "metrics.jsonl")]


def tiny_config(images: Path, epochs: int = 1, **overrides) -> PretrainConfig:
    return PretrainConfig(dataset=f"folder:{images}", epochs=epochs, width=0.125, **overrides)


# ---------------------------------------------------------------- resume after SIGKILL

@pytest.mark.slow
def test_killed_pretrain_resumes_from_its_checkpoint(image_folder, tmp_path):
    out = tmp_path / "out"
    command = pretrain_command(image_folder, out, 4)
    first = start(command, tmp_path / "first")
    deadline = time.monotonic() + 240
    checkpoint = None
    while checkpoint is None:
        assert first.poll() is None, \
            f"the run ended before its first checkpoint: {(tmp_path / 'first.err').read_text()}"
        assert time.monotonic() < deadline, "no checkpoint.pt after 240 s"
        found = list(out.glob("runs/*/checkpoint.pt"))
        checkpoint = found[0] if found else None
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    folder = checkpoint.parent
    assert not store.is_complete(folder), "the run finished before it could be killed; the test proves nothing"
    done = epochs_in(folder)
    assert done and done == list(range(len(done)))

    rc, stdout, stderr = finish(start(command, tmp_path / "second"), tmp_path / "second")
    assert rc == 0, stderr
    assert "resuming" in stderr and str(checkpoint) in stderr
    assert stdout.strip().splitlines()[-1] == str(folder)
    summary = store.read_json(folder / store.COMPLETE)
    assert summary["resumed_from_epoch"] >= 1
    assert summary["epochs_run"] == 4
    assert epochs_in(folder) == [0, 1, 2, 3]  # each epoch exactly once
    assert not (folder / "checkpoint.pt").exists()
    run = load_run(folder)
    assert run.load_task().backbone.config.width == 0.125
    assert run_folders(out) == [folder]


# ---------------------------------------------------------------- resume inside fit: exact

def _interrupt_at(task, step: int):
    """Make ``task.loss`` raise KeyboardInterrupt on call ``step`` (a kill mid-epoch)."""
    calls = [0]
    loss = task.loss

    def interrupting(images):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        return loss(images)

    task.loss = interrupting
    return task


def _task(seed: int):
    torch.manual_seed(seed)
    return build_task("rotation", BackboneConfig(in_channels=1, image_size=28, width=0.125))


def test_resumed_fit_matches_an_uninterrupted_one_bit_for_bit(tmp_path, make_image_set):
    """Model, optimiser, LR schedule, shuffling generator and the global RNG (augmentation)
    all come back from the checkpoint: a run interrupted mid-epoch 3 and resumed ends with the
    same weights and the same per-epoch losses as a run that was never interrupted."""
    images = make_image_set(n=48, size=28).images
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, schedule="step", milestones=(0.5,), seed=3)

    reference = _task(0)
    torch.manual_seed(123)
    expected = fit(reference, (images,), cfg, torch.device("cpu"), progress=False)

    checkpoint, metrics = tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl"
    interrupted = _interrupt_at(_task(0), 2 * 3 + 2)  # 3 steps per epoch: dies in epoch 2
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, (images,), cfg, torch.device("cpu"), checkpoint=checkpoint, metrics_path=metrics,
            progress=False)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in store.read_jsonl(metrics)] == [0, 1]

    torch.manual_seed(999)  # whatever the global RNG is now, the checkpoint's state wins
    resumed_task = _task(7)  # different initial weights: the checkpoint's must replace them
    resumed = fit(resumed_task, (images,), cfg, torch.device("cpu"), checkpoint=checkpoint, metrics_path=metrics,
                  progress=False)
    assert resumed.resumed_from == 2
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in expected.history]
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in expected.history]
    assert [r["epoch"] for r in store.read_jsonl(metrics)] == [0, 1, 2, 3]
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed_task.state_dict()[name]), name


def test_resume_after_early_stop_does_not_train_on(tmp_path, make_image_set):
    """A run that early-stopped and was killed before its caller finished must not start
    training again on resume: it returns the best epoch's weights, as the first run would."""
    images = make_image_set(n=32, size=28).images
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.05, patience=1, seed=0)
    scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1])
    task = _task(0)
    checkpoint = tmp_path / "checkpoint.pt"
    first = fit(task, (images,), cfg, torch.device("cpu"), validate=lambda m: {"val_acc": next(scores)},
                checkpoint=checkpoint, progress=False)
    assert first.epochs_run == 3 and first.best_epoch == 1
    best = {k: v.clone() for k, v in task.state_dict().items()}

    again = _task(5)
    second = fit(again, (images,), cfg, torch.device("cpu"), validate=lambda m: {"val_acc": 1.0},
                 checkpoint=checkpoint, progress=False)
    assert second.epochs_run == 3 and second.best_epoch == 1
    for name, value in best.items():
        assert torch.equal(value, again.state_dict()[name]), name


# ---------------------------------------------------------------- files that can be trusted

def test_truncated_checkpoint_is_reported_with_its_path_not_loaded(image_folder, tmp_path, monkeypatch, capsys):
    """A killed run leaves checkpoint.pt; if that file is damaged, the next run says which file
    and stops (exit 2, no traceback) instead of training from scratch over it."""
    import sslab.pretrain as pretrain_module
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # dies after its last epoch's checkpoint, before model.pt

    monkeypatch.setattr(pretrain_module, "evaluate_task", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(image_folder, epochs=2), device="cpu", out=str(out), progress=False)
    monkeypatch.undo()
    (folder,) = run_folders(out)
    checkpoint = folder / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])

    with pytest.raises(integrity.CorruptCheckpoint, match=str(checkpoint)):
        store.load_torch(checkpoint)
    argv = ["pretrain", "--dataset", f"folder:{image_folder}", "--epochs", "2", "--width", "0.125",
            "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(checkpoint) in err and "Traceback" not in err
    assert checkpoint.stat().st_size == len(data) // 2  # left for the person to inspect
    assert not store.is_complete(folder)


def test_truncated_or_empty_weights_are_reported_with_their_path(image_folder, tmp_path):
    run = pretrain(tiny_config(image_folder), device="cpu", out=str(tmp_path), progress=False, eval_limit=8)
    model = run.path / "model.pt"
    data = model.read_bytes()
    for damaged in (data[: len(data) // 3], data[:100], b""):
        model.write_bytes(damaged)
        with pytest.raises(integrity.CorruptCheckpoint) as info:
            load_run(run.path).load_task()
        assert str(model) in str(info.value)


class _RunsCode:
    """Unpickling this runs ``touch marker`` (what a malicious shared checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "shared.pt"
    payload = {"model": {"weight": torch.zeros(2)}, "extra": _RunsCode(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(integrity.CorruptCheckpoint) as info:
        store.load_torch(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # The same file without weights_only would have run the command: the test can fail.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_writes_are_atomic_and_files_stay_readable_for_others(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    store.save_torch(target, {"w": torch.ones(3)})

    def dies(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        store.save_torch(target, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(store.load_torch(target)["w"], torch.ones(3))  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.sha256"]  # no temporary file left
    # Shared checkpoints: permissions follow the umask like any other file, not 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_jsonl_reader_drops_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')
    assert [r["epoch"] for r in store.read_jsonl(path)] == [0, 1]


# ---------------------------------------------------------------- a failed run never replaces a complete one

def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_failed_force_leaves_the_complete_run_intact(image_folder, tmp_path, monkeypatch):
    import sslab.pretrain as pretrain_module
    config = tiny_config(image_folder)
    run = pretrain(config, device="cpu", out=str(tmp_path), progress=False, eval_limit=8)
    before = _snapshot(run.path)
    assert {"config.json", "model.pt", "metrics.jsonl", store.COMPLETE} <= set(before)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after training")

    monkeypatch.setattr(pretrain_module, "evaluate_task", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(config, device="cpu", out=str(tmp_path), force=True, progress=False, eval_limit=8)
    monkeypatch.undo()
    assert _snapshot(run.path) == before
    assert [r.path for r in [load_run(run.path)]] == [run.path]
    assert store.list_runs("pretrain", out=str(tmp_path)) == [run.path]

    # Without force the complete run is reused as is; with force the new one replaces it.
    assert _snapshot(pretrain(config, device="cpu", out=str(tmp_path), progress=False).path) == before
    redone = pretrain(config, device="cpu", out=str(tmp_path), force=True, progress=False, eval_limit=8)
    assert redone.path == run.path and store.is_complete(run.path)
    assert run_folders(tmp_path) == [run.path]  # no .new or .old folder left


def test_complete_runs_are_read_from_a_folder_that_cannot_be_written(image_folder, tmp_path, monkeypatch):
    """A shared, read-only outputs folder: reusing a complete run needs no write access."""
    config = tiny_config(image_folder)
    run = pretrain(config, device="cpu", out=str(tmp_path), progress=False, eval_limit=8)

    def read_only(folder, parameter="out"):
        raise PermissionError(f"{parameter}={str(folder)!r} cannot be written")

    monkeypatch.setattr(store, "check_writable", read_only)
    assert pretrain(config, device="cpu", out=str(tmp_path), progress=False).path == run.path
    with pytest.raises(PermissionError, match="cannot be written"):
        pretrain(tiny_config(image_folder, epochs=2), device="cpu", out=str(tmp_path), progress=False)


def test_crash_between_the_two_renames_of_force_is_recovered(image_folder, tmp_path, monkeypatch):
    """--force swaps the new run in with two renames; a kill between them leaves the new
    complete run as ``<name>.new`` and no ``<name>``: the next call finishes the swap."""
    import shutil

    import sslab.pretrain as pretrain_module
    config = tiny_config(image_folder)
    run = pretrain(config, device="cpu", out=str(tmp_path), progress=False, eval_limit=8)
    new = run.path.with_name(run.path.name + ".new")
    shutil.copytree(run.path, new)
    run.path.rename(run.path.with_name(run.path.name + ".old"))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although a complete run was there")

    monkeypatch.setattr(pretrain_module, "fit", no_training)
    recovered = pretrain(config, device="cpu", out=str(tmp_path), progress=False)
    assert recovered.path == run.path and store.is_complete(run.path)
    assert run_folders(tmp_path) == [run.path]


# ---------------------------------------------------------------- two processes, one config

@pytest.mark.slow
def test_two_processes_with_the_same_config_share_one_run(image_folder, tmp_path):
    out = tmp_path / "out"
    command = pretrain_command(image_folder, out, 1)
    processes = [start(command, tmp_path / f"p{i}") for i in range(2)]
    results = [finish(p, tmp_path / f"p{i}") for i, p in enumerate(processes)]
    for rc, stdout, stderr in results:
        assert rc == 0, stderr
        assert "Traceback" not in stderr
    (folder,) = run_folders(out)
    assert [r[1].strip().splitlines()[-1] for r in results] == [str(folder)] * 2
    assert [r[1].strip().splitlines()[-2] for r in results][0] == [r[1].strip().splitlines()[-2] for r in results][1]
    assert epochs_in(folder) == [0]  # one writer: each epoch once
    assert store.is_complete(folder) and not (folder / "checkpoint.pt").exists()
    load_run(folder).load_task()
    assert not list(folder.parent.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_lock_makes_the_second_process_wait(tmp_path):
    """While one process holds a run folder's lock, another asking for it without waiting is
    refused, and a waiting one gets it once the first lets go."""
    folder = tmp_path / "run"
    released = tmp_path / "released"
    code = ("import pathlib, sys, time; from sslab import store\n"
            "with store.locked(sys.argv[1]):\n"
            "    print('locked', flush=True); time.sleep(2); pathlib.Path(sys.argv[2]).touch()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), str(released)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlockingIOError):
            with store.locked(folder, wait=False):
                pass
        messages = []
        with store.locked(folder, poll=0.05, announce=messages.append):
            assert released.exists()  # only once the holder was done
        assert messages and folder.name in messages[0]
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- a folder only when something is written into it

def test_a_refused_or_failed_cell_or_run_leaves_no_folder_behind(image_folder, tmp_path, monkeypatch, capsys):
    """The lock of a run or cell folder is a file beside it (``runs/.locks/``), removed when let
    go: a cell refused once it holds its lock, a cell whose computation raises and a run that
    fails once it holds its lock leave ``outputs/runs`` as it was."""
    import sslab.pretrain as pretrain_module
    from sslab.evaluate import cells
    run = pretrain(tiny_config(image_folder, method="random-init"), device="cpu", out=str(tmp_path), progress=False)
    assert run_folders(tmp_path) == [run.path]

    # refused inside the cell: more validation images per class than a class has (32)
    assert main(["evaluate", "--run", str(run.path), "--labels", "2", "--protocols", "fixmatch", "--val-per-class",
                 "40", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "val_per_class" in capsys.readouterr().err

    def fails(*args, **kwargs):
        raise RuntimeError("the computation failed")

    cell = {"stage": "eval", "method": "rotation", "protocol": "probe", "dataset": "x", "budget": 1, "seed": 0}
    with pytest.raises(RuntimeError, match="the computation failed"):
        cells.computed_once(cell, str(tmp_path), fails)
    monkeypatch.setattr(pretrain_module, "build_task", fails)  # after the run's lock is taken
    with pytest.raises(RuntimeError, match="the computation failed"):
        pretrain(tiny_config(image_folder, method="vae"), device="cpu", out=str(tmp_path), progress=False)

    assert run_folders(tmp_path) == [run.path]  # no cell folder, no .locks folder
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == []


def test_a_lock_file_replaced_while_waiting_is_not_taken_for_the_lock(tmp_path):
    """A process letting go of a lock removes its file. One that was waiting on that file gets
    it, but a third may have taken a new file at the same path meanwhile: the waiter compares the
    file it locked with the one at the path, and waits on until the lock it gets is the path's."""
    import fcntl
    import threading
    folder = tmp_path / "runs" / "eval-x"
    path = store.lock_path(folder)
    path.parent.mkdir(parents=True)
    holder = open(path, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    entered, messages = threading.Event(), []

    def waiter():
        with store.locked(folder, poll=0.01, announce=messages.append):
            entered.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    for _ in range(1000):
        if messages:
            break
        time.sleep(0.01)
    assert messages and folder.name in messages[0]  # waiting on the holder's file
    path.unlink()  # the holder lets go as locked() does: its file removed while it still holds it ...
    third = open(path, "a+")  # ... and a third process takes a new file at the path before the waiter wakes
    fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    assert not entered.wait(0.5), "the waiter took the removed file's lock for the lock of the folder"
    path.unlink()
    fcntl.flock(third, fcntl.LOCK_UN)
    third.close()
    assert entered.wait(10)
    thread.join(10)
    assert len(messages) == 1 and not folder.exists() and not path.parent.exists()


# ---------------------------------------------------------------- --deterministic

@pytest.mark.slow
def test_deterministic_cpu_runs_repeat_bit_for_bit(image_folder, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    # One thread each: the two runs share the CPU cores side by side.
    processes = [start(pretrain_command(image_folder, out, 2, "--deterministic", "--method", "vae"),
                       tmp_path / out.name, OMP_NUM_THREADS="1") for out in outs]
    results = [finish(p, tmp_path / out.name) for p, out in zip(processes, outs)]
    assert all(rc == 0 for rc, _, _ in results), results
    folders = [run_folders(out)[0] for out in outs]
    assert folders[0].name == folders[1].name
    metrics = [store.read_jsonl(f / "metrics.jsonl") for f in folders]
    keys = [k for k in metrics[0][0] if k not in ("seconds", "images_per_s")]
    assert len(metrics[0]) == len(metrics[1]) == 2
    for row_a, row_b in zip(*metrics):
        assert [row_a[k] for k in keys] == [row_b[k] for k in keys]
    summaries = [store.read_json(f / store.COMPLETE) for f in folders]
    assert {k: v for k, v in summaries[0].items() if k.startswith("test_")} == \
           {k: v for k, v in summaries[1].items() if k.startswith("test_")}
    weights = [store.load_torch(f / "model.pt")["model"] for f in folders]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_json_files_are_complete_json(tmp_path):
    path = tmp_path / "table.json"
    store.write_json(path, {"rows": list(range(5))})
    assert json.loads(path.read_text()) == {"rows": [0, 1, 2, 3, 4]}


# ---------------------------------------------------------------- sweeps skip what is done

@pytest.mark.parametrize("batch_probes", [False, True])
def test_interrupted_sweep_computes_only_the_missing_cells(image_folder, tmp_path, monkeypatch, batch_probes):
    from sslab.evaluate import EvalConfig, label_curve
    from sslab.evaluate import probe as probe_module
    run = pretrain(tiny_config(image_folder), device="cpu", out=str(tmp_path), progress=False, eval_limit=8)
    # budgets 1 and 3 give 16 and 18 samples an epoch: two groups when the heads train together
    cfg = EvalConfig(val_per_class=2, probe_epochs=2, samples_per_epoch=16, probe_patience=0)
    calls = []

    def counted(real):
        def train(*args, **kwargs):  # one training of one cell (fit) or of one group of cells
            calls.append(real.__name__)
            if len(calls) == 2 and interrupt:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return train

    monkeypatch.setattr(probe_module, "fit", counted(probe_module.fit))
    monkeypatch.setattr(probe_module, "train_heads", counted(probe_module.train_heads))

    def sweep():
        return label_curve([run], budgets=[1, 3], seeds=[0], scratch=False, device="cpu", out=str(tmp_path),
                           config=cfg, progress=False, batch_probes=batch_probes)

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        sweep()
    assert calls == (["train_heads"] * 2 if batch_probes else ["fit"] * 2)
    interrupt = False
    calls.clear()
    table = sweep()
    assert calls == ["fit"]  # the first cell was complete and is read back; the one missing cell trains alone
    assert sorted(row["budget"] for row in table.rows) == [1, 3]
    calls.clear()
    again = sweep()
    assert calls == [] and [r["top1"] for r in again.rows] == [r["top1"] for r in table.rows]


# ---------------------------------------------------------------- semi-supervised cells are stored and found again

# One round of a 4-step student on a 5-neighbour graph; 6 FixMatch steps of 4 + 8 images.
SEMI_CONFIG = dict(probe_epochs=2, val_per_class=2, probe_patience=0, batch_size=16, lp_k=5, lp_pca=8, st_steps=4,
                   fm_steps=6, fm_batch=4, fm_mu=2)


@pytest.mark.parametrize("protocol, own, other", [
    pytest.param("selftrain", {"st_per_class": 5}, {"fm_mu": 3, "finetune_epochs": 1}, id="selftrain"),
    pytest.param("fixmatch", {"fm_mu": 3}, {"st_per_class": 5, "lp_k": 7}, id="fixmatch"),
])
def test_semi_supervised_cell_is_stored_and_found_again_without_training(image_folder, tmp_path, monkeypatch,
                                                                         protocol, own, other):
    """A second call reads the stored row (the same row, nothing trained, no data read); a setting
    the protocol trains with makes another cell, one it does not use finds the same cell."""
    from dataclasses import replace

    from sslab import evaluate as ev
    from sslab.evaluate import cells as module
    from sslab.evaluate import probe as probe_module
    run = pretrain(tiny_config(image_folder), device="cpu", out=str(tmp_path), progress=False, eval_limit=8)
    trained = []

    def counted(real, name):
        def train(*args, **kwargs):
            trained.append(name)
            return real(*args, **kwargs)
        return train

    monkeypatch.setattr(module, "fit", counted(module.fit, protocol))
    monkeypatch.setattr(probe_module, "fit", counted(probe_module.fit, "probe"))
    config = ev.EvalConfig(**SEMI_CONFIG)

    def cell(cfg):
        return getattr(ev, f"{protocol}_cell")(run, 4, device="cpu", out=str(tmp_path), config=cfg)

    first = cell(config)
    # both start from the budget's probe head (self-training's probe and agreement teachers, FixMatch's
    # start), then train themselves
    assert trained == ["probe", protocol]
    folder = Path(first["run"])
    assert store.is_complete(folder) and first["protocol"] == protocol and first["budget"] == 4
    assert not list(folder.glob("checkpoint.pt")) and not list(folder.glob("student-*.pt"))

    trained.clear()
    with monkeypatch.context() as no_data:  # found, not computed: not even the dataset is read
        def forbidden(*args, **kwargs):
            raise AssertionError("a stored cell was computed again")
        no_data.setattr(module, "dataset_splits", forbidden)
        again = cell(config)
        assert again == first
        assert cell(replace(config, **other)) == first  # settings this protocol does not train with
    assert trained == []

    changed = cell(replace(config, **own))
    assert protocol in trained and changed["run"] != first["run"]


# ---------------------------------------------------------------- runs killed part-way, evaluation cells, sweeps

# Put before the code of a child process the tests kill: after each checkpoint a run writes, it
# pauses (PAUSE_AFTER_CHECKPOINT seconds), so the test finds the checkpoint and kills the run
# before it finishes, however busy the machine is. The pause changes no result.
PAUSING = """
import os, sys, time
import torch
torch.set_num_threads(1)
from sslab import checkpoint
_maybe_save = checkpoint.Checkpointer.maybe_save
def _pausing_save(self, *args, **kwargs):
    before = self.saved_epoch
    _maybe_save(self, *args, **kwargs)
    if self.saved_epoch != before:
        time.sleep(float(os.environ.get("PAUSE_AFTER_CHECKPOINT", "0")))
checkpoint.Checkpointer.maybe_save = _pausing_save
"""

# argv: protocol, pretrained run, out, EvalConfig fields as JSON. Prints the cell's row as JSON.
END_TO_END_CELL = PAUSING + """
import json
from sslab import evaluate as ev
from sslab.evaluate import cells
from sslab.pretrain import load_run
cells.CHECKPOINT_EVERY_S = 0  # a checkpoint after every epoch (by default: once a minute)
protocol, run, out, config = sys.argv[1], load_run(sys.argv[2]), sys.argv[3], ev.EvalConfig(**json.loads(sys.argv[4]))
if protocol == "scratch":
    row = ev.scratch_cell(run, 4, device="cpu", out=out, config=config, deterministic=True)
elif protocol == "fixmatch":
    row = ev.fixmatch_cell(run, 4, device="cpu", out=out, config=config, deterministic=True)
else:
    row = ev.finetune_cell(run, 4, device="cpu", out=out, config=config, deterministic=True)
print(json.dumps(row))
"""

CELL_CONFIG = dict(probe_epochs=3, scratch_epochs=5, finetune_epochs=5, samples_per_epoch=64, batch_size=32,
                   val_per_class=2, probe_patience=0, scratch_patience=3, finetune_patience=3,
                   # fixmatch: a pool of 52 images (64 less the 4 + 2 per class of the split), 8 a
                   # step → 6 steps an epoch, 5 epochs
                   fm_steps=30, fm_batch=4, fm_mu=2)


def wait_for(pattern: str, root: Path, process: subprocess.Popen, log: Path, seconds: float = 240) -> Path:
    """The first file matching ``pattern`` under ``root``, while ``process`` runs."""
    deadline = time.monotonic() + seconds
    while True:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, f"the run ended before writing {pattern}: {log.with_suffix('.err').read_text()}"
        assert time.monotonic() < deadline, f"no {pattern} after {seconds} s"
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _result_of(row: dict) -> dict:
    """What a cell computed, without its timings."""
    history = [{k: v for k, v in epoch.items() if k not in ("seconds", "images_per_s")} for epoch in row["history"]]
    return {**{k: row[k] for k in ("top1", "top5", "per_class", "confusion", "epochs")}, "history": history}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["scratch", "finetune", "fixmatch"])
def test_killed_evaluation_cell_resumes_from_its_checkpoint_bit_for_bit(image_folder, tmp_path, protocol):
    run = pretrain(tiny_config(image_folder), device="cpu", out=str(tmp_path / "pretrained"), progress=False,
                   eval_limit=8)

    def cell(out: Path, log: Path, **env: str) -> subprocess.Popen:
        return start([sys.executable, "-c", END_TO_END_CELL, protocol, str(run.path), str(out),
                      json.dumps(CELL_CONFIG)], log, OMP_NUM_THREADS="1", **env)

    from sslab import evaluate as ev
    config = ev.EvalConfig(**CELL_CONFIG)
    if protocol == "scratch":  # the same cell, never interrupted
        expected = ev.scratch_cell(run, 4, device="cpu", out=str(tmp_path / "reference"),
                                   config=config, deterministic=True)
    elif protocol == "fixmatch":
        expected = ev.fixmatch_cell(run, 4, device="cpu", out=str(tmp_path / "reference"), config=config,
                                    deterministic=True)
    else:
        expected = ev.finetune_cell(run, 4, device="cpu", out=str(tmp_path / "reference"), config=config,
                                    deterministic=True)

    out = tmp_path / "out"
    first = cell(out, tmp_path / "first", PAUSE_AFTER_CHECKPOINT="30")
    checkpoint = wait_for("runs/eval-*/checkpoint.pt", out, first, tmp_path / "first")
    kill(first)
    folder = checkpoint.parent
    assert not store.is_complete(folder)
    stopped_after = store.load_torch(checkpoint)["epoch"]
    # (fixmatch's epochs follow from fm_steps and the pool: the checkpoint's training config has them)
    planned = CELL_CONFIG.get(f"{protocol}_epochs") or store.load_torch(checkpoint)["config"]["epochs"]
    assert stopped_after < planned - 1

    rc, stdout, stderr = finish(cell(out, tmp_path / "second"), tmp_path / "second")
    assert rc == 0, stderr
    assert f"resuming {protocol}" in stderr and str(checkpoint) in stderr
    row = json.loads(stdout.strip().splitlines()[-1])
    assert row["run"] == str(folder) and store.is_complete(folder) and not checkpoint.exists()
    assert _result_of(row) == _result_of(expected)  # as if it had never stopped


@pytest.mark.slow
def test_force_resumes_an_interrupted_new_folder_and_swaps_it_in(image_folder, tmp_path):
    """``pretrain --force`` trains into ``<folder>.new``; killed part-way, the next ``--force`` resumes
    that folder from its checkpoint (not from scratch) and swaps it in once it is complete."""
    out = tmp_path / "out"
    command = ["-c", PAUSING + "from sslab.cli import main\nsys.exit(main(sys.argv[1:]))",
               *pretrain_command(image_folder, out, 4, "--deterministic")[3:]]
    folder = pretrain(tiny_config(image_folder, epochs=4), device="cpu", out=str(out), progress=False,
                      deterministic=True).path
    original = _snapshot(folder)

    first = start([sys.executable, *command, "--force"], tmp_path / "first", OMP_NUM_THREADS="1",
                  PAUSE_AFTER_CHECKPOINT="30")
    pending = folder.with_name(folder.name + ".new")
    checkpoint = wait_for(f"{pending.name}/checkpoint.pt", folder.parent, first, tmp_path / "first")
    kill(first)
    assert not store.is_complete(pending) and _snapshot(folder) == original  # the complete run is untouched

    rc, stdout, stderr = finish(start([sys.executable, *command, "--force"], tmp_path / "second",
                                      OMP_NUM_THREADS="1"), tmp_path / "second")
    assert rc == 0, stderr
    assert f"resuming pretrain rotation from {checkpoint}" in stderr, stderr
    assert stdout.strip().splitlines()[-1] == str(folder)
    assert run_folders(out) == [folder]  # swapped in: no .new or .old left
    summary = store.read_json(folder / store.COMPLETE)
    assert summary["resumed_from_epoch"] >= 1  # (the original run: 0)
    assert epochs_in(folder) == [0, 1, 2, 3]
    # deterministic: the resumed retraining ends with the original run's weights, bit for bit
    new = store.load_torch(folder / "model.pt")["model"]
    old = torch.load(io.BytesIO(original["model.pt"]), weights_only=True)["model"]
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


# argv: log, out, EvalConfig fields as JSON, pretrained runs. Every computed cell appends its
# folder's name and this process's id to the log (one short line, appended: whole).
COUNTED_SWEEP = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from sslab import evaluate as ev
from sslab.evaluate import cells
from sslab.pretrain import load_run
log = sys.argv[1]
finish_cell = cells.finish_cell
def counted(folder, *args, **kwargs):
    with open(log, "a") as f:
        f.write(json.dumps({"cell": Path(folder).name, "pid": os.getpid()}) + "\\n")
    return finish_cell(folder, *args, **kwargs)
cells.finish_cell = counted
table = ev.label_curve([load_run(p) for p in sys.argv[4:]], budgets=[1, 3], seeds=[0, 1], finetune=True,
                       device="cpu", out=sys.argv[2], config=ev.EvalConfig(**json.loads(sys.argv[3])),
                       progress=False, name="sweep")
print(json.dumps([[r["method"], r["protocol"], r["budget"], r["seed"], r["top1"], r["run"]] for r in table.rows]))
"""


@pytest.mark.slow
def test_two_concurrent_sweeps_compute_each_cell_exactly_once(image_folder, tmp_path):
    out = tmp_path / "out"
    runs = [pretrain(tiny_config(image_folder, method=m), device="cpu", out=str(out), progress=False, eval_limit=8)
            for m in ("rotation", "vae")]
    log = tmp_path / "computed.jsonl"
    config = dict(CELL_CONFIG, scratch_epochs=2, finetune_epochs=2)
    sweeps = [start([sys.executable, "-c", COUNTED_SWEEP, str(log), str(out), json.dumps(config),
                     *[str(r.path) for r in runs]], tmp_path / f"sweep{i}", OMP_NUM_THREADS="1") for i in range(2)]
    results = [finish(p, tmp_path / f"sweep{i}") for i, p in enumerate(sweeps)]
    for rc, _, stderr in results:
        assert rc == 0, stderr
    tables = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    assert tables[0] == tables[1]  # both read the same cells
    cells = [p.name for p in (out / "runs").iterdir() if p.name.startswith("eval-") and store.is_complete(p)]
    # 2 budgets × 2 seeds × (2 methods × probe and finetune, + scratch)
    assert len(cells) == len(tables[0]) == 20
    computed = [row["cell"] for row in store.read_jsonl(log)]
    assert sorted(computed) == sorted(cells), "a cell was computed twice, or one was never computed"
    # the two really ran at the same time: one of them waited for a cell the other held
    assert any("waiting for another process" in stdout for _, stdout, _ in results)
