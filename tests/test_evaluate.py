"""Tests for sslab/evaluate/: metrics, probes, scratch, fine-tuning and label curves."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sslab import evaluate as ev
from sslab import store
from sslab.evaluate.curve import cell_key
from sslab.pretrain import PretrainConfig, pretrain
from sslab.models import extract_features, knn_predict

TINY = ev.EvalConfig(probe_epochs=3, scratch_epochs=2, finetune_epochs=2, samples_per_epoch=64, batch_size=32,
                     val_per_class=2, probe_patience=0, scratch_patience=0, finetune_patience=0)


def test_topk_against_hand_computation():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.05],   # ranks: 1,4,2,0,5,3
                           [0.9, 0.0, 0.1, 0.2, 0.3, 0.4],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([1, 5, 0])
    assert ev.topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)   # only row 0
    assert ev.topk_accuracy(logits, targets, 2) == pytest.approx(2 / 3)   # row 1: 0.9, 0.4 → class 5
    assert ev.topk_accuracy(logits, targets, 5) == pytest.approx(2 / 3)   # row 2: class 0 is the smallest
    assert ev.topk_accuracy(logits, targets, 6) == pytest.approx(1.0)
    assert ev.topk_accuracy(logits[:, :4], targets.clamp(max=3), 5) is None  # fewer classes than k


def test_top5_at_least_top1_and_confusion():
    torch.manual_seed(0)
    logits = torch.randn(200, 10)
    targets = torch.randint(0, 10, (200,))
    m = ev.classification_metrics(logits, targets)
    assert m["top5"] >= m["top1"]
    confusion = torch.tensor(m["confusion"])
    assert confusion.sum() == 200
    assert confusion.diag().sum() / 200 == pytest.approx(m["top1"])
    counts = torch.bincount(targets, minlength=10)
    assert torch.equal(confusion.sum(1), counts)
    assert m["per_class"][3] == pytest.approx(float(confusion[3, 3] / counts[3]))


def test_knn_near_perfect_on_separated_and_near_chance_on_random_labels():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=gen) * 10
    labels = torch.arange(5).repeat_interleave(40)
    feats = centres[labels] + torch.randn(200, 32, generator=gen)
    test_labels = torch.arange(5).repeat_interleave(20)
    test = centres[test_labels] + torch.randn(100, 32, generator=gen)
    scores = knn_predict(feats, labels, test, 5, k=10)
    assert ev.topk_accuracy(scores, test_labels, 1) > 0.97
    noise = torch.randn(2000, 32, generator=gen)
    random_labels = torch.randint(0, 5, (2000,), generator=gen)
    scores = knn_predict(noise[:1000], random_labels[:1000], noise[1000:], 5, k=10)
    assert abs(ev.topk_accuracy(scores, random_labels[1000:], 1) - 0.2) < 0.06


def _pattern(cls: int, rng) -> np.ndarray:
    img = rng.integers(0, 40, (28, 28)).astype(np.uint8)
    if cls == 0:
        img[::4] = 255
    elif cls == 1:
        img[:, ::4] = 255
    else:
        img[8:20, 8:20] = 255
    return img


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Three visually distinct classes, 24 train and 8 test images each."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for cls, name in enumerate(("rows", "columns", "square")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_pattern(cls, rng)).save(folder / f"{i}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def tiny_runs(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    # fp32: these tests compare evaluation paths with each other to fp32 rounding, which needs the
    # tiny nets' features free of bf16 rounding too.
    runs = [pretrain(PretrainConfig(method=m, dataset=tiny_folder, epochs=1, width=0.125, image_size=28,
                                    settings={"batch_size": 16}, precision="fp32"), device="cpu", out=str(out),
                     progress=False)
            for m in ("rotation", "vae")]
    return runs, str(out)


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _fresh_copy(run, folder):
    """The run copied without its cached features, so a cell computes them from the backbone."""
    import shutil

    from sslab.pretrain import load_run
    shutil.copytree(run.path, folder, ignore=shutil.ignore_patterns("features-*"))
    return load_run(folder)


def test_probe_cell_leaves_the_pretrained_backbone_untouched(tiny_runs, tmp_path, monkeypatch):
    (run, _), _ = tiny_runs
    run = _fresh_copy(run, tmp_path / "runs" / run.path.name)
    stored = {k[len("backbone."):]: v for k, v in store.load_torch(run.path / "model.pt")["model"].items()
              if k.startswith("backbone.")}
    model_bytes = (run.path / "model.pt").read_bytes()
    from sslab.pretrain import Run
    loaded = []
    real_load = Run.load_backbone

    def recording_load(self, *args, **kwargs):
        loaded.append(real_load(self, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(Run, "load_backbone", recording_load)
    ev.probe_cell(run, 2, seed=0, device="cpu", out=str(tmp_path), config=TINY)
    assert loaded, "the probe never built the backbone: its features came from somewhere else"
    assert any("running_mean" in k for k in stored)
    for backbone in loaded:  # weights, BN running statistics and batch counters, byte for byte
        after = backbone.state_dict()
        assert after.keys() == stored.keys()
        for key, value in stored.items():
            assert torch.equal(after[key], value), key
    assert (run.path / "model.pt").read_bytes() == model_bytes
    # even a backbone left in train mode keeps its BN statistics when features are extracted
    backbone = run.load_backbone("cpu").train()
    extract_features(backbone, ev.dataset_splits(run.config).train.images, "conv4", 2)
    changed = [k for k, v in stored.items() if not torch.equal(backbone.state_dict()[k], v)]
    assert not changed, f"feature extraction changed {changed}"


def _record_finetuning(monkeypatch, seen: list):
    """Wrap the ``fit`` the cells train with: per call, the learning rate of the backbone's and the
    head's optimiser groups at every step, and the two parts' parameters before and after."""
    from sslab.evaluate import cells
    real_fit = cells.fit

    def recording_fit(model, *args, **kwargs):
        backbone = {id(p) for p in model.backbone.parameters()}
        head = {id(p) for p in model.head.parameters()}
        steps = []

        def before_step(optimizer, args, kwargs):
            lrs = {}
            for group in optimizer.param_groups:
                ids = {id(p) for p in group["params"]}
                part = "backbone" if ids <= backbone else "head" if ids <= head else "mixed"
                lrs[part] = group["lr"]
            steps.append(lrs)

        params = {part: _params(getattr(model, part)) for part in ("backbone", "head")}
        handle = register_optimizer_step_pre_hook(before_step)
        try:
            result = real_fit(model, *args, **kwargs)
        finally:
            handle.remove()
        seen.append({"steps": steps, "lr": args[1].lr, "before": params,
                     "after": {part: _params(getattr(model, part)) for part in ("backbone", "head")}})
        return result

    monkeypatch.setattr(cells, "fit", recording_fit)


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _moved(call: dict, part: str) -> float:
    """The norm of the change of ``part``'s parameters during one recorded fit."""
    before, after = call["before"][part], call["after"][part]
    return float(torch.sqrt(sum(((after[k] - before[k]).float() ** 2).sum() for k in before)))


def test_finetune_cell_trains_the_backbone_at_backbone_lr_scale_times_the_head_rate(tiny_runs, tmp_path,
                                                                                      monkeypatch):
    (run, _), _ = tiny_runs
    seen = []
    _record_finetuning(monkeypatch, seen)
    config = replace(TINY, finetune_epochs=1, finetune_lr=2e-4)
    for scale in (0.1, 1.0):
        ev.finetune_cell(run, 2, seed=0, device="cpu", out=str(tmp_path), config=replace(config,
                                                                                          backbone_lr_scale=scale))
    slow, full = seen
    assert config.backbone_lr_scale == 0.1  # the documented default
    for call, scale in ((slow, 0.1), (full, 1.0)):
        assert call["lr"] == 2e-4 and call["steps"], call
        assert all(set(step) == {"backbone", "head"} for step in call["steps"])
        # the head at the cosine schedule's rate (its peak on the first step), the backbone at scale × that
        assert call["steps"][0]["head"] == pytest.approx(2e-4)
        for step in call["steps"]:
            assert step["backbone"] == pytest.approx(scale * step["head"], rel=1e-12)
        # and the backbone really trains: its weights move
        assert _moved(call, "backbone") > 0
    # Adam's steps are about as long as the learning rate whatever the gradient, so from the same
    # weights and batches the backbone moves ~0.1 as far at scale 0.1, and the head as far.
    assert _moved(slow, "backbone") / _moved(full, "backbone") == pytest.approx(0.1, rel=0.25)
    assert _moved(slow, "head") / _moved(full, "head") == pytest.approx(1.0, rel=0.1)


def test_same_seed_same_split_for_every_method_and_disjoint(tiny_runs):
    (rot, vae), out = tiny_runs
    a = ev.probe_cell(rot, 3, seed=1, device="cpu", out=out, config=TINY)
    b = ev.probe_cell(vae, 3, seed=1, device="cpu", out=out, config=TINY)
    c = ev.scratch_cell(rot, 3, seed=1, device="cpu", out=out, config=TINY)
    splits = [store.load_torch(Path(r["run"]) / "split.pt") for r in (a, b, c)]
    for s in splits[1:]:
        assert torch.equal(s["train"], splits[0]["train"]) and torch.equal(s["val"], splits[0]["val"])
    train, val = splits[0]["train"], splits[0]["val"]
    assert len(train) == 9 and len(val) == 6
    assert not set(train.tolist()) & set(val.tolist())
    other = ev.probe_cell(rot, 3, seed=2, device="cpu", out=out, config=TINY)
    assert not torch.equal(store.load_torch(Path(other["run"]) / "split.pt")["train"], train)


def test_budget_larger_than_a_class_is_a_clear_error(tiny_runs):
    (run, _), out = tiny_runs
    with pytest.raises(ValueError, match=r"class 0 has: it has 24 labeled images"):
        ev.probe_cell(run, 30, device="cpu", out=out, config=TINY)
    with pytest.raises(ValueError, match="^budget=0 is not allowed; allowed: an integer from 1 to"):
        ev.probe_cell(run, 0, device="cpu", out=out, config=TINY)
    with pytest.raises(ValueError, match="head=.svm'.*mlp, linear, knn"):
        ev.probe_cell(run, 2, head="svm", device="cpu", out=out, config=TINY)
    with pytest.raises(ValueError, match="layer='conv9'"):
        ev.probe_cell(run, 2, layer="conv9", device="cpu", out=out, config=TINY)


def test_probe_results_are_cached_by_config(tiny_runs):
    (run, _), out = tiny_runs
    first = ev.probe_cell(run, 4, seed=0, head="linear", device="cpu", out=out, config=TINY)
    metrics = Path(first["run"]) / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    second = ev.probe_cell(run, 4, seed=0, head="linear", device="cpu", out=out, config=TINY)
    assert second["top1"] == first["top1"] and metrics.stat().st_mtime_ns == stamp
    knn = ev.probe_cell(run, 4, seed=0, head="knn", device="cpu", out=out, config=TINY)
    assert knn["run"] != first["run"] and 0 <= knn["top1"] <= 1 and knn["top5"] is None  # 3 classes < 5


def test_small_curve_produces_every_row(tiny_runs):
    runs, out = tiny_runs
    table = ev.label_curve(runs, budgets=(1, 2), seeds=(0, 1), device="cpu", out=out, config=TINY,
                           finetune=True, progress=False, name="tiny")
    keys = {(r["method"], r["protocol"], r["budget"], r["seed"]) for r in table.rows}
    expected = {(m, p, b, s) for m in ("rotation", "vae") for p in ("probe", "finetune") for b in (1, 2)
                for s in (0, 1)} | {("scratch", "scratch", b, s) for b in (1, 2) for s in (0, 1)}
    assert keys == expected and len(table.rows) == len(expected)
    summary = table.summary()
    assert {(e["method"], e["protocol"], e["budget"]) for e in summary} == {k[:3] for k in expected}
    assert all(e["n"] == 2 for e in summary)
    gains = table.paired_gain()
    assert len(gains) == 8
    row = next(r for r in table.rows if r["method"] == "rotation" and r["protocol"] == "probe" and r["budget"] == 1
               and r["seed"] == 0)
    scratch = next(r for r in table.rows if r["protocol"] == "scratch" and r["budget"] == 1 and r["seed"] == 0)
    gain = next(g for g in gains if g["method"] == "rotation" and g["protocol"] == "probe" and g["budget"] == 1)
    other = next(r for r in table.rows if r["method"] == "rotation" and r["protocol"] == "probe" and r["budget"] == 1
                 and r["seed"] == 1)
    other_scratch = next(r for r in table.rows if r["protocol"] == "scratch" and r["budget"] == 1 and r["seed"] == 1)
    expected_gain = np.mean([row["top1"] - scratch["top1"], other["top1"] - other_scratch["top1"]])
    assert gain["gain_top1_mean"] == pytest.approx(expected_gain)
    csv_text = (Path(out) / "tables" / "tiny.csv").read_text().splitlines()
    assert csv_text[0].startswith("method,protocol,selection,val_per_class,head,layer,budget,seed,top1,top5")
    assert len(csv_text) == 1 + len(expected)
    saved = json.loads((Path(out) / "tables" / "tiny.json").read_text())
    assert len(saved["rows"]) == len(expected) and saved["summary"]


def test_shards_then_merge_equal_the_unsharded_table(tiny_runs):
    runs, out = tiny_runs
    full = ev.label_curve(runs, budgets=(1,), seeds=(0, 1), device="cpu", out=out, config=TINY, progress=False)
    shard_out = str(Path(out) / "sharded")
    partial, missing = ev.merge_curve(runs, budgets=(1,), seeds=(0, 1), out=shard_out, config=TINY)
    assert len(missing) == 6 and not partial.rows
    for index in range(2):
        ev.label_curve(runs, budgets=(1,), seeds=(0, 1), device="cpu", out=shard_out, config=TINY, progress=False,
                       shard=(index, 2))
    merged, missing = ev.merge_curve(runs, budgets=(1,), seeds=(0, 1), out=shard_out, config=TINY)
    assert not missing
    key = lambda r: (r["method"], r["protocol"], r["budget"], r["seed"])  # noqa: E731
    assert sorted((key(r), r["top1"], r["top5"]) for r in merged.rows) == \
        sorted((key(r), r["top1"], r["top5"]) for r in full.rows)


def test_sweeps_computed_in_one_batch_are_the_cells_label_curve_reads(tiny_runs, monkeypatch, tmp_path):
    from sslab.evaluate import curve
    runs, out = tiny_runs
    other = replace(TINY, probe_epochs=2)
    sweeps = [(runs, ["probe", "finetune"], TINY), (runs[:1], ["probe"], other)]
    reference = [ev.label_curve(r, budgets=(1,), seeds=(0, 1), protocols=p, device="cpu", out=str(tmp_path / "one"),
                                config=c, progress=False, workers=1).rows for r, p, c in sweeps]
    batches = []

    def in_this_process(jobs, workers, describe=None, report=None):
        if jobs:
            batches.append(sorted(describe(job) for job in jobs))
        return [function(*args, **kwargs) for function, args, kwargs in jobs]
    monkeypatch.setattr(curve, "run_all", in_this_process)
    batched = str(tmp_path / "batched")
    curve.compute_sweeps(sweeps, budgets=(1,), seeds=(0, 1), device="cpu", out=batched, workers=2)
    # the probes of both sweeps trained first (here, heads together), then one batch: each fine-tuning cell a job
    assert batches == [["rotation finetune k=1 seed=0", "rotation finetune k=1 seed=1", "vae finetune k=1 seed=0",
                        "vae finetune k=1 seed=1"]]
    tables = [ev.label_curve(r, budgets=(1,), seeds=(0, 1), protocols=p, device="cpu", out=batched, config=c,
                             progress=False, workers=2).rows for r, p, c in sweeps]
    assert len(batches) == 1  # every cell was stored: nothing computed again
    key = lambda r: (r["method"], r["protocol"], r["seed"], r["top1"], r["top5"])  # noqa: E731
    assert [sorted(map(key, t)) for t in tables] == [sorted(map(key, t)) for t in reference]


def test_the_workers_take_the_longest_cells_first(tiny_runs, monkeypatch, tmp_path):
    from sslab.evaluate import curve
    runs, _ = tiny_runs
    order = []
    monkeypatch.setattr(curve, "run_all", lambda jobs, workers, describe=None, report=None: order.extend(
        describe(job) for job in jobs))
    curve.compute_sweeps([(runs[:1], ["probe", "finetune", "scratch"], TINY)], budgets=(1, 3), seeds=(0, 1),
                         device="cpu", out=str(tmp_path), workers=2)
    # fine-tuning before scratch, and within each the larger budget (longer epochs) first; the probes
    # were trained here before the batch
    assert order == ["rotation finetune k=3 seed=0", "rotation finetune k=3 seed=1", "rotation finetune k=1 seed=0",
                     "rotation finetune k=1 seed=1", "scratch scratch k=3 seed=0", "scratch scratch k=3 seed=1",
                     "scratch scratch k=1 seed=0", "scratch scratch k=1 seed=1"]


@pytest.mark.slow
def test_probe_command_prints_top1_and_top5(tiny_runs):
    (run, _), out = tiny_runs
    result = subprocess.run([sys.executable, "-m", "sslab", "probe", "--run", str(run.path), "--labels", "2",
                             "--head", "knn", "--device", "cpu", "--out", out, "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "labels=2" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "sslab", "probe", "--run", out, "--labels", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a complete run" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("batch_probes", [False, True])
def test_deterministic_reaches_every_evaluation_fit_and_repeats_bit_for_bit(tiny_runs, tmp_path, monkeypatch,
                                                                             batch_probes):
    runs, _ = tiny_runs
    seen = []
    from sslab.evaluate import cells, probe
    real_fit = probe.fit

    def recording_fit(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(probe, "fit", recording_fit)
    monkeypatch.setattr(cells, "fit", recording_fit)
    tables = [ev.label_curve(runs, budgets=[2], seeds=[0], scratch=True, finetune=True, device="cpu",
                             out=str(tmp_path / name), config=TINY, progress=False, deterministic=True,
                             batch_probes=batch_probes)
              for name in ("a", "b")]
    # per run: a finetune cell (its probe is reused) and, unless the probes trained batched,
    # a probe cell; plus one scratch cell; twice
    assert seen == [True] * 2 * ((1 if batch_probes else 2) * len(runs) + 1)
    assert torch.are_deterministic_algorithms_enabled()
    keys = ("method", "protocol", "top1", "top5", "epochs", "per_class", "confusion")
    assert [[row[k] for k in keys] for row in tables[0].rows] == [[row[k] for k in keys] for row in tables[1].rows]


def test_batched_probes_give_the_one_at_a_time_results(tiny_runs, tmp_path):
    runs, _ = tiny_runs
    # early stopping on; budgets 1 and 4 have 66 and 72 samples per epoch: two groups of heads.
    # In fp32: the comparison is of the algorithm, to fp32 rounding (bf16 rounds 2^16 times coarser).
    config = replace(TINY, probe_epochs=8, probe_patience=2, precision="fp32")
    tables = {batched: ev.label_curve(runs, budgets=[1, 4], seeds=[0, 1], scratch=False, device="cpu",
                                      out=str(tmp_path / str(batched)), config=config, progress=False,
                                      batch_probes=batched)
              for batched in (False, True)}
    alone, together = tables[False].rows, tables[True].rows
    assert [r.get("trained_with") for r in together] == [4] * 8  # 2 methods × 2 seeds per budget
    assert all("trained_with" not in r for r in alone)
    assert [(r["method"], r["budget"], r["seed"]) for r in alone] == [(r["method"], r["budget"], r["seed"])
                                                                      for r in together]
    for a, b in zip(alone, together):
        assert a["epochs"] == b["epochs"] and a["confusion"] == b["confusion"], (a["method"], a["budget"], a["seed"])
        # Rounding differs (bmm against mm) and Adam, which divides by the gradient's size, can turn
        # it into up to one step (lr 1e-3) on weights whose gradient is about zero; a real
        # difference in the training (another permutation, other BN statistics) is ~1e-1.
        assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=5e-3)
        heads = [store.load_torch(Path(r["run"]) / "head.pt")["head"] for r in (a, b)]
        assert heads[0].keys() == heads[1].keys()
        for key in heads[0]:
            torch.testing.assert_close(heads[1][key].float(), heads[0][key].float(), rtol=0, atol=5e-3, msg=key)
    # a second sweep finds every cell stored and trains nothing
    assert ev.probe_cells_together([(run, b, s, "mlp") for run in runs for b in (1, 4) for s in (0, 1)], config,
                                   "cpu", str(tmp_path / "True")) == 0


def test_different_sweeps_write_different_tables_and_a_rerun_its_own(tiny_runs, tmp_path):
    runs, _ = tiny_runs
    out = str(tmp_path)

    def sweep(budgets, methods=runs):
        return ev.label_curve(methods, budgets=budgets, seeds=[0], head="knn", scratch=False, device="cpu", out=out,
                              config=TINY, progress=False).path
    first, other, fewer = sweep([1]), sweep([1, 2]), sweep([1], runs[:1])
    assert len({first, other, fewer}) == 3 and all(p.is_file() for p in (first, other, fewer))
    assert first.name.startswith("curve-") and "-conv4-knn-" in first.name
    assert sweep([1]) == first
    table, missing = ev.merge_curve(runs, budgets=[1], seeds=[0], head="knn", scratch=False, out=out, config=TINY)
    assert missing == [] and table.path == first


def test_finetune_result_does_not_depend_on_whether_its_probe_was_stored(tiny_runs, tmp_path):
    (run, _), _ = tiny_runs
    # a: the probe head is trained inside finetune_cell; b: it was stored by an earlier call,
    # after which the global generator was left somewhere else.
    a = ev.finetune_cell(run, 2, seed=1, device="cpu", out=str(tmp_path / "a"), config=TINY)
    ev.probe_cell(run, 2, seed=1, device="cpu", out=str(tmp_path / "b"), config=TINY)
    torch.manual_seed(1234)
    torch.rand(7)
    b = ev.finetune_cell(run, 2, seed=1, device="cpu", out=str(tmp_path / "b"), config=TINY)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (a["top1"], a["confusion"]) == (b["top1"], b["confusion"])


def test_a_scratch_cell_is_the_same_cell_whichever_probe_the_sweep_uses(tiny_runs, tmp_path):
    (run, _), _ = tiny_runs
    out = str(tmp_path)
    rows = [ev.scratch_cell(run, 1, seed=0, device="cpu", out=out, config=replace(TINY, head=p))
            for p in ("mlp", "linear", "knn")]
    assert len({r["run"] for r in rows}) == 1
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name.startswith("eval-scratch")]) == 1
    # ...while a setting the scratch baseline trains with makes another cell
    other = ev.scratch_cell(run, 1, seed=0, device="cpu", out=out, config=replace(TINY, scratch_lr=2e-3))
    assert other["run"] != rows[0]["run"]
    # and a setting only probes use does not change a fine-tuning cell's key, one they use does
    cells = [cell_key("finetune", 1, 0, run, c)
             for c in (TINY, replace(TINY, knn_k=5), replace(TINY, probe_lr=5e-3))]
    assert cells[0] == cells[1] and cells[0] != cells[2]


def test_cells_of_old_weights_are_not_reused_after_the_run_is_trained_again(tiny_runs, tmp_path):
    (run, _), _ = tiny_runs
    import shutil
    copy = tmp_path / "runs" / run.path.name
    shutil.copytree(run.path, copy)
    from sslab.pretrain import load_run
    first = ev.probe_cell(load_run(copy), 2, seed=0, device="cpu", out=str(tmp_path), config=TINY)
    assert ev.probe_cell(load_run(copy), 2, seed=0, device="cpu", out=str(tmp_path), config=TINY)["run"] == \
        first["run"]
    # the same folder name with other weights, as `pretrain --force` leaves it
    state = store.load_torch(copy / "model.pt")
    state["model"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state["model"].items()}
    store.save_torch(copy / "model.pt", state)
    again = ev.probe_cell(load_run(copy), 2, seed=0, device="cpu", out=str(tmp_path), config=TINY)
    assert again["run"] != first["run"]
    assert store.read_json(Path(again["run"]) / "config.json")["pretrained"].startswith(run.path.name + "@")


def test_repeated_budgets_or_seeds_are_refused():
    with pytest.raises(ValueError, match=r"budgets=\[1, 2, 1\] is not allowed; allowed: .*without repeats"):
        ev.check_budgets([1, 2, 1])
    with pytest.raises(ValueError, match=r"seeds=\[0, 0\] is not allowed"):
        ev.check_seeds([0, 0])
    with pytest.raises(ValueError, match=r"budgets=\[\] is not allowed"):
        ev.check_budgets([])
    assert ev.check_seeds([2, 0, 1]) == [2, 0, 1]


def test_table_name_depends_on_every_evaluation_setting(tiny_runs):
    runs, _ = tiny_runs
    names = {ev.default_table_name(runs, [1], [0], ("probe", "scratch"), c)
             for c in (TINY, replace(TINY, val_per_class=3), replace(TINY, hidden=50))}
    assert len(names) == 3
    # and on the protocols the sweep ran, which the name also shows
    finetune = ev.default_table_name(runs, [1], [0], ("probe", "finetune", "scratch"), TINY)
    assert finetune not in names and "-finetune-" in finetune
