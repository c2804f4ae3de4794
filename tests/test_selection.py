"""sslab.evaluate.selection: which images get labeled — each selector against a brute-force
reference, the known answer on separated blobs, never reading a label, and bad values."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sslab.evaluate import cells, selection
from sslab.evaluate.cells import EvalConfig, open_cell
from sslab.evaluate.selection import kmeans, purity_radius, select_cover, select_typical, typicality


def blobs(sizes, dims: int = 4, spread: float = 0.05, seed: int = 0) -> tuple:
    """Well-separated Gaussian blobs of the given sizes: (points N×dims, class of each point)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dims)[: len(sizes)] * 3 if len(sizes) <= dims else torch.randn(len(sizes), dims,
                                                                                           generator=generator) * 10
    points = torch.cat([centres[c] + spread * torch.randn(n, dims, generator=generator) for c, n in enumerate(sizes)])
    classes = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return points, classes


def test_kmeans_finds_separated_blobs_exactly():
    points, classes = blobs([40, 25, 10], dims=3)
    assign = kmeans(points, 3, seed=0)
    # the same partition, up to the names of the clusters
    pairs = set(zip(assign.tolist(), classes.tolist()))
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3


def _inertia(points: torch.Tensor, assign: torch.Tensor) -> float:
    """The sum of squared distances of the points to their cluster's mean, with loops."""
    total = 0.0
    for c in assign.unique().tolist():
        members = points[assign == c].double()
        total += float(((members - members.mean(0)) ** 2).sum())
    return total


def test_one_start_of_the_fast_lloyd_finds_the_blobs_and_its_inertia():
    points, classes = blobs([40, 25, 10], dims=3)
    assign, inertia = selection._lloyd(points, 3, seed=0, iterations=100)
    assert len(set(zip(assign.tolist(), classes.tolist()))) == 3 and len(assign.unique()) == 3
    assert inertia == pytest.approx(_inertia(points, assign), rel=1e-4)


def test_several_starts_keep_the_start_of_lowest_inertia():
    # ten blobs in two dimensions, close enough that k-means++ starts end in different optima
    points, _ = blobs([30] * 10, dims=2, spread=2.0, seed=3)
    for seed in range(4):
        singles = [selection._lloyd(points.float(), 10, seed + i * selection.START_STRIDE, 100)[0] for i in range(8)]
        inertias = [_inertia(points, a) for a in singles]
        best = kmeans(points, 10, seed, starts=8)
        assert torch.equal(best, singles[int(np.argmin(inertias))])
        assert _inertia(points, best) == pytest.approx(min(inertias))
    # the starts do differ here, so keeping the best is not a no-op
    assert len({round(_inertia(points, selection._lloyd(points, 10, i, 100)[0]), 3) for i in range(8)}) > 1


def test_one_start_is_the_choice_stored_before_starts_existed():
    points, _ = blobs([30] * 10, dims=2, spread=2.0, seed=3)
    # the picks of the lab's k-means before it had starts (commit 7bca44c), on these points: one
    # start keeps that loop (cdist and argmin), so a choice stored then is made again bit for bit
    assert select_typical(points, 10, 5, neighbours=5).tolist() == [160, 247, 72, 100, 5, 298, 51, 76, 220, 228]
    assert select_typical(points, 10, 5, neighbours=5, starts=10).tolist() != [160, 247, 72, 100, 5, 298, 51, 76,
                                                                               220, 228]


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_neighbours():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    expected = []
    for i in range(4):
        distances = sorted(math.dist(points[i].tolist(), points[j].tolist()) for j in range(4) if j != i)
        expected.append(1 / (sum(distances[:2]) / 2 + 1e-5))
    torch.testing.assert_close(typicality(points, 2), torch.tensor(expected), rtol=1e-5, atol=0)


def _typical_by_hand(points: torch.Tensor, budget: int, seed: int, neighbours: int, min_cluster: int) -> list:
    """TypiClust's first pick written out with loops: clusters largest first (ties: lower id),
    tiny ones dropped, in each its not-yet-chosen member of highest typicality."""
    assign = kmeans(points, budget, seed).tolist()
    sizes = {c: assign.count(c) for c in range(budget)}
    order = sorted((c for c in sizes if sizes[c] > min_cluster), key=lambda c: (-sizes[c], c))
    chosen = []
    for i in range(budget):
        members = [j for j, a in enumerate(assign) if a == order[i % len(order)] and j not in chosen]
        k = max(1, min(neighbours, len(members) // 2))
        best, best_score = None, -1.0
        for j in members:
            d = sorted(math.dist(points[j].tolist(), points[m].tolist()) for m in members if m != j)
            score = 1 / (sum(d[:k]) / k + 1e-5)
            if score > best_score + 1e-9:
                best, best_score = j, score
        chosen.append(best)
    return chosen


def test_typical_picks_the_most_typical_image_of_each_cluster_as_by_hand():
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(90, 3, generator=generator)
    assert select_typical(points, 6, seed=1, neighbours=5, min_cluster=5).tolist() == \
        _typical_by_hand(points, 6, 1, 5, 5)


def test_typical_takes_one_image_per_cluster_and_goes_round_when_tiny_clusters_are_dropped():
    points, classes = blobs([30, 30, 3], dims=3)  # the third blob is under the minimum cluster size
    picked = select_typical(points, 3, seed=0, neighbours=5, min_cluster=5)
    assert len(set(picked.tolist())) == 3
    assert sorted(classes[picked].tolist()) in ([0, 0, 1], [0, 1, 1])  # round again over the two kept clusters


def _cover_by_hand(points: torch.Tensor, budget: int, radius: float) -> list:
    n = len(points)
    near = [[j for j in range(n) if math.dist(points[i].tolist(), points[j].tolist()) < radius] for i in range(n)]
    covered, chosen = set(), []
    for _ in range(budget):
        gains = [len(set(near[i]) - covered) if i not in chosen else -1 for i in range(n)]
        if max(gains) > 0:
            pick = gains.index(max(gains))
        else:
            sizes = [len(near[i]) if i not in chosen else -1 for i in range(n)]
            pick = sizes.index(max(sizes))
        chosen.append(pick)
        covered |= set(near[pick])
    return chosen


@pytest.mark.parametrize("radius", [0.3, 0.8, 5.0])
def test_cover_is_the_greedy_maximum_coverage_as_by_hand(radius):
    generator = torch.Generator().manual_seed(5)
    points = torch.rand(60, 2, generator=generator) * 3
    assert select_cover(points, 8, radius).tolist() == _cover_by_hand(points, 8, radius)
    # the balls handed over by a caller that has them already
    from sslab.evaluate.selection import _ball_edges
    edges = _ball_edges(points, radius, 16)
    assert select_cover(points, 8, radius, edges=edges).tolist() == _cover_by_hand(points, 8, radius)


def test_purity_radius_is_the_quantile_of_the_distance_to_another_cluster():
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(80, 2, generator=generator)
    assign = kmeans(points, 4, seed=0)
    other = [min(math.dist(points[i].tolist(), points[j].tolist()) for j in range(80) if assign[j] != assign[i])
             for i in range(80)]
    radius = purity_radius(points, 4, seed=0, purity=0.9)
    assert radius == pytest.approx(float(np.quantile(other, 0.1)), rel=1e-5)
    # at that radius, at least 90 % of the balls hold one cluster only; the float32 radius can round
    # above a float64 distance that ties at the quantile (two points each other's nearest of another
    # cluster: the clusters of an AMD EPYC's k-means), so the balls are taken a rounding smaller
    pure = [all(assign[j] == assign[i] for j in range(80) if math.dist(points[i].tolist(), points[j].tolist())
                < radius * (1 - 1e-6)) for i in range(80)]
    assert sum(pure) >= 0.9 * 80


def test_a_second_budget_reuses_the_radius_and_balls_of_the_same_points_only(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(90, 3, generator=generator)
    made = []
    for name in ("_ball_edges", "_purity_radius"):
        original = getattr(selection, name)
        monkeypatch.setattr(selection, name, lambda *a, _f=original, _n=name: made.append(_n) or _f(*a))
    radius = purity_radius(points, 4, seed=0)
    first = select_cover(points, 3, radius)
    # a larger budget from the same points: the same δ, the same balls, and the greedy order's prefix
    assert purity_radius(points, 4, seed=0) == radius
    assert select_cover(points, 9, radius)[:3].tolist() == first.tolist()
    assert made == ["_purity_radius"]  # the balls came with the radius (one block: δ is within its bound)
    # the reused answers are the ones computed afresh
    selection._KEPT.clear()
    assert purity_radius(points, 4, seed=0) == radius
    assert select_cover(points, 9, radius).tolist() == _cover_by_hand(points, 9, radius)
    # other points (one coordinate moved), another seed: computed, not reused
    moved = points.clone()
    moved[0, 0] += 1e-3
    purity_radius(moved, 4, seed=0)
    purity_radius(points, 4, seed=1)
    assert made.count("_purity_radius") == 4


@pytest.mark.parametrize("block, spread, own_pass", [(300, 60.0, False), (64, 60.0, True), (300, 1.0, True)])
def test_the_radius_pass_hands_over_the_balls_its_bound_holds_and_only_those(block, spread, own_pass, monkeypatch):
    """The radius pass keeps the pairs under EDGE_BOUND × its first block's radius; where δ is under
    that bound, ball_edges returns them without a pass of its own, exactly the pairs its own pass
    finds. Here the clusters are the two sides of x = 0 and the first rows hold the only four
    pairs that straddle it: with all the rows in one block the bound is EDGE_BOUND × δ itself;
    with 64-row blocks the first block's radius is one of those tiny gaps, too small a bound for
    δ; and where the points crowd (``spread`` 1) more than EDGE_CAP pairs a point lie under the
    bound. In the last two ball_edges makes its own pass."""
    generator = torch.Generator().manual_seed(5)
    straddling = torch.tensor([[0.005, 0.3 * i] for i in range(4)] + [[-0.005, 0.3 * i] for i in range(4)])
    far = torch.rand(292, 2, generator=generator) * torch.tensor([1.0, spread]) + torch.tensor([1.0, 0.0])
    far[::2, 0] *= -1
    points = torch.cat([straddling, far])
    monkeypatch.setattr(selection, "kmeans", lambda pts, k, seed: (pts[:, 0] > 0).long())
    made = []
    original = selection._ball_edges
    monkeypatch.setattr(selection, "_ball_edges", lambda *a: made.append(a) or original(*a))
    selection._KEPT.clear()
    radius = purity_radius(points, 2, seed=0, block=block)
    assert radius > 1.0  # the 5 % quantile of the distances to the other side: not one of the four gaps
    rows, cols = selection.ball_edges(points, radius, block=block)
    assert len(made) == own_pass
    selection._KEPT.clear()
    expected = original(points, radius, block)
    assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])
    assert torch.equal(torch.stack([rows, cols], 1), (torch.cdist(points, points) < radius).nonzero())


def test_on_imbalanced_blobs_typical_and_cover_find_every_class_where_uniform_misses_some():
    sizes = [400, 200, 100, 40, 20, 12, 10, 10, 10, 10]
    points, classes = blobs(sizes, dims=12)
    missed = []
    for seed in range(5):
        assert len(set(classes[select_typical(points, 10, seed)].tolist())) == 10
        uniform = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:10]
        missed.append(10 - len(set(classes[uniform].tolist())))
    radius = purity_radius(points, 10, seed=0)
    assert len(set(classes[select_cover(points, 10, radius)].tolist())) == 10
    assert min(missed) >= 3  # a uniform draw of 10 images misses at least three of the small classes


# ---------------------------------------------------------------- through the cells

@pytest.fixture
def noise_run(make_noise_run, tmp_path):
    return make_noise_run(tmp_path, 20)


def _cell(run, chosen: str, budget: int = 2, seed: int = 0, **settings):
    config = EvalConfig(selection=chosen, lp_pca=8, lp_k=5, **settings)
    return open_cell("labelprop", run, budget, seed, device="cpu", config=config)


@pytest.mark.parametrize("chosen", ["uniform", "typical", "cover"])
def test_a_selection_never_reads_a_label(noise_run, monkeypatch, chosen):
    real = cells.dataset_splits(noise_run.config)
    picks = []
    for labels in (real.train.labels, real.train.labels[torch.randperm(len(real.train.labels),
                                                                       generator=torch.Generator().manual_seed(1))]):
        garbage = replace(real, train=replace(real.train, labels=labels))
        monkeypatch.setattr(cells, "dataset_splits", lambda config, s=garbage: s)
        selection._SPLITS.clear()
        for kept in noise_run.path.glob("selection-*.pt"):  # chosen anew, not read back
            kept.unlink()
        train, val = _cell(noise_run, chosen, val_per_class=0).labeled_split()
        assert len(val) == 0 and len(train) == 2 * real.train.num_classes
        picks.append(train.tolist())
    assert picks[0] == picks[1]


@pytest.mark.parametrize("chosen", ["uniform", "typical", "cover"])
def test_selected_images_come_from_the_pool_and_never_from_the_validation_images(noise_run, chosen):
    train, val = _cell(noise_run, chosen, val_per_class=2).labeled_split()
    assert len(train) == 6 and len(val) == 6 and not set(train.tolist()) & set(val.tolist())
    # the balanced draw keeps the study's validation images: the same ones
    assert torch.equal(_cell(noise_run, "balanced", val_per_class=2).labeled_split()[1], val)


def test_a_budget_larger_than_the_pool_is_one_line(noise_run):
    with pytest.raises(ValueError, match=r"^budget=30 is not allowed with selection='typical': 90 labeled images "
                                         r"in all, and the pool holds \d+ images to choose from; allowed: budget ≤ "):
        _cell(noise_run, "typical", budget=30, val_per_class=0).labeled_split()


def test_a_selection_is_part_of_the_cells_key_and_its_row(noise_run, tmp_path):
    keys = {chosen: _cell(noise_run, chosen).key for chosen in ("balanced", "uniform", "typical", "cover")}
    assert len({str(sorted(k.items())) for k in keys.values()}) == 4
    assert keys["typical"]["select_k"] == 20 and "select_k" not in keys["uniform"]
    # the k-means starts are in a typical cell's key where they are not 1 (typical cells stored
    # before starts existed keep their key), and in no other selection's
    assert "select_starts" not in keys["typical"]
    ten = _cell(noise_run, "typical", select_starts=10).key
    assert ten["select_starts"] == 10 and {k: v for k, v in ten.items() if k != "select_starts"} == keys["typical"]
    assert "select_starts" not in _cell(noise_run, "cover", select_starts=10).key
    row = cells.open_cell("labelprop", noise_run, 2, 0, device="cpu", out=str(tmp_path),
                          config=EvalConfig(selection="typical", lp_pca=8, lp_k=5, val_per_class=0)
                          ).computed(__import__("sslab.evaluate.labelprop", fromlist=["x"]).compute_labelprop)
    assert row["selection"] == "typical" and row["val_per_class"] == 0 and row["val_acc"] is None


@pytest.mark.parametrize("field, value, allowed", [("selection", "best", "balanced, uniform, typical, cover"),
                                                   ("select_purity", 1.0, "a number in (0, 1)"),
                                                   ("val_per_class", -1, "an integer from 0 to")])
def test_bad_selection_settings_are_one_line(field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{field}={value!r} is not (allowed|known); allowed: "
                                         + allowed.replace("(", r"\(").replace(")", r"\)")):
        replace(EvalConfig(), **{field: value}).validate()


def test_the_command_line_refuses_an_unknown_selection_before_any_work(noise_run, tmp_path, capsys):
    from sslab.cli import main
    code = main(["evaluate", "--run", str(noise_run.path), "--labels", "2", "--selection", "best", "--out",
                 str(tmp_path / "cells"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --selection='best' is not known; allowed: balanced, uniform")
    assert err.count("\n") == 1 and not (tmp_path / "cells").exists()


def test_a_choice_is_kept_in_the_runs_folder_and_read_back_by_another_process(noise_run, monkeypatch):
    """Every protocol's cell (and a worker process, or the next notebook) reads the choice made
    once; a kept choice that is damaged is made again."""
    first = _cell(noise_run, "typical", val_per_class=0).labeled_split()
    (kept,) = noise_run.path.glob("selection-*.pt")
    selection._SPLITS.clear()  # as in another process

    def forbidden(*args, **kwargs):
        raise AssertionError("the choice was made again")
    with monkeypatch.context() as patch:
        patch.setattr(selection, "select_typical", forbidden)
        again = _cell(noise_run, "typical", val_per_class=0).labeled_split()
    assert torch.equal(again[0], first[0])
    selection._SPLITS.clear()
    kept.write_bytes(kept.read_bytes()[:-20])  # damaged: made again, the same choice
    assert torch.equal(_cell(noise_run, "typical", val_per_class=0).labeled_split()[0], first[0])



def noise_run_classes(run) -> int:
    return cells.dataset_splits(run.config).train.num_classes


def test_choices_with_other_k_means_starts_are_stored_apart(noise_run, monkeypatch):
    from pathlib import Path
    one = _cell(noise_run, "typical", budget=3, val_per_class=0).labeled_split()[0]
    stored = set(Path(noise_run.path).glob("selection-*.pt"))
    monkeypatch.setattr(selection, "_SPLITS", {})  # nothing kept in memory: the files alone
    ten = _cell(noise_run, "typical", budget=3, val_per_class=0, select_starts=10).labeled_split()[0]
    # a choice of its own, made with ten starts (not read back from the one-start file)
    assert len(set(Path(noise_run.path).glob("selection-*.pt")) - stored) == 1
    assert len(ten) == len(one) == 3 * noise_run_classes(noise_run)
    # and the one-start file is still the one-start choice
    monkeypatch.setattr(selection, "_SPLITS", {})
    assert torch.equal(_cell(noise_run, "typical", budget=3, val_per_class=0).labeled_split()[0], one)
