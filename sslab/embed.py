"""Features → 2-D UMAP coordinates, and a number that says how well classes separate there.

UMAP (McInnes, Healy & Melville 2018, umap-learn) is imported lazily: the training path
never needs it. It always runs with ``n_jobs=1`` and a fixed ``random_state`` so that a
notebook redraws the same picture and umap does not warn that seeding disables
parallelism.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def stratified_sample(labels, n: int, seed: int = 0, sort: bool = True, name: str = "points") -> np.ndarray:
    """Up to ``n`` indices drawn evenly across classes (seeded), so every class shows in a
    small UMAP or gallery. ``sort=True`` returns them in index order; ``sort=False`` in
    round-robin class order (one image of each class, then a second of each, ...)."""
    labels = _as_numpy(labels).astype(np.int64)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name}={n!r} is not allowed; allowed: an integer ≥ 1")
    rng = np.random.Generator(np.random.PCG64(seed))
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    # Round-robin over classes until n are taken: equal shares, small classes used up first.
    taken, depth = [], 0
    while len(taken) < n:
        added = False
        for members in per_class:
            if depth < members.size and len(taken) < n:
                taken.append(members[depth])
                added = True
        if not added:
            break
        depth += 1
    taken = np.asarray(taken, dtype=np.int64)
    return np.sort(taken) if sort else taken


# umap-learn's modules whose numba functions it compiles at every process's first fit and does not
# keep on disk (pynndescent and the rest of umap already do)
UMAP_JIT_MODULES = ("umap.layouts", "umap.umap_", "umap.utils", "umap.distances")


def keep_umap_compiled() -> int:
    """Let numba keep on disk the machine code of the umap functions a fit compiles, so that only the
    first process ever compiles them: a second process's first fit took 12.0 s as umap-learn leaves
    it and 4.4 s with the code kept (``python -m benchmarks.umap_cache``: 2000 points, one thread).
    The code is the same either way, so are the coordinates. Returns how many functions were
    switched (0 once done, or where this numba or umap is laid out otherwise: UMAP then works as
    before, only compiling again); a function already compiled in this process stays as it is."""
    import importlib
    try:
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
    except ImportError:  # pragma: no cover - another numba layout
        return 0
    switched = 0
    for name in UMAP_JIT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - another umap-learn layout
            continue
        for value in vars(module).values():
            if (isinstance(value, Dispatcher) and isinstance(getattr(value, "_cache", None), NullCache)
                    and not value.signatures):
                try:
                    value.enable_caching()
                except Exception:  # pragma: no cover - a function numba cannot cache compiles as before
                    continue
                switched += 1
    return switched


def warm_umap() -> None:
    """Compile what a UMAP fit needs and keep it on disk (:func:`keep_umap_compiled`): a small fit of
    the same kinds of arrays as the notebooks' (float32 features, exact neighbours, 2 components)
    compiles the same functions in a few seconds of one core's time, so that a later process's first
    fit starts at once."""
    points = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    umap_2d(points)


def umap_2d(features, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "euclidean",
            random_state: int = 0) -> np.ndarray:
    """N×D features → N×2 UMAP coordinates (float32). Features are standardised per dimension
    first, so a few large channels do not dominate the neighbour graph."""
    try:
        import umap
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the UMAP plots need umap-learn: pip install -e '.[notebooks]'") from exc
    keep_umap_compiled()
    x = _as_numpy(features).reshape(len(features), -1).astype(np.float32)
    if x.shape[0] < 4:
        raise ValueError(f"features has {x.shape[0]} rows; allowed: at least 4 points to embed")
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, x.shape[0] - 1), min_dist=min_dist,
                        metric=metric, random_state=random_state, n_jobs=1)
    with warnings.catch_warnings():
        # umap's own numba/pynndescent chatter about compilation is not something a reader can act on.
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        return reducer.fit_transform(x).astype(np.float32)


def knn_accuracy(coords, labels, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy in the embedding: for each point, the
    majority label of its ``k`` nearest other points (ties → the nearest of the tied
    labels). 1.0 = classes form clean islands; 1/classes ≈ no structure."""
    x = _as_numpy(coords).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64)
    n = x.shape[0]
    if y.shape != (n,):
        raise ValueError(f"labels has shape {y.shape}; expected ({n},) to match coords")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
        raise ValueError(f"k={k!r} is not allowed; allowed: an integer from 1 to {n - 1}")
    classes, y_index = np.unique(y, return_inverse=True)
    correct = 0
    for start in range(0, n, 1024):  # chunks keep the distance block small for large N
        block = x[start:start + 1024]
        d = ((block[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        rows = np.arange(block.shape[0])
        d[rows, start + rows] = np.inf  # leave the point itself out
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        neighbour_labels = y_index[nearest]
        counts = np.zeros((block.shape[0], classes.size))
        first = np.full((block.shape[0], classes.size), k)
        for rank in reversed(range(k)):  # after the loop: the rank of each label's nearest member
            np.add.at(counts, (rows, neighbour_labels[:, rank]), 1)
            first[rows, neighbour_labels[:, rank]] = rank
        votes = counts * (k + 1) + (k - first)  # most votes first, then the nearest
        correct += int((votes.argmax(1) == y_index[start:start + block.shape[0]]).sum())
    return correct / n


def silhouette(coords, labels) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) of the classes in the embedding, in [-1, 1]:
    for each point (b − a)/max(a, b) with a = mean distance to its own class, b = the smallest
    mean distance to another class."""
    x = _as_numpy(coords).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64)
    classes, y_index = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError("silhouette needs at least 2 classes in labels")
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    sums = np.stack([d[:, y_index == c].sum(1) for c in range(classes.size)], axis=1)
    counts = np.bincount(y_index, minlength=classes.size).astype(np.float64)
    own = y_index
    own_count = counts[own] - 1
    a = np.where(own_count > 0, sums[np.arange(len(y)), own] / np.maximum(own_count, 1), 0.0)
    other = sums / counts[None, :]
    other[np.arange(len(y)), own] = np.inf
    b = other.min(1)
    s = np.where(own_count > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


SCORES = {"knn": knn_accuracy, "silhouette": silhouette}


def separation(coords, labels, score: str = "knn") -> float:
    """The separation number shown beside a UMAP panel: ``knn`` (5-NN accuracy) or ``silhouette``."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not known; allowed: {', '.join(SCORES)}")
    return SCORES[score](coords, labels)


@dataclass
class Embedding:
    """One UMAP panel: 2-D coordinates of the sampled images, their labels, what was embedded
    (``space``, e.g. ``conv4`` or ``latent μ``) and the separation score."""

    name: str
    coords: np.ndarray
    labels: np.ndarray
    space: str
    score: float
    score_name: str = "knn"
    classes: list = field(default_factory=list)

    @property
    def score_label(self) -> str:
        if self.score_name == "knn":
            return f"5-NN acc {100 * self.score:.1f}%"
        return f"silhouette {self.score:.2f}"


def embed(name: str, features, labels, space: str, classes: Optional[list] = None, score: str = "knn",
          random_state: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> Embedding:
    """Features of one method → its :class:`Embedding` (UMAP coordinates + separation score)."""
    coords = umap_2d(features, n_neighbors=n_neighbors, min_dist=min_dist, random_state=random_state)
    y = _as_numpy(labels).astype(np.int64)
    return Embedding(name, coords, y, space, separation(coords, y, score), score, list(classes or []))
