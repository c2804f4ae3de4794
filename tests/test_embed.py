"""sslab/embed.py: stratified samples, the separation scores against hand computations, and
how UMAP is called (n_jobs=1 with a random_state, so it is repeatable and quiet)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from sslab import embed


def test_stratified_sample_takes_classes_evenly_and_is_seeded():
    labels = np.repeat(np.arange(5), [100, 50, 30, 10, 3])
    index = embed.stratified_sample(labels, 40, seed=1)
    assert len(index) == 40 and len(set(index.tolist())) == 40
    assert np.all(np.diff(index) > 0)  # sorted
    counts = np.bincount(labels[index], minlength=5)
    # the 3-image class is used up; the 37 others spread evenly over the four larger classes
    assert counts[4] == 3 and sorted(counts[:4].tolist()) == [9, 9, 9, 10]
    assert np.array_equal(index, embed.stratified_sample(labels, 40, seed=1))
    assert not np.array_equal(index, embed.stratified_sample(labels, 40, seed=2))


def test_stratified_sample_round_robin_order_and_all_points():
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    first = embed.stratified_sample(labels, 3, seed=0, sort=False)
    assert labels[first].tolist() == [0, 1, 2]  # one per class, in class order
    everything = embed.stratified_sample(labels, 100)
    assert everything.tolist() == list(range(7))


def test_stratified_sample_rejects_a_bad_count():
    with pytest.raises(ValueError, match=r"points=0 .*allowed: an integer ≥ 1"):
        embed.stratified_sample(np.zeros(5), 0)
    with pytest.raises(ValueError, match="examples='4'"):
        embed.stratified_sample(np.zeros(5), "4", name="examples")


def _knn_reference(x, y, k):
    """Brute force: for each point, sort the others by distance, vote among the k nearest,
    ties broken by the nearest tied label."""
    correct = 0
    for i in range(len(x)):
        d = [(float(np.sum((x[i] - x[j]) ** 2)), j) for j in range(len(x)) if j != i]
        nearest = [j for _, j in sorted(d)[:k]]
        votes = {}
        for rank, j in enumerate(nearest):
            votes.setdefault(y[j], []).append(rank)
        top = max(len(v) for v in votes.values())
        winner = min((v[0], label) for label, v in votes.items() if len(v) == top)[1]
        correct += winner == y[i]
    return correct / len(x)


def test_knn_accuracy_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    y = rng.integers(0, 3, size=60)
    for k in (1, 4, 5):
        assert embed.knn_accuracy(x, y, k) == pytest.approx(_knn_reference(x, y, k))


def test_knn_accuracy_is_perfect_on_separated_clusters_and_near_chance_on_noise():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20]])
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + rng.normal(size=(200, 2))
    assert embed.knn_accuracy(x, y) == 1.0
    shuffled = rng.permutation(y)
    assert embed.knn_accuracy(x, shuffled) < 0.45  # chance is 0.25


def test_knn_accuracy_checks_its_inputs():
    with pytest.raises(ValueError, match="k=10"):
        embed.knn_accuracy(np.zeros((5, 2)), np.zeros(5), k=10)
    with pytest.raises(ValueError, match="labels has shape"):
        embed.knn_accuracy(np.zeros((5, 2)), np.zeros(4))


def test_silhouette_matches_the_formula_by_hand():
    # Two classes on a line: a = {0, 1}, b = {4}.
    x = np.array([[0.0], [1.0], [4.0]])
    y = np.array([0, 0, 1])
    s0 = (4.0 - 1.0) / 4.0       # a(0)=1, b(0)=4
    s1 = (3.0 - 1.0) / 3.0       # a(1)=1, b(1)=3
    s2 = 0.0                     # a singleton class scores 0
    assert embed.silhouette(x, y) == pytest.approx((s0 + s1 + s2) / 3)


def test_silhouette_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 2))
    y = rng.integers(0, 4, size=80)
    assert embed.silhouette(x, y) == pytest.approx(metrics.silhouette_score(x, y), abs=1e-9)


def test_separation_names_the_allowed_scores():
    with pytest.raises(ValueError, match="score='auc'.*knn, silhouette"):
        embed.separation(np.zeros((4, 2)), np.zeros(4), "auc")


def test_umap_runs_single_threaded_with_a_random_state_on_standardised_features(monkeypatch):
    calls = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            calls.update(kwargs)

        def fit_transform(self, x):
            calls["x"] = x
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    features = np.random.default_rng(3).normal(5.0, 3.0, size=(10, 4))
    coords = embed.umap_2d(features, n_neighbors=15, random_state=7)
    assert calls["n_jobs"] == 1 and calls["random_state"] == 7 and calls["n_components"] == 2
    assert calls["n_neighbors"] == 9  # capped below the number of points
    assert np.allclose(calls["x"].mean(0), 0, atol=1e-5) and np.allclose(calls["x"].std(0), 1, atol=1e-3)
    assert coords.shape == (10, 2) and coords.dtype == np.float32


def test_embed_returns_coordinates_labels_and_score(monkeypatch):
    monkeypatch.setattr(embed, "umap_2d", lambda features, **kw: np.asarray(features)[:, :2])
    y = np.repeat([0, 1], 10)
    features = np.stack([y * 10.0, np.arange(20.0)], axis=1)
    result = embed.embed("rotation", features, y, "conv4", ["a", "b"])
    assert result.coords.shape == (20, 2) and result.score == 1.0
    assert result.score_label == "5-NN acc 100.0%" and result.classes == ["a", "b"]


UMAP_PROBE = """
import numpy as np
from sslab.embed import keep_umap_compiled, umap_2d
import umap.layouts
epoch = umap.layouts._nb_optimize_layout_euclidean_single_epoch
switched = keep_umap_compiled()
assert keep_umap_compiled() == 0  # once done, nothing more to switch
coords = umap_2d(np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
print(switched, type(epoch._cache).__name__, sum(epoch.stats.cache_hits.values()), coords[:3].round(4).tolist())
"""


@pytest.mark.slow
def test_umap_compiles_once_and_a_later_process_loads_the_same_code(tmp_path):
    """umap-learn compiles its layout optimiser at each process's first fit and does not keep it:
    with keep_umap_compiled the first process writes it to numba's disk cache, a second loads it
    (a cache hit, no compiling) and draws the same coordinates."""
    pytest.importorskip("umap")
    import os
    import subprocess
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", UMAP_PROBE], env=env, capture_output=True, text=True,
                                    check=True).stdout.split(" ", 3) for _ in range(2))
    assert int(first[0]) > 0 and first[1] != "NullCache"  # switched to a disk cache before compiling
    assert int(first[2]) == 0 and int(second[2]) >= 1  # compiled by the first process, loaded by the second
    assert first[3] == second[3]


def test_the_umap_warm_up_starts_only_before_the_umap_notebook_and_at_the_lowest_priority():
    import os
    import time
    from pathlib import Path

    from sslab.lab.notebooks import warm_umap_in_background
    assert warm_umap_in_background(["00_from_scratch", "02_probe", "04_label_curves"]) is None
    assert warm_umap_in_background(["03_latent_umap", "04_label_curves"]) is None  # nothing runs before it
    pytest.importorskip("umap")
    warming = warm_umap_in_background(["01_pretext", "03_latent_umap"])
    try:
        # its own session, so that Linux's per-session group is its own too, at the lowest priority
        assert os.getsid(warming.pid) == warming.pid != os.getsid(0)
        deadline = time.monotonic() + 30
        while os.getpriority(os.PRIO_PROCESS, warming.pid) != 19 and time.monotonic() < deadline:
            time.sleep(0.05)  # lowest_priority() runs as the process starts
        assert os.getpriority(os.PRIO_PROCESS, warming.pid) == 19
        group = Path(f"/proc/{warming.pid}/autogroup")
        if group.exists():
            while not group.read_text().strip().endswith("nice 19") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert group.read_text().strip().endswith("nice 19")
    finally:
        warming.kill()
        warming.wait()
