"""Label propagation on a k-NN graph (Zhou et al., NeurIPS 2004, "Learning with Local and Global
Consistency"; the k-NN, γ and graph form of Iscen et al., CVPR 2019, "Label Propagation for Deep
Semi-supervised Learning"): the space the graph lives in, the blockwise k-NN search, the
normalised affinity, the propagation and the inductive vote. Plain tensors in, tensors out;
the protocols that use it are :mod:`.labelprop` and :mod:`.selftrain`, and label selection
(:mod:`.selection`) chooses images in the same space. The graph is built in blocks, so memory
stays O(block² + N·k) whatever the pool's size (100 000 images and more).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Projection:
    """Features → the space the graph lives in: centred by ``mean`` (1×D), onto the principal
    components ``basis`` (D×d; None: all of them), L2-normalised so a dot product is a cosine
    similarity (Iscen et al. reduce and normalise their descriptors before the k-NN graph)."""

    mean: torch.Tensor
    basis: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        centred = x.float() - self.mean.to(x.device)
        return F.normalize(centred if self.basis is None else centred @ self.basis.to(x.device), dim=1)


def pca_project(features: torch.Tensor, dims: Optional[int]) -> Projection:
    """The projection of N×D features to their ``dims`` principal components, fitted on
    ``features``; ``dims=None`` (or ≥ D) keeps the centred features."""
    fit = features.float()
    mean = fit.mean(0, keepdim=True)
    if dims is None or dims >= fit.shape[1]:
        return Projection(mean)
    centred = fit - mean
    eigvals, eigvecs = torch.linalg.eigh((centred.T @ centred / max(1, fit.shape[0] - 1)).double())
    return Projection(mean, eigvecs[:, eigvals.argsort(descending=True)[:dims]].float())


def knn_search(queries: torch.Tensor, bank: torch.Tensor, k: int, block: int = 4096,
               skip_self: bool = False) -> tuple:
    """The ``k`` most similar ``bank`` rows of each query row by dot product (cosine for
    L2-normalised rows): Q×D, N×D → (similarities Q×k, indices Q×k), most similar first. Both are
    walked in blocks of ``block`` rows with a running top-k: memory O(block² + Q·k). With
    ``skip_self`` the queries are the bank itself and each row's own entry is left out."""
    k = min(k, bank.shape[0] - int(skip_self))
    out_s = torch.empty(queries.shape[0], k, device=queries.device)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for q0 in range(0, queries.shape[0], block):
        q = queries[q0:q0 + block]
        best_s = torch.full((q.shape[0], k), -math.inf, device=q.device)
        best_i = torch.zeros(q.shape[0], k, dtype=torch.long, device=q.device)
        for b0 in range(0, bank.shape[0], block):
            sims = q @ bank[b0:b0 + block].T
            if skip_self:
                rows = torch.arange(q.shape[0], device=q.device) + (q0 - b0)
                inside = (rows >= 0) & (rows < sims.shape[1])
                sims[inside.nonzero().squeeze(1), rows[inside]] = -math.inf
            top_s, top_i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_s, pos = torch.cat([best_s, top_s], 1).topk(k, dim=1)
            best_i = torch.cat([best_i, top_i + b0], 1).gather(1, pos)
        out_s[q0:q0 + len(q)], out_i[q0:q0 + len(q)] = best_s, best_i
    return out_s, out_i


def normalized_affinity(rows: torch.Tensor, cols: torch.Tensor, sims: torch.Tensor, n: int,
                        gamma: float = 3.0) -> torch.Tensor:
    """The symmetric normalised affinity of Iscen et al. (eq. 8-9) as a sparse n×n matrix, from
    directed k-NN edges rows[e] → cols[e] of cosine similarity sims[e]: a_ij = max(0, s_ij)^γ,
    W = A + Aᵀ, then D^−½ W D^−½ (D: W's row sums). γ = 3 shrinks the weak edges."""
    weights = sims.clamp(min=0).pow(gamma)
    # W's entries in row-major order, each (i, j) once with its edges' weights summed: what
    # ``sparse_coo_tensor(...).coalesce()`` gives, by one sort of the flat positions (twice as fast:
    # benchmarks/levers.py; the same sums: a pair is at most i → j and j → i in a k-NN graph, and
    # a + b = b + a).
    flat, order = _flat_positions(rows, cols, n)
    return _affinity_of_sorted(flat, torch.cat([weights, weights])[order], n)


def _flat_positions(rows: torch.Tensor, cols: torch.Tensor, n: int) -> tuple:
    """W's positions i · n + j of the edges both ways (i → j, then j → i), sorted (stable), and the
    sort's order."""
    return (torch.cat([rows, cols]) * n + torch.cat([cols, rows])).sort(stable=True)


def _affinity_of_sorted(flat: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """D^−½ W D^−½ from W's sorted flat positions (repeats: a pair's two edges) and their weights."""
    flat, entry = torch.unique_consecutive(flat, return_inverse=True)
    values = torch.zeros(len(flat), device=weights.device).index_add_(0, entry, weights)
    i, j = torch.div(flat, n, rounding_mode="floor"), flat % n
    degree = torch.zeros(n, device=weights.device).index_add_(0, i, values)
    inv_sqrt = degree.clamp(min=1e-12).rsqrt()
    return torch.sparse_coo_tensor(torch.stack([i, j]), values * inv_sqrt[i] * inv_sqrt[j], (n, n),
                                   check_invariants=False, is_coalesced=True)


@dataclass
class PoolGraph:
    """The k-NN graph of an unlabeled pool, built once and shared by every budget and seed.
    ``project``: features → the (PCA, L2-normalised) space the graph lives in; ``nodes`` P×d: the
    projected pool; ``sims``, ``indices`` P×k: each pool image's k nearest other pool images."""

    project: Projection
    nodes: torch.Tensor
    sims: torch.Tensor
    indices: torch.Tensor
    # the test images' nearest pool images (sims, pool positions; k + SPARE_NEIGHBOURS each): the
    # same for every cell of the run, so each cell passes over its dropped images instead of searching
    test_neighbours: Optional[tuple] = None


def build_pool_graph(pool_features: torch.Tensor, k: int = 20, pca: Optional[int] = 128) -> PoolGraph:
    """PCA fitted on the pool (no label, no test image involved), then the pool's k-NN graph."""
    project = pca_project(pool_features, pca)
    nodes = project(pool_features)
    sims, indices = knn_search(nodes, nodes, k, skip_self=True)
    return PoolGraph(project, nodes, sims, indices)


def propagate(affinity: torch.Tensor, labels: torch.Tensor, classes: int, alpha: float = 0.99,
              iterations: int = 20) -> torch.Tensor:
    """Zhou et al.'s iteration Z ← αWZ + (1 − α)Y, ``iterations`` times from Z = Y: labels N
    (−1 unlabeled) → class distributions N×classes (uniform where nothing arrived). Y gives each
    class the same total mass whatever its number of labels, so no class floods the graph; 20
    steps at α = 0.99 is a more local diffusion than the fixed point, and scored better on the
    validation images here."""
    y = torch.zeros(labels.shape[0], classes, device=labels.device)
    known = labels >= 0
    y[known, labels[known]] = 1.0
    y = y / y.sum(0, keepdim=True).clamp(min=1.0)
    z = y.clone()
    if affinity.layout == torch.sparse_coo:  # compressed rows multiply ~20× faster, the same sums
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            affinity = affinity.to_sparse_csr()
    for _ in range(iterations):
        z = alpha * (affinity @ z) + (1 - alpha) * y
    z = z.clamp(min=0)
    total = z.sum(1, keepdim=True)
    return torch.where(total > 0, z / total.clamp(min=1e-30), torch.full_like(z, 1.0 / classes))


def balance_classes(probs: torch.Tensor, steps: int) -> torch.Tensor:
    """Class distributions N×C scaled towards equal class mass (Sinkhorn–Knopp): each step
    divides every class's column by its total mass (every class then holds the same mass) and
    every row by its sum (each row a distribution again). The rows come back as distributions,
    the columns' sums the nearer N / C the more steps. Zhu, Ghahramani & Lafferty (ICML 2003) scale
    once ("class mass normalisation"); the prior here is uniform: every class as frequent as the
    others. A class no row gives any mass stays at 0. ``steps`` 0: ``probs`` unchanged."""
    p = probs
    for _ in range(steps):  # the entries are ≥ 0, so a class of mass 0 is a column of zeros and stays one
        p = p / p.sum(0, keepdim=True).clamp(min=1e-30)
        p = p / p.sum(1, keepdim=True).clamp(min=1e-30)
    return p


def inductive_scores(queries: torch.Tensor, nodes: torch.Tensor, node_probs: torch.Tensor, k: int = 20,
                     gamma: float = 3.0, neighbours: Optional[tuple] = None) -> torch.Tensor:
    """Class scores of images outside the graph: each query's ``k`` nearest nodes vote with their
    propagated distributions weighted by max(0, cos)^γ. Queries Q×d, nodes N×d → Q×classes.
    ``neighbours``: the queries' k nearest nodes ``(sims, indices)`` when already known."""
    sims, idx = knn_search(queries, nodes, k) if neighbours is None else neighbours
    scores = (sims.clamp(min=0).pow(gamma).unsqueeze(2) * node_probs[idx]).sum(1)
    return scores / scores.sum(1, keepdim=True).clamp(min=1e-30)


# The queries whose pool neighbours a graph keeps (the test images: the same for every cell) keep
# this many more than k, so a cell's dropped pool images (its labeled and validation images) can
# be passed over without searching the whole pool again.
SPARE_NEIGHBOURS = 64


def cell_neighbours(queries: torch.Tensor, pool_neighbours: tuple, new_id: torch.Tensor, labeled_nodes: torch.Tensor,
                    graph_nodes: torch.Tensor, kept: torch.Tensor, k: int) -> tuple:
    """The k nearest of a cell's nodes (its L labeled images first, then its kept pool images) for
    projected ``queries``, from their nearest pool images known in advance (``pool_neighbours``:
    sims and pool positions, k + spare per query) and their similarity to the labeled images — the
    same as :func:`knn_search` over all the cell's nodes. ``new_id``: each pool position's node
    index in the cell (−1: dropped). A query with fewer than k kept pool images among its known
    neighbours is searched in full."""
    sims, positions = pool_neighbours
    ids = new_id[positions]
    sims = sims.masked_fill(ids < 0, -math.inf)
    lab_s, lab_i = (knn_search(queries, labeled_nodes, k) if len(labeled_nodes) else
                    (sims[:, :0], positions[:, :0]))
    best_s, pos = torch.cat([lab_s, sims], 1).topk(k, dim=1)
    best_i = torch.cat([lab_i, ids.clamp(min=0)], 1).gather(1, pos)
    short = ~torch.isfinite(best_s).all(1)
    if short.any():  # too many of its known neighbours were dropped: the full search for these rows
        nodes = torch.cat([labeled_nodes, graph_nodes[kept]])
        best_s[short], best_i[short] = knn_search(queries[short], nodes, k)
    return best_s, best_i


@dataclass
class Propagated:
    """One cell's propagation: ``probs`` over the graph's nodes (the L labeled images first, then
    the kept pool images ``pool_rows``, rows of the pool in pool order), ``nodes`` (projected), and
    the inductive class scores of each query set."""

    probs: torch.Tensor
    nodes: torch.Tensor
    pool_rows: torch.Tensor
    query_scores: list


@dataclass
class CellEdges:
    """A cell's k-NN graph as directed edges ``rows[e] → cols[e]`` of cosine similarity ``sims[e]``
    over its nodes (the L labeled images first, then the kept pool images ``kept``, pool positions);
    ``new_id``: each pool position's node index (−1: dropped)."""

    rows: torch.Tensor
    cols: torch.Tensor
    sims: torch.Tensor
    kept: torch.Tensor
    new_id: torch.Tensor


def cell_edges(graph: PoolGraph, keep: torch.Tensor, labeled_nodes: torch.Tensor) -> CellEdges:
    """The edges of a cell's graph: the pool's edges between kept images, and each (projected)
    labeled image's edges to its k nearest kept pool images (W's symmetry links them back)."""
    k = graph.indices.shape[1]
    kept = keep.nonzero().squeeze(1)
    n_lab = len(labeled_nodes)
    new_id = torch.full((len(keep),), -1, dtype=torch.long, device=keep.device)
    new_id[kept] = torch.arange(len(kept), device=keep.device) + n_lab
    src = torch.arange(len(keep), device=keep.device)[:, None].expand_as(graph.indices)
    valid = keep[src] & keep[graph.indices]
    lab_s, lab_i = knn_search(labeled_nodes, graph.nodes[kept], k)
    rows = torch.cat([new_id[src[valid]], torch.arange(n_lab, device=keep.device).repeat_interleave(lab_i.shape[1])])
    cols = torch.cat([new_id[graph.indices[valid]], lab_i.flatten() + n_lab])
    sims = torch.cat([graph.sims[valid], lab_s.flatten()])
    return CellEdges(rows, cols, sims, kept, new_id)


@dataclass
class _PoolPart:
    """What every propagation of one cell shares (the same kept pool images and number of labeled
    images: its own labeled images and each held-out split of them, :mod:`.choice`): the pool's
    edges between kept images in node indices, and W's flat positions of those edges sorted."""

    graph: PoolGraph
    keep_key: bytes
    labeled: int
    edges: CellEdges
    kept_nodes: torch.Tensor
    flat: torch.Tensor
    order: torch.Tensor


_POOL_PARTS: list = []  # the last two cells' parts (a label propagation cell and its held-out splits)


def _pool_part(graph: PoolGraph, keep: torch.Tensor, labeled: int) -> _PoolPart:
    keep_key = hashlib.blake2b(keep.cpu().numpy().tobytes(), digest_size=16).digest()
    for part in _POOL_PARTS:
        if part.graph is graph and part.keep_key == keep_key and part.labeled == labeled:
            return part
    pool = cell_edges(graph, keep, graph.nodes[:0])  # no labeled node yet: the pool's edges alone
    new_id = torch.where(pool.new_id >= 0, pool.new_id + labeled, pool.new_id)
    edges = CellEdges(pool.rows + labeled, pool.cols + labeled, pool.sims, pool.kept, new_id)
    flat, order = _flat_positions(edges.rows, edges.cols, labeled + len(pool.kept))
    part = _PoolPart(graph, keep_key, labeled, edges, graph.nodes[pool.kept], flat, order)
    _POOL_PARTS.insert(0, part)
    del _POOL_PARTS[2:]
    return part


def _joined_affinity(part: _PoolPart, labeled_nodes: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """:func:`normalized_affinity` of :func:`cell_edges`' graph (the pool's edges between kept images,
    then each labeled image's k nearest kept pool images), the pool's share of the sort taken from
    ``part``: the labeled images' few positions are sorted alone and merged in. The same matrix bit
    for bit: the same weights (computed over the edges in the same order), the same sorted positions
    (a labeled image's pair never repeats a pool pair) and the same sums."""
    n_lab, edges = len(labeled_nodes), part.edges
    n = n_lab + len(edges.kept)
    lab_s, lab_i = knn_search(labeled_nodes, part.kept_nodes, k)
    lab_rows = torch.arange(n_lab, device=lab_i.device).repeat_interleave(lab_i.shape[1])
    lab_cols = lab_i.flatten() + n_lab
    weights = torch.cat([edges.sims, lab_s.flatten()]).clamp(min=0).pow(gamma)
    pool_w, lab_w = weights[:len(edges.sims)], weights[len(edges.sims):]
    lab_flat, lab_order = _flat_positions(lab_rows, lab_cols, n)
    at = torch.searchsorted(part.flat, lab_flat) + torch.arange(len(lab_flat), device=lab_flat.device)
    from_pool = torch.ones(len(part.flat) + len(lab_flat), dtype=torch.bool, device=lab_flat.device)
    from_pool[at] = False
    flat = torch.empty(len(from_pool), dtype=part.flat.dtype, device=lab_flat.device)
    flat[from_pool], flat[at] = part.flat, lab_flat
    merged = torch.empty(len(from_pool), dtype=weights.dtype, device=weights.device)
    merged[from_pool], merged[at] = torch.cat([pool_w, pool_w])[part.order], torch.cat([lab_w, lab_w])[lab_order]
    return _affinity_of_sorted(flat, merged, n)


def propagate_cell(graph: PoolGraph, keep: torch.Tensor, labeled_features: torch.Tensor, labeled: torch.Tensor,
                   queries: list, classes: int, alpha: float, gamma: float, iterations: int,
                   known_neighbours: Optional[list] = None, balance: int = 0) -> Propagated:
    """Join the L labeled images to the pool images ``keep`` (P bool), propagate, and score
    ``queries`` (raw feature sets) inductively. Pool edges to dropped images are removed; each
    labeled image links to its k nearest kept pool images, and W's symmetry links them back.
    ``known_neighbours[i]``: query set i's nearest pool images, when the graph keeps them
    (:func:`cell_neighbours`; None: searched). ``balance``: :func:`balance_classes` steps on the
    pool images' distributions before the queries vote (the labeled images' are left as they are)."""
    k = graph.indices.shape[1]
    labeled_nodes = graph.project(labeled_features)
    part = _pool_part(graph, keep, len(labeled_nodes))
    kept, new_id = part.edges.kept, part.edges.new_id
    affinity = _joined_affinity(part, labeled_nodes, k, gamma)
    labels = torch.cat([labeled, torch.full((len(kept),), -1, dtype=torch.long, device=keep.device)])
    probs = propagate(affinity, labels, classes, alpha, iterations)
    if balance:
        n_labeled = len(labeled_nodes)
        probs = torch.cat([probs[:n_labeled], balance_classes(probs[n_labeled:], balance)])
    nodes = torch.cat([labeled_nodes, part.kept_nodes])
    known = known_neighbours or [None] * len(queries)
    scores = []
    for q, pool_neighbours in zip(queries, known):
        projected = graph.project(q)
        neighbours = None if pool_neighbours is None else \
            cell_neighbours(projected, pool_neighbours, new_id, labeled_nodes, graph.nodes, kept, k)
        scores.append(inductive_scores(projected, nodes, probs, k, gamma, neighbours))
    return Propagated(probs, nodes, kept, scores)
