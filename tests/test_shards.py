"""Work split across processes: the per-rank shards of an epoch (sslab/distributed.py), and a
label-curve sweep split into shards run as separate ``python -m sslab curve`` processes."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslab.distributed import Distributed, epoch_shard
from sslab.train import batches_per_epoch


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (97, 3), (256, 4), (9, 8)])
def test_epoch_shards_cover_the_permutation_once_in_near_equal_parts(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [epoch_shard(order, rank, world) for rank in range(world)]
    assert torch.equal(torch.cat(shards), order)  # every image exactly once, in the permutation's order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_every_rank_takes_the_same_number_of_steps():
    for n, world, batch in [(256, 2, 150), (97, 3, 8), (1001, 4, 32), (9, 4, 2)]:
        ranks = [Distributed(rank=r, local_rank=r, world_size=world, device=torch.device("cpu"), backend="gloo")
                 for r in range(world)]
        steps = {d.steps_per_epoch(n, batch) for d in ranks}
        assert steps == {batches_per_epoch(n // world, batch)}
        # each rank cuts its own shard into that many batches: near-equal on every rank, none
        # below 2 images (BatchNorm needs 2)
        order = torch.randperm(n)
        sizes = [len(c) for rank in range(world)
                 for c in torch.tensor_split(epoch_shard(order, rank, world), ranks[rank].steps_per_epoch(n, batch))]
        assert min(sizes) >= 2 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match=r"5 training images cannot be shared by 3 processes.*--limit ≥ 6"):
        ddp = Distributed(rank=0, local_rank=0, world_size=3, device=torch.device("cpu"), backend="gloo")
        ddp.steps_per_epoch(5, 2)


def test_epoch_data_gives_each_rank_its_rows_and_its_own_augmentation_stream():
    images = torch.arange(20).reshape(20, 1, 1, 1).to(torch.uint8)
    labels = torch.arange(20) * 10
    order = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    world = 3
    seen = []
    streams = []
    for rank in range(world):
        ddp = Distributed(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"), backend="gloo")
        torch.manual_seed(123)
        (local_images, local_labels), walk = ddp.epoch_data((images, labels), order, seed=0, epoch=4)
        assert torch.equal(walk, torch.arange(len(local_images)))
        assert torch.equal(local_labels, local_images.flatten().long() * 10)  # rows stay paired
        seen.append(local_images.flatten().long())
        streams.append(torch.rand(3))
    assert torch.equal(torch.cat(seen), order)
    torch.manual_seed(123)
    assert torch.equal(streams[0], torch.rand(3))  # rank 0 keeps the single-process stream
    assert not torch.equal(streams[1], streams[0]) and not torch.equal(streams[2], streams[1])
    ddp = Distributed(rank=1, local_rank=1, world_size=world, device=torch.device("cpu"), backend="gloo")
    ddp.epoch_data((images,), order, seed=0, epoch=4)
    assert torch.equal(torch.rand(3), streams[1])  # fixed by (seed, epoch, rank): a resume repeats it
    ddp.epoch_data((images,), order, seed=0, epoch=5)
    assert not torch.equal(torch.rand(3), streams[1])


# ---------------------------------------------------------------- the sharded sweep, end to end

def _pattern(cls: int, rng) -> np.ndarray:
    img = rng.integers(0, 40, (32, 32)).astype(np.uint8)
    if cls == 0:
        img[::4] = 255
    elif cls == 1:
        img[:, ::4] = 255
    else:
        img[8:24, 8:24] = 255
    return img


@pytest.fixture(scope="module")
def pattern_folder(tmp_path_factory) -> str:
    """Three visually distinct classes of 32×32 grey images: 16 train and 6 test each."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 6)):
        for cls, name in enumerate(("rows", "columns", "square")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_pattern(cls, rng)).save(folder / f"{i}.png")
    return f"folder:{root}"


def _curve(dataset: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sslab", "curve", "--methods", "rotation,vae", "--dataset", dataset,
               "--budgets", "1", "--seeds", "0,1", "--head", "knn", "--no-scratch", "--val-per-class", "2",
               "--pretrain-epochs", "1", "--batch-size", "16", "--width", "0.125", "--device", "cpu",
               "--out", str(out), "--name", "sweep", "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_one_thread_env())


def _one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _table(out: Path) -> list:
    with open(out / "tables" / "sweep.csv") as f:
        # ``seconds`` is how long a cell took, the one column that may differ between runs
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_curve_shards_then_merge_give_the_unsharded_table(pattern_folder, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    full = _curve(pattern_folder, whole)
    assert full.returncode == 0, full.stderr
    expected = _table(whole)
    assert [(r["method"], r["seed"]) for r in expected] == [("rotation", "0"), ("vae", "0"), ("rotation", "1"),
                                                            ("vae", "1")]
    assert all(0 <= float(r["top1"]) <= 1 for r in expected)  # (no top-5 with 3 classes)
    # The shards share the pretrained runs, as machines sharing a run store would.
    shutil.copytree(whole / "runs", sharded / "runs",
                    ignore=lambda folder, names: [n for n in names if n.startswith("eval-")])

    first = _curve(pattern_folder, sharded, "--shard", "0/2")
    assert first.returncode == 0, first.stderr
    assert "shard 0/2: its 2 cell(s) are in the store" in first.stdout
    early = _curve(pattern_folder, sharded, "--merge")
    assert early.returncode == 3  # shard 1 has not run: the merge names what is missing
    assert "2 cell(s) are not computed yet" in early.stderr
    assert "vae probe labels=1 seed=0" in early.stderr and "vae probe labels=1 seed=1" in early.stderr
    assert "rotation probe" not in early.stderr
    assert not (sharded / "tables" / "sweep.csv").exists()

    second = _curve(pattern_folder, sharded, "--shard", "1/2")
    assert second.returncode == 0, second.stderr
    assert "shard 1/2: its 2 cell(s) are in the store" in second.stdout
    merged = _curve(pattern_folder, sharded, "--merge")
    assert merged.returncode == 0, merged.stderr
    assert _table(sharded) == expected


@pytest.mark.slow
def test_merge_lists_a_missing_pretraining_run_instead_of_training_it(pattern_folder, tmp_path):
    merged = _curve(pattern_folder, tmp_path, "--merge")
    assert merged.returncode == 3, merged.stderr
    assert "2 pretraining run(s) are not there" in merged.stderr and "--width" in merged.stderr
    assert "pretrain rotation: no complete run at" in merged.stderr
    assert "pretrain vae: no complete run at" in merged.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing trained
