"""Shared fixtures: every test writes under a temporary outputs folder, and small synthetic
image sets stand in for real data where the data itself does not matter."""
from __future__ import annotations

import os

# cuBLAS reads this when its first handle is made, so it is set before any test touches CUDA:
# tests that compare two CUDA trainings bit for bit need its repeatable matmuls.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from sslab.data import ImageSet

# The tests' models are tiny: one thread is as fast as two, and it stays fast when other
# jobs share the 2 cores (two OpenMP threads on a busy machine spin-wait, ~20× slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path_factory, monkeypatch):
    """Point the run store at a fresh folder so no test writes into the repository's outputs/."""
    folder = tmp_path_factory.mktemp("outputs")
    monkeypatch.setenv("SSLAB_OUTPUTS", str(folder))
    return folder


@pytest.fixture(autouse=True)
def restore_deterministic_algorithms():
    """``--deterministic`` switches torch process-wide; undo it so one test does not change the next."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark


@pytest.fixture
def make_image_set():
    """``make_image_set(n, channels, size, classes, seed)`` → a random uint8 :class:`ImageSet`
    whose labels cycle through the classes (so every class has ⌊n/classes⌋ or more images)."""

    def make(n: int = 40, channels: int = 1, size: int = 28, classes: int = 4, seed: int = 0) -> ImageSet:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.arange(n) % classes
        return ImageSet(images, labels, [f"class{i}" for i in range(classes)])

    return make


@pytest.fixture(scope="session")
def make_noise_run():
    """``make_noise_run(root, train_per_class)`` → a random-init run on a ``folder:`` set written
    under ``root``: 3 classes of distinct 16 px noise images (``train_per_class`` train and 3 test
    images each), so every image is told apart by its pixels."""

    def make(root, train_per_class: int):
        from PIL import Image

        from sslab.pretrain import PretrainConfig, pretrain
        generator = torch.Generator().manual_seed(0)
        for split, count in (("train", train_per_class), ("test", 3)):
            for name in ("a", "b", "c"):
                (root / "images" / split / name).mkdir(parents=True)
                for i in range(count):
                    pixels = torch.randint(0, 256, (16, 16), dtype=torch.uint8, generator=generator)
                    Image.fromarray(pixels.numpy(), "L").save(root / "images" / split / name / f"{i}.png")
        return pretrain(PretrainConfig(method="random-init", dataset=f"folder:{root / 'images'}", image_size=16,
                                       width=0.125), device="cpu", out=str(root / "out"), progress=False)

    return make
