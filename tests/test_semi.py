"""The pieces of the selftrain and fixmatch protocols against hand computations: FixMatch's
unlabeled loss (threshold, hard pseudo-label, mean over all images, no gradient to the weak
view), FreeMatch's self-adaptive threshold, the moving average of the weights, the FixMatch
step, the start kept when no epoch beats it, and self-training's class-balanced pseudo-label
choice and its confidence 1 − H/log C."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslab.evaluate.fixmatch import FixMatch, ModelEMA, SelfAdaptiveThreshold, fixmatch_unlabeled_loss
from sslab.evaluate.heads import FeatureHead, ImageClassifier
from sslab.evaluate.selftrain import propagation_confidence, select_balanced
from sslab.models import BackboneConfig, build_backbone, pooled_dim

# ---------------------------------------------------------------- fixmatch_unlabeled_loss


def _softmax(row: list) -> list:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


# Weak-view logits of 6 unlabeled images, 3 classes. Row 0 sets the threshold τ: its own
# confidence, so it sits exactly at τ. Row 1 has the same logits, one step larger on its top
# class (just above τ), row 2 one step smaller (just below); row 3 is far below, rows 4 and 5
# far above, with their top class at different places.
WEAK = [[2.0, 0.5, 0.0],
        [0.5, 2.001, 0.0],
        [0.0, 0.5, 1.999],
        [1.0, 1.1, 0.9],
        [-3.0, 0.0, 5.0],
        [10.0, -10.0, 0.0]]
ABOVE_TAU = [True, True, False, False, True, True]
PSEUDO = [0, 1, 2, 1, 2, 0]  # each row's argmax


def test_fixmatch_unlabeled_loss_against_a_hand_computation():
    weak = torch.tensor(WEAK, requires_grad=True)
    strong = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    tau = weak.detach().softmax(1)[0].max().item()  # row 0's float32 confidence: τ exactly
    # The rows are where they are meant to be, computed in float64 by hand.
    confidence = [max(_softmax(row)) for row in WEAK]
    assert abs(confidence[0] - tau) < 1e-6
    assert confidence[1] > tau + 1e-4 and confidence[2] < tau - 1e-4

    loss, mask = fixmatch_unlabeled_loss(weak, strong, tau)

    assert mask.tolist() == [float(a) for a in ABOVE_TAU]
    # The strong view's cross-entropy against the weak view's argmax as a hard label, where the
    # weak view is confident; summed and divided by all N = 6 images (not by the 4 confident).
    rows = strong.detach().tolist()
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) - row[label]
                  for row, label, above in zip(rows, PSEUDO, ABOVE_TAU) if above) / len(rows)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    confident = torch.tensor(ABOVE_TAU)
    assert loss.item() == pytest.approx(F.cross_entropy(strong.detach()[confident], torch.tensor(PSEUDO)[confident],
                                                        reduction="sum").item() / 6, rel=1e-5)

    loss.backward()
    assert weak.grad is None or not weak.grad.any(), "a gradient reached the weak view"
    # d loss / d strong_i = (softmax(strong_i) − onehot(pseudo_i)) / N where confident, 0 elsewhere.
    expected = [[(p - (c == label)) / 6 if above else 0.0 for c, p in enumerate(_softmax(row))]
                for row, label, above in zip(rows, PSEUDO, ABOVE_TAU)]
    torch.testing.assert_close(strong.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert not strong.grad[~confident].any()


def test_fixmatch_unlabeled_loss_is_zero_when_nothing_is_confident_and_full_when_all_is():
    weak = torch.tensor(WEAK)
    strong = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss, mask = fixmatch_unlabeled_loss(weak, strong, threshold=1.0)  # row 5's 0.99995 is still under
    assert loss.item() == 0.0 and not mask.any()
    loss.backward()
    assert not strong.grad.any()
    # τ = 0: every row counts, the plain mean cross-entropy against the argmax.
    loss, mask = fixmatch_unlabeled_loss(weak, strong.detach(), threshold=0.0)
    assert mask.tolist() == [1.0] * 6
    assert loss.item() == pytest.approx(F.cross_entropy(strong.detach(), torch.tensor(PSEUDO)).item(), rel=1e-6)


def test_the_pseudo_label_is_hard_not_the_weak_views_distribution():
    # A soft target (the weak view's probabilities) would give another loss; the hard one is the
    # strong view's −log p at the weak view's top class.
    weak = torch.tensor([[1.0, 0.0, 0.0]])  # softmax ≈ (0.58, 0.21, 0.21)
    strong = torch.tensor([[0.0, 2.0, -1.0]])
    loss, _ = fixmatch_unlabeled_loss(weak, strong, threshold=0.5)
    hard = -math.log(_softmax([0.0, 2.0, -1.0])[0])
    soft = -sum(q * math.log(p) for q, p in zip(_softmax([1.0, 0.0, 0.0]), _softmax([0.0, 2.0, -1.0])))
    assert loss.item() == pytest.approx(hard, rel=1e-6)
    assert abs(hard - soft) > 0.1


def test_one_threshold_per_class_all_at_tau_is_the_fixed_threshold():
    weak, strong = torch.tensor(WEAK), torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    tau = weak.softmax(1)[0].max().item()
    fixed = fixmatch_unlabeled_loss(weak, strong, tau)
    per_class = fixmatch_unlabeled_loss(weak, strong, torch.full((3,), tau))
    assert per_class[1].tolist() == fixed[1].tolist() == [float(a) for a in ABOVE_TAU]
    assert per_class[0].item() == fixed[0].item()


# ---------------------------------------------------------------- FreeMatch's self-adaptive threshold

# Two steps' weak-view logits of 4 unlabeled images, 3 classes, and λ = 0.5. Worked through below:
# step 1 leaves image 3 (0.378 on class 0) under τ_1(0) = τ_1 ≈ 0.498; at step 2 image 2 (0.452
# on class 0, the least expected class) passes its class's τ_2(0) ≈ 0.409 though it is under the
# global τ_2 = 0.600, and image 3 (0.576 on class 1, the most expected) is held to τ_2 itself.
SAT_STEPS = [([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.2, 0.0]], [1.0, 1.0, 1.0, 0.0]),
             ([[0.0, 1.0, 3.0], [1.0, 4.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]], [1.0, 1.0, 1.0, 0.0])]


def test_freematch_threshold_against_a_hand_computation_over_two_steps():
    momentum, classes = 0.5, 3
    sat = SelfAdaptiveThreshold(classes, momentum)
    tau, expectation = 1 / 3, [1 / 3] * 3  # τ_0 and p̃_0: 1/C
    assert sat.global_threshold.item() == pytest.approx(tau) and sat.class_expectation.tolist() == pytest.approx(
        expectation)
    for step, (logits, mask_by_hand) in enumerate(SAT_STEPS):
        q = [_softmax(row) for row in logits]
        # τ_t = λ τ_{t−1} + (1 − λ) mean_b max q_b;  p̃_t(c) = λ p̃_{t−1}(c) + (1 − λ) mean_b q_b(c)
        tau = momentum * tau + (1 - momentum) * sum(max(row) for row in q) / len(q)
        expectation = [momentum * e + (1 - momentum) * sum(row[c] for row in q) / len(q)
                       for c, e in enumerate(expectation)]
        class_tau = [e / max(expectation) * tau for e in expectation]  # τ_t(c)
        mask = [float(max(row) >= class_tau[row.index(max(row))]) for row in q]

        thresholds = sat.update(torch.tensor(logits).softmax(1))

        assert sat.global_threshold.item() == pytest.approx(tau, rel=1e-6)
        assert sat.class_expectation.tolist() == pytest.approx(expectation, rel=1e-6)
        assert thresholds.tolist() == pytest.approx(class_tau, rel=1e-6)
        assert mask == mask_by_hand, f"step {step + 1}: the worked numbers above are off"
        strong = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        loss, taken = fixmatch_unlabeled_loss(torch.tensor(logits), strong, thresholds)
        assert taken.tolist() == mask_by_hand
        pseudo = [row.index(max(row)) for row in q]
        by_hand = sum(math.log(sum(math.exp(v) for v in row)) - row[label]
                      for row, label, m in zip(strong.tolist(), pseudo, mask) if m) / 4
        assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert tau == pytest.approx(0.600, abs=5e-4) and class_tau[0] == pytest.approx(0.409, abs=5e-4)
    # The global threshold alone would have left image 2 of step 2 out.
    assert max(_softmax(SAT_STEPS[1][0][2])) < tau


def test_freematch_threshold_state_is_in_the_fixmatch_models_state_and_its_step_reports_tau(make_image_set):
    labeled = make_image_set(n=6, classes=3, seed=0)
    unlabeled = make_image_set(n=8, classes=3, seed=1).images
    model = FixMatch(_classifier(), labeled.images, labeled.labels, batch=4, threshold=SelfAdaptiveThreshold(3, 0.9),
                     weight=1.0, ema=0.5)
    state = model.state_dict()
    assert state["threshold.global_threshold"].item() == pytest.approx(1 / 3)
    assert state["threshold.class_expectation"].tolist() == pytest.approx([1 / 3] * 3)
    model.train()
    torch.manual_seed(0)
    first = model.loss(unlabeled)
    second = model.loss(unlabeled)
    assert first["tau"].item() != second["tau"].item()
    assert second["tau"].item() == model.threshold.global_threshold.item()

    # A model loaded from the state after one step (with the random state) takes the same second step.
    torch.manual_seed(0)
    straight = FixMatch(_classifier(), labeled.images, labeled.labels, batch=4,
                        threshold=SelfAdaptiveThreshold(3, 0.9), weight=1.0, ema=0.5).train()
    straight.loss(unlabeled)
    saved, rng = {k: v.clone() for k, v in straight.state_dict().items()}, torch.get_rng_state()
    expected = straight.loss(unlabeled)
    resumed = FixMatch(_classifier(), labeled.images, labeled.labels, batch=4,
                       threshold=SelfAdaptiveThreshold(3, 0.9), weight=1.0, ema=0.5).train()
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    again = resumed.loss(unlabeled)
    assert all(again[k].item() == expected[k].item() for k in ("loss", "mask", "tau"))
    assert torch.equal(resumed.threshold.class_expectation, straight.threshold.class_expectation)

    fixed = FixMatch(_classifier(), labeled.images, labeled.labels, batch=4, threshold=0.95, weight=1.0, ema=0.5)
    assert not any(k.startswith("threshold.") for k in fixed.state_dict())
    assert "tau" not in fixed.train().loss(unlabeled)  # a fixed τ is in the cell's key, not in each step


# ---------------------------------------------------------------- ModelEMA


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_model_ema_averages_the_weights_and_copies_the_buffers():
    model = _net(0)
    ema = ModelEMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.module.parameters())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        old = {k: v.clone() for k, v in ema.module.named_parameters()}
        with torch.no_grad():  # new weights, and BatchNorm statistics from a batch
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + step)))
        model.train()
        model(torch.randn(8, 3, generator=torch.Generator().manual_seed(20 + step)) * 3 + 1)
        ema.update(model)
        for name, p in model.named_parameters():
            torch.testing.assert_close(dict(ema.module.named_parameters())[name], 0.9 * old[name] + 0.1 * p.detach())
        for name, b in model.named_buffers():  # running mean, variance and count: copied as they are
            assert torch.equal(dict(ema.module.named_buffers())[name], b), name
    assert not torch.equal(model.state_dict()["1.running_mean"], start["1.running_mean"])
    # The average is a copy of its own: changing the model changes nothing in it until the next update.
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())


def test_model_ema_with_decay_zero_is_the_model():
    model, other = _net(0), _net(1)
    ema = ModelEMA(other, decay=0.0)
    ema.update(model)
    for k, v in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[k], v), k


# ---------------------------------------------------------------- the FixMatch step


def _classifier(classes: int = 3) -> ImageClassifier:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(1, 28, 0.125))
    return ImageClassifier(backbone, FeatureHead(pooled_dim(backbone, "conv4", 2), classes, "mlp", 16), "conv4", 2)


def test_fixmatch_step_updates_the_average_first_and_adds_the_weighted_unlabeled_loss(make_image_set):
    labeled = make_image_set(n=6, classes=3, seed=0)
    unlabeled = make_image_set(n=8, classes=3, seed=1).images
    classifier = _classifier()
    model = FixMatch(classifier, labeled.images, labeled.labels, batch=4, threshold=0.0, weight=2.0, ema=0.75)
    initial = {k: v.clone() for k, v in model.ema.module.named_parameters()}
    with torch.no_grad():
        for p in classifier.parameters():
            p.mul_(1.5)
    model.train()
    out = model.loss(unlabeled)
    # The average took the weights the step starts from: 0.75·initial + 0.25·current.
    for name, p in classifier.named_parameters():
        torch.testing.assert_close(dict(model.ema.module.named_parameters())[name], 0.75 * initial[name] + 0.25 * p)
    assert out["loss"].item() == pytest.approx(out["sup"].item() + 2.0 * out["unsup"].item(), rel=1e-6)
    assert out["mask"].item() == 1.0  # τ = 0: every unlabeled image counts
    assert out["unsup"].item() > 0
    out["loss"].backward()
    assert all(p.grad is not None for p in classifier.head.parameters())
    assert all(p.grad is None for p in model.ema.module.parameters())

    never = FixMatch(_classifier(), labeled.images, labeled.labels, batch=4, threshold=1.01, weight=2.0, ema=0.75)
    never.train()
    out = never.loss(unlabeled)  # no softmax reaches 1.01: the supervised loss alone
    assert out["mask"].item() == 0.0 and out["unsup"].item() == 0.0
    assert out["loss"].item() == out["sup"].item()


# ---------------------------------------------------------------- selftrain: the pseudo-labels


def test_select_balanced_picks_each_classes_most_confident_above_the_threshold():
    # argmax per row:      0             1             0             1             1
    probs = torch.tensor([[.8, .1, .1], [.2, .5, .3], [.6, .3, .1], [.2, .5, .3], [.1, .7, .2],
                          [.0, .1, .9], [.4, .35, .25], [.3, .2, .5], [.3, .4, .3], [.1, .3, .6], [.5, .3, .2]])
    #                      2             0              2             1             2             0
    # confidence given separately (any score); the threshold is 0.25
    confidence = torch.tensor([.9, .1, .7, .6, .55, .95, .2, .3, .25, .26, .5])
    chosen, labels = select_balanced(probs, confidence, per_class=2, threshold=0.25)
    assert len(chosen) == len(labels) == 6
    picked = {c: sorted(chosen[labels == c].tolist()) for c in range(3)}
    assert picked == {0: [0, 2],  # 0.9 and 0.7 beat row 10's 0.5; row 6 (0.2) is under the threshold
                      1: [3, 4],  # 0.6 and 0.55 beat row 8 (0.25, at the threshold); row 1 (0.1) is under
                      2: [5, 7]}  # 0.95 and 0.3 beat row 9's 0.26
    # Within a class, most confident first.
    assert chosen.tolist() == [0, 2, 3, 4, 5, 7] and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_select_balanced_takes_fewer_where_a_class_has_fewer_and_never_borrows_from_another():
    probs = torch.tensor([[.8, .1, .1, 0.], [.6, .2, .1, .1], [.7, .1, .1, .1], [.1, .8, .05, .05],
                          [.2, .2, .5, .1]])
    confidence = torch.tensor([.9, .8, .85, .4, .25])
    chosen, labels = select_balanced(probs, confidence, per_class=3, threshold=0.25)
    # class 0: all three of its rows; class 1: its only row; class 2: row 4, at the threshold;
    # class 3: nothing (no row's argmax), and no row of class 0 is lent to it
    assert chosen.tolist() == [0, 2, 1, 3, 4] and labels.tolist() == [0, 0, 0, 1, 2]
    chosen, labels = select_balanced(probs, confidence, per_class=3, threshold=0.95)
    assert chosen.tolist() == [] and labels.tolist() == []
    chosen, labels = select_balanced(probs, confidence, per_class=1)  # threshold 0 by default
    assert chosen.tolist() == [0, 3, 4] and labels.tolist() == [0, 1, 2]


def test_propagation_confidence_is_one_minus_the_normalised_entropy():
    probs = torch.tensor([[1.0, 0.0, 0.0],  # certain: 1
                          [1 / 3, 1 / 3, 1 / 3],  # uniform: 0
                          [0.5, 0.25, 0.25],
                          [0.5, 0.5, 0.0],
                          [0.0, 0.1, 0.9]])
    by_hand = []
    for row in probs.tolist():
        entropy = -sum(p * math.log(p) for p in row if p > 0)
        by_hand.append(1 - entropy / math.log(3))
    assert by_hand[0] == 1.0 and abs(by_hand[1]) < 1e-8
    assert by_hand[2] == pytest.approx(1 - 1.5 * math.log(2) / math.log(3))
    confidence = propagation_confidence(probs)
    assert confidence[0].item() == 1.0
    assert abs(confidence[1].item()) < 1e-6
    torch.testing.assert_close(confidence, torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    # The same through torch's own entropy, for 10 classes.
    probs = torch.softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 3, 1)
    entropy = torch.distributions.Categorical(probs=probs).entropy()
    torch.testing.assert_close(propagation_confidence(probs), 1 - entropy / math.log(10))
    assert (propagation_confidence(probs) >= -1e-6).all() and (propagation_confidence(probs) <= 1 + 1e-6).all()


# ---------------------------------------------------------------- what each protocol trains on


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory, make_noise_run):
    """A random-init run on 3 classes of distinct noise images (12 train and 3 test images per
    class, 16 px): each image is told apart by its pixels."""
    return make_noise_run(tmp_path_factory.mktemp("noise"), 12)


def _rows_of(images: torch.Tensor, reference: torch.Tensor) -> list:
    """For each image, the row of ``reference`` holding the same pixels (None where none does)."""
    where = {bytes(r.numpy()): i for i, r in enumerate(reference)}
    return [where.get(bytes(image.numpy())) for image in images]


def _split(run, cfg):
    from sslab.data import label_budget_split
    from sslab.evaluate.features import dataset_splits
    splits = dataset_splits(run.config)
    return splits, label_budget_split(splits.train.labels, 2, 0, cfg.val_per_class)


def test_selftrain_student_trains_on_the_labeled_images_and_the_teachers_choice_from_the_pool(noise_run, monkeypatch,
                                                                                              tmp_path):
    from sslab import evaluate as ev
    from sslab.evaluate import selftrain
    seen = {}
    real_select, real_train = selftrain.select_balanced, selftrain.train_student

    def select(probs, confidence, per_class, threshold=0.0):
        seen["select"] = real_select(probs, confidence, per_class, threshold)
        seen["per_class"], seen["threshold"] = per_class, threshold
        return seen["select"]

    def train(cell, round_, labeled, labels, pseudo_images, pseudo_labels, *args):
        seen["student"] = labeled.cpu(), labels.cpu(), pseudo_images.cpu(), pseudo_labels.cpu()
        return real_train(cell, round_, labeled, labels, pseudo_images, pseudo_labels, *args)

    monkeypatch.setattr(selftrain, "select_balanced", select)
    monkeypatch.setattr(selftrain, "train_student", train)
    cfg = ev.EvalConfig(val_per_class=2, lp_k=4, lp_pca=8, st_per_class=3, st_threshold=0.01, st_steps=2,
                        batch_size=8, precision="fp32")
    row = ev.selftrain_cell(noise_run, 2, device="cpu", out=str(tmp_path), config=cfg)

    splits, (train_idx, val_idx) = _split(noise_run, cfg)
    labeled, labels, pseudo_images, pseudo_labels = seen["student"]
    assert torch.equal(labeled, splits.train.images[train_idx]) and torch.equal(labels, splits.train.labels[train_idx])
    assert seen["per_class"] == 3 and seen["threshold"] == 0.01
    assert torch.equal(pseudo_labels, seen["select"][1].cpu())
    assert all((pseudo_labels == c).sum() <= 3 for c in range(3))
    rows = _rows_of(pseudo_images, splits.train.images)
    # Pool images only: train images outside the cell's labeled and validation images, no test image.
    assert None not in rows and not set(rows) & set(train_idx.tolist() + val_idx.tolist())
    assert _rows_of(pseudo_images, splits.test.images) == [None] * len(rows)
    history = row["history"][0]
    assert history["pseudo_labels"] == len(rows) > 0
    truth = splits.train.labels[torch.tensor(rows)]
    assert history["pseudo_acc"] == pytest.approx(float((pseudo_labels == truth).float().mean()))


def test_fixmatch_trains_on_the_labeled_images_and_the_pool_without_them(noise_run, monkeypatch, tmp_path):
    from sslab import evaluate as ev
    from sslab.evaluate import cells
    seen = {}
    real_fit = cells.fit

    def fit(model, data, schedule, *args, **kwargs):
        seen["model"], seen["pool"], seen["schedule"] = model, data[0].cpu(), schedule
        return real_fit(model, data, schedule, *args, **kwargs)

    monkeypatch.setattr(cells, "fit", fit)
    cfg = ev.EvalConfig(val_per_class=2, probe_epochs=1, fm_steps=4, fm_batch=2, fm_mu=3, fm_threshold=0.5,
                        fm_weight=0.5, fm_ema=0.8, precision="fp32", fm_threshold_mode="fixed")
    row = ev.fixmatch_cell(noise_run, 2, device="cpu", out=str(tmp_path), config=cfg)

    splits, (train_idx, val_idx) = _split(noise_run, cfg)
    model = seen["model"]
    assert torch.equal(model.labeled_images.cpu(), splits.train.images[train_idx])
    assert torch.equal(model.labeled_labels.cpu(), splits.train.labels[train_idx])
    assert (model.batch, model.threshold, model.weight, model.ema.decay) == (2, 0.5, 0.5, 0.8)
    rows = _rows_of(seen["pool"], splits.train.images)
    left_out = set(train_idx.tolist() + val_idx.tolist())
    assert None not in rows and sorted(rows) == [i for i in range(len(splits.train.images)) if i not in left_out]
    # μB = 6 unlabeled images a step: 30 pool images are 5 steps an epoch, so 4 steps take 1 epoch
    assert seen["schedule"].batch_size == 6 and seen["schedule"].epochs == 1
    assert row["epochs"] == 1 and set(row["history"][0]) >= {"loss", "sup", "unsup", "mask", "val_acc"}


def test_a_row_the_teacher_knows_nothing_about_is_never_pseudo_labeled():
    # label propagation gives a node it never reached a uniform row: its argmax (class 0) is no label
    probs = torch.tensor([[0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.2, 0.2]])
    confidence = propagation_confidence(probs)  # 1 − H/log 3: about 0.42, 0 and 0.14
    assert confidence[0] > 0.3 > confidence[2] and abs(float(confidence[1])) < 1e-6
    for threshold, expected in ((0.0, [(2, 0), (0, 1)]), (0.3, [(0, 1)])):
        chosen, labels = select_balanced(probs, confidence, per_class=5, threshold=threshold)
        assert list(zip(chosen.tolist(), labels.tolist())) == expected


def test_trainable_spread_floors_each_spread_at_a_hundredth_of_their_mean():
    from sslab.evaluate.heads import trainable_spread
    std = torch.tensor([1e-6, 0.5, 2.0, 1.5e-2, 0.015])
    mean = float(std.mean())
    assert trainable_spread(std).tolist() == pytest.approx([0.01 * mean, 0.5, 2.0, 0.015, 0.015])
    assert trainable_spread(std)[1:].tolist() == std[1:].tolist()


# ---------------------------------------------------------------- fixmatch cells: the start as a candidate, the key


@pytest.fixture(scope="module")
def brightness_run(tmp_path_factory):
    """A random-init run on 3 classes told apart by brightness (noise in 0–59, 95–154, 190–249;
    12 train and 3 test images per class, 16 px): even random features separate them, so the
    probe head classifies the validation images perfectly."""
    from PIL import Image

    from sslab.pretrain import PretrainConfig, pretrain
    root = tmp_path_factory.mktemp("brightness")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 3)):
        for level, name in enumerate(("dark", "grey", "light")):
            (root / "images" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (torch.randint(0, 60, (16, 16), generator=generator) + 95 * level).to(torch.uint8)
                Image.fromarray(pixels.numpy(), "L").save(root / "images" / split / name / f"{i}.png")
    return pretrain(PretrainConfig(method="random-init", dataset=f"folder:{root / 'images'}", image_size=16,
                                   width=0.125), device="cpu", out=str(root / "out"), progress=False)


# 12 steps of 2 labeled and 6 unlabeled images: the pool's 24 images are 4 steps an epoch, 3 epochs.
SMALL_FIXMATCH = dict(val_per_class=2, probe_epochs=5, fm_steps=12, fm_batch=2, fm_mu=3, fm_ema=0.0,
                      precision="fp32")


def test_fixmatch_keeps_its_start_when_every_epoch_is_worse_on_validation(brightness_run, tmp_path):
    from sslab import evaluate as ev
    # lr 1 wrecks the weights (an average of decay 0 is the weights themselves) without diverging
    cfg = ev.EvalConfig(**SMALL_FIXMATCH, fm_lr=1.0)
    row = ev.fixmatch_cell(brightness_run, 2, device="cpu", out=str(tmp_path), config=cfg)
    probe = ev.probe_cell(brightness_run, 2, device="cpu", out=str(tmp_path), config=cfg)

    assert row["start_val_acc"] == 1.0  # the probe head on the backbone: all 6 validation images
    assert len(row["history"]) == 3 and all(epoch["val_acc"] < 1.0 for epoch in row["history"])
    assert row["kept"] == "start"
    # What is tested is the start: the probe head, now reading the backbone's output directly.
    assert row["confusion"] == probe["confusion"] and row["top1"] == probe["top1"]


def test_fixmatch_keeps_the_epoch_that_beats_its_start_and_without_validation_its_last(brightness_run, tmp_path):
    from dataclasses import replace

    from sslab import evaluate as ev
    from sslab.evaluate.fixmatch import kept
    from sslab.train import FitResult
    assert kept(FitResult(best_epoch=-1, best_metric=1.0), validated=True) == "start"
    assert kept(FitResult(best_epoch=2, best_metric=1.0), validated=True) == 2
    assert kept(FitResult(), validated=False) == "last"

    cfg = replace(ev.EvalConfig(**SMALL_FIXMATCH, fm_lr=1.0), val_per_class=0)
    row = ev.fixmatch_cell(brightness_run, 2, device="cpu", out=str(tmp_path), config=cfg)
    assert row["kept"] == "last" and "start_val_acc" not in row and row["val_per_class"] == 0
    assert all("val_acc" not in epoch for epoch in row["history"])


def test_a_changed_threshold_mode_or_momentum_is_another_fixmatch_cell(brightness_run):
    from dataclasses import replace

    from sslab import evaluate as ev
    from sslab.evaluate.cells import cell_folder, protocol_key
    cfg = ev.EvalConfig(**SMALL_FIXMATCH)

    def key(**changes):
        return protocol_key("fixmatch", brightness_run, 2, 0, replace(cfg, **changes))

    fixed, adaptive = key(fm_threshold_mode="fixed"), key(fm_threshold_mode="freematch")
    assert fixed["fm_threshold_mode"] == "fixed" and adaptive["fm_threshold_mode"] == "freematch"
    assert cell_folder(fixed, None) != cell_folder(adaptive, None)
    assert cell_folder(key(fm_threshold_mode="freematch", fm_sat_momentum=0.9), None) != cell_folder(adaptive, None)
    assert key(fm_threshold_mode="freematch") == adaptive  # and the same settings are the same cell


def test_fixmatch_backbone_rate_and_warm_up_reach_the_optimiser_and_key_only_when_changed(noise_run, monkeypatch,
                                                                                         tmp_path):
    from dataclasses import replace

    from sslab import evaluate as ev
    from sslab.evaluate import cells
    from sslab.evaluate.cells import protocol_key
    cfg = ev.EvalConfig(**SMALL_FIXMATCH)
    # FixMatch's own schedule is what cells stored before the settings trained with: their keys stay
    own = protocol_key("fixmatch", noise_run, 2, 0, replace(cfg, fm_backbone_lr_scale=1.0, fm_warmup=0.0))
    assert "fm_backbone_lr_scale" not in own and "fm_warmup" not in own
    default = protocol_key("fixmatch", noise_run, 2, 0, cfg)
    assert (default["fm_backbone_lr_scale"], default["fm_warmup"]) == (0.1, 1.0)

    seen = {}
    real_fit = cells.fit

    def fit(model, data, schedule, *args, param_groups=None, **kwargs):
        seen["schedule"], seen["groups"] = schedule, param_groups
        seen["backbone"] = {k: v.clone() for k, v in model.classifier.backbone.named_parameters()}
        seen["head"] = {k: v.clone() for k, v in model.classifier.head.named_parameters()}
        seen["model"] = model
        return real_fit(model, data, schedule, *args, param_groups=param_groups, **kwargs)

    monkeypatch.setattr(cells, "fit", fit)
    # a backbone rate of 0: only the head learns, so the backbone's weights end as they started (no
    # validation images: the last epoch is kept, not the start)
    ev.fixmatch_cell(noise_run, 2, device="cpu", out=str(tmp_path),
                     config=replace(cfg, fm_backbone_lr_scale=0.0, fm_warmup=0.5, fm_ema=0.0, val_per_class=0))
    backbone, head = seen["groups"]
    assert backbone["lr_scale"] == 0.0 and head["lr_scale"] == 1.0 and seen["schedule"].warmup_epochs == 0.5
    after = dict(seen["model"].classifier.backbone.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in seen["backbone"].items())
    assert not all(torch.equal(v, seen["head"][k]) for k, v in seen["model"].classifier.head.named_parameters())
    with pytest.raises(ValueError, match=r"^fm_backbone_lr_scale=1\.5 is not allowed; allowed: a number in \[0, 1\]"):
        replace(cfg, fm_backbone_lr_scale=1.5).validate()
    with pytest.raises(ValueError, match=r"^fm_warmup=-1 is not allowed"):
        replace(cfg, fm_warmup=-1).validate()


def test_an_interrupted_freematch_cell_resumes_from_its_checkpoint_bit_for_bit(noise_run, monkeypatch, tmp_path):
    """Killed during its third epoch, the cell goes on from the checkpoint of its second — the
    threshold's τ_t and p̃_t included — and ends as the cell run straight through."""
    from sslab import evaluate as ev
    from sslab import store
    from sslab.evaluate import cells, fixmatch
    cfg = ev.EvalConfig(**SMALL_FIXMATCH, fm_threshold_mode="freematch", fm_sat_momentum=0.8)
    straight = ev.fixmatch_cell(noise_run, 2, device="cpu", out=str(tmp_path / "straight"), config=cfg)
    ev.probe_cell(noise_run, 2, device="cpu", out=str(tmp_path / "out"), config=cfg)  # stored before the kill

    monkeypatch.setattr(cells, "CHECKPOINT_EVERY_S", 0)  # a checkpoint after every epoch
    steps = []
    real_loss = fixmatch.FixMatch.loss

    def interrupted(self, unlabeled):
        steps.append(self.threshold.global_threshold.item())
        if len(steps) == 9:  # the first step of epoch 3
            raise KeyboardInterrupt
        return real_loss(self, unlabeled)

    with monkeypatch.context() as during:
        during.setattr(fixmatch.FixMatch, "loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ev.fixmatch_cell(noise_run, 2, device="cpu", out=str(tmp_path / "out"), config=cfg)
    key = cells.protocol_key("fixmatch", noise_run, 2, 0, cells.open_cell("fixmatch", noise_run, 2, config=cfg,
                                                                            device="cpu").cfg)
    checkpoint = cells.cell_folder(key, str(tmp_path / "out")) / "checkpoint.pt"
    assert store.load_torch(checkpoint)["epoch"] == 1  # after the second epoch
    before_kill = steps[-1]  # τ_t after the 8 steps of epochs 1 and 2
    steps.clear()

    def counted(self, unlabeled):
        steps.append(self.threshold.global_threshold.item())
        return real_loss(self, unlabeled)

    monkeypatch.setattr(fixmatch.FixMatch, "loss", counted)
    resumed = ev.fixmatch_cell(noise_run, 2, device="cpu", out=str(tmp_path / "out"), config=cfg)
    assert len(steps) == 4 and steps[0] == before_kill  # epoch 3 alone, from the checkpoint's τ_t

    def result(row):
        return ({k: row[k] for k in ("top1", "per_class", "confusion", "kept", "start_val_acc")},
                [{k: v for k, v in epoch.items() if k not in ("seconds", "images_per_s")} for epoch in row["history"]])

    assert result(resumed) == result(straight)
    assert all(1 / 3 < epoch["tau"] <= 1 for epoch in straight["history"])  # from τ_0 = 1/C, up
