"""Five of the levers that shortened `make lab`, each timed against what it replaced, on the shapes
the lab uses:

- the optimiser step: torch's per-tensor Adam and SGD against their fused form (one kernel a
  step), on the parameters of 32 stacked probe heads (Adam) and of a quarter-width AlexNet
  (SGD, Nesterov momentum, as rotation and FixMatch use it);
- label propagation's 20 multiplications by the normalised affinity of a 20 000-node k-NN graph
  (k = 20, the notebooks' pool), with the sparse matrix in coordinate form and in compressed rows;
- building that normalised affinity: two passes of torch's ``coalesce`` (the first sums W = A + Aᵀ,
  the second re-sorts what is already sorted) against one sort of the flat positions, which gives
  the same matrix bit for bit (checked here; tests/test_labelprop.py checks it on a k-NN graph);
- ProbCover's δ and its δ-balls for the notebooks' pool size (20 000 points, 128 dimensions, ten
  clusters, balls the size of notebook 07's: :func:`cover_points`): a pass over all the distances
  for δ and another for the balls, against the one pass that keeps the balls' pairs as it finds δ
  (the same δ and pairs, checked here);
- a label propagation cell's five propagations over one graph (its own labeled images and four
  held-out splits of them, as ``choice_folds`` 5 makes them: the same kept pool images, other
  labeled ones), each building its whole graph and sorting all of W's positions, against the
  pool's share built and sorted once and each labeled set's few positions merged in (the same
  distributions bit for bit, checked here).

    python -m benchmarks.levers            # one thread, the median of 5 repeats each (3 for ProbCover)
    python -m benchmarks.levers --only cover
    python -m benchmarks.levers --only cover --threads 2   # as a notebook's kernel computes it
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _median_seconds(step, repeats: int = 5, per_repeat: int = 20) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(per_repeat):
            step()
        times.append((time.perf_counter() - started) / per_repeat)
    return statistics.median(times)


def optimizer_step(kind: str, fused: bool) -> float:
    """Seconds of one step of ``kind`` (adam, sgd) over the lab's parameter shapes."""
    from sslab.models import BackboneConfig, build_backbone
    generator = torch.Generator().manual_seed(0)
    if kind == "adam":  # 32 probe heads stacked: 1024 → 200 → 200 → 10, with BatchNorm
        shapes = [(32, 200, 1024), (32, 200), (32, 200), (32, 200), (32, 200, 200), (32, 200), (32, 200), (32, 200),
                  (32, 10, 200), (32, 10)]
        params = [torch.randn(*s, generator=generator).requires_grad_() for s in shapes]
    else:
        params = list(build_backbone(BackboneConfig(1, 28, 0.25)).parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    options = dict(fused=True) if fused else {}
    optimizer = (torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4, **options) if kind == "adam" else
                 torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, **options))
    return _median_seconds(optimizer.step)


def propagation(layout: str, nodes: int = 20000, k: int = 20, classes: int = 10) -> float:
    """Seconds of label propagation's 20 multiplications, the affinity in ``layout`` (coo, csr)."""
    from sslab.evaluate.graph import normalized_affinity
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(nodes).repeat_interleave(k)
    cols = torch.randint(nodes, (nodes * k,), generator=generator)
    affinity = normalized_affinity(rows, cols, torch.rand(nodes * k, generator=generator), nodes)
    if layout == "csr":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            affinity = affinity.to_sparse_csr()
    z = torch.rand(nodes, classes, generator=generator)

    def twenty():
        for _ in range(20):
            affinity @ z
    return _median_seconds(twenty, per_repeat=1)


def coalesced_affinity(rows, cols, sims, n: int, gamma: float = 3.0) -> torch.Tensor:
    """The normalised affinity as the lab built it before: W = A + Aᵀ by ``coalesce``, then the
    normalised values coalesced again."""
    weights = sims.clamp(min=0).pow(gamma)
    w = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                torch.cat([weights, weights]), (n, n), check_invariants=False).coalesce()
    i, j = w.indices()
    inv_sqrt = torch.zeros(n).index_add_(0, i, w.values()).clamp(min=1e-12).rsqrt()
    return torch.sparse_coo_tensor(w.indices(), w.values() * inv_sqrt[i] * inv_sqrt[j], (n, n),
                                   check_invariants=False).coalesce()


def affinity_build(how: str, nodes: int = 20000, k: int = 20) -> float:
    """Seconds to build the normalised affinity of a ``nodes``-node k-NN graph plus 40 labeled
    nodes' edges, ``how``: coalesce (before) or sort (the lab's :func:`normalized_affinity`)."""
    from sslab.evaluate.graph import knn_search, normalized_affinity
    generator = torch.Generator().manual_seed(0)
    points = torch.nn.functional.normalize(torch.randn(nodes, 16, generator=generator), dim=1)
    sims, idx = knn_search(points, points, k, skip_self=True)
    rows = torch.cat([torch.arange(nodes).repeat_interleave(k), torch.arange(nodes, nodes + 40).repeat_interleave(k)])
    cols = torch.cat([idx.flatten(), torch.randint(nodes, (40 * k,), generator=generator)])
    sims = torch.cat([sims.flatten(), torch.rand(40 * k, generator=generator)])
    before = coalesced_affinity(rows, cols, sims, nodes + 40)
    after = normalized_affinity(rows, cols, sims, nodes + 40)
    assert torch.equal(before.indices(), after.indices()) and torch.equal(before.values(), after.values())
    build = coalesced_affinity if how == "coalesce" else normalized_affinity
    return _median_seconds(lambda: build(rows, cols, sims, nodes + 40), per_repeat=1)


def radius_alone(points: torch.Tensor, clusters: int, seed: int, purity: float = 0.95, block: int = 2048) -> float:
    """ProbCover's δ as the lab computed it before the balls came with it: a pass of its own."""
    from sslab.evaluate.selection import kmeans
    assign = kmeans(points, clusters, seed)
    other = torch.empty(points.shape[0])
    for start in range(0, points.shape[0], block):
        distances = torch.cdist(points[start:start + block].float(), points.float())
        distances[assign[start:start + block, None] == assign[None, :]] = float("inf")
        other[start:start + block] = distances.min(1).values
    finite = other[torch.isfinite(other)]
    return float(torch.quantile(finite, 1 - purity))


def cover_points(nodes: int = 20000, dims: int = 128, latent: int = 6, clusters: int = 10) -> torch.Tensor:
    """Points like the ones ProbCover chooses from: ``clusters`` Gaussian blobs in a ``latent``-
    dimensional space, mapped into ``dims`` dimensions (with a little noise) and onto the unit
    sphere. With 6 latent dimensions a δ-ball holds ~20 points, as on SimCLR's pool in notebook 07
    (rotation's: 40–50); where the points fill all 128 dimensions, the pairs just above δ are too
    many to keep and the lab makes its second pass as before."""
    generator = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(clusters, latent, generator=generator)
    members = torch.randint(clusters, (nodes,), generator=generator)
    inner = centres[members] + torch.randn(nodes, latent, generator=generator)
    noise = 0.05 * torch.randn(nodes, dims, generator=generator)
    outer = inner @ torch.randn(latent, dims, generator=generator) + noise
    return torch.nn.functional.normalize(outer, dim=1)


def cover_passes(how: str, points: torch.Tensor, clusters: int = 10, repeats: int = 3) -> float:
    """Seconds for δ and its balls, ``how``: two passes (before) or one (the lab's)."""
    from sslab.evaluate import selection
    radius = radius_alone(points, clusters, 0)
    selection._KEPT.clear()
    assert selection.purity_radius(points, clusters, 0) == radius
    kept = selection.ball_edges(points, radius)
    alone = selection._ball_edges(points, radius, 2048)
    assert torch.equal(kept[0], alone[0]) and torch.equal(kept[1], alone[1])

    def step():
        selection._KEPT.clear()
        if how == "two passes":
            selection._ball_edges(points, radius_alone(points, clusters, 0), 2048)
        else:
            selection.ball_edges(points, selection.purity_radius(points, clusters, 0))
    return _median_seconds(step, repeats=repeats, per_repeat=1)


def shared_propagations(how: str, nodes: int = 20000, k: int = 20, labeled: int = 40, repeats: int = 5) -> float:
    """Seconds for five propagations of one cell over a ``nodes``-node k-NN graph (``labeled``
    labeled images each, the kept pool images the same), ``how``: each its whole graph (before) or
    the pool's share kept (the lab's :func:`~sslab.evaluate.graph.propagate_cell`)."""
    from sslab.evaluate import graph as g
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(nodes, 32, generator=generator)
    graph = g.build_pool_graph(points, k=k, pca=None)
    keep = torch.ones(nodes, dtype=torch.bool)
    keep[:100] = False  # the cell's labeled and validation images
    sets = [points[torch.randperm(100, generator=generator)[:labeled]] for _ in range(5)]
    labels = torch.arange(labeled) % 10

    def whole(features):
        labeled_nodes = graph.project(features)
        edges = g.cell_edges(graph, keep, labeled_nodes)
        affinity = g.normalized_affinity(edges.rows, edges.cols, edges.sims, labeled + len(edges.kept))
        return g.propagate(affinity, torch.cat([labels, torch.full((len(edges.kept),), -1)]), 10)

    def shared(features):
        return g.propagate_cell(graph, keep, features, labels, [], 10, 0.99, 3.0, 20).probs
    g._POOL_PARTS.clear()
    assert all(torch.equal(whole(f), shared(f)) for f in sets)

    def step():
        g._POOL_PARTS.clear()  # each repeat a cell of its own
        for features in sets:
            (whole if how == "whole" else shared)(features)
    return _median_seconds(step, repeats=repeats, per_repeat=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("optimizer", "propagation", "affinity", "cover", "shared"), help="one row")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads (default 1: a worker's; a notebook's kernel has the machine's cores)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads} is not allowed; allowed: 1 or more")
    torch.set_num_threads(args.threads)
    print("| what | before | after | speed-up |\n|---|---|---|---|")
    if args.only in (None, "optimizer"):
        for kind, what in (("adam", "Adam step, 32 stacked probe heads"), ("sgd", "SGD step, quarter-width AlexNet")):
            before, after = optimizer_step(kind, False), optimizer_step(kind, True)
            print(f"| {what} | {1e3 * before:.2f} ms (per tensor) | {1e3 * after:.2f} ms (fused) | "
                  f"{before / after:.1f}× |")
    if args.only in (None, "propagation"):
        before, after = propagation("coo"), propagation("csr")
        print(f"| label propagation, 20 steps on 20 000 nodes | {1e3 * before:.0f} ms (coordinates) | "
              f"{1e3 * after:.0f} ms (compressed rows) | {before / after:.1f}× |")
    if args.only in (None, "affinity"):
        before, after = affinity_build("coalesce"), affinity_build("sort")
        print(f"| its normalised affinity, built from the k-NN edges (20 000 + 40 nodes) | {1e3 * before:.0f} ms "
              f"(coalesce twice) | {1e3 * after:.0f} ms (one sort, the same matrix) | {before / after:.1f}× |")
    if args.only in (None, "shared"):
        before, after = shared_propagations("whole"), shared_propagations("shared")
        print(f"| a cell's five propagations, 20 000 nodes (its own labeled images and four held-out splits) | "
              f"{1e3 * before:.0f} ms (each its whole graph) | {1e3 * after:.0f} ms (the pool's sorted share kept, "
              f"the same distributions) | {before / after:.2f}× |")
    if args.only in (None, "cover"):
        points = cover_points()
        before, after = cover_passes("two passes", points), cover_passes("one pass", points)
        print(f"| ProbCover's δ and δ-balls, 20 000 points | {before:.2f} s (two passes) | {after:.2f} s (one pass, "
              f"the same δ and balls) | {before / after:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
