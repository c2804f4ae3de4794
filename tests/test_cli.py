"""The command line (sslab/__main__.py), run the way a person runs it: ``python -m sslab ...``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslab.cli import build_parser, main
from sslab.data import DEBIAN_FASHION_MNIST

needs_fashion_mnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                         reason="needs the Debian package dataset-fashion-mnist")
PRETRAIN_FLAGS = ["--method", "--dataset", "--epochs", "--limit", "--batch-size", "--lr", "--image-size", "--width",
                  "--seed", "--force", "--device", "--data-root", "--out", "--deterministic", "--no-progress",
                  "--data-budget", "--compile", "--checkpoint-every"]


def sslab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m sslab ARGS`` in a fresh process (outputs go to the test's $SSLAB_OUTPUTS)."""
    # One thread: on 2 shared cores two OpenMP threads spin-wait and run many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "sslab", *args], capture_output=True, text=True, timeout=timeout,
                           env=env)


def sslab_here(capsys, *args: str):
    """The same command line run in this process (fast): (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse exits on --help and on bad flags
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_fashion_mnist
@pytest.mark.slow
def test_pretrain_command_writes_a_run_then_hits_the_cache_and_force_retrains(tmp_path):
    command = ["pretrain", "--method", "rotation", "--epochs", "1", "--limit", "256", "--width", "0.125",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    first = sslab(*command)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path.resolve() / "runs"
    for name in ("config.json", "model.pt", "metrics.jsonl"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert (config["method"], config["limit"], config["width"], config["dataset"]) == \
        ("rotation", 256, 0.125, "fashion-mnist")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"loss", "rot_acc", "lr", "images_per_s"} <= set(rows[0])
    weights = torch.load(folder / "model.pt", weights_only=True)["model"]
    assert any(k.startswith("backbone.conv1") for k in weights)

    stamp, metrics = (folder / "model.pt").stat().st_mtime_ns, (folder / "metrics.jsonl").read_text()
    second = sslab(*command)
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip().splitlines()[-1]) == folder
    assert (folder / "model.pt").stat().st_mtime_ns == stamp, "an identical command reuses the complete run"
    assert (folder / "metrics.jsonl").read_text() == metrics

    forced = sslab(*command, "--force")
    assert forced.returncode == 0, forced.stderr
    assert Path(forced.stdout.strip().splitlines()[-1]) == folder
    assert (folder / "model.pt").stat().st_mtime_ns != stamp, "--force trains again"
    assert (folder / "complete.json").is_file()


def test_pretrain_command_rejects_an_unknown_method(tmp_path, capsys):
    code, _, err = sslab_here(capsys, "pretrain", "--method", "jigsaw", "--device", "cpu", "--out", str(tmp_path))
    assert code == 2
    assert "method='jigsaw' is not known; allowed: rotation, vae, siamese-vae" in err
    assert not (tmp_path / "runs").exists()


def test_pretrain_command_rejects_a_non_integer_flag(capsys):
    code, _, err = sslab_here(capsys, "pretrain", "--epochs", "two")
    assert code == 2 and "--epochs" in err and "'two'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_pretrain_command_on_cuda_without_cuda_names_the_device(tmp_path, capsys):
    code, _, err = sslab_here(capsys, "pretrain", "--device", "cuda", "--out", str(tmp_path))
    assert code == 2
    assert "device='cuda'" in err and "allowed here: cpu, auto" in err


@needs_fashion_mnist
def test_datasets_command_lists_fashion_mnist_as_found(capsys):
    code, out, _ = sslab_here(capsys, "datasets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert f"found in {DEBIAN_FASHION_MNIST}" in lines["fashion-mnist"]
    assert {"cifar10", "stl10", "folder:PATH"} <= set(lines)


def test_pretrain_help_mentions_every_flag_and_its_default(capsys):
    code, out, _ = sslab_here(capsys, "pretrain", "--help")
    assert code == 0
    help_text = " ".join(out.split())
    for flag in PRETRAIN_FLAGS:
        assert flag in help_text, flag
    for default in ("(default: rotation)", "(default: fashion-mnist)", "(default: 3)", "(default: auto)",
                    "(default: 0)"):
        assert default in help_text, default
    pretrain = build_parser()._subparsers._group_actions[0].choices["pretrain"]
    for action in pretrain._actions:
        assert action.help, f"{action.option_strings} has no help text"
