"""sslab.pretrain through its Python API: complete run folders, the cache, force, load_task."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import pytest
import torch

from sslab import store
from sslab.data import DEBIAN_FASHION_MNIST
from sslab.pretrain import PretrainConfig, evaluate_task, load_run, pretrain, unlabeled_pool

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                reason="needs the Debian package dataset-fashion-mnist")
CPU = torch.device("cpu")
EVAL = 64  # test images each run is evaluated on (kept small: these tests check plumbing, not accuracy)


def _tiny(method="rotation", **overrides) -> PretrainConfig:
    values = dict(method=method, epochs=1, limit=64, width=0.125,
                  settings={} if method == "random-init" else {"batch_size": 32})
    values.update(overrides)
    return PretrainConfig(**values)


def _pretrain(config, out, **kwargs):
    return pretrain(config, device="cpu", out=str(out), progress=False, eval_limit=EVAL, **kwargs)


@pytest.mark.parametrize("method, metrics", [
    ("rotation", {"loss", "rot_acc"}),
    ("vae", {"loss", "recon", "kl"}),
    ("siamese-vae", {"loss", "recon", "kl", "triplet"}),
    ("simclr", {"loss", "contrastive_acc"}),
])
def test_pretrain_writes_a_complete_run(tmp_path, method, metrics):
    run = _pretrain(_tiny(method), tmp_path)
    assert run.path.parent == tmp_path.resolve() / "runs"
    # Dashes separate the name's parts, so the method's own dash becomes "_".
    assert run.path.name.startswith(f"pretrain-{method.replace('-', '_')}-fashion_mnist-")
    for name in ("config.json", "model.pt", "metrics.jsonl", store.COMPLETE):
        assert (run.path / name).is_file(), name
    assert not (run.path / "checkpoint.pt").exists(), "the resume checkpoint is removed once the run is complete"
    config = json.loads((run.path / "config.json").read_text())
    assert (config["method"], config["limit"], config["width"], config["epochs"]) == (method, 64, 0.125, 1)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert metrics <= set(rows[0])
    assert run.summary["images"] == 64 and run.summary["epochs_run"] == 1
    assert {f"test_{m}" for m in metrics} <= set(run.summary)
    assert run.summary["backbone"] == {"arch": "alexnet", "in_channels": 1, "image_size": 28, "width": 0.125}
    state = torch.load(run.path / "model.pt", weights_only=True)
    assert state["method"] == method


def test_second_identical_pretrain_is_a_cache_hit_and_force_retrains(tmp_path):
    first = _pretrain(_tiny(), tmp_path)
    model = first.path / "model.pt"
    stamp, metrics = model.stat().st_mtime_ns, (first.path / "metrics.jsonl").read_text()
    again = _pretrain(_tiny(), tmp_path)
    assert again.path == first.path
    assert model.stat().st_mtime_ns == stamp, "a cache hit does not train or write again"
    assert (first.path / "metrics.jsonl").read_text() == metrics
    assert again.summary == first.summary
    # Settings that do not change the result (device, progress) share the run; the seed does not.
    other_seed = _pretrain(_tiny(seed=1), tmp_path)
    assert other_seed.path != first.path
    forced = _pretrain(_tiny(), tmp_path, force=True)
    assert forced.path == first.path
    assert model.stat().st_mtime_ns != stamp, "force trains again and replaces the run"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([first.path.name, other_seed.path.name])


def test_load_task_round_trip_gives_identical_weights(tmp_path):
    run = _pretrain(_tiny(), tmp_path)
    saved = store.load_torch(run.path / "model.pt")["model"]
    task = run.load_task("cpu")
    assert not task.training
    loaded = task.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    reloaded = load_run(run.path).load_task()
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), loaded.values()))
    # The loaded weights reproduce the test metrics recorded when the run finished.
    splits, _ = unlabeled_pool(run.config)
    again = evaluate_task(task, splits.test.images[:EVAL], precision=run.config.precision)
    for key in ("test_loss", "test_rot_acc"):
        assert again[key] == pytest.approx(run.summary[key], abs=1e-5), key


def test_limit_takes_a_seeded_subset_of_the_unlabeled_pool():
    _, first = unlabeled_pool(_tiny(limit=100, seed=0))
    _, again = unlabeled_pool(_tiny(limit=100, seed=0))
    _, other = unlabeled_pool(_tiny(limit=100, seed=1))
    assert len(first) == 100 and (first.labels == -1).all()
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    _, everything = unlabeled_pool(_tiny(limit=None))
    assert len(everything) == 60000


def test_method_defaults_fill_in():
    rotation = PretrainConfig(method="rotation").resolved(CPU)
    assert (rotation.batch_size, rotation.lr, rotation.schedule, rotation.width) == (150, 0.05, "cosine", 0.25)
    train = rotation.train_config()
    assert (train.optimizer, train.nesterov, train.momentum, train.weight_decay) == ("sgd", True, 0.9, 5e-4)
    vae = PretrainConfig(method="vae", settings={"lr": 0.002}, width=0.5).resolved(CPU)
    assert (vae.batch_size, vae.lr, vae.width) == (128, 0.002, 0.5)
    assert vae.train_config().optimizer == "adam"


@pytest.mark.parametrize("overrides, message", [
    (dict(method="jigsaw"), "method='jigsaw' is not known; allowed: rotation, vae, siamese-vae"),
    (dict(dataset="mnist"), "dataset='mnist' is not known"),
    (dict(epochs=0), "epochs=0 is not allowed"),
    (dict(limit=1), "limit=1 is not allowed"),
    (dict(settings={"batch_size": 1}), "batch_size=1 is not allowed"),
    (dict(image_size=8), "image_size=8 is not allowed"),
    (dict(width=5.0), "width=5.0 is not allowed"),
    (dict(settings={"lr": -0.1}), "lr=-0.1 is not allowed"),
    (dict(epochs=10 ** 20), "epochs=100000000000000000000 is not allowed; allowed: an integer from 1 to 10000"),
    (dict(limit=10 ** 9), "limit=1000000000 is not allowed; allowed: an integer from 2 to 100000000"),
    (dict(settings={"temperature": 0.1}), "temperature=0.1 is not allowed; allowed: a setting of rotation: "),
    (dict(settings={"rotations": 3}), "rotations=3 is not allowed; allowed: 2 (0/180°) or 4 (0/90/180/270°)"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ValueError) as info:
        _pretrain(_tiny(**overrides), tmp_path)
    assert message in str(info.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", [-1, float("nan"), "60"])
def test_bad_checkpoint_interval_is_refused_before_any_work(tmp_path, value):
    message = rf"checkpoint_every={value!r} is not allowed; allowed: seconds ≥ 0".replace("(", r"\(")
    with pytest.raises(ValueError, match=message):
        _pretrain(_tiny(), tmp_path, checkpoint_every=value)
    assert not (tmp_path / "runs").exists()


def test_load_run_refuses_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_run(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    store.write_json(tmp_path / "half" / "config.json", {"method": "rotation"})
    with pytest.raises(ValueError, match=r"not a complete run \(missing model.pt, complete.json\)"):
        load_run(tmp_path / "half")


@pytest.mark.slow
def test_compiled_pretraining_trains_the_same_model(tmp_path):
    """``compile=True`` runs the loss through torch.compile (recorded in the summary) and trains
    what the eager run trains, to rounding."""
    config = PretrainConfig(method="vae", dataset="fashion-mnist", epochs=1, limit=48, width=0.125,
                            settings={"batch_size": 16})
    try:
        eager = pretrain(config, device="cpu", out=str(tmp_path / "eager"), progress=False, eval_limit=16)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed here")
    compiled = pretrain(config, device="cpu", out=str(tmp_path / "compiled"), progress=False, eval_limit=16,
                        compile=True)
    assert eager.summary["compiled"] is False and compiled.summary["compiled"] is True
    assert eager.path.name == compiled.path.name  # not part of the config
    assert compiled.summary["final"]["loss"] == pytest.approx(eager.summary["final"]["loss"], rel=1e-3)
    assert compiled.summary["test_loss"] == pytest.approx(eager.summary["test_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="compile='yes' is not allowed"):
        pretrain(config, device="cpu", out=str(tmp_path / "bad"), compile="yes")


@pytest.mark.slow
def test_compiled_rotation_pretraining_takes_batches_of_another_size(tmp_path):
    """A compiled loss meets batches of other sizes (the epoch's last, the test set's): with shapes
    left dynamic, the rotation task's augmentation (torch.rand of the batch's size) failed to trace
    on the CPU; compiled per shape, the run completes."""
    config = PretrainConfig(method="rotation", dataset="fashion-mnist", epochs=1, limit=100, width=0.125,
                            settings={"batch_size": 16})
    try:
        run = pretrain(config, device="cpu", out=str(tmp_path), progress=False, eval_limit=12, compile=True)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed here")
    assert run.summary["compiled"] is True and math.isfinite(run.summary["final"]["loss"])
    assert 0.0 <= run.summary["test_rot_acc"] <= 1.0 and math.isfinite(run.summary["test_loss"])


def test_siamese_test_metrics_are_the_same_every_time_and_leave_the_callers_random_stream(tmp_path):
    # siamese-vae draws positive views and negatives even in evaluation; the same weights must
    # still give the same test metrics (they are shown in notebooks and run summaries).
    run = _pretrain(_tiny("siamese-vae"), tmp_path)
    task = run.load_task("cpu")
    splits, _ = unlabeled_pool(run.config)
    images = splits.test.images[:EVAL]
    torch.manual_seed(123)
    first = evaluate_task(task, images, precision=run.config.precision)
    after_first = torch.rand(3)
    torch.manual_seed(456)
    second = evaluate_task(task, images, precision=run.config.precision)
    assert first == second
    assert first["test_triplet"] == pytest.approx(run.summary["test_triplet"], abs=1e-6)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_first)


def test_load_backbone_gives_the_tasks_backbone_and_sees_a_retrained_run(tmp_path):
    run = _pretrain(_tiny(), tmp_path)
    expected = run.load_task("cpu").backbone.state_dict()
    backbone = run.load_backbone("cpu")
    assert not backbone.training
    assert backbone.state_dict().keys() == expected.keys()
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in expected.items())
    # Training the loaded backbone must not change what the next load returns.
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)
    again = run.load_backbone("cpu")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())
    # New weights in the same folder (as `pretrain --force` leaves): they are read, not the cached ones.
    saved = store.load_torch(run.path / "model.pt")
    saved["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in saved["model"].items()}
    store.save_torch(run.path / "model.pt", saved)
    new = run.load_task("cpu").backbone.state_dict()
    assert all(torch.equal(new[k], v + 1) for k, v in expected.items() if v.is_floating_point())
    assert all(torch.equal(run.load_backbone("cpu").state_dict()[k], v) for k, v in new.items())


def test_a_limit_beyond_the_pool_or_a_missing_dataset_leaves_nothing_in_the_store(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"limit=100000 is not allowed: fashion-mnist has 60000 unlabeled images; "
                                         r"allowed: 2 ≤ limit ≤ 60000"):
        _pretrain(_tiny(limit=100000), tmp_path)
    assert not any((tmp_path / "runs").iterdir())

    from sslab import data
    from sslab import pretrain as pretrain_module

    def missing(*args, **kwargs):
        raise data.DatasetNotFound("dataset 'fashion-mnist' not found")

    monkeypatch.setattr(pretrain_module, "load_dataset", missing)
    with pytest.raises(data.DatasetNotFound):
        _pretrain(_tiny(), tmp_path)
    assert not any((tmp_path / "runs").iterdir())


def test_a_resnet18_run_is_its_own_run_and_its_backbone_loads_with_the_default_layer(tmp_path):
    from sslab.evaluate import probe_cell
    alexnet = _pretrain(_tiny("simclr"), tmp_path)
    resnet = _pretrain(_tiny("simclr", backbone="resnet18"), tmp_path)
    assert resnet.path != alexnet.path and resnet.config.backbone == "resnet18"
    assert resnet.arch == "resnet18" and resnet.summary["backbone"]["arch"] == "resnet18"
    backbone = resnet.load_backbone()
    assert type(backbone).__name__ == "ResNet18Backbone" and not backbone.training
    task_backbone = resnet.load_task().backbone.state_dict()
    assert all(torch.equal(task_backbone[k], v) for k, v in backbone.state_dict().items())
    from sslab.evaluate import EvalConfig
    row = probe_cell(resnet, 1, device="cpu", out=str(tmp_path), config=EvalConfig(val_per_class=2, probe_epochs=1))
    assert row["layer"] == "layer4"  # layer auto: ResNet-18's default
    with pytest.raises(ValueError, match=r"layer='conv4' is not known; allowed: layer1, layer2, layer3, layer4, pool"):
        probe_cell(resnet, 1, device="cpu", out=str(tmp_path), config=EvalConfig(layer="conv4"))
    with pytest.raises(ValueError, match=r"arch='vgg' is not known; allowed: alexnet, resnet18"):
        _pretrain(_tiny(backbone="vgg"), tmp_path)


def test_the_knn_monitor_scores_every_epoch_and_changes_no_weight(tmp_path):
    plain = _pretrain(_tiny("rotation", epochs=2), tmp_path / "plain")
    watched = _pretrain(_tiny("rotation", epochs=2), tmp_path / "watched", knn_monitor=True)
    assert watched.path.name == plain.path.name  # not part of the config
    rows = [json.loads(line) for line in (watched.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(0.0 <= r["knn_acc"] <= 1.0 for r in rows)
    # 10 classes of Fashion-MNIST: a kNN on any features does far better than chance
    assert all(r["knn_acc"] > 0.3 for r in rows)
    assert not any("knn_acc" in json.loads(line) for line in (plain.path / "metrics.jsonl").read_text().splitlines())
    weights = [store.load_torch(run.path / "model.pt")["model"] for run in (plain, watched)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_random_init_run_stores_the_seeded_initial_backbone_and_trains_nothing(tmp_path):
    from sslab.models import BackboneConfig, build_backbone
    run = _pretrain(_tiny("random-init"), tmp_path)
    other_settings = _pretrain(_tiny("random-init", epochs=5, settings={"lr": 0.3}), tmp_path)
    assert other_settings.path == run.path  # the training settings do not apply, so they do not split runs
    assert run.summary["epochs_run"] == 0 and run.metrics == [] and run.config.epochs == 0
    torch.manual_seed(0)
    expected = build_backbone(BackboneConfig(1, 28, 0.125)).state_dict()
    loaded = run.load_backbone().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert _pretrain(_tiny("random-init", seed=1), tmp_path).path != run.path
    with pytest.raises(ValueError, match="has a backbone .* but no pretext task"):
        run.load_task()


# ---------------------------------------------------------------- the pretext task's settings

def test_a_changed_setting_is_a_new_run_and_the_default_finds_the_old_one(tmp_path):
    default = _pretrain(_tiny("siamese-vae"), tmp_path)
    stamp = (default.path / "model.pt").stat().st_mtime_ns
    heavier = _pretrain(_tiny("siamese-vae", settings={"batch_size": 32, "triplet_weight": 10}), tmp_path)
    assert heavier.path != default.path
    stored = json.loads((heavier.path / "config.json").read_text())["settings"]
    assert stored["triplet_weight"] == 10.0 and stored["margin"] == 0.5
    # The loss trained is recon + β·KL + λ·triplet with each run's λ (the epoch means are linear in the terms).
    for run, weight in ((default, 5.0), (heavier, 10.0)):
        row = run.metrics[0]
        assert row["loss"] == pytest.approx(row["recon"] + 0.01 * row["kl"] + weight * row["triplet"], rel=1e-4)
    # The default written out (as an int) is the default: the old run is found, not trained again.
    again = _pretrain(_tiny("siamese-vae", settings={"batch_size": 32, "triplet_weight": 5}), tmp_path)
    assert again.path == default.path and (default.path / "model.pt").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([default.path.name, heavier.path.name])


@pytest.mark.parametrize("method", ["rotation", "vae", "siamese-vae", "simclr"])
def test_the_resolved_config_lists_every_setting_with_its_value(method):
    from sslab.pretext import setting_names
    resolved = PretrainConfig(method=method, settings={"lr": 0.5}).resolved(CPU)
    assert list(resolved.settings) == list(setting_names(method))
    assert resolved.settings["lr"] == 0.5 and None not in resolved.settings.values()  # sized ones filled in
    assert resolved.train_config().lr == 0.5
    # resolving a resolved config changes nothing (the run folder is found from either)
    assert resolved.resolved(CPU) == resolved


def test_sized_settings_are_resolved_for_the_images_and_the_backbone():
    rotation = PretrainConfig(method="rotation").resolved(CPU).settings
    # RotNet's 4096-wide head × width 0.25; a 2-pixel shift (a twelfth of 28 px, at least 2)
    assert (rotation["hidden"], rotation["crop_padding"]) == (1024, 2)
    large = PretrainConfig(method="rotation", image_size=96, width=0.125).resolved(CPU).settings
    assert (large["hidden"], large["crop_padding"]) == (512, 8)
    simclr = PretrainConfig(method="simclr").resolved(CPU).settings
    # grey 28 px: strength 0.5 (brightness and contrast 0.4), no blur; AlexNet's pool5 at width 0.25 has 1024 values
    assert (simclr["jitter_strength"], simclr["blur_p"], simclr["hidden"]) == (0.5, 0.0, 1024)
    given = PretrainConfig(method="simclr", settings={"hidden": 77, "blur_p": 0.3}).resolved(CPU).settings
    assert (given["hidden"], given["blur_p"]) == (77, 0.3)


def test_editing_a_default_in_the_code_changes_the_hash(monkeypatch):
    from sslab.pretext import SimCLRSettings, SimCLRTask

    def folder(config):
        return store.config_hash(asdict(config.resolved(CPU)))

    before = folder(PretrainConfig(method="simclr"))
    assert folder(PretrainConfig(method="simclr", settings={"temperature": 0.5})) == before  # the default, given

    @dataclass
    class EditedSimCLRSettings(SimCLRSettings):
        temperature: float = 0.2  # the block's default, edited

    monkeypatch.setattr(SimCLRTask, "settings_class", EditedSimCLRSettings)
    edited = PretrainConfig(method="simclr").resolved(CPU)
    assert edited.settings["temperature"] == 0.2
    assert folder(PretrainConfig(method="simclr")) != before
    # the old default given explicitly finds the old runs again
    assert folder(PretrainConfig(method="simclr", settings={"temperature": 0.5})) == before


def test_settings_round_trip_through_config_json_and_load_run(tmp_path):
    config = _tiny(settings={"batch_size": 32, "rotations": 2, "hidden": 48, "milestones": [0.5], "schedule": "step",
                             "degrees": 0, "weight_decay": 0})
    run = _pretrain(config, tmp_path)
    resolved = config.resolved(CPU)
    stored = json.loads((run.path / "config.json").read_text())["settings"]
    assert stored == {**resolved.settings, "milestones": [0.5]}  # JSON has no tuples
    assert (stored["rotations"], stored["degrees"], stored["weight_decay"]) == (2, 0.0, 0.0)
    loaded = load_run(run.path)
    assert loaded.config == resolved == run.config
    task = loaded.load_task()
    assert task.settings == resolved.task_settings()
    assert task.rotations == 2 and task.head.net[-1].out_features == 2 and task.head.net[0][0].out_features == 48
    # the 2-way task's test metrics come back from the loaded weights
    splits, _ = unlabeled_pool(loaded.config)
    again = evaluate_task(task, splits.test.images[:EVAL], precision=loaded.config.precision)
    assert again["test_rot_acc"] == pytest.approx(run.summary["test_rot_acc"], abs=1e-5)


def test_random_init_has_no_settings_and_ignores_the_training_ones():
    resolved = PretrainConfig(method="random-init", settings={"lr": 0.3}, epochs=4).resolved(CPU)
    assert resolved.settings == {} and resolved.epochs == 0 and resolved.lr is None
