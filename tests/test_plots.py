"""sslab/plots.py: each figure draws the numbers it is given (checked on the artists), and
figures are saved as PNG and PDF under the outputs folder."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")  # tests only: the notebooks keep the inline backend
import matplotlib.pyplot as plt  # noqa: E402

from sslab import plots  # noqa: E402
from sslab.embed import Embedding  # noqa: E402
from sslab.evaluate import ResultTable  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _row(method, protocol, budget, seed, top1, top5=None, classes=3):
    confusion = np.eye(classes, dtype=int) * 5
    return {"method": method, "protocol": protocol, "probe": "mlp", "layer": "conv4", "budget": budget,
            "seed": seed, "top1": top1, "top5": top5 if top5 is not None else min(1.0, top1 + 0.2), "epochs": 3,
            "seconds": 0.1, "per_class": [top1] * classes, "confusion": confusion.tolist(),
            "classes": [f"c{i}" for i in range(classes)]}


def _table():
    rows = []
    for budget, base in ((1, 0.30), (4, 0.50), (16, 0.70)):
        for seed, jitter in ((0, -0.02), (1, 0.02)):
            rows.append(_row("rotation", "probe", budget, seed, base + 0.1 + jitter))
            rows.append(_row("rotation", "finetune", budget, seed, base + 0.12 + jitter))
            rows.append(_row("scratch", "scratch", budget, seed, base + jitter))
    return ResultTable(rows)


def test_label_curves_draw_means_with_std_bands_on_a_log2_axis():
    ax = plots.plot_label_curves(_table(), "top1")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"rotation", "rotation (finetune)", "scratch"}
    x, y = lines["rotation"].get_data()
    assert list(x) == [1, 4, 16] and np.allclose(y, [40, 60, 80])
    assert lines["scratch"].get_linestyle() == "--"
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    bands = ax.collections
    assert len(bands) == 3
    # the band is mean ± sample std: for two seeds at ±2 points, std = 2.83 points
    vertices = bands[0].get_paths()[0].vertices
    assert np.isclose(vertices[:, 1].max() - vertices[:, 1].min(), (80 + 2.828) - (40 - 2.828), atol=0.01)


def test_label_curves_keep_references_apart_and_filter_series():
    reference = {"label": "paper (reference)", "budgets": [4, 16], "values": [55.0, 75.0]}
    ax = plots.plot_label_curves(_table().rows, "top5", references=[reference], protocols={"probe", "scratch"})
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["rotation", "scratch", "paper (reference)"]
    ref = ax.get_lines()[-1]
    assert ref.get_color() == "grey" and list(ref.get_ydata()) == [55.0, 75.0]
    assert "top-5" in ax.get_ylabel()
    with pytest.raises(ValueError, match="metric='top3'"):
        plots.plot_label_curves(_table(), "top3")


def test_save_label_curves_keeps_the_curve_command_working(tmp_path):
    png = plots.save_label_curves(_table(), tmp_path / "curve-test")
    assert png == tmp_path / "curve-test.png"
    assert png.stat().st_size > 1000 and (tmp_path / "curve-test.pdf").is_file()


def test_save_figure_writes_png_and_pdf_under_outputs_figures(isolated_outputs):
    fig, _ = plt.subplots()
    paths = plots.save_figure(fig, "unit")
    assert paths == [isolated_outputs / "figures" / "unit.png", isolated_outputs / "figures" / "unit.pdf"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


def test_gain_bars_show_paired_gains_with_their_std():
    gains = _table().paired_gain("top1")
    ax = plots.gain_bars(gains)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    # probe gains are +10 points, finetune +12, at every budget
    assert heights == [10.0] * 3 + [12.0] * 3


def test_confusion_normalises_rows_to_percent_and_checks_the_shape():
    fig = plots.confusion([[8, 2], [0, 5]], ["a", "b"], "t")
    image = fig.axes[0].get_images()[0].get_array()
    assert np.allclose(image, [[80, 20], [0, 100]])
    with pytest.raises(ValueError, match="expected 3×3"):
        plots.confusion(np.eye(2), ["a", "b", "c"])


def test_accuracy_and_per_class_bars_use_the_seed_means():
    rows = [r for r in _table().rows if r["budget"] == 4]
    fig = plots.accuracy_bars(rows)
    tops = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert tops[:3] == [50.0, 60.0, 62.0]  # top-1: scratch, probe, finetune
    fig = plots.per_class_bars(rows, ["c0", "c1", "c2"])
    assert len(fig.axes[0].patches) == 3 * 3


def _run(method, metrics, summary):
    return SimpleNamespace(method=method, metrics=metrics, summary=summary)


def test_training_curves_plot_each_epoch_and_the_test_value():
    rot = _run("rotation", [{"epoch": 0, "loss": 1.0, "rot_acc": 0.5}, {"epoch": 1, "loss": 0.5, "rot_acc": 0.8}],
               {"test_rot_acc": 0.75, "test_loss": 0.6, "images": 100, "epochs_run": 2})
    vae = _run("vae", [{"epoch": 0, "loss": 90.0, "recon": 85.0, "kl": 500.0}],
               {"test_recon": 80.0, "test_loss": 81.0, "images": 100, "epochs_run": 1})
    fig = plots.training_curves({"rotation": rot, "vae": vae})
    loss_ax = fig.axes[0]
    train = [line for line in loss_ax.get_lines() if line.get_label() == "train"][0]
    assert list(train.get_ydata()) == [1.0, 0.5]
    star = [line for line in loss_ax.get_lines() if line.get_label() == "test (end)"][0]
    assert list(star.get_ydata()) == [0.6]
    rot_acc_ax = [ax for ax in fig.axes if ax.get_ylabel() == "rotation accuracy"][0]
    assert [list(line.get_ydata()) for line in rot_acc_ax.get_lines()] == [[0.5, 0.8], [0.75]]
    with pytest.raises(ValueError, match="runs is empty"):
        plots.training_curves({})


def test_rotation_examples_colour_right_and_wrong_predictions():
    images = np.zeros((2, 4, 1, 8, 8))
    predicted = np.array([[0, 1, 2, 3], [0, 3, 2, 1]])
    fig = plots.rotation_examples({"images": images, "predicted": predicted, "confidence": np.full((2, 4), 0.9)})
    titles = [(ax.get_title(), ax.title.get_color()) for ax in fig.axes]
    assert len(titles) == 8
    assert ("→ 270° (90%)", "red") in titles and ("→ 180° (90%)", "green") in titles
    assert "75% right" in fig._suptitle.get_text()


def test_rotation_examples_of_a_two_rotation_run_show_0_and_180_degrees():
    images = np.zeros((3, 2, 1, 8, 8))
    predicted = np.array([[0, 1], [1, 1], [0, 0]])
    fig = plots.rotation_examples({"images": images, "predicted": predicted, "confidence": np.full((3, 2), 0.6),
                                   "angles": [0, 180]})
    titles = [(ax.get_title(), ax.title.get_color()) for ax in fig.axes]
    assert len(titles) == 6 and ("→ 180° (60%)", "red") in titles and ("→ 0° (60%)", "green") in titles
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["shown 0°", "shown 180°"]
    assert "67% right on these 6" in fig._suptitle.get_text()


def test_vae_gallery_has_a_row_per_input_reconstruction_and_sample_set():
    x = np.random.default_rng(0).random((3, 1, 8, 8))
    fig = plots.vae_gallery({"inputs": x, "reconstructions": {"vae": x, "siamese-vae": x}, "samples": {"vae": x}})
    assert len(fig.axes) == 4 * 3
    row_labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert row_labels == ["test input", "vae reconstruction", "siamese-vae reconstruction", "vae prior sample"]


def test_umap_panels_colour_by_class_with_one_legend_and_the_score_in_the_title():
    rng = np.random.default_rng(0)
    panels = [Embedding(name, rng.normal(size=(30, 2)).astype(np.float32), np.arange(30) % 3, "conv4", score, "knn")
              for name, score in (("rotation", 0.91), ("vae", 0.5))]
    fig = plots.umap_panels(panels, ["a", "b", "c"])
    assert "5-NN acc 91.0%" in fig.axes[0].get_title() and "rotation" in fig.axes[0].get_title()
    assert len(fig.axes[0].collections) == 3  # one scatter per class
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "c"]
    bars = plots.separation_bars(panels)
    assert [round(p.get_height(), 6) for p in bars.axes[0].patches] == [91.0, 50.0]


def test_finetune_comparison_has_one_panel_per_pretrained_method():
    fig = plots.finetune_comparison(_table())
    assert len(fig.axes) == 1
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert labels == {"rotation", "rotation (finetune)", "scratch"}
    with pytest.raises(ValueError, match="no probe or finetune rows"):
        plots.finetune_comparison([r for r in _table().rows if r["protocol"] == "scratch"])


def test_training_curves_give_each_task_metric_its_own_axis():
    siamese = _run("siamese-vae", [{"epoch": 0, "loss": 140.0, "recon": 10.0, "kl": 130.0, "triplet": 0.2},
                                   {"epoch": 1, "loss": 139.0, "recon": 9.0, "kl": 131.0, "triplet": 0.1}],
                   {"test_triplet": 0.09, "images": 10, "epochs_run": 2})
    rot = _run("rotation", [{"epoch": 0, "loss": 1.0, "rot_acc": 0.5}], {"images": 10, "epochs_run": 1})
    fig = plots.training_curves([siamese, rot])
    labelled = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel()}
    triplet = labelled["triplet loss"]
    assert [list(line.get_ydata()) for line in triplet.get_lines()] == [[0.2, 0.1], [0.09]]
    low, high = triplet.get_ylim()
    assert high - low < 1  # its own scale, not the KL's
    assert len([ax for ax in fig.axes if ax.get_ylabel() == "KL to N(0, I)"]) == 1
    assert sum(ax.axison for ax in fig.axes) == 4 + 2  # siamese: loss + 3 metrics; rotation: loss + 1


def test_spread_figures_say_how_many_seeds_their_bands_summarise():
    def notes(ax):
        return [t.get_text() for t in ax.texts]
    assert notes(plots.plot_label_curves(_table(), "top1")) == ["bands: ± 1 std over 2 seeds"]
    assert notes(plots.gain_bars(_table().paired_gain("top1"))) == ["error bars: 95 % confidence interval over 2 seeds"]
    one_seed = ResultTable([r for r in _table().rows if r["seed"] == 0])
    assert notes(plots.plot_label_curves(one_seed, "top1")) == ["1 seed per point: no spread shown"]
    mixed = ResultTable([r for r in _table().rows if r["seed"] == 0 or r["budget"] == 16])
    assert notes(plots.plot_label_curves(mixed, "top1")) == ["bands: ± 1 std over 1–2 seeds"]


def test_view_pairs_shows_each_image_above_its_two_views():
    rng = np.random.default_rng(0)
    views = {k: rng.random((5, 1, 28, 28)) for k in ("images", "first", "second")}
    fig = plots.view_pairs(views)
    axes = fig.get_axes()
    assert len(axes) == 3 * 5
    shown = [ax.get_images()[0].get_array() for ax in axes]
    np.testing.assert_allclose(shown[5 + 2], views["first"][2, 0])  # row 2 = view 1, column 3 = image 2
    assert [axes[i].get_ylabel() for i in (0, 5, 10)] == ["test image", "view 1", "view 2"]
    fig = plots.view_pairs(views, rows=("anchor", "positive", "negative"), title="a triplet")
    assert [fig.get_axes()[i].get_ylabel() for i in (0, 5, 10)] == ["anchor", "positive", "negative"]
    assert fig._suptitle.get_text() == "a triplet"
