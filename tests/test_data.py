"""sslab.data: ImageSet, label-budget splits, Fashion-MNIST lookup and folder: datasets."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import sslab.data as data
from sslab.data import (FASHION_MNIST_CLASSES, DatasetNotFound, ImageSet, check_dataset_name, image_shape,
                        label_budget_split, load_dataset, max_per_class)


# ---------------------------------------------------------------- ImageSet

def test_image_set_holds_uint8_images_and_long_labels(make_image_set):
    images = make_image_set(n=12, channels=3, size=32, classes=3)
    assert len(images) == 12
    assert images.channels == 3 and images.image_size == 32 and images.num_classes == 3
    assert images.labels.dtype == torch.int64
    sub = images.subset([0, 5, 7])
    assert torch.equal(sub.images, images.images[[0, 5, 7]])
    assert sub.labels.tolist() == [0, 2, 1]
    hidden = images.unlabeled()
    assert torch.equal(hidden.images, images.images)
    assert (hidden.labels == -1).all()
    assert (images.labels >= 0).all(), "unlabeled() must not change the original labels"


def test_image_set_converts_int32_labels_to_int64():
    images = ImageSet(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2], dtype=torch.int32))
    assert images.labels.dtype == torch.int64


@pytest.mark.parametrize("images, labels, message", [
    (torch.zeros(2, 1, 4, 4), torch.zeros(2), "uint8"),
    (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2), "N×C×H×W"),
    (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), r"labels must have shape \(2,\)"),
])
def test_image_set_rejects_bad_tensors(images, labels, message):
    with pytest.raises(ValueError, match=message):
        ImageSet(images, labels)


# ---------------------------------------------------------------- label_budget_split

def _labels(counts, seed=0):
    """Shuffled labels with ``counts[c]`` images of class c, plus a few unknown (-1) ones."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)] + [np.full(7, -1)])
    return torch.from_numpy(np.random.default_rng(seed).permutation(labels))


def test_label_budget_split_is_stratified_and_disjoint():
    labels = _labels([30, 25, 40, 20])
    train, val = label_budget_split(labels, per_class=4, seed=3, val_per_class=5)
    assert train.dtype == torch.int64 and val.dtype == torch.int64
    assert torch.bincount(labels[train], minlength=4).tolist() == [4, 4, 4, 4]
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 5, 5, 5]
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(set(train.tolist())) == len(train), "no index twice"
    assert (labels[train] >= 0).all() and (labels[val] >= 0).all(), "unknown labels are never picked"
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)


def test_label_budget_split_without_validation_gives_empty_val():
    train, val = label_budget_split(_labels([5, 5, 5]), per_class=5, seed=0)
    assert len(train) == 15 and len(val) == 0


def test_label_budget_split_is_deterministic_and_seeded():
    labels = _labels([50, 50, 50])
    first = label_budget_split(labels, per_class=8, seed=1, val_per_class=4)
    again = label_budget_split(labels.clone(), per_class=8, seed=1, val_per_class=4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # A numpy array or a list gives the same answer as a tensor.
    from_numpy = label_budget_split(labels.numpy(), per_class=8, seed=1, val_per_class=4)
    assert torch.equal(first[0], from_numpy[0])
    other = label_budget_split(labels, per_class=8, seed=2, val_per_class=4)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], other[1])


def test_label_budget_split_pins_indices_across_machines():
    # Written out once: every saved split and paired comparison depends on these indices, so a
    # change of the split's algorithm or of numpy's PCG64 stream (fixed by numpy's compatibility
    # policy) must show here, on any machine.
    train, val = label_budget_split(torch.arange(20) % 2, per_class=2, seed=0, val_per_class=1)
    assert (train.tolist(), val.tolist()) == ([4, 7, 12, 19], [5, 8])
    train, val = label_budget_split(torch.arange(30) % 3, per_class=3, seed=5, val_per_class=2)
    assert (train.tolist(), val.tolist()) == ([3, 4, 6, 8, 9, 10, 14, 22, 29], [17, 18, 19, 21, 23, 28])


def test_label_budgets_are_nested_with_one_validation_set():
    labels = _labels([70, 70, 70, 70, 70])
    splits = {k: label_budget_split(labels, per_class=k, seed=7, val_per_class=6) for k in (1, 2, 4, 8, 16, 32, 64)}
    budgets = sorted(splits)
    for small, large in zip(budgets, budgets[1:]):
        assert set(splits[small][0].tolist()) <= set(splits[large][0].tolist()), f"{small} ⊄ {large}"
    for k in budgets:
        assert torch.equal(splits[k][1], splits[1][1]), f"validation set changed at budget {k}"
        assert len(splits[k][0]) == 5 * k


def test_label_budget_split_names_the_class_that_is_too_small():
    labels = _labels([30, 30, 3, 30])
    with pytest.raises(ValueError, match=r"class 2 has: it has 3 labeled images") as info:
        label_budget_split(labels, per_class=2, seed=0, val_per_class=2)
    assert "labels per class ≤ 1" in str(info.value)
    # Exactly what the class has is allowed.
    train, val = label_budget_split(labels, per_class=1, seed=0, val_per_class=2)
    assert len(train) == 4 and len(val) == 8
    assert max_per_class(labels, val_per_class=2) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(per_class=0), "labels per class=0"),
    (dict(per_class=2.5), "labels per class=2.5"),
    (dict(per_class=True), "labels per class=True"),
    (dict(per_class=2, val_per_class=-1), "val_per_class=-1"),
    (dict(per_class=2, seed="0"), "seed='0'"),
])
def test_label_budget_split_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        label_budget_split(_labels([10, 10]), **kwargs)


def test_label_budget_split_needs_some_labels():
    with pytest.raises(ValueError, match="every label is -1"):
        label_budget_split(torch.full((10,), -1), per_class=1)


# ---------------------------------------------------------------- dataset names

@pytest.mark.parametrize("name", ["mnist", "", "folder:", None])
def test_unknown_dataset_names_are_refused(name):
    with pytest.raises(ValueError, match="dataset="):
        check_dataset_name(name)


def test_known_dataset_names_pass():
    for name in ("fashion-mnist", "cifar10", "stl10", "folder:/tmp/x"):
        assert check_dataset_name(name) == name


# ---------------------------------------------------------------- fashion-mnist

@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_loads_from_the_debian_folder():
    splits = load_dataset("fashion-mnist", download=False)
    assert splits.source == str(data.DEBIAN_FASHION_MNIST)
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert splits.train.classes == FASHION_MNIST_CLASSES == splits.test.classes
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert splits.train.images.float().mean() > 20, "images are not all black"
    assert (splits.unlabeled.labels == -1).all()
    assert splits.unlabeled.images.shape == splits.train.images.shape


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    """Every place Fashion-MNIST is looked for is an empty folder."""
    empty_debian = tmp_path / "debian"
    empty_cache = tmp_path / "cache"
    data_root = tmp_path / "data-root"
    for folder in (empty_debian, empty_cache, data_root):
        folder.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", empty_debian)
    monkeypatch.setenv("SSLAB_DATA", str(empty_cache))
    return data_root, empty_debian, empty_cache


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(no_fashion_mnist):
    data_root, empty_debian, empty_cache = no_fashion_mnist
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", data_root=str(data_root), download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "network" in message
    for place in (data_root, empty_debian, empty_cache):
        assert str(place) in message
    assert isinstance(info.value, FileNotFoundError), "the CLI turns FileNotFoundError into a clean exit"


def test_dataset_status_reports_missing_fashion_mnist(no_fashion_mnist):
    data_root, _, _ = no_fashion_mnist
    status = dict(data.dataset_status(str(data_root)))
    assert "apt-get install dataset-fashion-mnist" in status["fashion-mnist"]
    assert set(status) == {"fashion-mnist", "cifar10", "stl10", "folder:PATH"}


def test_fashion_mnist_is_found_in_data_root(tmp_path, monkeypatch):
    """IDX files in --data-root are used before anything else (and must be read exactly)."""
    import gzip
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")

    def write_idx(name, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (6, 28, 28))
    test_images = rng.integers(0, 256, (4, 28, 28))
    write_idx("train-images-idx3-ubyte", train_images)
    write_idx("train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 9]))
    write_idx("t10k-images-idx3-ubyte", test_images)
    write_idx("t10k-labels-idx1-ubyte", np.array([5, 6, 7, 8]))
    splits = load_dataset("fashion-mnist", data_root=str(tmp_path), download=False)
    assert splits.source == str(tmp_path)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(train_images.astype(np.uint8)))
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test_images.astype(np.uint8)))
    assert splits.train.labels.tolist() == [0, 1, 2, 3, 4, 9]
    assert splits.test.labels.tolist() == [5, 6, 7, 8]


# ---------------------------------------------------------------- folder:PATH

def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _solid_rgb(colour, size=20):
    from PIL import Image
    return Image.new("RGB", (size, size), colour)


@pytest.fixture
def colour_folder(tmp_path):
    """Two classes of solid-colour PNGs, with one corrupt file, an RGBA, a palette and a grey image."""
    from PIL import Image
    root = tmp_path / "imgs"
    _save(root / "train" / "cat" / "red.png", _solid_rgb((255, 0, 0)))
    _save(root / "train" / "cat" / "green.png", _solid_rgb((0, 255, 0)))
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    # Fully transparent RGBA: composited on white.
    _save(root / "train" / "cat" / "transparent.png", Image.new("RGBA", (20, 20), (10, 20, 30, 0)))
    _save(root / "train" / "dog" / "blue.png", _solid_rgb((0, 0, 255)))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([200, 100, 50] + [0, 0, 0] * 255)
    _save(root / "train" / "dog" / "palette.png", palette)
    _save(root / "train" / "dog" / "grey.png", Image.new("L", (20, 20), 77))
    _save(root / "test" / "cat" / "t1.png", _solid_rgb((255, 255, 0)))
    _save(root / "test" / "dog" / "t2.png", _solid_rgb((0, 255, 255)))
    _save(root / "unlabeled" / "u1.png", _solid_rgb((1, 2, 3)))
    _save(root / "unlabeled" / "sub" / "u2.png", _solid_rgb((4, 5, 6)))
    (root / "unlabeled" / "notes.txt").write_text("not an image, and not an image suffix")
    return root


def _pixel(images: ImageSet, index: int) -> list:
    """The colour of a solid image, checking it is solid."""
    image = images.images[index]
    assert (image == image[:, :1, :1]).all(), "a solid image stays solid"
    return image[:, 0, 0].tolist()


def test_folder_dataset_loads_with_a_warning_for_the_corrupt_file(colour_folder):
    with pytest.warns(UserWarning) as caught:
        splits = load_dataset(f"folder:{colour_folder}", image_size=16)
    messages = [str(w.message) for w in caught]
    assert any("broken.png" in m for m in messages), messages
    assert any("skipped 1 unreadable image(s) in total" in m for m in messages), messages
    train = splits.train
    assert train.classes == ["cat", "dog"]
    assert train.images.shape == (6, 3, 16, 16)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Files come sorted by name within each class: cat = green, red, transparent; dog = blue, grey, palette.
    assert _pixel(train, 0) == [0, 255, 0]
    assert _pixel(train, 1) == [255, 0, 0]
    assert _pixel(train, 2) == [255, 255, 255], "transparent RGBA is put on white"
    assert _pixel(train, 3) == [0, 0, 255]
    assert _pixel(train, 4) == [77, 77, 77], "a grey image in a colour set becomes grey RGB"
    assert _pixel(train, 5) == [200, 100, 50], "a palette image keeps its colours"
    assert splits.test.images.shape == (2, 3, 16, 16)
    assert splits.test.labels.tolist() == [0, 1]
    assert splits.unlabeled.images.shape == (2, 3, 16, 16)
    assert (splits.unlabeled.labels == -1).all()
    assert splits.unlabeled.classes == ["cat", "dog"]


def test_image_shape_is_what_the_loader_gives_without_loading(colour_folder, tmp_path):
    assert image_shape("fashion-mnist") == (1, 28) and image_shape("fashion-mnist", 32) == (1, 32)
    assert image_shape("cifar10") == (3, 32) and image_shape("stl10") == (3, 96) and image_shape("stl10", 48) == (3, 48)
    with pytest.warns(UserWarning):
        loaded = load_dataset(f"folder:{colour_folder}", image_size=16)
    assert image_shape(f"folder:{colour_folder}", 16) == (loaded.train.channels, loaded.train.image_size) == (3, 16)
    assert image_shape(f"folder:{colour_folder}") == (3, 32)
    from PIL import Image
    grey = tmp_path / "grey"
    for cls in ("a", "b"):
        _save(grey / "train" / cls / "x.png", Image.new("L", (20, 20), 9))
    assert image_shape(f"folder:{grey}") == (1, 32)
    with pytest.raises(ValueError, match="dataset='mnist' is not known"):
        image_shape("mnist")


def test_grey_folder_gives_one_channel_and_train_as_test(tmp_path):
    from PIL import Image
    root = tmp_path / "grey"
    for cls, value in (("a", 10), ("b", 200)):
        for i in range(2):
            _save(root / "train" / cls / f"{i}.png", Image.new("L", (30, 30), value + i))
    with pytest.warns(UserWarning, match="no test/ folder"):
        splits = load_dataset(f"folder:{root}", image_size=28)
    assert splits.train.images.shape == (4, 1, 28, 28)
    assert [_pixel(splits.train, i) for i in range(4)] == [[10], [11], [200], [201]]
    assert splits.test is splits.train
    assert (splits.unlabeled.labels == -1).all() and len(splits.unlabeled) == 4


def test_folder_without_corrupt_files_gives_no_skip_warning(tmp_path):
    root = tmp_path / "clean"
    for cls in ("a", "b"):
        _save(root / "train" / cls / "x.png", _solid_rgb((1, 2, 3)))
        _save(root / "test" / cls / "x.png", _solid_rgb((1, 2, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_dataset(f"folder:{root}")
    assert splits.train.images.shape == (2, 3, 32, 32), "folder sets default to 32 px"


def test_folder_without_train_is_a_clear_error(tmp_path):
    root = tmp_path / "empty"
    (root / "test" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFound, match=r"train.* is missing or has no class folders"):
        load_dataset(f"folder:{root}")
    (root / "train").mkdir()
    with pytest.raises(DatasetNotFound, match="no class folders"):
        load_dataset(f"folder:{root}", image_size=20)


def test_folder_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_folder_with_one_class_is_a_clear_error(tmp_path):
    root = tmp_path / "single"
    _save(root / "train" / "only" / "x.png", _solid_rgb((1, 2, 3)))
    with pytest.raises(ValueError, match=r"single class \('only'\).*at least 2"):
        load_dataset(f"folder:{root}")


def test_folder_class_without_readable_images_is_a_clear_error(tmp_path):
    root = tmp_path / "unreadable"
    _save(root / "train" / "a" / "x.png", _solid_rgb((1, 2, 3)))
    (root / "train" / "b").mkdir(parents=True)
    (root / "train" / "b" / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(ValueError, match="class 'b' has no readable"):
        load_dataset(f"folder:{root}")
