"""sslab/evaluate/labelprop.py: the k-NN search and graph against brute force, propagation on
a set whose answer is known, inductive scoring that never reads a test label."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sslab.checks import MAX_COUNT
from sslab.evaluate import graph as graph_module
from sslab.evaluate import pool
from sslab.evaluate import labelprop as lp


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_knn_search_in_blocks_is_brute_force_top_k():
    queries, bank = _unit(37, 8, 0), _unit(101, 8, 1)
    sims, idx = graph_module.knn_search(queries, bank, 5, block=16)  # blocks smaller than both sets
    full = queries @ bank.T
    top_s, top_i = full.topk(5, dim=1)
    torch.testing.assert_close(sims, top_s)
    assert torch.equal(idx, top_i)
    self_s, self_i = graph_module.knn_search(bank, bank, 3, block=16, skip_self=True)
    full = bank @ bank.T
    full.fill_diagonal_(-math.inf)
    assert torch.equal(self_i, full.topk(3, dim=1).indices)
    assert not (self_i == torch.arange(101)[:, None]).any()


def test_normalized_affinity_is_the_formula():
    rows, cols = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 2, 3])
    sims = torch.tensor([0.9, 0.5, -0.2, 0.8])
    w = graph_module.normalized_affinity(rows, cols, sims, 4, gamma=3.0).to_dense()
    a = torch.zeros(4, 4)
    a[rows, cols] = sims.clamp(min=0) ** 3
    a = a + a.T
    d = a.sum(1).clamp(min=1e-12).rsqrt()
    torch.testing.assert_close(w, d[:, None] * a * d[None, :])
    torch.testing.assert_close(w, w.T)


def test_normalized_affinity_matches_torchs_coalesce_bit_for_bit():
    # a k-NN graph with mutual edges (i → j and j → i), joined by labeled nodes as a cell joins them
    points = torch.nn.functional.normalize(torch.randn(300, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    sims, idx = graph_module.knn_search(points, points, 6, skip_self=True)
    rows = torch.cat([torch.arange(300).repeat_interleave(6), torch.arange(300, 305).repeat_interleave(6)])
    cols = torch.cat([idx.flatten(), torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(4))])
    sims = torch.cat([sims.flatten(), torch.rand(30, generator=torch.Generator().manual_seed(5))])
    got = graph_module.normalized_affinity(rows, cols, sims, 305, gamma=3.0)
    weights = sims.clamp(min=0).pow(3.0)
    w = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                torch.cat([weights, weights]), (305, 305)).coalesce()
    i, j = w.indices()
    inv_sqrt = torch.zeros(305).index_add_(0, i, w.values()).clamp(min=1e-12).rsqrt()
    assert got.is_coalesced()
    assert torch.equal(got.indices(), w.indices())
    assert torch.equal(got.values(), w.values() * inv_sqrt[i] * inv_sqrt[j])


def test_propagation_recovers_two_clusters_from_one_label_each():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [-4.0, 0.0, 0.0]])
    truth = torch.arange(200) % 2
    points = centres[truth] + torch.randn(200, 3, generator=generator)
    graph = graph_module.build_pool_graph(points, k=8, pca=None)
    keep = torch.ones(200, dtype=torch.bool)
    keep[[0, 1]] = False  # the two labeled images join as labeled nodes, not as pool nodes
    queries = centres[torch.tensor([0, 1, 1])] + 0.5 * torch.randn(3, 3, generator=generator)
    result = graph_module.propagate_cell(graph, keep, points[[0, 1]], truth[[0, 1]], [queries], 2, alpha=0.99,
                                         gamma=3.0, iterations=30)
    assert torch.equal(result.probs[2:].argmax(1), truth[result.pool_rows])  # every pool image
    assert torch.equal(result.query_scores[0].argmax(1), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(result.probs.sum(1), torch.ones(len(result.probs)))


def test_each_class_gets_the_same_seed_mass_however_many_labels_it_has():
    affinity = graph_module.normalized_affinity(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.0]), 5)
    labels = torch.tensor([0, 0, 0, 1, -1])
    probs = graph_module.propagate(affinity, labels, 2, alpha=0.5, iterations=1)  # no edge carries anything
    torch.testing.assert_close(probs[:4], torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]]))
    torch.testing.assert_close(probs[4], torch.tensor([0.5, 0.5]))  # nothing arrived: uniform


def test_pool_keep_leaves_out_the_cells_labeled_and_validation_images():
    rows = torch.tensor([5, 2, 9, 7])
    keep = pool.pool_keep(rows, 4, (torch.tensor([2]), torch.tensor([7, 11])), "cpu")
    assert keep.tolist() == [True, False, True, False]
    assert pool.pool_keep(None, 3, (torch.tensor([0]),), "cpu").tolist() == [True, True, True]


def test_the_cell_never_reads_a_test_label(monkeypatch, tmp_path, make_noise_run):
    """The same scores whatever the test labels are: only the metrics read them."""
    from sslab.data import DatasetSplits, ImageSet
    from sslab.evaluate import features
    from sslab.evaluate import cells
    from sslab.evaluate.cells import EvalConfig

    run = make_noise_run(tmp_path, 20)
    real = features.dataset_splits(run.config)
    scores = []
    for test_labels in (real.test.labels, real.test.labels.flip(0)):
        splits = DatasetSplits(real.name, real.train, ImageSet(real.test.images, test_labels, real.test.classes),
                               real.unlabeled, pool_is_train=True)
        monkeypatch.setattr(pool, "dataset_splits", lambda config, s=splits: s)
        monkeypatch.setattr(cells, "dataset_splits", lambda config, s=splits: s)
        pool._GRAPHS.clear()
        cfg = replace(EvalConfig(val_per_class=2, lp_k=5, lp_pca=8), layer="conv4", precision="fp32")
        result, _ = lp.labelprop_of(cells.open_cell("labelprop", run, 3, 0, device="cpu", config=cfg))
        scores.append(result.query_scores[1])
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)


@pytest.mark.parametrize("field, value, allowed", [("lp_alpha", 1.0, "a number in (0, 1)"),
                                                   ("lp_k", 0, f"an integer from 1 to {MAX_COUNT}"),
                                                   ("lp_pca", -1, f"an integer from 0 to {MAX_COUNT}"),
                                                   ("lp_gamma", 0.0, "a number > 0")])
def test_bad_graph_settings_name_the_setting(field, value, allowed):
    from sslab.evaluate.cells import EvalConfig
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not allowed; allowed: {allowed}".replace("(", r"\(")
                       .replace(")", r"\)")):
        replace(EvalConfig(), **{field: value}).validate()


def test_known_test_neighbours_give_the_same_scores_as_searching_every_node():
    """A graph keeps the test images' nearest pool images (k + spare); a cell passes over its dropped
    images in them instead of searching again — the same votes, also when a query loses more
    neighbours than the spare ones and is searched in full."""
    generator = torch.Generator().manual_seed(4)
    pool_points = torch.randn(300, 6, generator=generator)
    graph = graph_module.build_pool_graph(pool_points, k=5, pca=None)
    queries = torch.randn(40, 6, generator=generator)
    queries[0] = pool_points[:20].mean(0)  # a query among the images the cell drops
    known = graph_module.knn_search(graph.project(queries), graph.nodes, 5 + 3)  # few spares: the fallback runs
    keep = torch.ones(300, dtype=torch.bool)
    keep[:20] = False
    labeled_features, labels = pool_points[:4] + 0.01, torch.tensor([0, 1, 0, 1])
    args = (graph, keep, labeled_features, labels, [queries], 2, 0.9, 3.0, 10)
    plain = graph_module.propagate_cell(*args)
    fast = graph_module.propagate_cell(*args, known_neighbours=[known])
    torch.testing.assert_close(fast.query_scores[0], plain.query_scores[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma", [3.0, 2.7])
def test_a_cells_propagations_share_the_pools_sorted_edges_and_give_the_same_bits(gamma):
    """propagate_cell sorts the pool's share of W's positions once per kept set and merges each
    labeled set's few in: the same affinity, distributions and votes, bit for bit, as building the
    cell's whole graph (cell_edges) and its normalised affinity each time — for the held-out splits
    of one cell (the same kept images and number of labeled images, other labeled images), also
    where γ is no integer (the weights are computed over the edges in the same order)."""
    generator = torch.Generator().manual_seed(7)
    pool_points = torch.randn(400, 6, generator=generator)
    graph = graph_module.build_pool_graph(pool_points, k=6, pca=None)
    queries = torch.randn(30, 6, generator=generator)
    keep = torch.ones(400, dtype=torch.bool)
    keep[:25] = False
    graph_module._POOL_PARTS.clear()
    for split in range(4):
        rows = torch.randperm(25, generator=generator)[:8]  # a held-out split's labeled images
        labeled_features, labels = pool_points[rows] + 0.01, torch.arange(8) % 3
        got = graph_module.propagate_cell(graph, keep, labeled_features, labels, [queries], 3, 0.9, gamma, 10)
        nodes = graph.project(labeled_features)
        edges = graph_module.cell_edges(graph, keep, nodes)
        affinity = graph_module.normalized_affinity(edges.rows, edges.cols, edges.sims, 8 + len(edges.kept), gamma)
        probs = graph_module.propagate(affinity, torch.cat([labels, torch.full((len(edges.kept),), -1)]), 3, 0.9, 10)
        scores = graph_module.inductive_scores(graph.project(queries), torch.cat([nodes, graph.nodes[edges.kept]]),
                                               probs, 6, gamma)
        assert torch.equal(got.probs, probs) and torch.equal(got.query_scores[0], scores)
        assert len(graph_module._POOL_PARTS) == 1  # one kept set, one number of labeled images: one part
    graph_module.propagate_cell(graph, keep, pool_points[:5], torch.arange(5) % 3, [queries], 3, 0.9, gamma, 10)
    assert len(graph_module._POOL_PARTS) == 2  # five labeled images: node indices move, another part


def test_balance_classes_is_sinkhorn_by_hand():
    """One step by hand: columns to equal mass, then rows to distributions; many steps: every
    class holds N / C; a class no row gives mass stays empty; 0 steps: unchanged."""
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    col = p / torch.tensor([[2.3, 0.7]])
    torch.testing.assert_close(graph_module.balance_classes(p, 1), col / col.sum(1, keepdim=True))
    many = graph_module.balance_classes(p, 200)
    torch.testing.assert_close(many.sum(1), torch.ones(3))
    torch.testing.assert_close(many.sum(0), torch.tensor([1.5, 1.5]), rtol=0, atol=1e-4)
    assert many[:, 1].argmax() == 2 and many[:, 0].argmax() == 0  # the order within a class is kept
    empty = graph_module.balance_classes(torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.5, 0.0]]), 10)
    assert torch.equal(empty[:, 2], torch.zeros(2))
    assert graph_module.balance_classes(p, 0) is p


def test_balance_moves_a_flooded_class_back_and_leaves_the_labeled_rows():
    """Two clusters, one three times the other, the boundary image nearer the big cluster's label:
    balancing the pool's class mass moves pool images to the small class, never away from it,
    and the labeled images' rows stay what propagation gave them."""
    generator = torch.Generator().manual_seed(0)
    big, small = torch.randn(90, 4, generator=generator) * 0.6, torch.randn(30, 4, generator=generator) * 0.6 + 1.5
    pool_points = torch.cat([big, small])
    graph = graph_module.build_pool_graph(pool_points, k=8, pca=None)
    keep = torch.ones(120, dtype=torch.bool)
    labeled_features, labels = torch.stack([big.mean(0), small.mean(0)]), torch.tensor([0, 1])
    args = (graph, keep, labeled_features, labels, [pool_points], 2, 0.99, 3.0, 20)
    plain = graph_module.propagate_cell(*args)
    balanced = graph_module.propagate_cell(*args, balance=5)
    torch.testing.assert_close(balanced.probs[:2], plain.probs[:2], rtol=0, atol=0)
    torch.testing.assert_close(balanced.probs[2:], graph_module.balance_classes(plain.probs[2:], 5))
    before, after = plain.query_scores[0].argmax(1), balanced.query_scores[0].argmax(1)
    assert not ((before == 1) & (after == 0)).any()
    assert balanced.probs[2:, 1].sum() > plain.probs[2:, 1].sum()


def test_lp_balance_is_keyed_only_when_on(tmp_path, make_noise_run):
    from sslab.evaluate import cells
    from sslab.evaluate.cells import EvalConfig
    run = make_noise_run(tmp_path, 20)
    for kind in ("labelprop", "selftrain"):
        off = cells.open_cell(kind, run, 2, 0, device="cpu", config=EvalConfig()).key
        on = cells.open_cell(kind, run, 2, 0, device="cpu", config=EvalConfig(lp_balance=5)).key
        assert "lp_balance" not in off and on["lp_balance"] == 5
        assert {k: v for k, v in on.items() if k != "lp_balance"} == off
    assert "lp_balance" not in cells.open_cell("probe", run, 2, 0, device="cpu", config=EvalConfig(lp_balance=5)).key
    with pytest.raises(ValueError, match=r"lp_balance=-1 is not allowed; allowed: an integer from 0 to \d+ "
                                         r"\(Sinkhorn steps to equal class mass; 0: none\)"):
        EvalConfig(lp_balance=-1).validate()


def test_a_vote_of_one_hot_labels_weighs_each_neighbour_by_its_similarity_to_the_power_gamma():
    """inductive_scores with known neighbours and one-hot node labels: a weighted k-NN vote (what
    benchmarks/graph_ceiling.py --every-label counts)."""
    sims = torch.tensor([[0.9, 0.8, 0.7], [0.5, -0.9, 0.45]])
    indices = torch.tensor([[0, 1, 2], [2, 0, 1]])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 0, 0]), 2).float()

    def vote(k, gamma):
        return graph_module.inductive_scores(None, None, labels, k, gamma, (sims[:, :k], indices[:, :k])).argmax(1)

    # query 0: 1-NN class 1; 3 neighbours, γ 1: class 0 has 0.8 + 0.7 > 0.9
    assert vote(1, 1.0).tolist()[0] == 1
    assert vote(3, 1.0).tolist()[0] == 0
    # γ 3: 0.8³ + 0.7³ = 0.855 still beats 0.9³ = 0.729; γ 6: 0.9⁶ = 0.531 beats 0.8⁶ + 0.7⁶ = 0.380
    assert vote(3, 3.0).tolist()[0] == 0
    assert vote(3, 6.0).tolist()[0] == 1
    # query 1: the negative similarity counts nothing, so class 0 (0.5 + 0.45 against 0) wins at k 3
    assert vote(3, 1.0).tolist()[1] == 0


def _small_graph_rows(monkeypatch, tmp_path, make_noise_run) -> tuple:
    """benchmarks.graph_ceiling set to 2 budgets × 2 seeds of a small noise run, and the graph's
    top-1 of the lab's own label propagation cells there: ``(module, run, out, top-1s)``."""
    from benchmarks import graph_ceiling
    from sslab.evaluate.cells import EvalConfig
    from sslab.evaluate.labelprop import labelprop_cell
    run = make_noise_run(tmp_path, 12)
    settings = dict(graph_ceiling.GRAPH_ONLY, lp_k=3, lp_pca=0, val_per_class=2, select_min_cluster=0)
    monkeypatch.setattr(graph_ceiling, "GRAPH_ONLY", settings)
    monkeypatch.setattr(graph_ceiling, "BUDGETS", (1, 2))
    monkeypatch.setattr(graph_ceiling, "SEEDS", (0, 1))
    out = str(tmp_path / "out")
    expected = [[labelprop_cell(run, b, s, device="cpu", out=out, config=EvalConfig(**settings))["graph_top1"]
                 for s in (0, 1)] for b in (1, 2)]
    assert len({a for row in expected for a in row}) > 1  # the seeds and budgets label differently
    return graph_ceiling, run, out, expected


def test_one_graphs_vote_is_the_cells_own_graph_top1(monkeypatch, tmp_path, make_noise_run):
    """benchmarks.graph_ceiling's vote of the graphs, with rotation's graph alone, gives the top-1 of
    the lab's label propagation cell on the same images (its graph alone); two votes of the same
    graph give it too (the scores only double), and so does that graph alone under another name."""
    graph_ceiling, run, out, expected = _small_graph_rows(monkeypatch, tmp_path, make_noise_run)
    assert graph_ceiling.voted_row({"rotation": run}, (), "cpu", out) == expected
    assert graph_ceiling.voted_row({"rotation": run, "again": run}, ("again",), "cpu", out) == expected
    # one graph alone (another run's, here the same one under another name), from rotation's images
    assert graph_ceiling.crossed_row({"rotation": run, "again": run}, "rotation", "again", "cpu", out) == expected


def test_choosing_and_propagating_in_one_run_is_the_cells_own_graph_top1(monkeypatch, tmp_path, make_noise_run):
    """benchmarks.graph_ceiling's crossed row, where the run that chooses is the run whose graph
    propagates (under either name), gives the top-1 of the lab's label propagation cell (its graph
    alone, on the same images)."""
    graph_ceiling, run, out, expected = _small_graph_rows(monkeypatch, tmp_path, make_noise_run)
    runs = {"rotation": run, "again": run}
    assert graph_ceiling.crossed_row(runs, "rotation", "rotation", "cpu", out) == expected
    assert graph_ceiling.crossed_row(runs, "again", "rotation", "cpu", out) == expected
    # a setting given to the cells, here the lab's own value
    assert graph_ceiling.crossed_row(runs, "rotation", "rotation", "cpu", out, extra={"select_starts": 1}) == expected


def test_the_budget_aware_cover_asked_for_no_coverage_is_the_labs_cover_cell(monkeypatch, tmp_path, make_noise_run):
    """benchmarks.graph_ceiling's budget-aware ProbCover takes the first radius of its purity grid
    whose balls cover enough of the pool: asked for none, ProbCover's own (purity 0.95), so its
    images and top-1 are the lab's cover cell's (its graph alone); asked to cover everything, it
    goes down the grid to a larger radius."""
    from sslab.evaluate.cells import EvalConfig
    from sslab.evaluate.labelprop import labelprop_cell
    graph_ceiling, run, out, _ = _small_graph_rows(monkeypatch, tmp_path, make_noise_run)
    cover = EvalConfig(**dict(graph_ceiling.GRAPH_ONLY, selection="cover"))
    rows = [[labelprop_cell(run, b, s, device="cpu", out=out, config=cover) for s in (0, 1)] for b in (1, 2)]
    monkeypatch.setattr(graph_ceiling, "COVERAGE", 0.0)
    accs, classes, alphas = graph_ceiling.coverage_row(run, "cpu", out)
    assert accs == [[r["graph_top1"] for r in per_seed] for per_seed in rows]
    assert classes == [[r["labeled_classes"] for r in per_seed] for per_seed in rows]
    assert alphas == [[0.95, 0.95], [0.95, 0.95]]
    monkeypatch.setattr(graph_ceiling, "COVERAGE", 1.0)
    _, _, alphas = graph_ceiling.coverage_row(run, "cpu", out)
    assert all(a < 0.95 for per_seed in alphas for a in per_seed), alphas


def test_the_mirrored_graph_of_unmirrored_features_is_the_cells_own_graph(monkeypatch, tmp_path, make_noise_run):
    """benchmarks.graph_ceiling's mirrored row averages each image's features with its mirror
    image's: where the mirror gives the features themselves, its graph, labeled images and vote are
    the lab's label propagation cell's (its graph alone, on the same images)."""
    graph_ceiling, run, out, expected = _small_graph_rows(monkeypatch, tmp_path, make_noise_run)
    monkeypatch.setattr(graph_ceiling, "mirrored", lambda cell, split, rows: cell.features(split, rows))
    assert graph_ceiling.mirrored_row(run, "cpu", out) == expected


def test_mirrored_features_are_the_features_of_the_images_flipped_left_to_right(tmp_path, make_noise_run):
    """graph_ceiling.mirrored: the features of images flipped left to right (of the mirror images,
    the features the cell itself reads), and the rows asked for, in their order."""
    from benchmarks import graph_ceiling
    from sslab.evaluate.cells import EvalConfig, open_cell
    run = make_noise_run(tmp_path, 4)
    cell = open_cell("labelprop", run, 1, 0, device="cpu", out=str(tmp_path / "out"),
                     config=EvalConfig(val_per_class=1, select_min_cluster=0))
    own = cell.features("test")
    mirror = graph_ceiling.mirrored(cell, "test", None)
    assert mirror.shape == own.shape and not torch.equal(mirror, own)  # noise images are not symmetric
    rows = torch.tensor([5, 0, 3])
    assert torch.equal(graph_ceiling.mirrored(cell, "test", rows), mirror[rows])
    images = cell.splits.test.images
    cell.splits.test.images = images.flip(-1)  # mirrored twice: the images themselves
    try:
        assert torch.equal(graph_ceiling.mirrored(cell, "test", None), own)
    finally:
        cell.splits.test.images = images
