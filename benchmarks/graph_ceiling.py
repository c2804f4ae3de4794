"""How far the graph's vote goes on the notebooks' features, and what does not move it.

Label propagation's top-1 on the test set (the graph alone, no probe mixed in) with TypiClust's
images chosen on rotation's features, at 1, 2 and 4 labels per class, seeds 0, 1, 2: the lab's
graph, then one setting changed at a time (neighbours, PCA dimensions, diffusion steps, the
edges' exponent γ, the pooling grid), then the graph built on rotation's features joined with
another task's (each task's PCA-128 features L2-normalised, concatenated, normalised again),
then each task's own graph propagating from the same images with the test images' scores
summed over rotation's and other tasks' graphs (a vote of the graphs, where joining builds one
graph), then Poisson learning (Calder et al., ICML 2020) in place of Zhou et al.'s propagation on
the same graph. TypiClust chooses in the graph's space, so the rows that change the PCA or the grid
label other images; every other row labels the same images as the lab's graph.

With ``--mirrored``, the lab's graph and one built on the mean of each image's features and its
mirror image's (left to right), the pool, labeled and test images alike: features that a
horizontal flip, label-preserving on these images, moves less.

With ``--seeds-voted``, the graphs of rotation runs pretrained with other seeds (each on its own
20 000 images) vote with the notebooks' rotation graph from its TypiClust images: what an
ensemble of pretraining runs gives; then each of those runs from TypiClust's images on its own
features, and the notebooks' rotation graph from those images.

With ``--cover``, ProbCover's images with δ chosen at purities α below the paper's 0.95 (a
larger δ), on rotation's and SimCLR's features, propagated on the same graph, with the classes
the images cover; then a budget-aware δ (the smallest of those radii whose B balls cover half
the pool) on those runs and on rotation pretrained with other seeds.

With ``--starts``, TypiClust with one k-means start (the lab's) and with ten (the best by
inertia, as the paper's code), each run choosing on its own features, over the notebooks'
rotation run and rotation pretrained with seeds 1, 2 and 3.

With ``--crossed``, TypiClust's images chosen on rotation's or SimCLR's features and propagated
on rotation's or SimCLR's graph: whether one space chooses better and the other propagates better.

With ``--every-label``, only what each method's graph space allows when every pool image is
labeled: the test images' 1-NN and 20-NN votes over the labeled pool, and a softmax regression.

    SSLAB_OUTPUTS=outputs python -m benchmarks.graph_ceiling [--every-label | --voted | --seeds-voted | --mirrored
                                                             | --crossed | --cover | --starts]

The notebooks' runs (rotation, SimCLR, the VAEs, the random-init backbone at their CPU defaults)
are pretrained first if the store lacks them, as the notebooks would.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from sslab import lab
from sslab.evaluate.cells import EvalConfig, open_cell
from sslab.evaluate.features import cached_features
from sslab.evaluate.graph import (SPARE_NEIGHBOURS, PoolGraph, Projection, build_pool_graph, cell_edges,
                                 inductive_scores, knn_search, pca_project, propagate_cell)
from sslab.evaluate.labelprop import labelprop_cell
from sslab.evaluate.pool import pool_graph, pool_keep, pool_of
from sslab.models import extract_features
from sslab.pretrain import pretrain

BUDGETS = (1, 2, 4)
SEEDS = (0, 1, 2)
GRAPH_ONLY = dict(lp_probe_weights=(0.0,), choice_folds=1, selection="typical")
SETTINGS = [("the lab's graph: k 20, PCA 128, γ 3, 20 steps, grid 4", {}),
            ("k 10", {"lp_k": 10}), ("k 40", {"lp_k": 40}),
            ("PCA 64", {"lp_pca": 64}), ("PCA 256", {"lp_pca": 256}),
            ("50 steps", {"lp_iterations": 50}), ("100 steps", {"lp_iterations": 100}),
            ("γ 1", {"lp_gamma": 1.0}), ("γ 6", {"lp_gamma": 6.0}),
            ("grid 2 (features pooled 2×2)", {"grid": 2}), ("grid 1 (global pooling)", {"grid": 1})]
JOINED = [("simclr",), ("vae",), ("siamese-vae",), ("random-init",), ("simclr", "vae", "siamese-vae")]
VOTED = [("simclr",), ("vae",), ("siamese-vae",), ("simclr", "vae", "siamese-vae")]
PRETRAIN_SEEDS = (1, 2, 3)  # rotation pretrained again with these seeds, for --seeds-voted
PURITIES = (0.95, 0.9, 0.8, 0.65, 0.5)  # ProbCover's α (the paper's 0.95 first), for --cover
# --cover's budget-aware radius: the smallest δ of this purity grid whose B greedy balls cover at
# least COVERAGE of the pool
PURITY_GRID = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3)
COVERAGE = 0.5


def mean_std(values: list) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def setting_row(run, extra: dict, device, out) -> list:
    cfg = EvalConfig(**GRAPH_ONLY, **extra)
    return [[labelprop_cell(run, b, s, device=device, out=out, config=cfg)["top1"] for s in SEEDS] for b in BUDGETS]


def cell_graph_inputs(cell):
    """The cell's labeled images, the pool images it keeps and the pool's rows (as labelprop sees them)."""
    train_idx, val_idx = cell.labeled_split()
    feats, rows = pool_of(cell.run, cell.cfg, cell.device)
    return train_idx, pool_keep(rows, len(feats), (train_idx, val_idx), cell.device)


def joined_row(runs: dict, methods: tuple, device, out) -> list:
    """The graph on rotation's features joined with ``methods``' (each task weighs the same)."""
    cfg = EvalConfig(**GRAPH_ONLY)
    names = ("rotation",) + methods
    projections, pool, test = {}, [], []
    for name in names:
        cell = open_cell("labelprop", runs[name], 1, 0, device=device, out=out, config=cfg)
        feats, _ = pool_of(runs[name], cell.cfg, cell.device)
        projections[name] = pca_project(feats, cell.cfg.lp_pca)
        pool.append(projections[name](feats))
        test.append(projections[name](cached_features(runs[name], "test", cell.cfg.layer, cell.cfg.grid, cell.device,
                                                      precision=cell.cfg.precision)))
    nodes, test_nodes = F.normalize(torch.cat(pool, 1), dim=1), F.normalize(torch.cat(test, 1), dim=1)
    sims, idx = knn_search(nodes, nodes, cfg.lp_k, skip_self=True)
    graph = PoolGraph(Projection(torch.zeros(1, nodes.shape[1])), nodes, sims, idx)
    accs = []
    for b in BUDGETS:
        per_seed = []
        for s in SEEDS:
            chooser = open_cell("labelprop", runs["rotation"], b, s, device=device, out=out, config=cfg)
            train_idx, keep = cell_graph_inputs(chooser)
            cells = [open_cell("labelprop", runs[n], b, s, device=device, out=out, config=cfg) for n in names]
            parts = [projections[n](c.features("train", train_idx)) for n, c in zip(names, cells)]
            labeled = F.normalize(torch.cat(parts, 1), dim=1)
            y = chooser.splits.train.labels
            result = propagate_cell(graph, keep, labeled, y[train_idx], [test_nodes], chooser.splits.train.num_classes,
                                    cfg.lp_alpha, cfg.lp_gamma, cfg.lp_iterations)
            per_seed.append(float((result.query_scores[0].argmax(1) == chooser.splits.test.labels).float().mean()))
        accs.append(per_seed)
    return accs


def voted_row(runs: dict, methods: tuple, device, out) -> list:
    """Rotation's graph and ``methods``' own graphs each propagating from the same labeled images
    (TypiClust's on rotation's features), the test images' class scores summed over the graphs
    (each weighs the same)."""
    cfg = EvalConfig(**GRAPH_ONLY)
    accs = []
    for b in BUDGETS:
        per_seed = []
        for s in SEEDS:
            chooser = open_cell("labelprop", runs["rotation"], b, s, device=device, out=out, config=cfg)
            train_idx, val_idx = chooser.labeled_split()
            y = chooser.splits.train.labels
            scores = 0
            for name in ("rotation",) + methods:
                cell = open_cell("labelprop", runs[name], b, s, device=device, out=out, config=cfg)
                graph, rows = pool_graph(cell.run, cell.cfg, cell.device)
                keep = pool_keep(rows, len(graph.nodes), (train_idx, val_idx), cell.device)
                result = propagate_cell(graph, keep, cell.features("train", train_idx), y[train_idx],
                                        [cell.features("test")], chooser.splits.train.num_classes, cfg.lp_alpha,
                                        cfg.lp_gamma, cfg.lp_iterations, [graph.test_neighbours],
                                        balance=cfg.lp_balance)
                scores = scores + result.query_scores[0]
            per_seed.append(float((scores.argmax(1) == chooser.splits.test.labels).float().mean()))
        accs.append(per_seed)
    return accs


def cover_row(run, purity: float, device, out) -> tuple:
    """ProbCover's images (δ the largest radius whose balls stay ``purity`` pure) on ``run``'s
    features, propagated on its graph: ``(top-1 per budget and seed, classes covered per budget and
    seed)``."""
    cfg = EvalConfig(**dict(GRAPH_ONLY, selection="cover", select_purity=purity))
    rows = [[labelprop_cell(run, b, s, device=device, out=out, config=cfg) for s in SEEDS] for b in BUDGETS]
    return ([[r["top1"] for r in per_seed] for per_seed in rows],
            [[r["labeled_classes"] for r in per_seed] for per_seed in rows])


def coverage_row(run, device, out) -> tuple:
    """ProbCover's greedy cover with a budget-aware δ: of the radii PURITY_GRID's purities give
    (ProbCover's rule at each α), the smallest whose B balls cover at least COVERAGE of the pool;
    propagated on ``run``'s graph. ``(top-1, classes covered, α chosen)``, each per budget and seed."""
    from sslab.evaluate import selection
    cfg = EvalConfig(**GRAPH_ONLY)
    accs, classes, alphas = ([[] for _ in BUDGETS] for _ in range(3))
    for s in SEEDS:
        cell = open_cell("labelprop", run, BUDGETS[0], s, device=device, out=out, config=cfg)
        labels, classes_n = cell.splits.train.labels, cell.splits.train.num_classes
        val = selection.validation_images(labels, s, cell.cfg.val_per_class)
        candidates = selection.candidate_images(cell.run, labels, val)
        graph, rows = pool_graph(cell.run, cell.cfg, cell.device)
        points = graph.project(cached_features(cell.run, "train", cell.cfg.layer, cell.cfg.grid, cell.device,
                                               index=candidates, precision=cell.cfg.precision)).cpu().float()
        # each point's distance to the nearest point of another k-means cluster (the clusters
        # ProbCover's rule judges purity by): the radius of purity α is its (1 − α) quantile
        assign = selection.kmeans(points, classes_n, s)
        other = torch.cat([torch.cdist(points[start:start + 2048], points).masked_fill(
            assign[start:start + 2048, None] == assign[None, :], float("inf")).min(1).values
            for start in range(0, len(points), 2048)])
        other = other[torch.isfinite(other)]
        radii = [float(torch.quantile(other, 1 - a)) for a in PURITY_GRID]
        # one pass for every radius: the pairs within the largest, filtered for each smaller one
        near, far = [], []
        for start in range(0, len(points), 2048):
            distances = torch.cdist(points[start:start + 2048], points)
            pairs = (distances < radii[-1]).nonzero()
            near.append(pairs + torch.tensor([start, 0]))
            far.append(distances[pairs[:, 0], pairs[:, 1]])
        near, far = torch.cat(near), torch.cat(far)
        for i, b in enumerate(BUDGETS):
            for alpha, radius in zip(PURITY_GRID, radii):
                within = near[far < radius]  # sorted by row, as ball_edges gives them
                picked = selection.select_cover(points, b * classes_n, radius, edges=(within[:, 0], within[:, 1]))
                covered = float((torch.cdist(points, points[picked]).min(1).values < radius).float().mean())
                if covered >= COVERAGE:
                    break
            train_idx = candidates[picked].sort().values
            keep = pool_keep(rows, len(graph.nodes), (train_idx, val), cell.device)
            result = propagate_cell(graph, keep, cell.features("train", train_idx), labels[train_idx],
                                    [cell.features("test")], classes_n, cell.cfg.lp_alpha, cell.cfg.lp_gamma,
                                    cell.cfg.lp_iterations, [graph.test_neighbours])
            accs[i].append(float((result.query_scores[0].argmax(1) == cell.splits.test.labels).float().mean()))
            classes[i].append(int(labels[train_idx].unique().numel()))
            alphas[i].append(alpha)
    return accs, classes, alphas


def crossed_row(runs: dict, chooser: str, graph: str, device, out, extra: dict = None) -> list:
    """TypiClust's images chosen on ``chooser``'s features, propagated on ``graph``'s own graph (the
    lab's settings, and ``extra`` settings): where the two are one method, the lab's label
    propagation cell."""
    cfg = EvalConfig(**GRAPH_ONLY, **(extra or {}))
    accs = []
    for b in BUDGETS:
        per_seed = []
        for s in SEEDS:
            choosing = open_cell("labelprop", runs[chooser], b, s, device=device, out=out, config=cfg)
            train_idx, val_idx = choosing.labeled_split()
            cell = open_cell("labelprop", runs[graph], b, s, device=device, out=out, config=cfg)
            pool, rows = pool_graph(cell.run, cell.cfg, cell.device)
            keep = pool_keep(rows, len(pool.nodes), (train_idx, val_idx), cell.device)
            result = propagate_cell(pool, keep, cell.features("train", train_idx), cell.splits.train.labels[train_idx],
                                    [cell.features("test")], cell.splits.train.num_classes, cfg.lp_alpha,
                                    cfg.lp_gamma, cfg.lp_iterations, [pool.test_neighbours], balance=cfg.lp_balance)
            per_seed.append(float((result.query_scores[0].argmax(1) == cell.splits.test.labels).float().mean()))
        accs.append(per_seed)
    return accs


def seed_runs(settings) -> dict:
    """Rotation's run of the notebooks' settings pretrained again with each of PRETRAIN_SEEDS
    (the seed also draws the run's 20 000 images), trained side by side where the store lacks
    them: ``{"rotation seed P": Run}``."""
    base = settings.pretrain_config("rotation")
    configs = {f"rotation seed {p}": dataclasses.replace(base, seed=p) for p in PRETRAIN_SEEDS}
    lab.pretrain_runs(settings, announce=None, also=list(configs.values()))
    options = dict(device=settings.device, out=settings.out, progress=False, deterministic=settings.deterministic)
    return {name: pretrain(config, **options) for name, config in configs.items()}  # each read back


def mirrored(cell, split: str, rows) -> torch.Tensor:
    """The cell's frozen features (its layer, grid and precision) of rows ``rows`` of ``split`` (None:
    all of them), each image mirrored left to right first."""
    images = getattr(cell.splits, split).images
    images = images if rows is None else images[rows.cpu()]
    return extract_features(cell.run.load_backbone(cell.device), images.flip(-1), cell.cfg.layer, cell.cfg.grid,
                            cell.device, precision=cell.cfg.precision)


def mirrored_row(run, device, out) -> list:
    """Label propagation as the lab's graph does it, every image's features (pool, labeled and test
    images) replaced by the mean of its own and its mirror image's; the labeled images are the lab's
    graph's (TypiClust's on the features themselves)."""
    cfg = EvalConfig(**GRAPH_ONLY)
    first = open_cell("labelprop", run, BUDGETS[0], SEEDS[0], device=device, out=out, config=cfg)
    feats, rows = pool_of(run, first.cfg, first.device)
    if rows is None:
        raise ValueError(f"{run.path}'s pool is not the train split; allowed: a pool of train images, whose "
                         f"mirror images this row reads")

    def both(plain: torch.Tensor, split: str, index) -> torch.Tensor:
        return (plain + mirrored(first, split, index)) / 2

    graph = build_pool_graph(both(feats, "train", rows), first.cfg.lp_k, first.cfg.lp_pca or None)
    test = both(first.features("test"), "test", None)
    test_neighbours = knn_search(graph.project(test), graph.nodes, first.cfg.lp_k + SPARE_NEIGHBOURS)
    accs = []
    for b in BUDGETS:
        per_seed = []
        for s in SEEDS:
            cell = open_cell("labelprop", run, b, s, device=device, out=out, config=cfg)
            train_idx, val_idx = cell.labeled_split()
            keep = pool_keep(rows, len(graph.nodes), (train_idx, val_idx), cell.device)
            y = cell.splits.train.labels
            result = propagate_cell(graph, keep, both(cell.features("train", train_idx), "train", train_idx),
                                    y[train_idx], [test], cell.splits.train.num_classes, cfg.lp_alpha, cfg.lp_gamma,
                                    cfg.lp_iterations, [test_neighbours], balance=cfg.lp_balance)
            per_seed.append(float((result.query_scores[0].argmax(1) == cell.splits.test.labels).float().mean()))
        accs.append(per_seed)
    return accs


def poisson_row(run, steps: int, device, out) -> list:
    """Poisson learning on the lab's graph: u ← u + D⁻¹(b − (D − W)u) from u = 0, b the labeled nodes'
    one-hot minus the labels' mean; the test images vote with their k nearest nodes' u."""
    cfg = EvalConfig(**GRAPH_ONLY)
    accs = []
    for b in BUDGETS:
        per_seed = []
        for s in SEEDS:
            cell = open_cell("labelprop", run, b, s, device=device, out=out, config=cfg)
            train_idx, keep = cell_graph_inputs(cell)
            graph, _ = pool_graph(run, cell.cfg, cell.device)
            k, classes = cell.cfg.lp_k, cell.splits.train.num_classes
            labeled = graph.project(cell.features("train", train_idx))
            edges = cell_edges(graph, keep, labeled)  # the same graph label propagation builds, unnormalised
            n_lab, n = len(labeled), len(labeled) + len(edges.kept)
            w = edges.sims.clamp(min=0).pow(cell.cfg.lp_gamma)
            weights = torch.sparse_coo_tensor(torch.stack([torch.cat([edges.rows, edges.cols]),
                                                           torch.cat([edges.cols, edges.rows])]),
                                              torch.cat([w, w]), (n, n)).coalesce().to_sparse_csr()
            degree = (weights @ torch.ones(n, 1)).clamp(min=1e-12)
            onehot = F.one_hot(cell.splits.train.labels[train_idx], classes).float()
            source = torch.zeros(n, classes)
            source[:n_lab] = onehot - onehot.mean(0, keepdim=True)
            u = torch.zeros(n, classes)
            for _ in range(steps):
                u = u + (source - (degree * u - weights @ u)) / degree
            nodes = torch.cat([labeled, graph.nodes[edges.kept]])
            qs, qi = knn_search(graph.project(cell.features("test")), nodes, k)
            scores = (qs.clamp(min=0).pow(cell.cfg.lp_gamma).unsqueeze(2) * u[qi]).sum(1)
            per_seed.append(float((scores.argmax(1) == cell.splits.test.labels).float().mean()))
        accs.append(per_seed)
    return accs


def every_label_row(run, device, out, steps: int = 300) -> list:
    """What the graph's space allows when every pool image is labeled: the test images' 1-NN and
    20-NN votes over the whole labeled pool (the lab's γ), and a softmax regression on the same
    PCA-128 unit vectors (full batch, L-BFGS, ``steps`` iterations, L2 1e-4), top-1 on the test set."""
    cell = open_cell("labelprop", run, 1, 0, device=device, out=out, config=EvalConfig(**GRAPH_ONLY))
    graph, rows = pool_graph(run, cell.cfg, cell.device)
    if rows is None:
        raise ValueError(f"{run.path}'s pool is not the labeled train split; allowed: a pool whose labels are known")
    classes, y_test = cell.splits.train.num_classes, cell.splits.test.labels
    y_pool = cell.splits.train.labels[rows]
    sims, indices = graph.test_neighbours
    labeled = F.one_hot(y_pool, classes).float()  # every pool image's own label, the vote's distribution
    accs = [float((inductive_scores(None, None, labeled, k, cell.cfg.lp_gamma, (sims[:, :k], indices[:, :k]))
                   .argmax(1) == y_test).float().mean()) for k in (1, 20)]
    x, x_test = graph.nodes.float(), graph.project(cell.features("test")).float()
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        # unit vectors give small logits: the factor 10 lets the weights stay small under the L2 term
        value = F.cross_entropy(10 * x @ weight + bias, y_pool) + 1e-4 * weight.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        accs.append(float(((10 * x_test @ weight + bias).argmax(1) == y_test).float().mean()))
    return accs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--every-label", action="store_true",
                      help="only what each method's graph space allows with every pool image labeled")
    only.add_argument("--voted", action="store_true", help="only the lab's graph and the graphs' votes")
    only.add_argument("--seeds-voted", action="store_true",
                      help="only the votes of rotation's graphs from runs pretrained with other seeds")
    only.add_argument("--cover", action="store_true",
                      help="only ProbCover's images with δ chosen at other purities, on rotation's and SimCLR's graphs")
    only.add_argument("--starts", action="store_true",
                      help="only TypiClust with one and with ten k-means starts on rotation runs of four seeds")
    only.add_argument("--crossed", action="store_true",
                      help="only the images chosen on one method's features and propagated on another's graph")
    only.add_argument("--mirrored", action="store_true",
                      help="only the lab's graph and the graph of each image's and its mirror image's features")
    args = parser.parse_args()
    settings = lab.check_notebook_params(methods=["rotation", "simclr", "vae", "siamese-vae"], random_init=True,
                                         epochs=3, limit=20000, device="cpu")  # the notebooks' CPU defaults
    runs = lab.pretrain_runs(settings, announce=lambda *a, **k: None)
    device, out = settings.device, settings.out
    if args.every_label:
        print("| features (every pool image labeled) | 1-NN | 20-NN vote | softmax regression |\n|---|---|---|---|")
        for name, run in runs.items():
            print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in every_label_row(run, device, out)) + " |",
                  flush=True)
        return 0
    if args.seeds_voted:
        runs.update(seed_runs(settings))
        print("| graphs voting (TypiClust's images on the notebooks' rotation run's features) | 1 | 2 | 4 | seconds |\n"
              "|---|---|---|---|---|")
        seeds = tuple(f"rotation seed {p}" for p in PRETRAIN_SEEDS)
        rows = [(name + "'s alone", lambda name=name: crossed_row(runs, "rotation", name, device, out))
                for name in ("rotation",) + seeds]
        rows += [(f"rotation's and {seeds[0]}'s", lambda: voted_row(runs, seeds[:1], device, out)),
                 ("rotation's and seeds " + ", ".join(str(p) for p in PRETRAIN_SEEDS) + "'",
                  lambda: voted_row(runs, seeds, device, out))]
        for label, compute in rows:
            started = time.perf_counter()
            accs = compute()
            print(f"| {label} | " + " | ".join(mean_std(a) for a in accs)
                  + f" | {time.perf_counter() - started:.0f} |", flush=True)
        for name in seeds:  # each run choosing its own images, on its own features
            started = time.perf_counter()
            accs = crossed_row(runs, name, name, device, out)
            print(f"| {name}'s alone, from TypiClust's images on its own features | "
                  + " | ".join(mean_std(a) for a in accs) + f" | {time.perf_counter() - started:.0f} |", flush=True)
        for name in seeds:  # those images on the notebooks' run's graph
            started = time.perf_counter()
            accs = crossed_row(runs, name, "rotation", device, out)
            print(f"| rotation's alone, from TypiClust's images on {name}'s features | "
                  + " | ".join(mean_std(a) for a in accs) + f" | {time.perf_counter() - started:.0f} |", flush=True)
        return 0
    if args.cover:
        print("| features | purity α | 1 | 2 | 4 | classes covered at 1 / 2 / 4 (mean) | seconds |\n"
              "|---|---|---|---|---|---|---|")
        for name in ("rotation", "simclr"):
            for purity in PURITIES:
                started = time.perf_counter()
                accs, classes = cover_row(runs[name], purity, device, out)
                print(f"| {name} | {purity} | " + " | ".join(mean_std(a) for a in accs) + " | "
                      + " / ".join(f"{statistics.mean(c):.1f}" for c in classes)
                      + f" | {time.perf_counter() - started:.0f} |", flush=True)
        runs.update(seed_runs(settings))
        print(f"\n| features | δ: the smallest whose balls cover ≥ {COVERAGE:.0%} of the pool | 1 | 2 | 4 "
              "| classes covered at 1 / 2 / 4 (mean) | α chosen at 1 / 2 / 4 (per seed) | seconds |\n"
              "|---|---|---|---|---|---|---|---|")
        for name in ("rotation", "simclr") + tuple(f"rotation seed {p}" for p in PRETRAIN_SEEDS):
            started = time.perf_counter()
            accs, classes, alphas = coverage_row(runs[name], device, out)
            print(f"| {name} | | " + " | ".join(mean_std(a) for a in accs) + " | "
                  + " / ".join(f"{statistics.mean(c):.1f}" for c in classes) + " | "
                  + " / ".join(",".join(str(a) for a in per_seed) for per_seed in alphas)
                  + f" | {time.perf_counter() - started:.0f} |", flush=True)
        return 0
    if args.starts:
        runs.update(seed_runs(settings))
        names = ("rotation",) + tuple(f"rotation seed {p}" for p in PRETRAIN_SEEDS)
        print("| rotation run | k-means starts | 1 | 2 | 4 | seconds |\n|---|---|---|---|---|---|")
        pooled = {}
        for starts in (1, 10):
            for name in names:
                started = time.perf_counter()
                accs = crossed_row(runs, name, name, device, out, extra={"select_starts": starts})
                pooled.setdefault(starts, [[] for _ in BUDGETS])
                for i, a in enumerate(accs):
                    pooled[starts][i] += a
                print(f"| {name} | {starts} | " + " | ".join(mean_std(a) for a in accs)
                      + f" | {time.perf_counter() - started:.0f} |", flush=True)
        for starts, accs in pooled.items():
            print(f"| all four runs × {len(SEEDS)} seeds | {starts} | "
                  + " | ".join(mean_std(a) for a in accs) + " | |")
        return 0
    if args.crossed:
        print("| TypiClust's images chosen on | propagated on | 1 | 2 | 4 | seconds |\n|---|---|---|---|---|---|")
        for chooser in ("rotation", "simclr"):
            for graph in ("rotation", "simclr"):
                started = time.perf_counter()
                accs = crossed_row(runs, chooser, graph, device, out)
                print(f"| {chooser} | {graph} | " + " | ".join(mean_std(a) for a in accs)
                      + f" | {time.perf_counter() - started:.0f} |", flush=True)
        return 0
    print("| graph (TypiClust's images on rotation's features) | 1 | 2 | 4 | seconds |\n|---|---|---|---|---|")

    def show(label, compute):
        started = time.perf_counter()
        accs = compute()
        print(f"| {label} | " + " | ".join(mean_std(a) for a in accs) + f" | {time.perf_counter() - started:.0f} |",
              flush=True)

    only = args.voted or args.mirrored
    for label, extra in SETTINGS[:1] if only else SETTINGS:
        show(label, lambda extra=extra: setting_row(runs["rotation"], extra, device, out))
    if args.mirrored:
        show("the mean of each image's and its mirror image's features", lambda: mirrored_row(runs["rotation"],
                                                                                               device, out))
        return 0
    for methods in [] if args.voted else JOINED:
        show("rotation joined with " + " + ".join(methods),
             lambda methods=methods: joined_row(runs, methods, device, out))
    for methods in VOTED:
        show("rotation's graph and " + " + ".join(f"{m}'s" for m in methods) + ", votes summed",
             lambda methods=methods: voted_row(runs, methods, device, out))
    if args.voted:
        return 0
    for steps in (50, 200):
        show(f"Poisson learning, {steps} steps", lambda steps=steps: poisson_row(runs["rotation"], steps, device, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
