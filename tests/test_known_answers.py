"""Known answers: every evaluation protocol learns a rule that can be learned, and scores no
better than chance where its predictions cannot match the labels.

The images (32 px grey, 4 classes) are noise with one bright 4×6 blob; the class is which of
four horizontal bands, top to bottom, holds the blob, wherever it sits across the image. The
rule survives the training augmentation of scratch and fine-tuning (horizontal flip, a crop
shifted by up to 2 px, ±10° rotation), and a backbone pretrained for two epochs keeps where
things are in its pooled feature grid, so with 8 labeled images per class every protocol must
reach its ``min_top1`` on the 100 test images (chance: 25 %). Features misaligned with their
labels, a split that picks other images than it says, or a head that never sees the labels
all end far below that and fail.

The control is the same dataset with the test split's labels permuted (each test image keeps
its pixels, but sits in a random class folder). A protocol that learned the rule then matches
the permuted label only where the permutation happened to keep the true band, a share the
dataset fixes (``Variant.rule_agreement``, about 25 %), so the control's top-1 must be near that
share and below ``CONTROL_MAX``: this fails a protocol that scores itself against anything but
each test image's own label. (Permuting the *train* labels instead makes a poor control with
4 classes: the head still maps each band to one label, so its accuracy averages 4 draws and
lands anywhere between 0 and 100 %.)

Adding a protocol (labelprop, selftrain, fixmatch, …): write ``cell(run, labels, out, config)
→ result row`` calling the protocol's cell the way the lab does, with ``device="cpu"`` and
``out=out``, and append one ``pytest.param(Protocol(name, cell, min_top1), id=name)`` to
``PROTOCOLS``. ``run`` is a rotation run pretrained on the dataset (its ``config.dataset`` is
the ``folder:`` name; the train images double as the unlabeled pool), ``config`` is
:data:`CONFIG` (add the protocol's own settings to it, kept small: each case should take
seconds on one CPU thread). Both tests below then run for it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from sslab import evaluate as ev
from sslab.pretrain import PretrainConfig, Run, pretrain

SIZE, CLASSES = 32, 4
BAND = SIZE // CLASSES
TRAIN_PER_CLASS, TEST_PER_CLASS = 24, 25
BUDGET = 8  # labeled images per class (4 more per class validate)
CHANCE = 1 / CLASSES
CONTROL_MAX = 0.40  # chance + 3.5 standard deviations of a coin of p = 0.25 over 100 test images

# Small enough for seconds on a CPU, long enough for each protocol to learn the rule. selftrain:
# one round, a student of 30 steps; fixmatch: 30 steps of 8 labeled and 2 × 8 unlabeled images
# (the pool: the 48 train images outside the labeled and validation ones), a shorter average.
CONFIG = ev.EvalConfig(probe_epochs=12, scratch_epochs=6, finetune_epochs=3, samples_per_epoch=256, batch_size=32,
                       val_per_class=4, probe_patience=0, scratch_patience=0, finetune_patience=0,
                       st_steps=30, fm_steps=30, fm_batch=8, fm_mu=2, fm_lr=0.02, fm_ema=0.9)


def blob_image(band: int, rng: np.random.Generator) -> np.ndarray:
    """Dark noise with a bright 4×6 blob centred in ``band`` (0: top) at a random column."""
    image = rng.integers(0, 60, (SIZE, SIZE)).astype(np.uint8)
    top = band * BAND + (BAND - 4) // 2
    left = int(rng.integers(2, SIZE - 8))
    image[top:top + 4, left:left + 6] = 255
    return image


@dataclass
class Variant:
    """A ``folder:`` dataset of blob images and how its test labels relate to the rule."""

    dataset: str
    rule_agreement: float  # share of test images whose label is the band holding the blob


def write_blob_folder(root: Path, permute_test: bool, seed: int = 0) -> Variant:
    """``root/{train,test}/band<k>/*.png``; the images are the same for a given ``seed``, and with
    ``permute_test`` each test image goes into the folder of a random permutation of the labels."""
    rng = np.random.default_rng(seed)
    agreement = 1.0
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        bands = np.repeat(np.arange(CLASSES), count)
        images = [blob_image(int(band), rng) for band in bands]
        labels = bands
        if split == "test" and permute_test:
            labels = np.random.default_rng(seed + 1).permutation(bands)
            agreement = float((labels == bands).mean())
        for i, (label, image) in enumerate(zip(labels, images)):
            folder = root / split / f"band{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    return Variant(f"folder:{root}", agreement)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """variant name ("rule", "permuted test labels") → (Variant, a rotation Run pretrained on it)."""
    root = tmp_path_factory.mktemp("blobs")
    out = str(root / "outputs")
    runs = {}
    for name, permute in (("rule", False), ("permuted test labels", True)):
        variant = write_blob_folder(root / name.replace(" ", "-"), permute)
        # 24 steps: enough for the BatchNorm running statistics to settle. After fewer, fine-tuning
        # (BN in training mode) moves them far, and the probe head it starts from reads other features.
        run = pretrain(PretrainConfig(method="rotation", dataset=variant.dataset, epochs=2, width=0.125,
                                      settings={"batch_size": 8}), device="cpu", out=out, progress=False)
        runs[name] = (variant, run)
    return runs


@dataclass
class Protocol:
    """An evaluation protocol as these tests call it: ``cell(run, labels, out, config)`` → the
    cell's result row; ``min_top1`` is the top-1 it must reach on the rule."""

    name: str
    cell: Callable[[Run, int, str, ev.EvalConfig], dict]
    min_top1: float


def probe(head: str):
    def cell(run: Run, labels: int, out: str, config: ev.EvalConfig) -> dict:
        return ev.probe_cell(run, labels, head=head, device="cpu", out=out, config=config)
    return cell


def scratch(run: Run, labels: int, out: str, config: ev.EvalConfig) -> dict:
    return ev.scratch_cell(run, labels, device="cpu", out=out, config=config)


def finetune(run: Run, labels: int, out: str, config: ev.EvalConfig) -> dict:
    return ev.finetune_cell(run, labels, device="cpu", out=out, config=config)


def labelprop(run: Run, labels: int, out: str, config: ev.EvalConfig) -> dict:
    # the pool is tiny (96 images): a graph of 5 neighbours keeps its edges within a band
    return ev.labelprop_cell(run, labels, device="cpu", out=out, config=replace(config, lp_k=5, lp_pca=32))


def selftrain(run: Run, labels: int, out: str, config: ev.EvalConfig) -> dict:
    # the teacher is labelprop's graph, with labelprop's settings above
    return ev.selftrain_cell(run, labels, device="cpu", out=out, config=replace(config, lp_k=5, lp_pca=32))


def fixmatch(run: Run, labels: int, out: str, config: ev.EvalConfig) -> dict:
    # FixMatch starts from the probe head: trained at probe_lr 1e-6 it scores near chance, so the
    # bar is reached by FixMatch's own training (from the good probe, a run that learned nothing,
    # even one fed wrong labels, would pass by its first epoch's average, the best on validation).
    # On the default 4×4 grid one of the head's 512 features is constant over the train images:
    # the case also checks that such a feature does not blow up once SGD moves the backbone.
    return ev.fixmatch_cell(run, labels, device="cpu", out=out, config=replace(config, probe_lr=1e-6))


PROTOCOLS = [
    pytest.param(Protocol("probe mlp", probe("mlp"), 0.9), id="probe-mlp"),
    pytest.param(Protocol("probe linear", probe("linear"), 0.9), id="probe-linear"),
    pytest.param(Protocol("probe knn", probe("knn"), 0.9), id="probe-knn"),
    pytest.param(Protocol("scratch", scratch, 0.8), id="scratch"),
    pytest.param(Protocol("finetune", finetune, 0.9), id="finetune"),
    pytest.param(Protocol("labelprop", labelprop, 0.9), id="labelprop"),
    pytest.param(Protocol("selftrain", selftrain, 0.85), id="selftrain"),
    pytest.param(Protocol("fixmatch", fixmatch, 0.9), id="fixmatch"),
]


def _test_class_counts(variant: Variant) -> list:
    root = Path(variant.dataset[len("folder:"):]) / "test"
    return [len(list((root / f"band{c}").glob("*.png"))) for c in range(CLASSES)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocol_learns_the_band_rule(protocol, pretrained, tmp_path):
    variant, run = pretrained["rule"]
    row = protocol.cell(run, BUDGET, str(tmp_path), CONFIG)
    assert row["top1"] >= protocol.min_top1, f"{protocol.name}: top-1 {row['top1']:.2f} < {protocol.min_top1}"
    # The result is the whole test split, scored class by class against the folders' labels.
    confusion = np.asarray(row["confusion"])
    assert confusion.sum(1).tolist() == _test_class_counts(variant)
    assert confusion.trace() / confusion.sum() == pytest.approx(row["top1"])
    assert row["budget"] == BUDGET


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocol_is_near_chance_when_the_test_labels_are_permuted(protocol, pretrained, tmp_path):
    variant, run = pretrained["permuted test labels"]
    assert abs(variant.rule_agreement - CHANCE) < 0.1  # the permutation itself is not close to the rule
    row = protocol.cell(run, BUDGET, str(tmp_path), CONFIG)
    assert row["top1"] <= CONTROL_MAX, f"{protocol.name}: top-1 {row['top1']:.2f} on permuted test labels"
    # It still learned the rule from the (true) train labels: it matches the permuted labels
    # exactly where they agree with the rule, up to the test images it gets wrong.
    assert abs(row["top1"] - variant.rule_agreement) <= 1 - protocol.min_top1 + 1e-9, row["top1"]
