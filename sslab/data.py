"""Datasets as one in-memory form, and the label-budget splits every comparison uses.

Every dataset becomes an :class:`ImageSet` (uint8 N×C×H×W images, int64 labels with -1
where unknown, class names). Training code moves the whole set to the training device
once; there is no per-sample loader in the training path.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DATASETS = ("fashion-mnist", "cifar10", "stl10", "folder:PATH")
# (channels, pixels) of each named dataset's images as stored; a folder: dataset's images are
# resized to FOLDER_IMAGE_SIZE unless image_size says otherwise.
NATIVE_SHAPES = {"fashion-mnist": (1, 28), "cifar10": (3, 32), "stl10": (3, 96)}
FOLDER_IMAGE_SIZE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetNotFound(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says how to get it."""


@dataclass
class ImageSet:
    """Images as one uint8 tensor (N×C×H×W), int64 labels (-1 = unknown), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 N×C×H×W tensor, got {self.images.dtype} "
                             f"with shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), "
                             f"got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], list(self.classes))

    def unlabeled(self) -> "ImageSet":
        """The same images with their labels hidden."""
        return ImageSet(self.images, torch.full_like(self.labels, -1), list(self.classes))

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), list(self.classes))


@dataclass
class DatasetSplits:
    """The three pools a study needs. ``unlabeled`` is the dataset's own unlabeled split
    where it has one, otherwise ``train`` with its labels hidden."""

    name: str
    train: ImageSet
    test: ImageSet
    unlabeled: ImageSet
    source: str = ""
    # The unlabeled pool is the train split itself (row i of one is row i of the other), labels
    # hidden: a protocol that uses the pool must then leave out the images it holds as labeled
    # or validation images.
    pool_is_train: bool = False


# ---------------------------------------------------------------- fashion-mnist

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / f"{stem}.gz", folder / stem,
                      folder / "FashionMNIST" / "raw" / f"{stem}.gz", folder / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_from(folder: Path) -> Optional[DatasetSplits]:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find_idx(folder, s) for s in stems]
    if any(p is None for p in paths):
        return None
    arrays = [_read_idx(p) for p in paths]
    train = ImageSet(torch.from_numpy(arrays[0].copy()).unsqueeze(1), torch.from_numpy(arrays[1].astype(np.int64)),
                     list(FASHION_MNIST_CLASSES))
    test = ImageSet(torch.from_numpy(arrays[2].copy()).unsqueeze(1), torch.from_numpy(arrays[3].astype(np.int64)),
                    list(FASHION_MNIST_CLASSES))
    return DatasetSplits("fashion-mnist", train, test, train.unlabeled(), source=str(folder), pool_is_train=True)


def _download_root(data_root: Optional[str]) -> Path:
    if data_root:
        return Path(data_root)
    return Path(os.environ.get("SSLAB_DATA", Path.home() / ".cache" / "sslab"))


def _fashion_mnist_locations(data_root: Optional[str]) -> list:
    places = []
    if data_root:
        places.append(Path(data_root))
    places.append(DEBIAN_FASHION_MNIST)
    places.append(_download_root(None))
    return places


def _load_fashion_mnist(data_root: Optional[str], download: bool) -> DatasetSplits:
    places = _fashion_mnist_locations(data_root)
    for place in places:
        found = _fashion_mnist_from(place)
        if found is not None:
            return found
    error = None
    if download:
        try:
            from torchvision.datasets import FashionMNIST
            root = _download_root(data_root)
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
            found = _fashion_mnist_from(root)
            if found is not None:
                return found
        except Exception as exc:  # no network, blocked host, disk full ...
            error = exc
    looked = ", ".join(str(p) for p in places)
    raise DatasetNotFound(
        f"dataset 'fashion-mnist' not found. Looked in: {looked}"
        + (f"; download failed ({type(error).__name__}: {error})" if error else "")
        + ". Get it with `apt-get install dataset-fashion-mnist` (files under "
        f"{DEBIAN_FASHION_MNIST}), or run once with network access so torchvision downloads it "
        f"(into --data-root, default {_download_root(None)}).")


# ---------------------------------------------------------------- torchvision sets

def _torchvision_error(name: str, root: Path, exc: Exception) -> DatasetNotFound:
    return DatasetNotFound(
        f"dataset '{name}' not found under {root} and the download failed "
        f"({type(exc).__name__}: {exc}). Run once with network access "
        f"(`python -m sslab datasets --download {name}`), or pass --data-root pointing to a folder "
        f"that already holds torchvision's copy.")


def _from_hwc(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _load_cifar10(data_root: Optional[str], download: bool) -> DatasetSplits:
    from torchvision.datasets import CIFAR10
    root = _download_root(data_root)
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except Exception as exc:
        raise _torchvision_error("cifar10", root, exc) from exc
    train_set = ImageSet(_from_hwc(train.data), torch.tensor(train.targets), list(train.classes))
    test_set = ImageSet(_from_hwc(test.data), torch.tensor(test.targets), list(test.classes))
    return DatasetSplits("cifar10", train_set, test_set, train_set.unlabeled(), source=str(root), pool_is_train=True)


def _load_stl10(data_root: Optional[str], download: bool) -> DatasetSplits:
    from torchvision.datasets import STL10
    root = _download_root(data_root)
    try:
        splits = {s: STL10(str(root), split=s, download=download) for s in ("train", "test", "unlabeled")}
    except Exception as exc:
        raise _torchvision_error("stl10", root, exc) from exc
    classes = list(splits["train"].classes)

    def as_set(ds, labeled=True):
        labels = torch.from_numpy(ds.labels.astype(np.int64)) if labeled else torch.full((len(ds.data),), -1)
        return ImageSet(torch.from_numpy(np.ascontiguousarray(ds.data)), labels, classes)

    return DatasetSplits("stl10", as_set(splits["train"]), as_set(splits["test"]),
                         as_set(splits["unlabeled"], labeled=False), source=str(root))


# ---------------------------------------------------------------- folder:PATH

def _image_files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _to_mode(img, mode: str):
    """Convert any PIL mode (palette, RGBA, 16-bit grey, CMYK ...) to 'L' or 'RGB'."""
    from PIL import Image
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert(mode)


def _load_images(files: list, mode: str, size: int, skipped: list) -> list:
    from PIL import Image
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                img = _to_mode(img, mode).resize((size, size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:
            skipped.append((path, exc))
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=3)
            continue
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return arrays


def _detect_mode(files: list) -> str:
    """Grey only when every sampled readable image is grey; one colour image makes the set RGB."""
    from PIL import Image
    for path in files[:: max(1, len(files) // 64)]:
        try:
            with Image.open(path) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    if img.mode == "P" and all(
                            r == g == b for r, g, b in np.asarray(img.convert("RGB")).reshape(-1, 3)[::97]):
                        continue
                    return "RGB"
        except Exception:
            continue
    return "L"


_FINGERPRINTS: dict = {}  # (folder, every sub-folder's modification time) → fingerprint


def folder_fingerprint(path: str) -> str:
    """A digest of what a ``folder:`` dataset holds: the relative path, size and modification time
    of every image file (by suffix) under its ``train/``, ``test/`` and ``unlabeled/`` folders, and
    the names of their sub-folders (the classes). Part of the run and cell folder names, so images
    added, removed, moved between classes or rewritten give new runs instead of old ones. Pixels
    are not read: a file rewritten with the same size and modification time is not seen. Within
    one process it is recomputed when a sub-folder's modification time changes (a file added,
    removed or renamed in it)."""
    root = Path(path).expanduser()
    folder_classes(path)  # the layout's own errors first
    pending = [str(d) for d in (root / "train", root / "test", root / "unlabeled") if d.is_dir()]
    folders = []
    while pending:  # the sub-folders and their times only: cheap enough to do on every call
        folder = pending.pop()
        folders.append((folder, os.stat(folder).st_mtime_ns))
        with os.scandir(folder) as entries:
            pending += [entry.path for entry in entries if entry.is_dir()]
    folders.sort()
    key = (str(root.resolve()), tuple(folders))
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        start = len(str(root)) + 1
        for folder, _ in folders:
            digest.update(f"{folder[start:]}/\n".encode())
            with os.scandir(folder) as entries:
                files = sorted((entry.name, entry.stat()) for entry in entries
                               if not entry.is_dir() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES)
            for name, st in files:
                digest.update(f"{folder[start:]}/{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        while len(_FINGERPRINTS) >= 64:
            del _FINGERPRINTS[next(iter(_FINGERPRINTS))]
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def folder_classes(path: str) -> list:
    """The class folders of a ``folder:`` dataset, checked from the directory listing alone (so a
    run fails before any work when the layout is wrong)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFound(f"dataset 'folder:{path}': the folder {root} does not exist. Expected "
                              f"{root}/train/<class>/*.png (ImageFolder layout), optional test/ and unlabeled/.")
    train_dir = root / "train"
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else []
    if not classes:
        raise DatasetNotFound(f"dataset 'folder:{path}': {train_dir} is missing or has no class folders. "
                              f"Expected {train_dir}/<class>/*.png (one folder per class).")
    if len(classes) < 2:
        raise ValueError(f"dataset 'folder:{path}': {train_dir} has a single class ({classes[0]!r}); "
                         f"a classification study needs at least 2 class folders.")
    return classes


def _load_folder(path: str, image_size: Optional[int]) -> DatasetSplits:
    root = Path(path).expanduser()
    train_dir = root / "train"
    classes = folder_classes(path)
    size = image_size or FOLDER_IMAGE_SIZE
    if size < 16:
        raise ValueError(f"image_size={size} is too small; allowed: 16 or more (28, 32 and 96 are the usual sizes)")
    all_files = [f for c in classes for f in _image_files(train_dir / c)]
    mode = _detect_mode(all_files)
    skipped: list = []

    def labeled_split(split_dir: Path, required: bool) -> Optional[ImageSet]:
        if not split_dir.is_dir():
            return None
        images, labels = [], []
        for index, name in enumerate(classes):
            arrays = _load_images(_image_files(split_dir / name), mode, size, skipped)
            if required and not arrays:
                raise ValueError(f"dataset 'folder:{path}': class {name!r} has no readable images in "
                                 f"{split_dir / name}; every class needs at least one.")
            images += arrays
            labels += [index] * len(arrays)
        if not images:
            return None
        return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), list(classes))

    train = labeled_split(train_dir, required=True)
    test = labeled_split(root / "test", required=False)
    unlabeled = None
    if (root / "unlabeled").is_dir():
        arrays = _load_images(_image_files(root / "unlabeled"), mode, size, skipped)
        if arrays:
            unlabeled = ImageSet(torch.from_numpy(np.stack(arrays)), torch.full((len(arrays),), -1), list(classes))
    if skipped:
        warnings.warn(f"dataset 'folder:{path}': skipped {len(skipped)} unreadable image(s) in total", stacklevel=2)
    if test is None:
        warnings.warn(f"dataset 'folder:{path}' has no test/ folder; using the train images as the test split, "
                      f"so accuracies are optimistic.", stacklevel=2)
        test = train
    return DatasetSplits(f"folder:{path}", train, test, unlabeled if unlabeled is not None else train.unlabeled(),
                         source=str(root), pool_is_train=unlabeled is None)


# ---------------------------------------------------------------- entry points

def _resize(images: ImageSet, size: int) -> ImageSet:
    if images.image_size == size:
        return images
    resized = torch.nn.functional.interpolate(images.images.float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return ImageSet(resized.round().clamp(0, 255).to(torch.uint8), images.labels, images.classes)


def check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not (name in DATASETS[:-1] or name.startswith("folder:")):
        raise ValueError(f"dataset={name!r} is not known; allowed: {', '.join(DATASETS)}")
    if name == "folder:":
        raise ValueError("dataset='folder:' needs a path, e.g. folder:/data/my_images")
    return name


_CACHE: dict = {}
_FOLDER_MODES: dict = {}  # (folder, its fingerprint) → "L" or "RGB"


def image_shape(name: str, image_size: Optional[int] = None) -> tuple:
    """``(channels, pixels)`` of the images :func:`load_dataset` gives for ``name`` and
    ``image_size``, without loading them: from :data:`NATIVE_SHAPES`, or for ``folder:PATH`` from
    a sample of its train images (grey only when every sampled one is grey, as the loader decides)."""
    check_dataset_name(name)
    if not name.startswith("folder:"):
        channels, size = NATIVE_SHAPES[name]
        return channels, image_size or size
    path = name[len("folder:"):]
    key = (str(Path(path).expanduser().resolve()), folder_fingerprint(path))
    if key not in _FOLDER_MODES:
        train_dir = Path(path).expanduser() / "train"
        _FOLDER_MODES[key] = _detect_mode([f for c in folder_classes(path) for f in _image_files(train_dir / c)])
    return (1 if _FOLDER_MODES[key] == "L" else 3), image_size or FOLDER_IMAGE_SIZE


def load_dataset(name: str = "fashion-mnist", data_root: Optional[str] = None, image_size: Optional[int] = None,
                 download: bool = True) -> DatasetSplits:
    """Load a dataset by name (``fashion-mnist``, ``cifar10``, ``stl10`` or ``folder:PATH``) into memory.

    ``image_size`` resizes every split (``folder:`` sets default to 32 px). Results are cached
    per process, so notebooks that load the same set twice pay once.
    """
    check_dataset_name(name)
    key = (name, data_root, image_size)
    if name.startswith("folder:"):  # a folder whose files changed is read again
        key += (folder_fingerprint(name[len("folder:"):]),)
    if key in _CACHE:
        return _CACHE[key]
    if name == "fashion-mnist":
        splits = _load_fashion_mnist(data_root, download)
    elif name == "cifar10":
        splits = _load_cifar10(data_root, download)
    elif name == "stl10":
        splits = _load_stl10(data_root, download)
    else:
        splits = _load_folder(name[len("folder:"):], image_size)
    if image_size is not None and not name.startswith("folder:"):
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small; allowed: 16 or more")
        splits = DatasetSplits(splits.name, _resize(splits.train, image_size), _resize(splits.test, image_size),
                               _resize(splits.unlabeled, image_size), splits.source, splits.pool_is_train)
    _CACHE[key] = splits
    return splits


def dataset_status(data_root: Optional[str] = None) -> list:
    """(name, where it is or how to get it) for each known dataset, without downloading."""
    rows = []
    for place in _fashion_mnist_locations(data_root):
        if _fashion_mnist_from(place) is not None if place.is_dir() else False:
            rows.append(("fashion-mnist", f"found in {place}"))
            break
    else:
        rows.append(("fashion-mnist", "missing: apt-get install dataset-fashion-mnist, or run once with network"))
    root = _download_root(data_root)
    cifar = root / "cifar-10-batches-py"
    rows.append(("cifar10", f"found in {root}" if cifar.is_dir() else
                 f"missing: downloads into {root} on first use when the network allows"))
    stl = root / "stl10_binary"
    rows.append(("stl10", f"found in {root} (train, test, 100k unlabeled; 96 px)" if stl.is_dir() else
                 f"missing: downloads into {root} on first use when the network allows (2.6 GB)"))
    rows.append(("folder:PATH", "your own images: PATH/train/<class>/*, optional PATH/test/<class>/*, "
                                "PATH/unlabeled/*"))
    return rows


# ---------------------------------------------------------------- label budgets

def label_budget_split(labels, per_class: int, seed: int = 0, val_per_class: int = 0):
    """Stratified, seeded, disjoint labeled-train and validation indices.

    For each class (in label order) the class's indices are shuffled with a generator
    seeded by ``seed``; the first ``val_per_class`` become validation, the next
    ``per_class`` the labeled budget. So for one seed the validation set is the same for
    every budget and budgets are nested (the 4-label set contains the 2-label set), and
    every method given the same arguments sees exactly the same images. Returns two sorted
    int64 tensors ``(train_index, val_index)``.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class <= 0:
        raise ValueError(f"labels per class={per_class!r} is not allowed; allowed: an integer ≥ 1")
    if isinstance(val_per_class, bool) or not isinstance(val_per_class, (int, np.integer)) or val_per_class < 0:
        raise ValueError(f"val_per_class={val_per_class!r} is not allowed; allowed: an integer ≥ 0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} is not allowed; allowed: an integer")
    labels = np.asarray(torch.as_tensor(labels).cpu())
    known = np.unique(labels[labels >= 0])
    if known.size == 0:
        raise ValueError("label_budget_split needs labeled images; every label is -1 (unknown)")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    train_parts, val_parts = [], []
    for cls in known:
        members = np.flatnonzero(labels == cls)
        need = per_class + val_per_class
        if need > members.size:
            allowed = (f"labels per class ≤ {members.size - val_per_class}" if members.size > val_per_class else
                       f"val_per_class ≤ {members.size - 1}, so that some images are left for labels")
            raise ValueError(f"labels per class={per_class} (+ {val_per_class} validation) is more than class "
                             f"{int(cls)} has: it has {members.size} labeled images; allowed: {allowed}")
        order = members[rng.permutation(members.size)]
        val_parts.append(order[:val_per_class])
        train_parts.append(order[val_per_class:need])
    train_index = torch.from_numpy(np.sort(np.concatenate(train_parts)).astype(np.int64))
    val_index = torch.from_numpy(np.sort(np.concatenate(val_parts)).astype(np.int64))
    return train_index, val_index


def max_per_class(labels, val_per_class: int = 0) -> int:
    """The largest budget every class can give after taking ``val_per_class`` for validation."""
    labels = np.asarray(torch.as_tensor(labels).cpu())
    counts = np.bincount(labels[labels >= 0])
    counts = counts[counts > 0]
    return int(counts.min()) - val_per_class


def check_budgets_fit(dataset: str, labels, budgets, val_per_class: int, name: str = "budgets",
                      val_name: str = "val_per_class") -> None:
    """Every budget (labeled images per class) of ``budgets`` must leave ``val_per_class``
    validation images in every class of ``dataset``'s labeled train split (``labels``): the one
    check the command line and the notebooks run before any pretraining, not hours into a sweep.
    ``name`` and ``val_name`` are how the caller spells the two parameters."""
    most = max_per_class(labels, val_per_class)
    if most < 1:  # not even one labeled image per class is left: the validation share is the problem
        raise ValueError(f"{val_name}={val_per_class} is not allowed: {dataset}'s smallest class has "
                         f"{most + val_per_class} labeled images, and at least 1 must be left for the labels; "
                         f"allowed: {val_name} ≤ {most + val_per_class - 1}")
    budgets = [budgets] if isinstance(budgets, int) else list(budgets)
    too_many = [b for b in budgets if b > most]
    if too_many:
        shown = budgets[0] if len(budgets) == 1 else ",".join(map(str, budgets))
        raise ValueError(f"{name}={shown} is not allowed: {dataset} has too few labeled images per class for "
                         f"{', '.join(map(str, too_many))} with {val_name}={val_per_class} validation images per "
                         f"class; allowed: {name} ≤ {most}")

