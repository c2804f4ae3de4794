"""The benchmarks (benchmarks/) measure what they say: structure and values of their rows, never speed."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from benchmarks import step, study
from sslab import store
from sslab.cli import main
from sslab.models import BackboneConfig
from sslab.pretext import build_task


def tiny(**changes) -> step.BenchConfig:
    return step.quick_config(**{"methods": ("rotation",), "sizes": (28,), "steps": 2, "warmup": 1, "rounds": 1,
                                 **changes})


def test_rotation_row_on_cpu_has_positive_rates_ratio_and_flops():
    rows = step.measure_steps(tiny(), "cpu", progress=False)
    assert len(rows) == 1
    row = rows[0]
    assert (row.method, row.size, row.channels) == ("rotation", 28, 1)
    assert row.batch_size == step.QUICK_BATCH["rotation"] and row.views == 4 and row.width == step.QUICK_WIDTH
    assert row.sslab_img_s > 0 and row.reference_img_s > 0
    assert math.isclose(row.ratio, row.sslab_img_s / row.reference_img_s)
    # images/s is the median step's images: batch × 4 rotated copies.
    assert math.isclose(row.sslab_img_s, row.batch_size * 4 / (row.sslab_ms / 1000))
    assert row.gflop_per_image > 0 and row.sslab_tflops > 0
    assert math.isclose(row.sslab_tflops, row.gflop_per_image * row.sslab_img_s / 1000, rel_tol=1e-9)
    assert row.steps == 2 and len(row.sslab_step_ms) == 2 and len(row.reference_step_ms) == 2
    assert row.sslab_peak_mib is None and row.reference_peak_mib is None  # no device memory on CPU


def test_colour_sizes_and_each_method_get_their_own_row():
    rows = step.measure_steps(tiny(methods=("vae", "siamese-vae"), sizes=(32,), steps=1, warmup=0), "cpu",
                           progress=False)
    assert [(r.method, r.size, r.channels, r.views) for r in rows] == [("vae", 32, 3, 1), ("siamese-vae", 32, 3, 1)]
    # The siamese task encodes a second (positive) view, so it costs more FLOPs per image than the VAE.
    assert rows[1].gflop_per_image > rows[0].gflop_per_image > 0


def test_flops_count_forward_and_backward():
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8)
    # forward 2·5·8·4; backward only the weight gradient (x needs none), the same again.
    assert step.count_flops(lambda: layer(x).sum()) == 2 * (2 * 5 * 8 * 4)


@pytest.mark.parametrize("method", ["rotation", "vae"])
def test_reference_loss_is_the_tasks_objective_without_anchor_augmentation(method):
    task = build_task(method, BackboneConfig(1, 28, 0.25)).train()
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(4).repeat_interleave(6)
    torch.manual_seed(3)  # the VAE draws its reparameterisation noise in the same order in both
    ours = task.loss(images, train=False)["loss"]
    torch.manual_seed(3)
    reference = step.reference_loss(task, method, images.float() / 255.0, labels)
    torch.testing.assert_close(reference, ours, rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="method='jigsaw'.*allowed"):
        step.BenchConfig(methods=("jigsaw",)).validate()
    with pytest.raises(ValueError, match="sizes=.*8.*allowed: integers ≥ 16"):
        step.BenchConfig(sizes=(8,)).validate()
    with pytest.raises(ValueError, match="batch_size=1 .*allowed"):
        step.BenchConfig(batch_size=1).validate()
    with pytest.raises(ValueError, match="steps=0 .*allowed"):
        step.BenchConfig(steps=0).validate()


def test_cli_prints_the_table_last_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--quick", "--methods", "vae", "--sizes", "28", "--steps", "2",
                 "--warmup", "0", "--json", str(path)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].split()[:3] == ["method", "px", "ch"]
    assert lines[-1].split()[:4] == ["vae", "28", "1", str(step.QUICK_BATCH["vae"])]
    data = json.loads(path.read_text())
    assert data["machine"]["device"] == "cpu" and data["config"]["quick"] is True
    assert len(data["rows"]) == 1 and data["rows"][0]["ratio"] > 0


def test_cli_rejects_a_bad_size(capsys):
    assert main(["bench", "--sizes", "28,big"]) == 2
    assert "--sizes='28,big'" in capsys.readouterr().err


def test_params_file_sets_study_and_eval_fields_and_reports_the_rest(tmp_path):
    from sslab.lab import load_params
    path = tmp_path / "full.yml"
    path.write_text("# the full study\nepochs: 2   # pretraining epochs\nmethods: rotation,vae\nbudgets: [1, 4]\n"
                    "probe_epochs: 5\nfinetune: false\nfigure_dpi: 150\npoints: 500\n")
    params = load_params(path)
    assert params == {"epochs": 2, "methods": "rotation,vae", "budgets": [1, 4], "probe_epochs": 5,
                      "finetune": False, "figure_dpi": 150, "points": 500}
    config, ignored = study.study_from_params(params, study.StudyConfig())
    assert (config.epochs, config.methods, config.budgets, config.finetune) == (2, ("rotation", "vae"), (1, 4), False)
    assert config.umap_points == 500  # the notebooks' name for it
    assert config.eval == {"probe_epochs": 5}
    assert ignored == ["figure_dpi"]


def _write_folder_dataset(root, classes=3, train=14, test=4, size=32):
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


@pytest.mark.slow
def test_study_timing_runs_every_phase_on_a_tiny_dataset(tmp_path):
    _write_folder_dataset(tmp_path / "images")
    config = study.StudyConfig(
        methods=("rotation",), dataset=f"folder:{tmp_path / 'images'}", epochs=1, budgets=(1,), seeds=(0, 1),
        umap_points=0, eval={"probe_epochs": 2, "scratch_epochs": 1, "finetune_epochs": 1, "samples_per_epoch": 16,
                             "batch_size": 8, "val_per_class": 2})
    out = tmp_path / "study"
    rows = study.time_study(config, "cpu", out=str(out), progress=False)
    phases = [r.phase for r in rows]
    assert phases == ["load data", "pretrain rotation", "features", "probes", "probes one at a time", "scratch",
                      "finetune", "total"]
    counts = {r.phase: r.count for r in rows}
    assert counts["probes"] == counts["probes one at a time"] == counts["scratch"] == counts["finetune"] == 2
    assert counts["load data"] == 3 * 14 + 3 * 4
    assert all(r.seconds > 0 for r in rows)
    # the total is the study's wall time: the one-at-a-time comparison is left out of it
    timed = [r for r in rows[:-1] if r.phase != "probes one at a time"]
    assert rows[-1].seconds >= sum(r.seconds for r in timed) * 0.99
    assert rows[-1].seconds < sum(r.seconds for r in rows[:-1])
    # the probe cells of the study were trained together (two seeds, one group), the comparison's alone
    stored = [store.read_json(p) for p in (out / "runs").glob("eval-rotation_probe-*/metrics.json")]
    assert sorted(r.get("trained_with") for r in stored) == [2, 2]
    alone = [store.read_json(p) for p in (out / "probes-alone" / "runs").glob("eval-rotation_probe-*/metrics.json")]
    assert len(alone) == 2 and all("trained_with" not in r for r in alone)
    assert any((out / "runs").iterdir())  # the runs went where we said
    with pytest.raises(ValueError, match="out=.*not empty"):
        study.time_study(config, "cpu", out=str(out), progress=False)


@pytest.mark.slow
def test_interrupted_study_still_reports_and_writes_the_phases_it_reached(tmp_path, monkeypatch, capsys):
    # A time limit's SIGINT arrives as KeyboardInterrupt: the finished phases must survive it.
    _write_folder_dataset(tmp_path / "images")
    from sslab import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "scratch_cell", interrupted)
    path = tmp_path / "study.json"
    code = main(["bench", "--study", "--device", "cpu", "--dataset", f"folder:{tmp_path / 'images'}", "--methods",
                 "rotation", "--epochs", "1", "--budgets", "1", "--seeds", "0", "--umap-points", "0",
                 "--no-probes-alone", "--no-finetune", "--out", str(tmp_path / "study"), "--json", str(path)])
    assert code == 130
    out = capsys.readouterr().out
    assert "STOPPED part-way" in out
    data = json.loads(path.read_text())
    assert data["stopped"] is True
    phases = [p["phase"] for p in data["phases"]]
    assert phases == ["load data", "pretrain rotation", "features", "probes", "scratch (stopped)", "total"]
    assert data["phases"][4]["count"] == 0 and data["phases"][4]["detail"].startswith("interrupted here")
    assert data["phases"][-1]["seconds"] >= sum(p["seconds"] for p in data["phases"][:-1]) * 0.99


def test_the_lab_profile_puts_each_sample_in_its_phase_and_leaves_waiting_threads_out(tmp_path):
    from benchmarks import lab_profile
    raw = tmp_path / "profile.txt"
    raw.write_text("\n".join([
        'process 1:"python -m sslab.lab";<module> (123.py:1);evaluate_budgets (sslab/lab/tables.py:21);'
        'compute_fixmatch (sslab/evaluate/fixmatch.py:9);fit (sslab/train.py:1) 40',
        '<module> (123.py:1);compute_fixmatch (sslab/evaluate/fixmatch.py:9);'
        'extract_features (sslab/models.py:3) 10',  # features count as features wherever computed
        '<module> (4567.py:3);Conv2d.forward (torch/nn/modules/conv.py:1) 20',  # a notebook cell's own code
        'Thread.run (threading.py:1);Heartbeat.run (ipykernel/heartbeat.py:2) 500',  # a waiting thread
        # the runner waiting for its workers: a lock's wait, no CPU
        '<module> (9.py:1);run_all (sslab/parallel.py:200);Event.wait (threading.py:629);'
        'Condition.wait (threading.py:327) 300',
        # a label propagation cell: its own propagation, and a head of one of its choice's held-out splits
        '_call (sslab/parallel.py:1);compute_labelprop (sslab/evaluate/labelprop.py:48);'
        'propagate_cell (sslab/evaluate/graph.py:2) 6',
        '_call (sslab/parallel.py:1);compute_labelprop (sslab/evaluate/labelprop.py:58);'
        'held_out_scores (sslab/evaluate/choice.py:80);train_heads (sslab/evaluate/batched_heads.py:9) 8',
        # a sweep choosing its labeled images, then training its probe heads
        '<module> (89.py:1);probe_cells_together (sslab/evaluate/probe.py:90);labeled_split '
        '(sslab/evaluate/selection.py:240);select_typical (sslab/evaluate/selection.py:130) 12',
        '<module> (89.py:1);probe_cells_together (sslab/evaluate/probe.py:95);train_heads '
        '(sslab/evaluate/batched_heads.py:9) 14',
        # make lab's UMAP warm-up compiles through the same umap_2d as notebook 03's figures
        '<module> (<string>:1);warm_umap (sslab/embed.py:90);umap_2d (sslab/embed.py:110) 16',
        '<module> (7.py:2);embeddings (sslab/lab/embeddings.py:30);umap_2d (sslab/embed.py:110) 18',
    ]) + "\n")
    seconds = lab_profile.profile(raw, rate=20.0)
    assert seconds == {"FixMatch cells": 2.0, "frozen features": 0.5,
                       "plain PyTorch in notebook cells (00, the method pages)": 1.0,
                       "label propagation cells": 0.3, "choices' held-out splits": 0.4,
                       "choosing labeled images": 0.6, "probe heads (batched and single)": 0.7,
                       "UMAP's compile warm-up (lowest priority, mostly waiting)": 0.8, "UMAP": 0.9}


def test_cpu_busy_splits_the_samples_by_notebook_and_counts_idle_core_seconds():
    from benchmarks.cpu_busy import STARTED, busy_table
    assert STARTED.match("[3/8] 02_probe interactive=False").group(3) == "02_probe"
    samples = [(1.0, 1.0), (2.0, 1.0), (3.0, 0.5), (4.0, 0.5), (5.0, 0.25)]
    rows = busy_table(samples, [(0.0, "a"), (2.0, "b")], end=5.0, cores=2)
    assert [r[0] for r in rows] == ["a", "b"]
    # a: 2 s, all busy; b: 3 s at (0.5 + 0.5 + 0.25) / 3 busy, so 2 cores × 3 s × (1 − 5/12) idle
    assert rows[0][1:] == (2.0, 1.0, 0.0)
    assert rows[1][1] == 3.0 and rows[1][2] == pytest.approx(5 / 12) and rows[1][3] == pytest.approx(3.5)


def test_worker_start_times_each_batch_in_a_fresh_process():
    from benchmarks import worker_start
    for way, early in (("spawn", False), ("forkserver", True)):
        seconds = worker_start.batches(way, early, repeats=2, head_start=0.1)
        assert len(seconds) == 2 and all(s > 0 for s in seconds)


def test_the_cover_lever_times_two_passes_and_one_that_give_the_same_radius_and_balls():
    """benchmarks.levers' ProbCover row: its points have balls of a few dozen points at δ, so the lab's
    one pass hands the balls over (the row would time the same two passes otherwise); both ways
    give the same δ and pairs (cover_passes asserts it) and a time each."""
    from benchmarks.levers import cover_passes, cover_points
    from sslab.evaluate import selection
    points = cover_points(nodes=3000)
    selection._KEPT.clear()
    radius = selection.purity_radius(points, 10, 0)
    assert any(key[0] == "edges" and key[2] == radius for key in selection._KEPT)
    for how in ("two passes", "one pass"):
        assert 0 < cover_passes(how, points, repeats=1) < 60


def test_groupings_compares_each_grouping_with_all_heads_together():
    """benchmarks.stacked_heads --groupings: one entry per group size after the first (the
    reference), each a count of the heads whose weights differ and their largest difference."""
    from benchmarks.stacked_heads import groupings
    found = groupings(sizes=(4, 2, 3), count=4, dim=16)
    assert set(found) == {2, 3}
    for differ, largest in found.values():
        assert 0 <= differ <= 4 and largest >= 0 and (largest == 0) == (differ == 0)


def test_the_levers_refuse_a_thread_count_below_one(capsys):
    from benchmarks.levers import main
    with pytest.raises(SystemExit):
        main(["--only", "cover", "--threads", "0"])
    assert "--threads 0 is not allowed; allowed: 1 or more" in capsys.readouterr().err


def test_the_shared_propagations_lever_checks_the_two_ways_agree_and_times_each():
    from benchmarks.levers import shared_propagations
    for how in ("whole", "shared"):
        assert 0 < shared_propagations(how, nodes=500, k=5, labeled=20, repeats=1) < 60


def test_kernel_gaps_reads_papermills_times_of_each_cell(tmp_path, capsys):
    import nbformat

    from benchmarks import kernel_gaps

    def cell(start, end):
        made = nbformat.v4.new_code_cell("x = 1")
        made.metadata["papermill"] = {"start_time": f"2026-12-07T10:00:{start:06.3f}Z",
                                      "end_time": f"2026-12-07T10:00:{end:06.3f}Z"}
        return made
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# a"), cell(0.5, 2.0), cell(2.0, 2.1),
                                         cell(2.1, 3.0), cell(3.0, 20.0)])
    nb.metadata["papermill"] = {"start_time": "2026-12-07T10:00:00.000Z", "end_time": "2026-12-07T10:00:22.625Z"}
    nbformat.write(nb, str(tmp_path / "01_a.ipynb"))
    assert kernel_gaps.gaps(tmp_path / "01_a.ipynb") == pytest.approx(
        {"to first cell": 0.5, "to third cell's end": 3.0, "after last cell": 2.625, "notebook": 22.625})
    assert kernel_gaps.main([str(tmp_path)]) == 0
    assert "| 01_a | 0.50 | 3.00 | 2.62 | 22.62 |" in capsys.readouterr().out
    del nb.metadata["papermill"]
    nbformat.write(nb, str(tmp_path / "01_a.ipynb"))
    with pytest.raises(ValueError, match="has no papermill times; allowed: an executed copy"):
        kernel_gaps.gaps(tmp_path / "01_a.ipynb")


def test_compare_notebooks_counts_result_lines_that_differ_and_ignores_timings(tmp_path, capsys):
    import nbformat

    from benchmarks import compare_notebooks

    def notebook(folder, printed, injected=False):
        cells = [nbformat.v4.new_markdown_cell("# a")]
        if injected:  # papermill's cell, in executed copies only
            cells.append(nbformat.v4.new_code_cell("labels = 4", metadata={"tags": ["injected-parameters"]}))
        for text in printed:
            made = nbformat.v4.new_code_cell("print()")
            made.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
            cells.append(made)
        folder.mkdir(exist_ok=True)
        nbformat.write(nbformat.v4.new_notebook(cells=cells), str(folder / "02_a.ipynb"))

    first = ["trained now in 86 s: rotation, 81 s on cpu; test loss=0.05998\n",
             "        15 cells, 2 workers: 1/3 done (probe), 8 s\nrotation 69.1 ± 0.3\nscratch 66.1 ± 1.2\n"]
    notebook(tmp_path / "a", first)
    # the same results another time: other seconds, other progress, and papermill's cell
    notebook(tmp_path / "b", [first[0].replace("86 s", "120 s").replace("81 s", "116 s"),
                              "        15 cells, 2 workers: 3/3 done (probe), 14 s\nrotation 69.1 ± 0.3\n"
                              "scratch 66.1 ± 1.2\n"], injected=True)
    assert compare_notebooks.compare(tmp_path / "a" / "02_a.ipynb", tmp_path / "b" / "02_a.ipynb") == \
        {"lines": 3, "differ": 0, "diff": []}
    # other results: one line of three differs, in the second code cell
    notebook(tmp_path / "c", [first[0], first[1].replace("69.1", "67.6")])
    report = compare_notebooks.compare(tmp_path / "a" / "02_a.ipynb", tmp_path / "c" / "02_a.ipynb")
    assert report == {"lines": 3, "differ": 1, "diff": ["[2] -rotation 69.1 ± 0.3", "[2] +rotation 67.6 ± 0.3"]}
    assert compare_notebooks.main([str(tmp_path / "a"), str(tmp_path / "c"), "--show", "5"]) == 0
    out = capsys.readouterr().out
    assert "| 02_a | 3 | 1 |" in out and "[2] +rotation 67.6 ± 0.3" in out
    notebook(tmp_path / "d", first[:1])  # another notebook's cells
    with pytest.raises(ValueError, match="different code cells; allowed: two runs of the same notebook"):
        compare_notebooks.compare(tmp_path / "a" / "02_a.ipynb", tmp_path / "d" / "02_a.ipynb")
    with pytest.raises(SystemExit):
        compare_notebooks.main([str(tmp_path / "a"), str(tmp_path / "nowhere")])
    assert "no notebook is in both" in capsys.readouterr().err
