"""Which images get labeled. A budget of k labels per class is B = k × classes labeled images in
all; four ways to choose them:

- ``balanced``: k images of every class drawn at random — the study's draw, which knows every
  image's class before anyone labeled it;
- ``uniform``: B images drawn at random from the pool, classes unknown (the honest random
  baseline of a person who starts labeling);
- ``typical``: TypiClust (Hacohen, Dekel & Weinshall, ICML 2022, "Active Learning on a Budget:
  Opposite Strategies Suit High and Low Budgets"): k-means of the pool into B clusters (the best
  of ``select_starts`` k-means++ starts; the paper's code ran scikit-learn's ``KMeans``, 10), and
  from each cluster (largest first, clusters of at most ``select_min_cluster`` images dropped) its
  most typical image — typicality = 1 / the mean distance to its ``select_k`` nearest neighbours
  in the cluster;
- ``cover``: ProbCover (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022, "Active Learning
  Through a Covering Lens"): the greedy maximum coverage of δ-balls, each pick the image whose
  ball covers most images not yet covered; δ is chosen without labels as the paper does, the
  largest radius whose balls stay ≥ ``select_purity`` pure under a k-means clustering of the pool
  into as many clusters as there are classes.

``typical`` and ``cover`` work in the space label propagation uses (:mod:`.graph`: the run's
frozen features, PCA fitted on the pool, L2-normalised). The selectors see features only — never
a label; the chosen images then get their dataset labels. The validation images (when
``val_per_class`` > 0) are the study's, drawn per class as before and never selected.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from .. import integrity, store
from ..data import label_budget_split
from .features import cached_features
from .pool import pool_graph, pool_rows

SELECTIONS = ("balanced", "uniform", "typical", "cover")
# The selections that read an embedding (and so depend on the network whose features they use).
EMBEDDED = ("typical", "cover")


# ---------------------------------------------------------------- the selectors (features in, positions out)

# Start i of a k-means with several starts is seeded seed + i · START_STRIDE: start 0 is the
# single start's seed, and the starts of different seeds never share a seed (seeds < the stride).
START_STRIDE = 1_000_003
MAX_STARTS = 1000


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 100, starts: int = 1) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), seeded: N×D → the
    cluster of each row, N (0..k-1). A cluster left empty keeps its centre. With ``starts`` > 1,
    the clustering of lowest inertia (the sum of squared distances to the centres) among that
    many seeded starts, as scikit-learn's ``KMeans(n_init=…)`` chooses: one start's clustering
    depends much on where k-means++ put its first centres."""
    if starts == 1:
        return _single_start(points, k, seed, iterations)
    points = points.float()
    best, lowest = None, float("inf")
    for i in range(starts):
        assign, inertia = _lloyd(points, k, seed + i * START_STRIDE, iterations)
        if inertia < lowest:
            best, lowest = assign, inertia
    return best


def _lloyd(points: torch.Tensor, k: int, seed: int, iterations: int) -> tuple:
    """One seeded start of k-means: ``(cluster of each row, inertia)``. Squared distances as
    ‖c‖² − 2 p·c (‖p‖² is the same for every centre): one matrix product and a min per step, which
    cost less than :func:`torch.cdist` and an argmin (a start on the notebooks' pool takes about a
    third of the time of :func:`_single_start`'s)."""
    n = points.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    norms = points.pow(2).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    picks = [first]
    nearest = (norms - 2 * points @ points[first] + norms[first]).clamp(min=0)
    for _ in range(1, k):
        pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator)) if nearest.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        picks.append(pick)
        nearest = torch.minimum(nearest, (norms - 2 * points @ points[pick] + norms[pick]).clamp(min=0))
    centres = points[picks].clone()
    distance, assign = torch.addmm(centres.pow(2).sum(1), points, centres.T, alpha=-2).min(1)
    for _ in range(iterations):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        distance, moved = torch.addmm(centres.pow(2).sum(1), points, centres.T, alpha=-2).min(1)
        if torch.equal(moved, assign):
            break
        assign = moved
    return assign, float((distance + norms).clamp(min=0).sum())


def _single_start(points: torch.Tensor, k: int, seed: int, iterations: int) -> torch.Tensor:
    """One start, computed as the lab's typical and cover choices were before starts existed
    (cdist, argmin), so a choice stored then is made again bit for bit."""
    points = points.float()
    n = points.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [points[first]]
    nearest = (points - points[first]).pow(2).sum(1)
    for _ in range(1, k):
        pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator)) if nearest.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        centres.append(points[pick])
        nearest = torch.minimum(nearest, (points - points[pick]).pow(2).sum(1))
    centres = torch.stack(centres)
    assign = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        moved = torch.cdist(points, centres).argmin(1)
        if torch.equal(moved, assign):
            break
        assign = moved
    return assign


def typicality(points: torch.Tensor, neighbours: int) -> torch.Tensor:
    """TypiClust's typicality of each row: 1 / (mean Euclidean distance to its ``neighbours``
    nearest other rows + 1e-5). N×D → N."""
    distances = torch.cdist(points.float(), points.float())
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(min(neighbours, points.shape[0] - 1), dim=1, largest=False).values
    return 1.0 / (nearest.mean(1) + 1e-5)


def select_typical(points: torch.Tensor, budget: int, seed: int, neighbours: int = 20,
                   min_cluster: int = 5, starts: int = 1) -> torch.Tensor:
    """TypiClust's first selection: ``budget`` rows of ``points`` (N×D), the most typical row of
    each of ``budget`` k-means clusters (the best of ``starts``), largest cluster first; clusters of at most
    ``min_cluster`` rows are dropped, and when fewer clusters are left than the budget the pick
    goes round them again (the next most typical row not yet chosen). Typicality is computed
    within the cluster, with at most half its size as neighbours."""
    assign = kmeans(points, budget, seed, starts=starts)
    sizes = torch.bincount(assign, minlength=budget)
    order = [int(c) for c in sizes.argsort(descending=True, stable=True) if sizes[c] > min_cluster]
    if not order:  # every cluster tiny (a pool hardly larger than the budget): keep them all
        order = [int(c) for c in sizes.argsort(descending=True, stable=True) if sizes[c] > 0]
    taken = torch.zeros(points.shape[0], dtype=torch.bool)
    chosen = []
    for i in range(budget):
        members = ((assign == order[i % len(order)]) & ~taken).nonzero().squeeze(1)
        if len(members) == 0:
            members = (~taken).nonzero().squeeze(1)
        scores = typicality(points[members], max(1, min(neighbours, len(members) // 2))) if len(members) > 1 \
            else torch.ones(1)
        pick = members[int(scores.argmax())]
        taken[pick] = True
        chosen.append(int(pick))
    return torch.tensor(chosen, dtype=torch.long)


# A sweep chooses for several budgets from the same points: δ depends on the points and the seed
# only, and the δ-balls on the points and δ, so both are kept for the next budget (keyed by the
# points' bytes, so a result is reused only for exactly the same points). The balls are the large
# part: kept up to _KEPT_EDGES pairs in all, the least recently used dropped first.
_KEPT: "OrderedDict[tuple, object]" = OrderedDict()
_KEPT_EDGES = 60_000_000


def _points_key(points: torch.Tensor) -> str:
    return hashlib.blake2b(points.detach().float().contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest() \
        + str(tuple(points.shape))


def _kept(key: tuple, make):
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key]
    return _keep(key, make())


def _keep(key: tuple, value):
    _KEPT[key] = value
    _KEPT.move_to_end(key)
    size = lambda v: len(v[0]) if isinstance(v, tuple) else 0  # noqa: E731
    while len(_KEPT) > 1 and sum(size(v) for v in _KEPT.values()) > _KEPT_EDGES:
        _KEPT.popitem(last=False)
    return value


def ball_edges(points: torch.Tensor, radius: float, block: int = 2048) -> tuple:
    """Every ordered pair (i, j), i ≠ j allowed or not, with ‖p_i − p_j‖ < ``radius``, as
    (rows, cols) sorted by row; walked in blocks of ``block`` rows (memory O(block · N + edges)).
    The same points and radius a second time give the pairs kept from the first."""
    return _kept(("edges", _points_key(points), float(radius), block), lambda: _ball_edges(points, radius, block))


def _ball_edges(points: torch.Tensor, radius: float, block: int) -> tuple:
    rows, cols = [], []
    for start in range(0, points.shape[0], block):
        near = (torch.cdist(points[start:start + block].float(), points.float()) < radius).nonzero()
        rows.append(near[:, 0] + start)
        cols.append(near[:, 1])
    return torch.cat(rows), torch.cat(cols)


def purity_radius(points: torch.Tensor, clusters: int, seed: int, purity: float = 0.95, block: int = 2048) -> float:
    """ProbCover's δ: the largest radius whose balls are pure for at least ``purity`` of the
    points, purity judged by a k-means clustering into ``clusters`` (a ball is pure when every
    point in it shares its centre's cluster). A point's ball is pure exactly while the radius is
    at most its distance to the nearest point of another cluster, so δ is that distance's
    (1 − purity) quantile. The same points and settings a second time give the radius kept from
    the first."""
    return _kept(("purity", _points_key(points), clusters, seed, purity, block),
                 lambda: _purity_radius(points, clusters, seed, purity, block))


# The radius pass also keeps the pairs closer than EDGE_BOUND times the radius its first block of
# rows gives, and hands the balls over when δ turns out below that bound: the same distances, so
# the same pairs, without a second pass over all of them. On the notebooks' pools (20 000 points in
# a random order) the first block's radius is within 2 % of δ and 1.1 × it keeps ~65 pairs a row.
# Where the pairs under the bound pass EDGE_CAP a point on average (distances that crowd just above
# δ), keeping them would cost more than it saves: they are dropped and ball_edges makes its own pass.
EDGE_BOUND = 1.1
EDGE_CAP = 100


def _purity_radius(points: torch.Tensor, clusters: int, seed: int, purity: float, block: int) -> float:
    assign = kmeans(points, clusters, seed)
    n = points.shape[0]
    other = torch.empty(n)
    bound, near, count = None, [], 0
    for start in range(0, n, block):
        distances = torch.cdist(points[start:start + block].float(), points.float())
        same = assign[start:start + block, None] == assign[None, :]
        if start == 0:  # the first block's distances are still needed whole, for its pairs
            other[:len(distances)] = distances.masked_fill(same, float("inf")).min(1).values
            first = other[:len(distances)]
            first = first[torch.isfinite(first)]
            if len(first):
                bound = EDGE_BOUND * float(torch.quantile(first, 1 - purity))
        if near is not None and bound is not None:
            pairs = (distances < bound).nonzero()
            count += len(pairs)
            if count > EDGE_CAP * n:
                near = None
            else:
                near.append((pairs[:, 0] + start, pairs[:, 1], distances[pairs[:, 0], pairs[:, 1]]))
        if start > 0:
            distances[same] = float("inf")
            other[start:start + block] = distances.min(1).values
    finite = other[torch.isfinite(other)]
    radius = float(torch.quantile(finite, 1 - purity)) if len(finite) else float("inf")
    if near and radius <= bound:  # every pair closer than δ is among those kept: ball_edges' answer
        rows, cols, values = (torch.cat(parts) for parts in zip(*near))
        within = values < radius
        _keep(("edges", _points_key(points), radius, block), (rows[within], cols[within]))
    return radius


def select_cover(points: torch.Tensor, budget: int, radius: float, edges: Optional[tuple] = None) -> torch.Tensor:
    """ProbCover's greedy maximum coverage: ``budget`` rows of ``points``, each the row whose
    δ-ball (``radius``) covers the most rows not covered yet (ties: the lowest row); once
    everything is covered, the next picks are the rows with the most neighbours, then the lowest.
    ``edges``: the balls as :func:`ball_edges` gives them, where the caller has them already."""
    n = points.shape[0]
    rows, cols = ball_edges(points, radius) if edges is None else edges
    starts = torch.zeros(n + 1, dtype=torch.long)
    starts[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    degree = torch.bincount(rows, minlength=n)  # uncovered rows in each ball (every row is uncovered yet)
    fallback = degree.clone()
    covered = torch.zeros(n, dtype=torch.bool)
    chosen: list = []
    for _ in range(min(budget, n)):
        if int(degree.max()) > 0:
            pick = int(degree.argmax())
        else:
            free = fallback.clone()
            free[chosen] = -1
            pick = int(free.argmax())
        chosen.append(pick)
        degree[pick] = 0
        ball = cols[starts[pick]:starts[pick + 1]]
        newly = ball[~covered[ball]]
        covered[newly] = True
        # the ball of every row that holds a newly covered row loses it (the relation is symmetric)
        for row in newly.tolist():
            degree.index_add_(0, cols[starts[row]:starts[row + 1]], torch.full((int(starts[row + 1] - starts[row]),),
                                                                                 -1, dtype=torch.long))
    return torch.tensor(chosen, dtype=torch.long)


# ---------------------------------------------------------------- a cell's labeled images

_SPLITS: dict = {}


def labeled_split(cell) -> tuple:
    """``(train indices, validation indices)`` into the train split for a cell (an
    :class:`~.cells.Cell`): its budget's labeled images chosen by ``cfg.selection`` and the
    study's validation images (none when ``val_per_class`` is 0). An embedded choice is made once
    for the same embedding, budget, seed and settings, and kept in memory and in the embedding
    run's folder: every protocol's cell (and every worker process, every notebook) reads it."""
    cfg = cell.cfg
    labels = cell.splits.train.labels
    if cfg.selection == "balanced":
        return label_budget_split(labels, cell.budget, cell.seed, cfg.val_per_class)
    embedding = selection_run(cell)
    settings = dict(selection=cfg.selection, budget=cell.budget, seed=cell.seed, val_per_class=cfg.val_per_class,
                    layer=cfg.layer, grid=cfg.grid, precision=cfg.precision, lp_pca=cfg.lp_pca,
                    select_k=cfg.select_k, select_min_cluster=cfg.select_min_cluster,
                    **({"select_starts": cfg.select_starts} if cfg.selection == "typical" and cfg.select_starts != 1
                       else {}),  # a choice stored before the setting existed keeps its name
                    select_purity=cfg.select_purity, candidates=len(labels))
    key = (str(embedding.path) if embedding is not None else None, str(cell.device),
           *sorted(settings.items()))
    if key not in _SPLITS:
        while len(_SPLITS) >= 256:
            del _SPLITS[next(iter(_SPLITS))]
        _SPLITS[key] = _stored_choice(cell, embedding, labels, settings)
    return _SPLITS[key]


def _stored_choice(cell, embedding, labels: torch.Tensor, settings: dict) -> tuple:
    """The choice kept in the embedding run's folder (``uniform``: in the cell's run's), made now
    when it is missing, stale or damaged."""
    run = embedding if embedding is not None else cell.run
    weights = integrity.file_digest(Path(run.path) / "model.pt")
    made_by = integrity.provenance("selection", model=weights, **settings)
    path = Path(run.path) / f"selection-{store.config_hash(made_by)}.pt"
    if path.is_file():
        try:
            saved = store.load_torch(path, expect=made_by)
            return saved["train"], saved["val"]
        except integrity.CorruptCheckpoint:  # damaged, foreign or stale: chosen again, never trusted
            pass
    chosen = _choose(cell, embedding, labels)
    try:
        store.save_torch(path, {"train": chosen[0], "val": chosen[1]}, provenance=made_by)
    except (OSError, RuntimeError):  # a read-only or full store still works, only slower
        pass
    return chosen


def _choose(cell, embedding, labels: torch.Tensor) -> tuple:
    cfg = cell.cfg
    val = validation_images(labels, cell.seed, cfg.val_per_class)
    candidates = candidate_images(cell.run, labels, val)
    budget = cell.budget * cell.splits.train.num_classes
    if budget > len(candidates):
        raise ValueError(f"budget={cell.budget} is not allowed with selection={cfg.selection!r}: "
                         f"{budget} labeled images in all, and the pool holds {len(candidates)} images to choose "
                         f"from; allowed: budget ≤ {len(candidates) // cell.splits.train.num_classes}")
    if cfg.selection == "uniform":
        generator = torch.Generator().manual_seed(cell.seed)
        picked = torch.randperm(len(candidates), generator=generator)[:budget]
    else:
        graph, _ = pool_graph(embedding, cfg, cell.device)
        points = graph.project(cached_features(embedding, "train", cfg.layer, cfg.grid, cell.device, index=candidates,
                                               precision=cfg.precision)).cpu()
        if cfg.selection == "typical":
            picked = select_typical(points, budget, cell.seed, cfg.select_k, cfg.select_min_cluster,
                                    cfg.select_starts)
        else:
            radius = purity_radius(points, cell.splits.train.num_classes, cell.seed, cfg.select_purity)
            picked = select_cover(points, budget, radius)
    return candidates[picked].sort().values, val


def validation_images(labels: torch.Tensor, seed: int, val_per_class: int) -> torch.Tensor:
    """The study's validation images of a seed: the same ``val_per_class`` per class that
    :func:`sslab.data.label_budget_split` draws for every budget."""
    if val_per_class == 0:
        return torch.zeros(0, dtype=torch.long)
    return label_budget_split(labels, 1, seed, val_per_class)[1]


def candidate_images(run, labels: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """The train images a selection may choose from: the run's pool where the pool is the train
    split (labels hidden), else every train image; never a validation image."""
    split, rows = pool_rows(run)
    candidates = rows if split == "train" else torch.arange(len(labels))
    return candidates[~torch.isin(candidates, val)]


def selection_run(cell):
    """The run whose features an embedded selection reads: the cell's own run, and for the scratch
    baseline (which has no pretraining) the random-init backbone of the same shape. None for the
    selections that read no features."""
    if cell.cfg.selection not in EMBEDDED:
        return None
    if cell.protocol != "scratch":
        return cell.run
    return random_init_like(cell.run, cell.device, cell.out)


def random_init_config(run):
    """The config of the random-init run of ``run``'s dataset, pool and backbone."""
    from dataclasses import replace

    from ..pretrain import RANDOM_INIT
    return run.config if run.method == RANDOM_INIT else replace(run.config, method=RANDOM_INIT)


def random_init_like(run, device, out: Optional[str]):
    """The random-init run of ``run``'s dataset, pool and backbone (stored like any run; cheap)."""
    from ..pretrain import RANDOM_INIT, pretrain
    if run.method == RANDOM_INIT:
        return run
    return pretrain(random_init_config(run), device=device, out=out, progress=False)
