"""The run store refuses damaged and foreign files, and every user error is one line.

Each test damages, swaps or starves what the store reads (flipped bytes, a VAE's weights in a
rotation run, a full disk, a changed image folder, an exploding learning rate, a bad name or
YAML value) and checks the documented outcome: one line naming the file or value and what to
do, exit code 2, and every file that was there before byte-identical after (or, for a cache,
a rebuild). The runs are tiny (32 px noise, width 0.125, 32 images) so each test takes seconds.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import sslab.pretrain as pretrain_module
from sslab import data, integrity, store
from sslab.cli import main
from sslab.evaluate import EvalConfig, features, finetune_cell, label_curve, probe_cell, scratch_cell
from sslab.evaluate import cells as cells_module
from sslab.evaluate.cells import ROW_KEYS, cell_folder, protocol_key
from sslab.pretrain import PretrainConfig, load_run, pretrain, run_folder
from sslab.train import TrainConfig, TrainingDiverged, check_divergence, fit

TINY_EVAL = EvalConfig(val_per_class=2, probe_epochs=2, scratch_epochs=1, finetune_epochs=1, samples_per_epoch=16,
                       batch_size=16, probe_patience=0, scratch_patience=0, finetune_patience=0)


# ---------------------------------------------------------------- helpers

def make_images(root: Path, classes: int = 2, per_class: int = 16, test_per_class: int = 4, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: 32 px grey noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(folder / f"{i}.png")
    return root


def tiny(images: Path, method: str = "rotation", **overrides) -> PretrainConfig:
    values = dict(method=method, dataset=f"folder:{images}", epochs=1, width=0.125, limit=16)
    values.update(overrides)
    return PretrainConfig(**values)


def cli_args(images: Path, out: Path, *extra: str) -> list:
    return ["pretrain", "--dataset", f"folder:{images}", "--epochs", "1", "--width", "0.125", "--limit", "16",
            "--device", "cpu", "--out", str(out), "--no-progress", "--checkpoint-every", "0", *extra]


def one_error_line(capsys, argv) -> str:
    """Run the command line in-process: exit code 2 and exactly one line, ``error: …``."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def digests(root: Path) -> dict:
    """sha256 of every file under ``root``: what 'byte-identical' compares."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def damage(path: Path, count: int = 64, zero: bool = False) -> None:
    """Flip (or zero) ``count`` bytes in the middle of ``path``."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    for i in range(middle, min(middle + count, len(raw))):
        raw[i] = 0 if zero else raw[i] ^ 0xFF
    path.write_bytes(bytes(raw))


def damage_tensor_data(path: Path) -> None:
    """Flip the first byte of the first tensor stored in a torch (zip) file: the file still loads
    without a CRC check, with one wrong number."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[member.header_offset + 26:member.header_offset + 30])
    raw[member.header_offset + 30 + name_length + extra_length] ^= 0x01
    path.write_bytes(bytes(raw))


def change_a_digit(path: Path) -> None:
    """Change one digit in the second half of a JSON file: still valid JSON, only a number is
    wrong, which only the recorded checksum can tell."""
    text = path.read_text()
    at = next(i for i in range(len(text) // 2, len(text)) if text[i].isdigit())
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
    json.loads(path.read_text())


def partial_run(config: PretrainConfig, out: Path, monkeypatch) -> Path:
    """A run killed after its last checkpoint, before model.pt: the folder a resume starts from."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pretrain_module, "evaluate_task", killed)
        with pytest.raises(KeyboardInterrupt):
            pretrain(config, device="cpu", out=str(out), progress=False, checkpoint_every=0)
    folder = run_folder(config.resolved(torch.device("cpu")), str(out))
    assert (folder / "checkpoint.pt").is_file() and not store.is_complete(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def store_with_runs(images, tmp_path_factory) -> Path:
    """An outputs folder with a complete rotation run, a VAE run, a rotation run of another width,
    and a probe cell of the rotation run (its head, split and feature caches)."""
    out = tmp_path_factory.mktemp("store")
    for config in (tiny(images), tiny(images, "vae"), tiny(images, width=0.25)):
        pretrain(config, device="cpu", out=str(out), progress=False, eval_limit=8)
    rotation = load_run(run_folder(tiny(images).resolved(torch.device("cpu")), str(out)))
    probe_cell(rotation, 2, 0, device="cpu", out=str(out), config=TINY_EVAL)
    return out


@pytest.fixture
def outputs(store_with_runs, tmp_path) -> Path:
    """A private copy of :func:`store_with_runs` that a test may damage."""
    copy = tmp_path / "out"
    shutil.copytree(store_with_runs, copy)
    features._FEATURES.clear()  # each test reads the copy's files, not another test's memory
    return copy


def the_run(out: Path, images: Path, **overrides):
    return load_run(run_folder(tiny(images, **overrides).resolved(torch.device("cpu")), str(out)))


# ---------------------------------------------------------------- damaged files (1, 9)

def test_every_file_the_store_writes_records_its_sha256(outputs, images):
    run = the_run(outputs, images)
    (cell,) = [p for p in (outputs / "runs").iterdir() if p.name.startswith("eval-")]
    written = [run.path / n for n in ("config.json", "model.pt", store.COMPLETE)]
    written += [cell / n for n in ("config.json", "split.pt", "head.pt", "metrics.json", store.COMPLETE)]
    written += sorted(run.path.glob("features-*.pt"))
    assert len(written) == 10
    for path in written:
        line = integrity.sums_path(path).read_text()
        assert line == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n", path  # sha256sum -c
    assert not (run.path / "checkpoint.pt").exists() and not integrity.sums_path(run.path / "checkpoint.pt").exists()


def test_flipped_bytes_in_a_partial_runs_checkpoint_stop_the_resume(images, tmp_path, monkeypatch, capsys):
    """torch.load does not check zip CRCs: a damaged checkpoint used to resume to rot_acc 0.34."""
    out = tmp_path / "out"
    folder = partial_run(tiny(images), out, monkeypatch)
    damage(folder / "checkpoint.pt")
    before = digests(out)
    err = one_error_line(capsys, cli_args(images, out))
    assert f"{folder / 'checkpoint.pt'} is damaged" in err and "delete" in err
    assert "could run code" not in err  # damage is not the unsafe-pickle refusal
    assert digests(out) == before and not store.is_complete(folder)


def test_zeroed_weights_in_model_pt_stop_the_probe(outputs, images, capsys):
    """Zeroed conv2 weights used to be probed and stored as a result (64.55 % instead of 62.86 %)."""
    run = the_run(outputs, images)
    damage(run.path / "model.pt", 4096, zero=True)
    before = digests(outputs)
    err = one_error_line(capsys, ["probe", "--run", str(run.path), "--labels", "3", "--device", "cpu",
                                  "--out", str(outputs), "--no-progress"])
    assert f"{run.path / 'model.pt'} is damaged" in err
    assert digests(outputs) == before


def _damage_run_json(out: Path, images: Path, name: str):
    run = the_run(out, images)
    change_a_digit(run.path / name)
    return run.path / name, lambda: load_run(run.path)


def _damage_cell_metrics(out: Path, images: Path, name: str):
    (cell,) = [p for p in (out / "runs").iterdir() if p.name.startswith("eval-")]
    change_a_digit(cell / name)
    return cell / name, lambda: probe_cell(the_run(out, images), 2, 0, device="cpu", out=str(out), config=TINY_EVAL)


def _damage_head(out: Path, images: Path, name: str):
    (cell,) = [p for p in (out / "runs").iterdir() if p.name.startswith("eval-")]
    damage(cell / name)
    return cell / name, lambda: finetune_cell(the_run(out, images), 2, 0, device="cpu", out=str(out),
                                              config=TINY_EVAL)


def _damage_split(out: Path, images: Path, name: str):
    (cell,) = [p for p in (out / "runs").iterdir() if p.name.startswith("eval-")]
    damage_tensor_data(cell / name)
    torch.load(cell / name, weights_only=True)  # what torch alone would have taken as intact
    return cell / name, lambda: store.load_torch(cell / name)


@pytest.mark.parametrize("name, make", [("config.json", _damage_run_json), (store.COMPLETE, _damage_run_json),
                                        ("metrics.json", _damage_cell_metrics), ("head.pt", _damage_head),
                                        ("split.pt", _damage_split)])
def test_damaged_stored_files_are_named_and_left_alone(outputs, images, name, make):
    path, read = make(outputs, images, name)
    before = digests(outputs)
    with pytest.raises(integrity.DamagedFile) as info:
        read()
    message = str(info.value)
    assert message.startswith(f"{path} is damaged") and "\n" not in message and "delete" in message
    assert digests(outputs) == before


def test_a_damaged_split_of_a_complete_cell_is_named_when_the_cell_is_read(outputs, images):
    """A complete cell's split.pt used to be trusted unread: its damage went unreported."""
    (cell,) = [p for p in (outputs / "runs").iterdir() if p.name.startswith("eval-")]
    damage_tensor_data(cell / "split.pt")
    before = digests(outputs)
    with pytest.raises(integrity.DamagedFile) as info:
        probe_cell(the_run(outputs, images), 2, 0, device="cpu", out=str(outputs), config=TINY_EVAL)
    assert str(info.value).startswith(f"{cell / 'split.pt'} is damaged") and "\n" not in str(info.value)
    assert digests(outputs) == before


@pytest.mark.parametrize("name", ["metrics.json", "split.pt"])
def test_a_result_copied_from_the_cell_of_another_setting_is_refused(outputs, images, name, capsys):
    """metrics.json (with its checksum) copied from a cell of other settings used to be read back
    as this cell's result, and the sweep stored it."""
    run = the_run(outputs, images)
    (cell,) = [p for p in (outputs / "runs").iterdir() if p.name.startswith("eval-")]
    other = Path(probe_cell(run, 2, 0, device="cpu", out=str(outputs), config=replace(TINY_EVAL, probe_lr=5e-3))["run"])
    assert other != cell
    _swap_in(other / name, cell / name)
    before = digests(outputs)
    with pytest.raises(integrity.ForeignFile) as info:
        probe_cell(run, 2, 0, device="cpu", out=str(outputs), config=TINY_EVAL)
    assert str(info.value).startswith(f"{cell / name} belongs to something else") and "\n" not in str(info.value)
    with pytest.raises(integrity.ForeignFile):
        label_curve([run], budgets=[2], seeds=[0], protocols=["probe"], device="cpu", out=str(outputs),
                    config=TINY_EVAL, progress=False)
    assert digests(outputs) == before


def test_damaged_checkpoint_of_an_evaluation_cell_stops_its_resume(images, outputs, monkeypatch):
    """A scratch cell killed after its epochs keeps checkpoint.pt; damaged, it is refused."""
    run = the_run(outputs, images)
    monkeypatch.setattr(cells_module, "CHECKPOINT_EVERY_S", 0.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cells_module, "classification_metrics", killed)
        with pytest.raises(KeyboardInterrupt):
            scratch_cell(run, 2, 0, device="cpu", out=str(outputs), config=TINY_EVAL)
    (checkpoint,) = (outputs / "runs").glob("eval-scratch*/checkpoint.pt")
    damage(checkpoint)
    before = digests(outputs)
    with pytest.raises(integrity.DamagedFile, match=f"^{checkpoint} is damaged"):
        scratch_cell(run, 2, 0, device="cpu", out=str(outputs), config=TINY_EVAL)
    assert digests(outputs) == before


@pytest.mark.parametrize("how", ["flipped bytes", "foreign"])
def test_a_feature_cache_that_fails_is_rebuilt(outputs, images, how, capsys):
    run = the_run(outputs, images)
    cache = next(run.path.glob("features-train-*.pt"))
    if how == "foreign":  # the test split's features in the train split's file
        test_cache = next(run.path.glob("features-test-*.pt"))
        shutil.copy(test_cache, cache)
        shutil.copy(integrity.sums_path(test_cache), integrity.sums_path(cache))
    else:
        damage(cache)
    row = probe_cell(run, 2, 1, device="cpu", out=str(outputs), config=TINY_EVAL)
    assert 0 <= row["top1"] <= 1
    integrity.verify(cache)  # rewritten, intact, and made by this run's train split
    assert store.load_torch(cache)["provenance"]["split"] == "train"
    if how == "flipped bytes":
        assert "rebuilding the feature cache" in capsys.readouterr().err


def test_a_few_rows_added_to_a_large_feature_cache_go_to_a_file_of_their_own(outputs, images):
    from sslab.evaluate.features import cached_features
    run = the_run(outputs, images)
    for path in list(run.path.glob("features-*")):
        path.unlink()
    features._FEATURES.clear()
    many, few, more = torch.arange(0, 20), torch.tensor([25, 21, 23]), torch.tensor([24, 27])
    reference = cached_features(run, "train", "conv2", 2, "cpu", index=torch.cat([many, few, more]))
    (cache,) = run.path.glob("features-train-*.pt")  # one file: the rows computed in one call
    for path in list(run.path.glob("features-*")):
        path.unlink()
    features._FEATURES.clear()
    cached_features(run, "train", "conv2", 2, "cpu", index=many)
    before = cache.read_bytes()
    first = cached_features(run, "train", "conv2", 2, "cpu", index=few)
    cached_features(run, "train", "conv2", 2, "cpu", index=more)
    added = sorted(run.path.glob("features-train-*.more-*.pt"))
    # the cache is not written again for 3 and 2 rows: each addition has its file, with its checksum
    assert cache.read_bytes() == before and len(added) == 2
    for path in added:
        integrity.verify(path)
    # another process reads the cache and the added rows: the same numbers, nothing computed again
    features._FEATURES.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("computed again"))
        again = cached_features(run, "train", "conv2", 2, "cpu", index=torch.cat([many, few, more]))
    assert torch.equal(again, reference) and torch.equal(again[20:23], first)
    # a damaged file of added rows is left out: its rows are computed again
    damage(added[0])
    features._FEATURES.clear()
    assert torch.equal(cached_features(run, "train", "conv2", 2, "cpu", index=torch.cat([many, few, more])),
                       reference)
    # more new rows than half of what the cache would hold: one whole cache again, without the files it holds
    for path in list(run.path.glob("features-*")):
        path.unlink()
    features._FEATURES.clear()
    cached_features(run, "train", "conv2", 2, "cpu", index=torch.arange(0, 4))
    cached_features(run, "train", "conv2", 2, "cpu", index=torch.tensor([4]))
    assert len(list(run.path.glob("features-train-*.more-*.pt"))) == 1
    whole = cached_features(run, "train", "conv2", 2, "cpu", index=torch.arange(0, 15))
    assert not list(run.path.glob("features-train-*.more-*.pt"))
    saved = store.load_torch(cache)
    assert sorted(saved["rows"].tolist()) == list(range(15))
    assert torch.equal(saved["features"][saved["rows"].argsort()], whole)


def test_a_file_without_its_checksum_is_checked_by_its_zip_crcs(tmp_path):
    path = tmp_path / "weights.pt"
    store.save_torch(path, {"w": torch.arange(4096, dtype=torch.float32)})
    integrity.sums_path(path).unlink()  # copied without it, or written before checksums
    assert store.load_torch(path)["w"].sum() > 0
    damage(path, 64)
    with pytest.raises(integrity.DamagedFile, match="fails its zip CRC check"):
        store.load_torch(path)


def test_a_kill_between_the_checksum_and_the_rename_leaves_a_file_that_verifies(tmp_path, monkeypatch):
    """The sidecar lists the new digest before the new file replaces the old one, and keeps the
    old digest until after: a kill between the two leaves the old file, still verified."""
    import os
    path = tmp_path / "checkpoint.pt"
    store.save_torch(path, {"epoch": 0})
    real = os.replace

    def killed_at_the_rename(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        store.save_torch(path, {"epoch": 1})
    monkeypatch.undo()
    assert len(integrity.sums_path(path).read_text().splitlines()) == 2
    assert store.load_torch(path)["epoch"] == 0
    store.save_torch(path, {"epoch": 2})
    assert len(integrity.sums_path(path).read_text().splitlines()) == 1 and store.load_torch(path)["epoch"] == 2


@pytest.mark.parametrize("text, problem", [('{"method": "rotation", "dataset": "x', "Unterminated string"),
                                           ("", "Expecting value")])
def test_json_that_does_not_parse_is_named_with_the_fix(outputs, images, text, problem, capsys):
    """Without a checksum to compare (deleted with the damage), the parser's error names the file."""
    run = the_run(outputs, images)
    (run.path / "config.json").write_text(text)
    integrity.sums_path(run.path / "config.json").unlink()
    before = digests(outputs)
    err = one_error_line(capsys, ["probe", "--run", str(run.path), "--labels", "2", "--device", "cpu",
                                  "--out", str(outputs)])
    assert f"{run.path / 'config.json'} is damaged: it is not valid JSON ({problem}" in err
    assert f"delete the folder {run.path}" in err
    assert digests(outputs) == before


def test_a_cell_row_without_a_key_is_named_not_a_key_error(outputs, images, capsys):
    (cell,) = [p for p in (outputs / "runs").iterdir() if p.name.startswith("eval-")]
    row = store.read_json(cell / "metrics.json")
    del row["top1"]
    store.write_json(cell / "metrics.json", row)  # a valid checksum: only the key is missing
    before = digests(outputs)
    with pytest.raises(integrity.DamagedFile) as info:
        probe_cell(the_run(outputs, images), 2, 0, device="cpu", out=str(outputs), config=TINY_EVAL)
    assert str(info.value).startswith(f"{cell / 'metrics.json'} is damaged: it has no 'top1'")
    assert "top1" in ROW_KEYS and digests(outputs) == before


# ---------------------------------------------------------------- foreign files (2)

def _swap_in(source: Path, target: Path) -> None:
    shutil.copy(source, target)
    shutil.copy(integrity.sums_path(source), integrity.sums_path(target))


@pytest.mark.parametrize("donor, expected", [({"method": "vae"}, "method=vae"),
                                             ({"width": 0.25}, "backbone (arch=alexnet image_size=32 in_channels=1 "
                                                               "width=0.25)")])
def test_weights_of_another_run_are_refused_by_the_probe(outputs, images, donor, expected, capsys):
    """A VAE's model.pt in a rotation folder used to be probed and stored as a rotation result."""
    run, other = the_run(outputs, images), the_run(outputs, images, **donor)
    _swap_in(other.path / "model.pt", run.path / "model.pt")
    before = digests(outputs)
    err = one_error_line(capsys, ["probe", "--run", str(run.path), "--labels", "3", "--device", "cpu",
                                  "--out", str(outputs), "--no-progress"])
    assert f"{run.path / 'model.pt'} belongs to something else: it holds kind=model, " in err
    assert expected in err and "where this run expects kind=model" in err
    assert digests(outputs) == before
    with pytest.raises(integrity.ForeignFile):
        run.load_task()


def test_weights_without_a_provenance_record_are_refused(outputs, images):
    run = the_run(outputs, images)
    state = torch.load(run.path / "model.pt", weights_only=True)
    del state["provenance"]
    store.save_torch(run.path / "model.pt", state)
    with pytest.raises(integrity.ForeignFile, match="does not say what made it"):
        run.load_backbone()


def test_a_model_in_place_of_a_checkpoint_is_refused(outputs, images, tmp_path, monkeypatch, capsys):
    """A complete model.pt copied over a checkpoint used to fail with KeyError 'optimizer'."""
    out = tmp_path / "partial"
    folder = partial_run(tiny(images, epochs=2), out, monkeypatch)
    _swap_in(the_run(outputs, images).path / "model.pt", folder / "checkpoint.pt")
    before = digests(out)
    err = one_error_line(capsys, cli_args(images, out, "--epochs", "2"))
    assert f"{folder / 'checkpoint.pt'} belongs to something else: it holds kind=model" in err
    assert "where this run expects kind=checkpoint" in err and "delete" in err
    assert digests(out) == before


def test_a_checkpoint_of_another_width_is_refused(images, tmp_path, monkeypatch, capsys):
    """Another width's checkpoint used to fail with a size-mismatch traceback."""
    narrow = partial_run(tiny(images, epochs=2), tmp_path / "a", monkeypatch)
    wide = partial_run(tiny(images, epochs=2, width=0.25), tmp_path / "b", monkeypatch)
    _swap_in(wide / "checkpoint.pt", narrow / "checkpoint.pt")
    before = digests(tmp_path / "a")
    err = one_error_line(capsys, cli_args(images, tmp_path / "a", "--epochs", "2"))
    assert f"{narrow / 'checkpoint.pt'} belongs to something else" in err and "width=0.25" in err
    assert digests(tmp_path / "a") == before


def test_fit_refuses_a_checkpoint_that_does_not_fit_its_model(tmp_path, make_image_set):
    """Without a provenance to compare (fit called directly), the shapes and keys still are."""
    from sslab.models import BackboneConfig
    from sslab.pretext import build_task
    images = make_image_set(n=16, size=28).images
    cfg = TrainConfig(epochs=1, batch_size=8)
    checkpoint = tmp_path / "checkpoint.pt"
    fit(build_task("rotation", BackboneConfig(1, 28, 0.25)), (images,), cfg, torch.device("cpu"),
        checkpoint=checkpoint, progress=False)
    with pytest.raises(integrity.ForeignFile, match="holds the weights of another model"):
        fit(build_task("rotation", BackboneConfig(1, 28, 0.125)), (images,), cfg, torch.device("cpu"),
            checkpoint=checkpoint, progress=False)
    store.save_torch(checkpoint, {"model": {}, "backbone": {}, "method": "rotation"})
    with pytest.raises(integrity.ForeignFile, match="is not a training checkpoint .*optimizer"):
        fit(build_task("rotation", BackboneConfig(1, 28, 0.125)), (images,), cfg, torch.device("cpu"),
            checkpoint=checkpoint, progress=False)


def test_the_store_format_is_in_every_config_hash_and_every_provenance(tmp_path, monkeypatch):
    config = {"method": "rotation", "epochs": 3}
    path = tmp_path / "model.pt"
    store.save_torch(path, {"w": torch.ones(2)}, provenance=integrity.provenance("model", method="rotation"))
    before = store.config_hash(config)
    newer = integrity.STORE_FORMAT + 1
    for module in (store, integrity):  # the store hashes with it, integrity checks records against it
        monkeypatch.setattr(module, "STORE_FORMAT", newer)
    assert store.config_hash(config) != before  # a new format never reuses old runs or cells
    with pytest.raises(integrity.ForeignFile, match="store_format=2 where this run expects kind=model, store_format=3"):
        store.load_torch(path, expect={"kind": "model", "method": "rotation"})


def test_a_new_version_of_the_arithmetic_never_reuses_stored_runs_or_cells(tmp_path, monkeypatch):
    config = {"method": "rotation", "epochs": 3}
    before = store.config_hash(config)
    monkeypatch.setattr(store, "RESULTS_VERSION", store.RESULTS_VERSION + 1)
    assert store.config_hash(config) != before
    monkeypatch.setattr(store, "RESULTS_VERSION", 1)  # the hash stores made before the version existed
    relevant = {**config, "store_format": integrity.STORE_FORMAT}
    text = json.dumps(relevant, sort_keys=True, default=str, separators=(",", ":"))
    assert store.config_hash(config) == hashlib.sha256(text.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- what the hash covers (3)

def test_sync_bn_is_part_of_the_pretraining_config(images, tmp_path, monkeypatch):
    """SyncBatchNorm runs only under torchrun on CUDA; what is checked here is that asking for it
    gives the run a folder of its own."""
    plain = tiny(images).resolved(torch.device("cpu"))
    synced = replace(tiny(images), sync_bn=True).resolved(torch.device("cpu"))
    assert run_folder(plain) != run_folder(synced)
    asked, folders = [], []
    monkeypatch.setattr(pretrain_module.distributed, "from_environment",
                        lambda device, sync_bn: asked.append(sync_bn))
    monkeypatch.setattr(pretrain_module, "_pretrain_in_store", lambda config, dev, folder, *a: folders.append(folder))
    pretrain(tiny(images), device="cpu", out=str(tmp_path), sync_bn=True)
    pretrain(tiny(images), device="cpu", out=str(tmp_path))
    assert asked == [True, False]
    assert folders == [run_folder(synced, str(tmp_path)), run_folder(plain, str(tmp_path))]
    with pytest.raises(ValueError, match="sync_bn='yes' is not allowed"):
        replace(tiny(images), sync_bn="yes").resolved(torch.device("cpu"))


def test_a_changed_image_folder_gets_new_runs_and_new_cells(tmp_path):
    """Adding an image or moving one to another class used to reuse the old run and its cells."""
    root = make_images(tmp_path / "images")
    out = tmp_path / "out"
    config = tiny(root)
    first = pretrain(config, device="cpu", out=str(out), progress=False, eval_limit=8)
    scratch_cells = [cell_folder(protocol_key("scratch", first, 2, 0, TINY_EVAL), str(out))]
    before = digests(out)
    from PIL import Image
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(root / "train" / "class0" / "new.png")
    added = pretrain(config, device="cpu", out=str(out), progress=False, eval_limit=8)
    scratch_cells.append(cell_folder(protocol_key("scratch", added, 2, 0, TINY_EVAL), str(out)))
    (root / "train" / "class0" / "new.png").rename(root / "train" / "class1" / "new.png")
    moved = pretrain(config, device="cpu", out=str(out), progress=False, eval_limit=8)
    scratch_cells.append(cell_folder(protocol_key("scratch", moved, 2, 0, TINY_EVAL), str(out)))
    assert len({first.path, added.path, moved.path}) == 3
    assert len(set(scratch_cells)) == 3
    assert {k: v for k, v in digests(out).items() if k in before} == before  # the old run is untouched
    assert len(data.load_dataset(config.dataset).train) == 33  # the in-memory copy follows the folder too


def test_the_fingerprint_ignores_what_the_loader_ignores(tmp_path):
    root = make_images(tmp_path / "images", per_class=2, test_per_class=1)
    name = str(root)
    before = data.folder_fingerprint(name)
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    (root / "README").write_text("about the images")
    assert data.folder_fingerprint(name) == before
    (root / "test" / "class0" / "0.png").unlink()
    assert data.folder_fingerprint(name) != before


# ---------------------------------------------------------------- malformed YAML (4)

@pytest.mark.parametrize("argv, expected", [
    (["-p", "labels", "[1"], ["-p labels '[1' is not allowed: line 1 column 3: expected ',' or ']'",
                              "allowed: a YAML value"]),
    (["-p", "seeds", "{a: [}"], ["-p seeds '{a: [}' is not allowed: line 1"]),
])
def test_a_malformed_parameter_value_is_one_line(argv, expected, capsys):
    from sslab.lab.notebooks import main as lab_main
    assert lab_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err
    assert not (store.outputs_root() / "notebooks").exists()


@pytest.mark.parametrize("text, expected", [
    ("labels: [1\nseeds: 0\n", "line 2 column 6: expected ',' or ']'"),
    ("labels: 4\n  bad indent: 1\n", "line 2 column 13: mapping values are not allowed here"),
    ("x: !!python/object/apply:os.system ['touch {marker}']\n",
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'; only plain "
     "values are read"),
])
def test_a_malformed_params_file_is_one_line_and_runs_nothing(tmp_path, text, expected, capsys):
    from sslab.lab.notebooks import main as lab_main
    marker = tmp_path / "code-ran"
    params = tmp_path / "params.yml"
    params.write_text(text.format(marker=marker))
    assert lab_main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --params='{params}' is not allowed: ") and err.count("\n") == 1, err
    assert expected in err
    assert not marker.exists() and not (store.outputs_root() / "notebooks").exists()


# ---------------------------------------------------------------- a full disk (5)

def _full_disk(kind: str):
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # a writer dies part-way
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    return save


@pytest.mark.parametrize("kind", ["ENOSPC", "zip writer"])
def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch, kind):
    path = tmp_path / "checkpoint.pt"
    store.save_torch(path, {"epoch": torch.tensor(1)})
    before = digests(tmp_path)
    monkeypatch.setattr(torch, "save", _full_disk(kind))
    with pytest.raises(integrity.StoreFull) as info:
        store.save_torch(path, {"epoch": torch.tensor(2)})
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith("no space left on ") and "\n" not in message
    assert f"to write {path}: the previous checkpoint.pt is intact" in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert digests(tmp_path) == before  # no temporary file, the old file and its checksum as they were
    assert store.load_torch(path)["epoch"] == 1


def test_a_full_disk_while_appending_metrics_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    store.append_jsonl(path, {"epoch": 0})

    def no_room(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", no_room)
    with pytest.raises(integrity.StoreFull, match=f"^no space left on .* to write {path}: "):
        store.append_jsonl(path, {"epoch": 1})
    monkeypatch.undo()
    assert store.read_jsonl(path)[0] == {"epoch": 0}


def test_a_full_disk_during_pretraining_resumes_bit_for_bit(images, tmp_path, monkeypatch, capsys):
    """The disk fills at the second checkpoint: one line, the first checkpoint kept, and the
    same command afterwards ends with the weights of a run that never stopped."""
    clean = pretrain(tiny(images, epochs=3), device="cpu", out=str(tmp_path / "clean"), progress=False,
                     deterministic=True, checkpoint_every=0, eval_limit=8)
    real, saves = torch.save, []

    def fills_up(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            return _full_disk("ENOSPC")(obj, f)
        return real(obj, f, *args, **kwargs)

    out = tmp_path / "full"
    argv = cli_args(images, out, "--epochs", "3", "--deterministic")
    monkeypatch.setattr(torch, "save", fills_up)
    err = one_error_line(capsys, argv)
    monkeypatch.undo()
    assert "no space left on " in err and "checkpoint.pt: the previous checkpoint.pt is intact" in err
    (folder,) = (out / "runs").iterdir()
    assert store.load_torch(folder / "checkpoint.pt")["epoch"] == 0
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().err
    resumed, reference = store.load_torch(folder / "model.pt")["model"], store.load_torch(clean.path / "model.pt")
    for name, value in reference["model"].items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.parametrize("kind", ["ENOSPC", "zip writer"])
def test_a_feature_cache_that_does_not_fit_leaves_the_probe_alone(outputs, images, monkeypatch, kind):
    run = the_run(outputs, images)
    for cache in run.path.glob("features-*"):
        cache.unlink()
    real = store.save_torch

    def no_room_for_caches(path, obj, *args, **kwargs):
        if Path(path).name.startswith("features-"):
            return store._atomic(path, lambda f: _full_disk(kind)(obj, f), checksum=True)
        return real(path, obj, *args, **kwargs)

    monkeypatch.setattr(store, "save_torch", no_room_for_caches)
    row = probe_cell(run, 3, 0, device="cpu", out=str(outputs), config=TINY_EVAL)
    assert 0 <= row["top1"] <= 1 and not list(run.path.glob("features-*"))


# ---------------------------------------------------------------- names of tables (6)

@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr("sslab.data.load_dataset", forbidden)
    monkeypatch.setattr(pretrain_module, "fit", forbidden)


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", "x" * 300, ".hidden", "..", "", "a b",
                                  "tab\there"])
def test_a_table_name_that_is_not_one_plain_file_name_is_refused_first(name, no_work, tmp_path, capsys):
    err = one_error_line(capsys, ["curve", "--name", name, "--out", str(tmp_path), "--no-progress"])
    assert err.startswith("error: --name=") and "allowed: one file name of 1 to 120 letters" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="^name=.* is not allowed"):
        label_curve([], scratch=True, name=name, out=str(tmp_path))


# ---------------------------------------------------------------- labels against the dataset (7)

def test_the_lab_checks_labels_and_budgets_against_the_dataset_before_any_notebook(tmp_path, monkeypatch):
    pytest.importorskip("papermill")
    from sslab import lab
    root = make_images(tmp_path / "images", per_class=14, test_per_class=1)
    ran = []
    monkeypatch.setattr("papermill.execute_notebook", lambda *args, **kwargs: ran.append(args))
    with pytest.raises(ValueError, match=r"^parameter labels=100000 is not allowed: folder:.* has too few labeled "
                                         r"images per class for 100000 with parameter val_per_class=10 validation"):
        lab.execute_notebooks({"dataset": f"folder:{root}", "labels": 100000}, ["01_pretext", "02_probe"],
                              tmp_path / "nb")
    # notebook 04's default budgets (1, 4, 16, 64) do not fit 14 images per class either
    with pytest.raises(ValueError, match=r"parameter budgets=1,4,16,64 is not allowed: .* for 16, 64 "
                                         r".*allowed: parameter budgets ≤ 4"):
        lab.execute_notebooks({"dataset": f"folder:{root}"}, ["04_label_curves"], tmp_path / "nb")
    small = make_images(tmp_path / "small", per_class=6, test_per_class=1)
    with pytest.raises(ValueError, match=r"parameter val_per_class=10 is not allowed: folder:.*'s smallest class "
                                         r"has 6"):
        lab.execute_notebooks({"dataset": f"folder:{small}", "labels": 1}, ["02_probe"], tmp_path / "nb")
    assert ran == [] and not (tmp_path / "nb").exists()


# ---------------------------------------------------------------- divergence (8)

@pytest.mark.parametrize("method, lr", [("vae", "1e39"), ("rotation", "1e308")])
def test_a_learning_rate_that_overflows_is_one_line(images, tmp_path, method, lr, capsys):
    err = one_error_line(capsys, cli_args(images, tmp_path, "--method", method, "--lr", lr))
    assert f"pretrain {method}: an update overflowed float32 in epoch 1" in err
    assert "no checkpoint of this run was written, so nothing of its training is kept" in err
    assert not list(tmp_path.glob("runs/*/model.pt")) and not list(tmp_path.glob("runs/*/complete.json"))


def test_a_loss_that_explodes_stops_the_run_and_says_what_is_kept(images, tmp_path, capsys):
    """An Adam VAE at lr 1e6 stays finite (loss 5e30) and used to be stored as complete."""
    err = one_error_line(capsys, cli_args(images, tmp_path, "--method", "vae", "--lr", "1e6", "--epochs", "3"))
    assert "pretrain vae: the loss became" in err and "over 1000× its first loss" in err
    (folder,) = (tmp_path / "runs").iterdir()
    assert f"the checkpoint after epoch 1 ({folder / 'checkpoint.pt'}) is kept" in err
    assert store.load_torch(folder / "checkpoint.pt")["epoch"] == 0 and not store.is_complete(folder)
    assert [row["epoch"] for row in store.read_jsonl(folder / "metrics.jsonl")] == [0]


def test_the_divergence_rule():
    check_divergence({"epoch": 1, "loss": 1999.0}, "x", 1, 0.1, reference=2.0)  # under 1000×: not diverged
    check_divergence({"epoch": 1, "loss": -1999.0}, "x", 1, 0.1, reference=2.0)
    check_divergence({"epoch": 0, "loss": 1e30}, "x", 0, 0.1)  # nothing to compare with
    check_divergence({"epoch": 0, "loss": 1e30}, "x", 0, 0.1, reference=0.0)
    for row in ({"epoch": 1, "loss": 2001.0}, {"epoch": 1, "loss": float("nan")}, {"epoch": 1, "loss": 1.0,
                                                                                     "kl": float("inf")}):
        with pytest.raises(TrainingDiverged, match="x: the loss became"):
            check_divergence(row, "x", 1, 0.1, reference=2.0)


def test_a_loss_that_explodes_within_the_first_epoch_is_caught(make_image_set):
    """With many steps an epoch, a loss can explode in the first one: its mean is compared with
    the run's first step, not with itself."""
    from sslab.models import BackboneConfig
    from sslab.pretext import build_task
    torch.manual_seed(0)
    task = build_task("vae", BackboneConfig(1, 28, 0.125))
    cfg = TrainConfig(epochs=1, batch_size=4, optimizer="adam", lr=1e6, schedule="constant", weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="over 1000× its first loss .* in epoch 1"):
        fit(task, (make_image_set(n=32, size=28).images,), cfg, torch.device("cpu"), progress=False)


def test_batched_probe_heads_stop_when_they_diverge():
    from sslab.evaluate.batched_heads import train_heads
    from sslab.evaluate.heads import FeatureHead
    torch.manual_seed(0)
    heads = [FeatureHead(8, 2, "linear", 16) for _ in range(2)]
    x, y = torch.randn(16, 8), torch.arange(16) % 2
    # a sane first half, then the rate jumps by 1e30: the loss explodes against the first epoch's
    cfg = TrainConfig(epochs=4, batch_size=8, optimizer="adam", lr=1e-3, schedule="step", milestones=(0.5,),
                      gamma=1e30, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="probe head 0 of this batch"):
        train_heads(heads, [(x, y)] * 2, [(x, y)] * 2, cfg, [0, 1], torch.device("cpu"))


# ---------------------------------------------------------------- metrics.jsonl (10)

def test_a_bad_line_in_metrics_jsonl_costs_only_that_line(tmp_path, make_image_set, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n{"epoch": 3}\n{"epoch": 4, "lo')
    assert [r["epoch"] for r in store.read_jsonl(path)] == [0, 2, 3]
    assert "skipped line(s) 2, 5" in capsys.readouterr().err
    # On resume the file is rebuilt from the checkpoint's history: every epoch, once, intact.
    from sslab.models import BackboneConfig
    from sslab.pretext import build_task
    images = make_image_set(n=16, size=28).images
    checkpoint, metrics = tmp_path / "checkpoint.pt", tmp_path / "run-metrics.jsonl"
    task = build_task("rotation", BackboneConfig(1, 28, 0.125))
    fit(task, (images,), TrainConfig(epochs=3, batch_size=8), torch.device("cpu"), checkpoint=checkpoint,
        metrics_path=metrics, progress=False)
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage{", *lines[1:]]) + "\n")
    fit(task, (images,), TrainConfig(epochs=4, batch_size=8), torch.device("cpu"), checkpoint=checkpoint,
        metrics_path=metrics, progress=False)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2, 3]


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_exits_130_with_one_line_and_the_same_command_resumes(images, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the last epoch's checkpoint

    argv = cli_args(images, tmp_path, "--epochs", "2")
    with monkeypatch.context() as patch:
        patch.setattr(pretrain_module, "evaluate_task", interrupted)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == "interrupted; the last complete checkpoint is kept and the same command resumes from it\n"
    (folder,) = (tmp_path / "runs").iterdir()
    assert store.load_torch(folder / "checkpoint.pt")["epoch"] == 1
    assert main(argv) == 0
    assert "resuming pretrain rotation" in capsys.readouterr().err
    assert store.read_json(folder / store.COMPLETE)["resumed_from_epoch"] == 2


# ---------------------------------------------------------------- the run that loads them is unchanged

def test_intact_files_load_as_before(outputs, images):
    """Nothing above costs an intact run anything: its weights, summary and cells read back."""
    run = the_run(outputs, images)
    task = run.load_task()
    state = torch.load(run.path / "model.pt", weights_only=True)  # still a plain torch file
    assert state["method"] == "rotation" and state["provenance"]["kind"] == "model"
    assert all(torch.equal(task.state_dict()[k], v) for k, v in state["model"].items())
    assert asdict(run.config)["width"] == 0.125
    row = probe_cell(run, 2, 0, device="cpu", out=str(outputs), config=TINY_EVAL)  # read, not computed
    assert row["run"].endswith(next(p.name for p in (outputs / "runs").iterdir() if p.name.startswith("eval-")))
