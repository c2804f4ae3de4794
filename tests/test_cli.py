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
                  "--pool-memory", "--compile", "--checkpoint-every", "--schedule", "--set"]


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


# ---------------------------------------------------------------- pretext settings (--set)

TINY_PRETRAIN = ["pretrain", "--epochs", "1", "--limit", "64", "--width", "0.125", "--batch-size", "32",
                 "--device", "cpu", "--no-progress"]


@needs_fashion_mnist
def test_a_changed_setting_is_a_new_run_folder_and_the_default_value_finds_the_old_one(tmp_path, capsys):
    def pretrain(*extra):
        code, out, err = sslab_here(capsys, *TINY_PRETRAIN, "--method", "siamese-vae", "--out", str(tmp_path), *extra)
        assert code == 0, err
        return Path(out.strip().splitlines()[-1])

    default = pretrain()
    stamp = (default / "model.pt").stat().st_mtime_ns
    changed = pretrain("--set", "triplet_weight=10")
    assert changed != default and changed.parent == default.parent
    assert json.loads((changed / "config.json").read_text())["settings"]["triplet_weight"] == 10.0
    assert json.loads((default / "config.json").read_text())["settings"]["triplet_weight"] == 5.0
    assert pretrain("--set", "triplet_weight=5.0") == default  # the default, given: the old run
    assert (default / "model.pt").stat().st_mtime_ns == stamp, "found, not trained again"
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("extra, message", [
    (["--method", "siamese-vae", "--set", "triplet_weight=-1"],
     "error: --set triplet_weight=-1 is not allowed; allowed: a number ≥ 0"),
    (["--method", "siamese-vae", "--set", "tripplet_weight=10"],
     "error: --set tripplet_weight=10 is not allowed; allowed: a setting of siamese-vae: optimizer, lr, momentum, "
     "nesterov, weight_decay, batch_size, schedule, milestones, gamma, warmup_epochs, latent, beta, flip, "
     "triplet_weight, margin, positive_scale, positive_flip, positive_degrees, positive_jitter"),
    (["--method", "rotation", "--set", "rotations=3"],
     "error: --set rotations=3 is not allowed; allowed: 2 (0/180°) or 4 (0/90/180/270°)"),
    (["--method", "random-init", "--set", "lr=0.1"],
     "error: --set lr=0.1 is not allowed; allowed: none: random-init trains nothing, so it has no settings"),
    (["--method", "rotation", "--lr", "0.1", "--set", "lr=0.2"],
     "error: --set 'lr=0.2' is not allowed: lr is already set by --lr; allowed: one value per setting"),
    (["--method", "rotation", "--epochs", "99999999999999999999"],
     "error: epochs=99999999999999999999 is not allowed; allowed: an integer from 1 to 10000"),
])
def test_a_bad_setting_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, monkeypatch, extra, message):
    import sslab.pretrain as pretrain_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the dataset was read before the settings were checked")

    monkeypatch.setattr(pretrain_module, "load_dataset", forbidden)
    code, out, err = sslab_here(capsys, "pretrain", "--device", "cpu", "--out", str(tmp_path / "out"), *extra)
    assert code == 2 and out == ""
    assert err.rstrip("\n") == message
    assert not (tmp_path / "out").exists()


def test_curve_gives_each_listed_method_the_settings_it_has():
    from sslab.cli import pretext_settings
    args = build_parser().parse_args(["curve", "--methods", "rotation,simclr,random-init", "--lr", "0.1",
                                      "--set", "temperature=0.2", "--set", "flip=false"])
    assert pretext_settings(args, ["rotation", "simclr", "random-init"]) == {
        "rotation": {"lr": 0.1, "flip": False},
        "simclr": {"lr": 0.1, "temperature": 0.2, "flip": False},
        "random-init": {},
    }


def test_curve_refuses_a_setting_no_listed_method_has_before_any_work(tmp_path, capsys):
    code, out, err = sslab_here(capsys, "curve", "--methods", "rotation,vae", "--set", "temperature=0.2",
                                "--device", "cpu", "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("error: --set temperature=0.2 is not allowed; allowed: a setting of rotation, vae: ")
    assert "triplet_weight" not in err and "latent" in err and "rotations" in err
    assert not any(tmp_path.iterdir())


def test_a_sweep_gives_one_run_per_value_to_each_method_that_has_the_setting():
    from sslab.cli import pretext_settings, swept_settings
    args = build_parser().parse_args(["curve", "--methods", "siamese-vae,rotation", "--sweep", "triplet_weight=0,5,20",
                                      "--set", "margin=1"])
    settings = pretext_settings(args, ["siamese-vae", "rotation"])
    assert swept_settings(args, ["siamese-vae", "rotation"], settings) == {
        "siamese-vae": [{"triplet_weight": 0.0}, {"triplet_weight": 5.0}, {"triplet_weight": 20.0}],
        "rotation": [{}],
    }


@pytest.mark.parametrize("sweep, message", [
    ("triplet_weight=5", "--sweep='triplet_weight=5' is not allowed; allowed: NAME=V1,V2,... with two values or more"),
    ("triplet_weight=0,-1", "--sweep triplet_weight=-1 is not allowed; allowed: a number ≥ 0"),
    ("margin=0,1", "--sweep='margin=0,1' is not allowed: margin is also set by --set; allowed: one of the two"),
    ("temperature=0.1,0.5", "--sweep temperature=0.1 is not allowed; allowed: a setting of siamese-vae: "),
])
def test_a_bad_sweep_is_one_line_before_any_work(tmp_path, capsys, sweep, message):
    code, out, err = sslab_here(capsys, "curve", "--methods", "siamese-vae", "--sweep", sweep, "--set", "margin=1",
                                "--device", "cpu", "--out", str(tmp_path))
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_runs_that_differ_in_one_setting_are_told_apart_by_their_label(tmp_path):
    from sslab.evaluate.curve import run_names
    from sslab.pretrain import PretrainConfig, pretrain

    def run(method, **settings):
        return pretrain(PretrainConfig(method=method, epochs=1, limit=64, width=0.125, settings=settings),
                        device="cpu", out=str(tmp_path), progress=False, eval_limit=16)
    swept = [run("siamese-vae", triplet_weight=w, margin=1) for w in (0, 20)]
    alone = run("rotation", lr=0.1)
    assert run("siamese-vae", triplet_weight=5).path == run("siamese-vae").path  # the default, given, is the default
    names = run_names([*swept, alone])
    assert list(names) == ["siamese-vae [triplet_weight=0.0]", "siamese-vae [triplet_weight=20.0]", "rotation"]
    assert names["rotation"] is alone and names["siamese-vae [triplet_weight=20.0]"] is swept[1]
    with pytest.raises(ValueError, match="two runs of rotation with the same settings"):
        run_names([alone, alone])
