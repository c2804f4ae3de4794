"""sslab/distributed.py: pretraining under torchrun (gloo on CPU here; NCCL takes the same path
on GPUs), resuming across a change in the number of processes, and the errors around it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from sslab import store
from sslab.distributed import Distributed, device_for, from_environment, state_sha256
from sslab.models import BackboneConfig
from sslab.pretext import build_task
from sslab.pretrain import PretrainConfig, load_run, pretrain
from sslab.train import TrainConfig, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pattern_folder(tmp_path_factory) -> str:
    """Two classes of 32×32 grey images (rows, columns): 40 train and 4 test each."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 4)):
        for cls, name in enumerate(("rows", "columns")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 40, (32, 32)).astype(np.uint8)
                if cls == 0:
                    img[::4] = 255
                else:
                    img[:, ::4] = 255
                Image.fromarray(img).save(folder / f"{i}.png")
    return f"folder:{root}"


def _pretrain_command(dataset: str, out: Path, epochs: int, processes: int = 0) -> list:
    """``python -m sslab pretrain`` on the tiny folder; under torchrun when ``processes`` > 0."""
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return launcher + ["-m", "sslab", "pretrain", "--dataset", dataset, "--epochs", str(epochs), "--lr", "0.02",
                       "--batch-size", "16", "--width", "0.125", "--device", "cpu", "--out", str(out), "--no-progress",
                       "--checkpoint-every", "0"]  # a checkpoint after every epoch, for the tests that stop a run


def _env() -> dict:
    # One thread per process: two processes on two busy cores stay fast (and torchrun stays quiet).
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _epochs(run_dir: Path) -> list:
    return [row["epoch"] for row in store.read_jsonl(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_torchrun_two_processes_train_one_run_with_identical_weights(pattern_folder, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(_pretrain_command(pattern_folder, out, epochs=2, processes=2), capture_output=True,
                            text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    runs = [p for p in (out / "runs").iterdir()]
    assert len(runs) == 1 and runs[0].is_dir()
    run_dir = runs[0]
    # Rank 0 alone prints: the summary line and the run folder, once.
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1] == str(run_dir) and lines[0].startswith("rotation: 80 images, 2 epochs")
    # Rank 0 alone logs: one metrics line per epoch.
    assert _epochs(run_dir) == [0, 1]
    metrics = store.read_jsonl(run_dir / "metrics.jsonl")
    # Learning rate × 2 processes; cosine schedule at the end of epoch 1 of 2 = half of it.
    assert metrics[0]["lr"] == pytest.approx(0.02 * 2 * 0.5)
    summary = json.loads((run_dir / store.COMPLETE).read_text())
    ranks = summary["distributed"]
    assert ranks["world_size"] == 2 and ranks["backend"] == "gloo" and ranks["global_batch_size"] == 32
    # Both ranks ended with the same weights and buffers, and they are the stored model's.
    hashes = ranks["state_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    task = load_run(run_dir).load_task("cpu")
    assert state_sha256(task) == hashes[0]
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_run_stopped_under_two_processes_resumes_in_one(pattern_folder, tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / "torchrun.log", "w") as log:
        # A new session: SIGTERM reaches torchrun alone, which stops its workers (as Slurm's preemption does).
        launcher = subprocess.Popen(_pretrain_command(pattern_folder, out, epochs=5, processes=2), stdout=log,
                                    stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 200
            while not list(out.glob("runs/*/checkpoint.pt")):
                assert launcher.poll() is None, (tmp_path / "torchrun.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint after 200 s"
                time.sleep(0.05)
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    (run_dir,) = [p for p in (out / "runs").iterdir() if not p.name.startswith(".")]  # .locks beside the runs
    assert not store.is_complete(run_dir), "the run finished before it could be stopped"
    stopped_after = store.load_torch(run_dir / "checkpoint.pt")["epoch"]
    assert 0 <= stopped_after < 4

    result = subprocess.run(_pretrain_command(pattern_folder, out, epochs=5), capture_output=True, text=True,
                            timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    assert f"after epoch {stopped_after + 1} of 5" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)  # the same run folder, whatever the processes
    summary = json.loads((run_dir / store.COMPLETE).read_text())
    assert summary["resumed_from_epoch"] == stopped_after + 1
    assert "distributed" not in summary  # one process finished it
    assert _epochs(run_dir) == [0, 1, 2, 3, 4]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, inside the test process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield Distributed(rank=0, local_rank=0, world_size=1, device=CPU, backend="gloo")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["rotation", "vae", "siamese-vae"])
def test_one_rank_through_ddp_trains_exactly_like_the_plain_loop(one_process_group, make_image_set, method):
    images = make_image_set(n=40, size=28).images
    optimizer, lr = ("sgd", 0.02) if method == "rotation" else ("adam", 1e-3)
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer=optimizer, lr=lr, schedule="cosine", seed=3)

    def trained(distributed):
        torch.manual_seed(0)
        task = build_task(method, BackboneConfig(in_channels=1, image_size=28, width=0.125))
        history = fit(task, (images,), cfg, CPU, progress=False, distributed=distributed).history
        return task.state_dict(), history

    torch.manual_seed(0)
    initial = build_task(method, BackboneConfig(in_channels=1, image_size=28, width=0.125)).state_dict()
    plain, plain_history = trained(None)
    ddp, ddp_history = trained(one_process_group)
    assert any(not torch.equal(initial[k], plain[k]) for k in plain)  # it trained
    assert all(torch.equal(plain[k], ddp[k]) for k in plain)  # bit for bit, buffers included
    assert [r["loss"] for r in ddp_history] == [r["loss"] for r in plain_history]


def test_distributed_settings_that_cannot_work_are_clear_errors(monkeypatch, pattern_folder):
    with pytest.raises(ValueError, match=r"sync_bn=True is not allowed in a single process.*torchrun"):
        pretrain(PretrainConfig(dataset=pattern_folder, epochs=1, width=0.125), device="cpu", sync_bn=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 is set but RANK is not"):
        from_environment("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"sync_bn=True on device 'cpu' is not allowed.*CUDA only"):
        from_environment("cpu", sync_bn=True)
    with pytest.raises(ValueError, match=r"device='cuda:1' is not allowed under torchrun.*cuda:LOCAL_RANK"):
        device_for("cuda:1", 0)
    assert device_for("cpu", 3) == CPU
    assert not dist.is_initialized()  # each error came before joining a process group


def test_only_pretrain_runs_under_torchrun_and_rank_0_says_so_once(monkeypatch, capsys):
    from sslab.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, speaks in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert main(["curve", "--methods", "rotation", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert ("only `pretrain` runs on several processes" in err) is speaks
        assert ("curve --shard I/N" in err) is speaks


def test_rank_0_tells_the_other_ranks_to_train_reuse_or_fail(monkeypatch):
    """The word rank 0 sends (``Distributed.pretrain``), with the collective replaced by a script."""
    sent = []

    def rank(r: int, incoming=()):
        ddp = Distributed(rank=r, local_rank=r, world_size=2, device=CPU, backend="gloo")
        messages = iter(incoming)
        monkeypatch.setattr(ddp, "_broadcast", lambda message: sent.append(message) or
                            (message if r == 0 else next(messages)))
        return ddp

    # A follower trains when told, then returns rank 0's result.
    trained = []
    follower = rank(1, [("train", "/runs/x"), ("done", "the run")])
    assert follower.pretrain(lambda: pytest.fail("only rank 0 leads"), trained.append) == "the run"
    assert trained == [Path("/runs/x")]
    # ... or raises the error rank 0 met before training.
    follower = rank(1, [("error", PermissionError("out='/x' cannot be written"))])
    with pytest.raises(PermissionError, match="cannot be written"):
        follower.pretrain(lambda: None, trained.append)

    # Rank 0: a reused run is sent as is.
    sent.clear()
    assert rank(0).pretrain(lambda: "complete run", None) == "complete run"
    assert sent == [("done", "complete run")]
    # An error before training goes to the others; one during training does not (they are
    # inside training themselves and would never read it).
    sent.clear()

    def fails_before_training():
        raise ValueError("bad")

    with pytest.raises(ValueError):
        rank(0).pretrain(fails_before_training, None)
    assert [kind for kind, _ in sent] == ["error"] and str(sent[0][1]) == "bad"
    sent.clear()
    leader = rank(0)

    def fails_while_training():
        leader.begin_training(Path("/runs/x"))
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        leader.pretrain(fails_while_training, None)
    assert sent == [("train", "/runs/x")]


def test_scaled_learning_rate_is_reached_by_a_warm_up_under_several_processes():
    def scaled(world: int, **config):
        ddp = Distributed(rank=0, local_rank=0, world_size=world, device=CPU, backend="gloo")
        return ddp.scale_lr(TrainConfig(lr=0.05, **config))

    one = scaled(1, epochs=30)
    assert (one.lr, one.warmup_epochs) == (0.05, 0.0)  # one process trains exactly as without torchrun
    eight = scaled(8, epochs=30)
    assert eight.lr == pytest.approx(0.4) and eight.warmup_epochs == 5.0  # Goyal et al.'s 5 epochs
    short = scaled(2, epochs=2)
    assert short.lr == pytest.approx(0.1) and short.warmup_epochs == pytest.approx(0.4)  # a fifth of the run
    assert scaled(2, epochs=30, warmup_epochs=1.0).warmup_epochs == 1.0  # a warm-up already asked for is kept
