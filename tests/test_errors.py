"""Bad input gets a clear error naming the parameter, the value and what is allowed, before
any dataset is read or any training starts; the command line exits 2 with ``error: ...`` and
no traceback. Odd image modes in a ``folder:`` dataset are converted, not rejected."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sslab.pretrain as pretrain_module
from sslab import store
from sslab.checks import MAX_COUNT, MAX_EPOCHS, MAX_STEPS
from sslab.cli import main
from sslab.data import DatasetNotFound, label_budget_split, load_dataset
from sslab.models import AlexNetBackbone, BackboneConfig, check_layer
from sslab.pretrain import PretrainConfig, load_run, pretrain
from sslab.train import TrainConfig, resolve_device

REPO = Path(__file__).resolve().parent.parent


def save_png(path: Path, array: np.ndarray, mode: str) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def grey_folder(root: Path, classes=("a", "b"), per_class: int = 3, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            save_png(root / "train" / name / f"{i}.png", rng.integers(0, 256, (size, size), dtype=np.uint8), "L")
    return root


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the dataset is read or training starts: validation must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("dataset work or training started before the input was checked")

    monkeypatch.setattr(pretrain_module, "load_dataset", forbidden)
    monkeypatch.setattr(pretrain_module, "fit", forbidden)


def cli(capsys, *argv) -> str:
    """Run the command line in-process; it must exit 2 with one ``error: ...`` and no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------- parameters

@pytest.mark.parametrize("argv, expected", [
    (["--method", "jigsaw"], ["method='jigsaw'", "rotation, vae, siamese-vae, simclr"]),
    (["--dataset", "mnist"], ["dataset='mnist'", "fashion-mnist", "cifar10", "folder:PATH"]),
    (["--epochs", "0"], ["epochs=0", "integer from 1 to 10000"]),
    (["--epochs", "-3"], ["epochs=-3", "integer from 1 to 10000"]),
    (["--epochs", "99999999999999999999"], ["epochs=99999999999999999999", "integer from 1 to 10000"]),
    (["--batch-size", "0"], ["--batch-size=0", "integer from 2 to 100000000"]),
    (["--batch-size", "-5"], ["--batch-size=-5", "integer from 2 to 100000000"]),
    (["--width", "0"], ["width=0.0", "(0, 4]"]),
    (["--lr", "-1"], ["--lr=-1.0", "a number > 0"]),
    (["--schedule", "poly"], ["--schedule='poly'", "cosine, step, constant"]),
    (["--limit", "0"], ["limit=0", "integer from 2 to 100000000"]),
    (["--set", "weight_decay=-1"], ["--set weight_decay=-1", "a number ≥ 0"]),
    (["--method", "simclr", "--set", "temperature=0"], ["--set temperature=0", "a number > 0"]),
    (["--set", "triplet_weight=10"], ["--set triplet_weight=10", "a setting of rotation: optimizer, lr"]),
    (["--set", "lr"], ["--set 'lr'", "NAME=VALUE"]),
    (["--seed", "-1"], ["seed=-1", "integer ≥ 0"]),
    (["--device", "tpu"], ["device='tpu'", "auto, cpu, cuda"]),
])
def test_pretrain_command_rejects_bad_parameters_before_any_work(argv, expected, no_work, tmp_path, capsys):
    err = cli(capsys, "pretrain", "--out", str(tmp_path), "--no-progress", *argv)
    for text in expected:
        assert text in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("field, value, allowed", [
    ("epochs", 0, "integer from 1 to 10000"), ("epochs", "3", "integer from 1 to 10000"),
    ("epochs", 2.5, "integer from 1 to 10000"), ("epochs", True, "integer from 1 to 10000"),
    ("limit", 1, "integer from 2 to 100000000"), ("seed", "abc", "integer ≥ 0"),
    ("settings", "lr=0.1", "a dict of the pretext task's settings"),
    ("method", "jigsaw", "rotation, vae, siamese-vae"), ("dataset", "imagenet", "fashion-mnist"),
])
def test_pretrain_function_rejects_bad_values_naming_them(field, value, allowed, no_work, tmp_path):
    """What a notebook's parameters cell (or papermill -p) passes reaches these checks as is."""
    with pytest.raises(ValueError) as info:
        pretrain(PretrainConfig(**{field: value}), device="cpu", out=str(tmp_path), progress=False)
    message = str(info.value)
    assert f"{field}={value!r}" in message and allowed in message


@pytest.mark.parametrize("field, value", [("epochs", 0), ("epochs", -1), ("batch_size", 0), ("batch_size", -2),
                                          ("epochs", 1.5), ("optimizer", "rmsprop"), ("schedule", "poly"),
                                          ("lr", 0.0)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}.*allowed"):
        TrainConfig(**{field: value}).validate()


def test_unknown_layer_lists_the_layers():
    with pytest.raises(ValueError,
                       match="layer='conv9' is not known; allowed: conv1, conv2, conv3, conv4, conv5, pool5"):
        check_layer("conv9")
    backbone = AlexNetBackbone(BackboneConfig(1, 28, 0.125))
    with pytest.raises(ValueError, match="layer='fc7'"):
        backbone.features(torch.zeros(2, 1, 28, 28), "fc7")


@pytest.mark.parametrize("per_class, allowed", [(0, "integer ≥ 1"), (-2, "integer ≥ 1"), ("4", "integer ≥ 1"),
                                                (2.0, "integer ≥ 1"), (11, "≤ 10")])
def test_label_budget_errors_name_the_value_and_the_limit(per_class, allowed):
    labels = torch.arange(30) % 3  # 10 labeled images per class
    with pytest.raises(ValueError) as info:
        label_budget_split(labels, per_class)
    assert f"labels per class={per_class!r}" in str(info.value) and allowed in str(info.value)


def test_label_budget_counts_the_validation_images():
    labels = torch.arange(30) % 3
    with pytest.raises(ValueError, match="allowed: labels per class ≤ 6"):
        label_budget_split(labels, 8, val_per_class=4)
    with pytest.raises(ValueError, match="allowed: val_per_class ≤ 9"):
        label_budget_split(labels, 1, val_per_class=10)


@pytest.mark.parametrize("option, text", [("--budgets", "1,two,4"), ("--seeds", "0,1.5"), ("--budgets", ","),
                                          ("--budgets", "1,,2"), ("--seeds", "0,1,0")])
def test_budgets_and_seeds_must_be_integers_on_the_command_line(option, text, capsys):
    err = cli(capsys, "curve", option, text)
    assert f"{option}={text!r}" in err and "allowed:" in err


@pytest.mark.parametrize("budgets", [[1, "2"], [0], 2.5, [True]])
def test_budgets_that_are_not_positive_integers_are_refused(budgets):
    from sslab.evaluate import check_budgets, check_seeds
    with pytest.raises(ValueError, match=r"budgets=.*allowed: a non-empty list of integers ≥ 1"):
        check_budgets(budgets)
    with pytest.raises(ValueError, match=r"seeds=.*allowed: a non-empty list of integers ≥ 0"):
        check_seeds(["0"])


# ---------------------------------------------------------------- devices and folders

def test_cuda_where_there_is_none(monkeypatch, no_work, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"device='{device}' asks for CUDA.*allowed here: cpu, auto"):
            resolve_device(device)
    assert resolve_device("auto").type == "cpu"
    err = cli(capsys, "pretrain", "--device", "cuda", "--out", str(tmp_path))
    assert "device='cuda'" in err and "no usable CUDA device" in err


def test_unwritable_output_folder_is_refused_before_training(no_work, tmp_path, monkeypatch, capsys):
    """Tests run as root, who may write anywhere: a file system that refuses every new file
    stands in for a read-only disk."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(store.tempfile, "NamedTemporaryFile", refuse)
    out = tmp_path / "outputs"
    err = cli(capsys, "pretrain", "--out", str(out), "--no-progress")
    assert f"out='{out}/runs' cannot be written (Permission denied); allowed:" in err
    with pytest.raises(PermissionError, match="cannot be written"):
        pretrain(PretrainConfig(), device="cpu", out=str(out), progress=False)


def _tree(root: Path) -> list:
    """Every path under ``root``, links not followed: what 'nothing written' compares."""
    return sorted(str(Path(folder, name).relative_to(root)) for folder, folders, files in os.walk(root)
                  for name in folders + files)


def _not_a_folder(root: Path, case: str) -> Path:
    """An outputs path that can never be a folder."""
    loop = root / "loop"
    loop.symlink_to("loop")  # `ln -s loop loop`: a link that leads back to itself
    blocker = root / "a-file"
    blocker.write_text("not a folder")
    return {"a symbolic link loop": loop, "a path under a loop": loop / "outputs", "a file": blocker,
            "a path under a file": blocker / "outputs", "a name too long": root / ("x" * 300) / "outputs"}[case]


@pytest.mark.parametrize("case", ["a symbolic link loop", "a path under a loop", "a file", "a path under a file",
                                  "a name too long"])
@pytest.mark.parametrize("given", ["SSLAB_OUTPUTS", "--out"])
def test_an_outputs_path_that_cannot_be_a_folder_is_one_line_naming_it(case, given, complete_run, monkeypatch,
                                                                      tmp_path, capsys):
    from sslab.evaluate import cells, features

    def forbidden(*args, **kwargs):
        raise AssertionError("dataset work or training started before the outputs folder was checked")

    for module, name in ((pretrain_module, "load_dataset"), (pretrain_module, "fit"), (features, "load_dataset"),
                         (cells, "dataset_splits")):
        monkeypatch.setattr(module, name, forbidden)
    path = _not_a_folder(tmp_path, case)
    before = _tree(tmp_path)
    if given == "SSLAB_OUTPUTS":
        monkeypatch.setenv("SSLAB_OUTPUTS", str(path))
        out, named = [], "SSLAB_OUTPUTS"
    else:
        out, named = ["--out", str(path)], "out"
    for argv in (["pretrain", "--no-progress", *out],
                 ["evaluate", "--run", str(complete_run.path), "--labels", "2", "--no-progress", *out]):
        err = cli(capsys, *argv)
        assert err.count("\n") == 1, err
        assert err.startswith(f"error: {named}={str(path)!r} is not allowed: "), err
        assert err.rstrip().endswith("allowed: a folder this user can create and write"), err
    with pytest.raises(ValueError, match=f"^{named}="):
        store.outputs_root(None if given == "SSLAB_OUTPUTS" else str(path))
    assert _tree(tmp_path) == before  # nothing written


def test_folder_dataset_that_does_not_exist(no_work, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = cli(capsys, "pretrain", "--dataset", f"folder:{missing}", "--out", str(tmp_path / "out"))
    assert f"folder:{missing}" in err and "does not exist" in err and "train/<class>" in err
    assert not (tmp_path / "out" / "runs").exists()


def test_folder_dataset_without_train(no_work, tmp_path, capsys):
    root = tmp_path / "images"
    save_png(root / "a" / "0.png", np.zeros((20, 20), np.uint8), "L")  # classes at the top, not in train/
    err = cli(capsys, "pretrain", "--dataset", f"folder:{root}", "--out", str(tmp_path / "out"))
    assert f"{root / 'train'} is missing" in err and "one folder per class" in err


def test_folder_dataset_with_a_single_class(no_work, tmp_path, capsys):
    root = grey_folder(tmp_path / "images", classes=("only",))
    err = cli(capsys, "pretrain", "--dataset", f"folder:{root}", "--out", str(tmp_path / "out"))
    assert "single class ('only')" in err and "at least 2" in err


def test_folder_dataset_with_a_class_of_unreadable_images(tmp_path, capsys):
    root = grey_folder(tmp_path / "images", classes=("a",))
    broken = root / "train" / "b"
    broken.mkdir()
    (broken / "0.png").write_bytes(b"\x89PNG not really")
    (broken / "1.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        err = cli(capsys, "pretrain", "--dataset", f"folder:{root}", "--out", str(tmp_path / "out"),
                  "--no-progress")
    assert "class 'b' has no readable images" in err and str(broken) in err
    assert not list((tmp_path / "out").glob("runs/*/checkpoint.pt"))


def test_folder_dataset_skips_single_unreadable_images(tmp_path):
    root = grey_folder(tmp_path / "images")
    (root / "train" / "a" / "broken.png").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="broken.png"):
        splits = load_dataset(f"folder:{root}", image_size=16)
    # every readable image is kept, with its class: the same set as the folder without the broken file
    clean = grey_folder(tmp_path / "clean")
    with pytest.warns(UserWarning, match="no test/ folder"):
        reference = load_dataset(f"folder:{clean}", image_size=16)
    assert splits.train.labels.tolist() == reference.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(splits.train.images, reference.train.images)


def test_odd_image_modes_are_converted_not_rejected(tmp_path):
    """Grey, RGBA, 16-bit grey and palette images next to RGB ones: all load, as RGB."""
    from PIL import Image
    root = tmp_path / "images"
    save_png(root / "train" / "a" / "rgb.png", np.full((20, 20, 3), (200, 10, 10), np.uint8), "RGB")
    save_png(root / "train" / "a" / "grey.png", np.full((20, 20), 100, np.uint8), "L")
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent: composited on white
    save_png(root / "train" / "a" / "rgba.png", rgba, "RGBA")
    deep = Image.fromarray(np.full((20, 20), 65535, np.uint16))  # 16-bit grey at full scale
    (root / "train" / "b").mkdir(parents=True)
    deep.save(root / "train" / "b" / "deep.png")
    assert Image.open(root / "train" / "b" / "deep.png").mode.startswith("I")
    palette = Image.fromarray(np.full((20, 20, 3), (0, 0, 255), np.uint8), "RGB").convert("P")
    palette.save(root / "train" / "b" / "palette.png")
    save_png(root / "train" / "b" / "la.png", np.dstack([np.full((20, 20), 50, np.uint8),
                                                        np.full((20, 20), 255, np.uint8)]), "LA")
    with pytest.warns(UserWarning, match="no test/ folder"):
        splits = load_dataset(f"folder:{root}", image_size=16)
    train = splits.train
    assert train.images.shape == (6, 3, 16, 16) and train.images.dtype == torch.uint8
    pixel = {name: tuple(train.images[i, :, 8, 8].tolist())
             for i, name in enumerate(["grey", "rgb", "rgba", "deep", "la", "palette"])}
    assert pixel["rgb"] == (200, 10, 10)
    assert pixel["grey"] == (100, 100, 100)
    assert pixel["rgba"] == (255, 255, 255)
    assert pixel["deep"] == (255, 255, 255)
    assert pixel["la"] == (50, 50, 50)
    assert pixel["palette"] == (0, 0, 255)


def test_grey_only_folders_stay_one_channel(tmp_path):
    from PIL import Image
    root = grey_folder(tmp_path / "images")
    Image.fromarray(np.full((20, 20), 1000, np.uint16)).save(root / "train" / "b" / "deep.png")
    with pytest.warns(UserWarning, match="no test/ folder"):
        splits = load_dataset(f"folder:{root}", image_size=16)
    assert splits.train.images.shape == (7, 1, 16, 16)


# ---------------------------------------------------------------- run folders

def test_load_run_refuses_what_is_not_a_complete_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"not a complete run \(missing config.json, model.pt, complete.json\)"):
        load_run(empty)
    killed = tmp_path / "killed"  # what a run killed mid-training leaves
    store.write_json(killed / "config.json", {"method": "rotation"})
    store.save_torch(killed / "checkpoint.pt", {"epoch": 0})
    with pytest.raises(ValueError, match=r"missing model.pt, complete.json.*finished `python -m sslab pretrain`"):
        load_run(killed)


def test_curve_checks_budgets_against_the_dataset_before_pretraining(no_work, tmp_path, capsys):
    root = grey_folder(tmp_path / "images", per_class=3)
    err = cli(capsys, "curve", "--methods", "rotation", "--dataset", f"folder:{root}", "--budgets", "1,3",
              "--val-per-class", "1", "--out", str(tmp_path / "out"), "--no-progress")
    assert "--budgets=1,3 is not allowed" in err and "for 3 with --val-per-class=1 validation" in err and "≤ 2" in err
    assert not (tmp_path / "out" / "runs").exists()
    # A validation share that leaves no image at all for any budget is named as the cause.
    err = cli(capsys, "curve", "--methods", "rotation", "--dataset", f"folder:{root}", "--budgets", "1",
              "--val-per-class", "3", "--out", str(tmp_path / "out"), "--no-progress")
    assert "--val-per-class=3 is not allowed" in err and "smallest class has 3 labeled images" in err
    assert "allowed: --val-per-class ≤ 2" in err and "--budgets" not in err
    assert not (tmp_path / "out" / "runs").exists()


def test_curve_checks_the_fixmatch_threshold_mode_before_pretraining(no_work, tmp_path, capsys):
    err = cli(capsys, "curve", "--methods", "rotation", "--protocols", "probe,fixmatch", "--fm-threshold-mode",
              "adaptive", "--out", str(tmp_path / "out"), "--no-progress")
    assert err == "error: --fm-threshold-mode='adaptive' is not known; allowed: fixed, freematch\n"
    assert not (tmp_path / "out" / "runs").exists()


def test_curve_needs_a_method(no_work, tmp_path, capsys):
    err = cli(capsys, "curve", "--methods", ",", "--out", str(tmp_path))
    assert "--methods=','" in err and "rotation, vae, siamese-vae" in err


def test_lab_refuses_a_parameter_no_notebook_declares(tmp_path):
    from sslab import lab
    with pytest.raises(ValueError, match=r"parameter lables=5 is not declared by any notebook; allowed: .*labels"):
        lab.execute_notebooks({"lables": 5}, ["02_probe"], tmp_path)
    assert not any(tmp_path.iterdir())


def test_lab_refuses_a_bad_value_before_running_any_notebook(tmp_path, monkeypatch):
    # `labels` is first used by notebook 02: its value must be refused before 01 pretrains.
    from sslab import lab
    pytest.importorskip("papermill")
    ran = []
    monkeypatch.setattr("papermill.execute_notebook", lambda *args, **kwargs: ran.append(args))
    with pytest.raises(ValueError, match=r"parameter labels='abc' is not allowed; allowed: an integer ≥ 1"):
        lab.execute_notebooks({"labels": "abc"}, list(lab.NOTEBOOKS), tmp_path)
    assert ran == [] and not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    root = grey_folder(tmp_path_factory.mktemp("images"), per_class=8, size=32)
    out = tmp_path_factory.mktemp("out")
    with pytest.warns(UserWarning, match="no test/ folder"):
        return pretrain(PretrainConfig(dataset=f"folder:{root}", epochs=1, width=0.125), device="cpu",
                        out=str(out), progress=False, eval_limit=8)


def test_probe_refuses_a_folder_that_is_not_a_complete_run(tmp_path, capsys):
    store.write_json(tmp_path / "half" / "config.json", {"method": "rotation"})
    err = cli(capsys, "probe", "--run", str(tmp_path / "half"), "--labels", "2", "--out", str(tmp_path))
    assert "not a complete run" in err and str(tmp_path / "half") in err


@pytest.mark.parametrize("argv, expected", [
    (["--labels", "0"], ["--labels=0", "an integer from 1 to"]),
    (["--layer", "conv9"], ["layer='conv9'", "conv1, conv2, conv3, conv4, conv5, pool5"]),
    (["--head", "svm"], ["--head='svm'", "mlp, linear, knn"]),
    (["--protocols", "probe,jigsaw"],
     ["--protocols='probe,jigsaw'", "probe, finetune, labelprop, selftrain, fixmatch, scratch", "'jigsaw' is not one"]),
    (["--protocols", "probe,probe"], ["--protocols='probe,probe'", "without repeats"]),
    (["--seed", "-1"], ["--seed=-1", "an integer from 0 to"]),
    (["--protocols", "fixmatch", "--fm-threshold-mode", "flexmatch"],
     ["--fm-threshold-mode='flexmatch' is not known; allowed: fixed, freematch"]),
])
def test_probe_rejects_bad_parameters_before_any_work(complete_run, argv, expected, monkeypatch, tmp_path, capsys):
    from sslab.evaluate import cells, features

    def forbidden(*args, **kwargs):
        raise AssertionError("dataset work started before the input was checked")

    monkeypatch.setattr(features, "load_dataset", forbidden)
    monkeypatch.setattr(cells, "dataset_splits", forbidden)
    monkeypatch.setattr(cells, "cached_features", forbidden)
    argv = ["--labels", "2", *argv] if "--labels" not in argv else argv
    err = cli(capsys, "probe", "--run", str(complete_run.path), "--out", str(tmp_path), *argv)
    for text in expected:
        assert text in err


# ---------------------------------------------------------------- a real process: exit code, no traceback

@pytest.mark.parametrize("argv, expected", [
    (["--method", "jigsaw"], "method='jigsaw' is not known; allowed: rotation, vae, siamese-vae, simclr"),
    (["--epochs", "0"], "epochs=0 is not allowed; allowed: an integer from 1 to 10000"),
    (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
])
@pytest.mark.slow
def test_command_line_exits_2_with_one_error_line(argv, expected, tmp_path):
    result = subprocess.run([sys.executable, "-m", "sslab", "pretrain", "--out", str(tmp_path), *argv],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_dataset_names_where_it_looked_and_how_to_get_it(monkeypatch, tmp_path):
    import sslab.data as data
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    monkeypatch.setattr(data, "_CACHE", {})
    monkeypatch.setenv("SSLAB_DATA", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", data_root=str(tmp_path / "root"), download=False)
    message = str(info.value)
    assert str(tmp_path / "root") in message and str(tmp_path / "not-installed") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_reusing_a_run_trained_by_another_number_of_processes_says_so(complete_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / "runs" / complete_run.path.name
    shutil.copytree(complete_run.path, copy)
    summary = store.read_json(copy / store.COMPLETE)
    summary["distributed"] = {"world_size": 4, "global_batch_size": 600, "lr_scale": 4}
    store.write_json(copy / store.COMPLETE, summary)
    run = pretrain(complete_run.config, device="cpu", out=str(tmp_path), progress=False)
    assert run.path == copy
    err = capsys.readouterr().err
    assert f"reusing {copy.name}, trained with 4 process(es) (global batch 600, lr × 4); this call has 1" in err
    # a run trained by one process, reused by one process: nothing to say
    pretrain(complete_run.config, device="cpu", out=str(complete_run.path.parent.parent), progress=False)
    assert "reusing" not in capsys.readouterr().err


def test_evaluate_runs_each_protocol_it_is_given(complete_run, tmp_path, capsys):
    code = main(["evaluate", "--run", str(complete_run.path), "--labels", "2", "--out", str(tmp_path),
                 "--device", "cpu", "--protocols", "probe,scratch", "--val-per-class", "2", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and [line.split()[1] for line in out] == ["probe", "scratch"]
    assert all(" conv4 " in line for line in out)  # layer auto on an AlexNet run


# ---------------------------------------------------------------- selftrain and fixmatch settings

STEPS, COUNT = f"an integer from 1 to {MAX_STEPS}", f"an integer from 1 to {MAX_COUNT}"


@pytest.mark.parametrize("field, value, allowed", [
    ("fm_threshold", 1.5, "a number in [0, 1]"), ("fm_threshold", -0.1, "a number in [0, 1]"),
    ("fm_mu", 0, COUNT), ("fm_mu", 2.5, COUNT), ("fm_batch", 0, COUNT), ("fm_steps", -1, STEPS),
    ("fm_steps", MAX_STEPS + 1, STEPS), ("fm_ema", 1.0, "a number in [0, 1)"), ("fm_ema", -0.5, "a number in [0, 1)"),
    ("fm_weight", 0.0, "a number > 0"), ("fm_lr", float("nan"), "a number > 0"),
    ("fm_sat_momentum", 1.0, "a number in [0, 1)"), ("fm_sat_momentum", -0.1, "a number in [0, 1)"),
    ("fm_sat_momentum", "0.9", "a number in [0, 1)"),
    ("fm_backbone_lr_scale", 1.5, "a number in [0, 1]"), ("fm_backbone_lr_scale", -0.1, "a number in [0, 1]"),
    ("fm_warmup", -1.0, f"a number in [0, {MAX_EPOCHS}]"),
    ("fm_warmup", float("inf"), f"a number in [0, {MAX_EPOCHS}]"),
    ("st_rounds", 0, STEPS), ("st_per_class", 0, COUNT), ("st_steps", True, STEPS),
    ("st_threshold", 1.0, "a number in [0, 1)"), ("st_threshold", -0.2, "a number in [0, 1)"),
    ("st_labeled_fraction", 1.0, "a number in (0, 1)"), ("st_labeled_fraction", 0.0, "a number in (0, 1)"),
    ("st_lr", -1e-3, "a number > 0"),
])
def test_bad_semi_supervised_settings_name_the_setting_the_value_and_what_is_allowed(field, value, allowed):
    from dataclasses import replace

    from sslab.evaluate import EvalConfig
    with pytest.raises(ValueError) as info:
        replace(EvalConfig(), **{field: value}).validate()
    assert str(info.value) == f"{field}={value!r} is not allowed; allowed: {allowed}"


@pytest.mark.parametrize("value", ["flexmatch", "Fixed", "", None, 0.95])
def test_a_bad_fixmatch_threshold_mode_is_one_line_naming_the_modes(value):
    from sslab.evaluate import EvalConfig
    with pytest.raises(ValueError) as info:
        EvalConfig(fm_threshold_mode=value).validate()
    assert str(info.value) == f"fm_threshold_mode={value!r} is not known; allowed: fixed, freematch"


def test_semi_supervised_settings_at_the_ends_of_their_ranges_are_allowed():
    from sslab.evaluate import EvalConfig
    EvalConfig(fm_threshold=0.0, fm_ema=0.0, st_threshold=0.0, st_labeled_fraction=0.999).validate()
    EvalConfig(fm_threshold_mode="freematch", fm_sat_momentum=0.0).validate()
    EvalConfig(fm_threshold_mode="fixed", fm_sat_momentum=0.999).validate()
    EvalConfig(fm_threshold=1.0, fm_mu=1, fm_batch=1, st_rounds=1, st_per_class=1).validate()


@pytest.mark.parametrize("protocol, field, value", [("selftrain", "st_rounds", 0),
                                                    ("selftrain", "st_labeled_fraction", 1.0),
                                                    ("fixmatch", "fm_threshold", 1.5), ("fixmatch", "fm_ema", 1.0),
                                                    ("fixmatch", "fm_mu", 0),
                                                    ("fixmatch", "fm_sat_momentum", 1.0)])
def test_semi_supervised_cells_refuse_bad_settings_before_any_work(complete_run, protocol, field, value, monkeypatch,
                                                                   tmp_path):
    from sslab import evaluate as ev
    from sslab.evaluate import cells, fixmatch, selftrain

    def forbidden(*args, **kwargs):
        raise AssertionError("dataset work or training started before the settings were checked")

    monkeypatch.setattr(cells, "dataset_splits", forbidden)
    monkeypatch.setattr(cells, "fit", forbidden)
    monkeypatch.setattr(selftrain, "labelprop_of", forbidden)
    monkeypatch.setattr(fixmatch, "classifier_from_probe", forbidden)
    config = ev.EvalConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field}={value!r} is not allowed; allowed: "):
        getattr(ev, f"{protocol}_cell")(complete_run, 2, device="cpu", out=str(tmp_path), config=config)
    with pytest.raises(ValueError, match=rf"^{field}={value!r} is not allowed; allowed: "):
        ev.label_curve([complete_run], budgets=[2], seeds=[0], protocols=[protocol], device="cpu", out=str(tmp_path),
                       config=config, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.filterwarnings("ignore:.*has no test/ folder")
def test_curve_accepts_the_semi_supervised_protocols(monkeypatch, tmp_path, capsys):
    """``curve --protocols probe,labelprop,selftrain,fixmatch`` passes every check and reaches the
    sweep with those protocols (pretraining and the sweep are stand-ins here)."""
    from types import SimpleNamespace

    import sslab.evaluate as evaluate

    class Swept(Exception):
        pass

    def sweep(runs, budgets, seeds, *args, **kwargs):
        raise Swept(kwargs["protocols"], budgets, seeds)

    monkeypatch.setattr(pretrain_module, "pretrain", lambda config, **kwargs: SimpleNamespace(path=tmp_path / "run"))
    monkeypatch.setattr(evaluate, "label_curve", sweep)
    root = grey_folder(tmp_path / "images", per_class=3)
    argv = ["curve", "--methods", "rotation", "--dataset", f"folder:{root}", "--budgets", "1", "--seeds", "0",
            "--val-per-class", "1", "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(Swept) as info:
        main(argv + ["--protocols", "fixmatch,probe,selftrain,labelprop"])
    assert info.value.args == (("probe", "labelprop", "selftrain", "fixmatch"), [1], [0])  # in the lab's order
    with pytest.raises(Swept) as info:
        main(argv + ["--protocols", "selftrain,fixmatch", "--finetune"])
    assert info.value.args[0] == ("finetune", "selftrain", "fixmatch")
    capsys.readouterr()
    err = cli(capsys, *argv, "--protocols", "probe,fixmatch,mixmatch")
    assert "--protocols='probe,fixmatch,mixmatch'" in err and "'mixmatch' is not one" in err
    assert "probe, finetune, labelprop, selftrain, fixmatch, scratch" in err
    err = cli(capsys, *argv, "--protocols", "selftrain,selftrain")
    assert "--protocols='selftrain,selftrain'" in err and "without repeats" in err
    assert not (tmp_path / "out" / "runs").exists()


def test_probe_command_accepts_the_semi_supervised_protocols(complete_run, monkeypatch, tmp_path, capsys):
    import sslab.evaluate as evaluate
    computed = []

    def cell(protocol, budget, seed, run, cfg, *args):
        computed.append((protocol, budget, seed, run.path))
        return {"method": run.method, "protocol": protocol, "head": "mlp", "layer": cfg.layer, "budget": budget,
                "seed": seed, "top1": 0.5, "top5": None, "epochs": 1}

    monkeypatch.setattr(evaluate, "compute_cell", cell)
    code = main(["probe", "--run", str(complete_run.path), "--labels", "2", "--out", str(tmp_path), "--device", "cpu",
                 "--protocols", "fixmatch,labelprop,selftrain", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert computed == [(p, 2, 0, complete_run.path) for p in ("labelprop", "selftrain", "fixmatch")]
    assert [line.split()[1] for line in out] == ["labelprop", "selftrain", "fixmatch"]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--labels", "2", "--protocols", "fixmatch", "--fm-steps", "99999999999999999999"],
     f"--fm-steps=99999999999999999999 is not allowed; allowed: an integer from 1 to {MAX_STEPS}"),
    (["evaluate", "--labels", "2", "--protocols", "selftrain", "--st-steps", "10000001"],
     f"--st-steps=10000001 is not allowed; allowed: an integer from 1 to {MAX_STEPS}"),
    (["evaluate", "--labels", "99999999999999999999"],
     f"--labels=99999999999999999999 is not allowed; allowed: an integer from 1 to {MAX_COUNT}"),
    (["evaluate", "--labels", "2", "--protocols", "labelprop", "--choice-margin", "-1"],
     "--choice-margin=-1.0 is not allowed; allowed: a number in [0, 10]"),
    (["evaluate", "--labels", "2", "--protocols", "labelprop", "--choice-folds", "0"],
     "--choice-folds=0 is not allowed; allowed: an integer from 1 to 20"),
    (["evaluate", "--labels", "2", "--selection", "typical", "--select-starts", "0"],
     "--select-starts=0 is not allowed; allowed: an integer from 1 to 1000 (k-means starts)"),
    (["evaluate", "--labels", "2", "--protocols", "labelprop", "--lp-balance", "-1"],
     f"--lp-balance=-1 is not allowed; allowed: an integer from 0 to {MAX_STEPS} (Sinkhorn steps; 0: none)"),
    (["evaluate", "--labels", "2", "--protocols", "selftrain", "--st-start", "teacher"],
     "--st-start='teacher' is not known; allowed: fresh, probe"),
    (["evaluate", "--labels", "2", "--protocols", "selftrain", "--st-predict", "vote"],
     "--st-predict='vote' is not known; allowed: blend, auto, graph, head, both"),
    (["evaluate", "--labels", "2", "--protocols", "fixmatch", "--fm-backbone-lr-scale", "2"],
     "--fm-backbone-lr-scale=2.0 is not allowed; allowed: a number in [0, 1]"),
    (["evaluate", "--labels", "2", "--protocols", "fixmatch", "--fm-warmup", "-1"],
     f"--fm-warmup=-1.0 is not allowed; allowed: a number in [0, {MAX_EPOCHS}]"),
    (["evaluate", "--labels", "2", "--protocols", "selftrain", "--st-rounds", "0"],
     f"--st-rounds=0 is not allowed; allowed: an integer from 1 to {MAX_STEPS}"),
    (["evaluate", "--labels", "2", "--protocols", "selftrain", "--st-per-class", "0"],
     f"--st-per-class=0 is not allowed; allowed: an integer from 1 to {MAX_COUNT} (pseudo-labels per class)"),
])
def test_step_and_count_flags_have_an_upper_bound_that_names_itself(complete_run, argv, message, tmp_path, capsys):
    """--fm-steps 99999999999999999999 was accepted: a run of 10^16 hours."""
    code = main([argv[0], "--run", str(complete_run.path), *argv[1:], "--out", str(tmp_path / "cells"), "--device",
                 "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "cells").exists()
