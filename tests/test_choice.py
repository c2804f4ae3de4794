"""Choices judged on more held-out splits than the validation images (sslab.evaluate.choice):
the splits against hand counts, each split's probe and graph against the same computed alone, and
the labelprop and selftrain cells that use them."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sslab import evaluate as ev
from sslab.evaluate.batched_heads import train_heads
from sslab.evaluate.cells import cell_key, open_cell, repeat_to
from sslab.evaluate.choice import HeldOut, held_out_scores, holdout_splits, pooled
from sslab.evaluate.graph import propagate_cell
from sslab.evaluate.heads import FeatureHead
from sslab.evaluate.pool import pool_graph, pool_keep
from sslab.evaluate.probe import chosen_on_validation, head_train_config, probe_probabilities, trained_probe


def test_each_split_holds_out_the_validation_counts_and_trains_on_the_labeled_counts():
    labels = torch.tensor([0] * 8 + [1] * 8 + [2] * 8)
    train_idx = torch.tensor([0, 1, 8, 9, 10])            # 2 of class 0, 3 of class 1, none of class 2
    val_idx = torch.tensor([2, 3, 11, 16, 17])            # 2, 1, 2 validation images
    splits = holdout_splits(train_idx, val_idx, labels, folds=4, seed=0)
    assert len(splits) == 3
    both = set(train_idx.tolist() + val_idx.tolist())
    for train, held in splits:
        assert set(train.tolist()) | set(held.tolist()) == both and not set(train.tolist()) & set(held.tolist())
        assert torch.bincount(labels[train], minlength=3).tolist() == [2, 3, 0]   # the labeled set's counts
        assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 2]    # the validation set's
    # class 0 has 4 images and 2 held out per split: splits 1 and 2 hold out all four between them
    class0 = [set(h[labels[h] == 0].tolist()) for _, h in splits]
    assert class0[0] | class0[1] == {0, 1, 2, 3} and not class0[0] & class0[1] and class0[2] == class0[0]
    again = holdout_splits(train_idx, val_idx, labels, folds=4, seed=0)
    assert all(torch.equal(a, b) for s, t in zip(splits, again) for a, b in zip(s, t))   # seeded
    other = holdout_splits(train_idx, val_idx, labels, folds=4, seed=1)
    assert any(not torch.equal(s[1], t[1]) for s, t in zip(splits, other))
    assert holdout_splits(train_idx, val_idx, labels, folds=1, seed=0) == []
    assert holdout_splits(train_idx, val_idx[:0], labels, folds=4, seed=0) == []


def test_a_candidate_is_judged_on_every_split_pooled():
    """Weight ½ is best on the validation images (2 of 2 against 1 of 2) but worst over all three
    splits (3 of 6 against 4 of 6 for the graph): counted by hand."""
    def one_hot(predicted):
        return torch.nn.functional.one_hot(torch.tensor(predicted), 2).float()
    held = [HeldOut(one_hot([0, 1]), one_hot([0, 0]), torch.tensor([0, 1])),
            HeldOut(one_hot([1, 0]), one_hot([0, 1]), torch.tensor([0, 1])),
            HeldOut(one_hot([1, 1]), one_hot([0, 0]), torch.tensor([0, 1]))]
    def mix(w):
        return lambda s: w * s.probe + (1 - w) * s.graph + 1e-3 * s.probe   # ties go to the probe
    judged = {w: pooled(held, mix(w))[0] for w in (0.0, 1.0)}
    labels = pooled(held, lambda s: s.probe)[1]
    assert labels.tolist() == [0, 1] * 3
    assert chosen_on_validation({w: judged[w][:2] for w in judged}, labels[:2]) == (1.0, 1.0)
    assert chosen_on_validation(judged, labels) == (0.0, pytest.approx(4 / 6))


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory, make_noise_run):
    return make_noise_run(tmp_path_factory.mktemp("choice"), 20)


CFG = ev.EvalConfig(val_per_class=2, lp_k=4, lp_pca=8, st_per_class=3, st_steps=2, batch_size=8, probe_epochs=3,
                    precision="fp32", layer="conv4")


def test_each_split_trains_the_probe_and_propagates_as_alone(noise_run, tmp_path):
    """The extra splits' probe heads (trained together) and propagated labels, against a head trained
    alone by fit and a propagation run alone on the same split."""
    cfg = replace(CFG, choice_folds=3)
    cell = open_cell("labelprop", noise_run, 2, 1, device="cpu", out=str(tmp_path), config=cfg)
    split = cell.labeled_split()
    val_y = cell.splits.train.labels[split[1]]
    marker = torch.full((len(val_y), 3), 0.5)
    held = held_out_scores(cell, marker, marker, split)
    assert len(held) == 3 and held[0].probe is marker and torch.equal(held[0].labels, val_y)
    labels = cell.splits.train.labels
    graph, rows = pool_graph(cell.run, cell.cfg, cell.device)
    keep = pool_keep(rows, len(graph.nodes), split, "cpu")
    mean, std = cell.pool_statistics()
    for r, (train, out) in enumerate(holdout_splits(*split, labels, 3, cell.seed)):
        assert torch.equal(held[r + 1].labels, labels[out])
        x = cell.features("train", train)
        order = repeat_to(len(train), cfg.samples_per_epoch, "cpu")
        torch.manual_seed(cell.seed)
        head = FeatureHead(x.shape[1], 3, "mlp", cfg.hidden, mean, std)
        x_out = cell.features("train", out)
        train_heads([head], [(x[order], labels[train][order])], [(x_out, labels[out])],
                    head_train_config(cell.cfg, len(order)), [cell.seed * 1000 + r + 1], torch.device("cpu"),
                    precision=cell.cfg.precision)
        torch.testing.assert_close(held[r + 1].probe, probe_probabilities(head.eval(), x_out, cell.cfg.precision))
        alone = propagate_cell(graph, keep, x, labels[train], [x_out], 3, cfg.lp_alpha, cfg.lp_gamma,
                               cfg.lp_iterations)
        torch.testing.assert_close(held[r + 1].graph, alone.query_scores[0])


def test_labelprop_and_selftrain_cells_count_every_split_and_key_the_setting(noise_run, tmp_path):
    out = str(tmp_path)
    plain = ev.labelprop_cell(noise_run, 2, device="cpu", out=out, config=replace(CFG, choice_folds=1))
    folds = ev.labelprop_cell(noise_run, 2, device="cpu", out=out, config=replace(CFG, choice_folds=3))
    assert plain["choice_images"] == 6 and folds["choice_images"] == 18   # 2 per class × 3 classes, × 3 splits
    assert plain["run"] != folds["run"] and plain["graph_top1"] == folds["graph_top1"]
    assert folds["probe_weight"] in CFG.lp_probe_weights
    # the test prediction is still the cell's own probe and graph, mixed with the chosen weight
    cell = open_cell("labelprop", noise_run, 2, device="cpu", out=out, config=CFG)
    probe_test = probe_probabilities(trained_probe(cell), cell.features("test"), cell.cfg.precision)
    graph_only = ev.labelprop_cell(noise_run, 2, device="cpu", out=out, config=replace(CFG, lp_probe_weights=(0.0,)))
    assert graph_only["graph_top1"] == folds["graph_top1"]
    w = folds["probe_weight"]
    if w == 1.0:
        test_y = cell.splits.test.labels
        assert folds["top1"] == pytest.approx(float((probe_test.argmax(1) == test_y).float().mean()))
    row = ev.selftrain_cell(noise_run, 2, device="cpu", out=out, config=replace(CFG, choice_folds=3))
    assert row["teacher"] in ("agree", "labelprop", "probe")
    # the cells stored before the setting (the validation images alone) keep their key
    assert "choice_folds" not in cell_key("labelprop", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig(choice_folds=1))
    assert cell_key("selftrain", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig())["choice_folds"] == 5
    assert "choice_folds" not in cell_key("probe", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig(choice_folds=5))
    with pytest.raises(ValueError, match=r"^choice_folds=0 is not allowed; allowed: an integer from 1 to 20"):
        ev.EvalConfig(choice_folds=0).validate()


def test_a_student_started_from_the_probe_has_the_probe_head(noise_run, tmp_path):
    """st_start=probe: before its first step the student's head is the budget's probe head (its
    spreads floored as fine-tuning floors them); fresh: random weights. Checked with a learning rate
    of 1e-30, so the trained student's weights are its start's (its BatchNorm statistics move)."""
    from sslab.evaluate.heads import trainable_spread
    from sslab.evaluate.selftrain import train_student
    out = str(tmp_path)
    heads = {}
    for start in ("fresh", "probe"):
        cfg = replace(CFG, st_start=start, st_lr=1e-30, st_steps=1)
        cell = open_cell("selftrain", noise_run, 2, device="cpu", out=out, config=cfg)
        folder = tmp_path / start
        folder.mkdir()
        cell = replace(cell, folder=folder)
        train_idx, val_idx = cell.labeled_split()
        images, y = cell.splits.train.images, cell.splits.train.labels
        student = train_student(cell, 0, images[train_idx], y[train_idx], images[train_idx], y[train_idx],
                                images[val_idx], y[val_idx])
        heads[start] = student.head.state_dict()
    head = trained_probe(open_cell("selftrain", noise_run, 2, device="cpu", out=out, config=CFG))
    probe = {name: value for name, value in head.state_dict().items()
             if name == "std" or name in dict(head.named_parameters())}
    for name, value in probe.items():
        expected = trainable_spread(value) if name == "std" else value
        torch.testing.assert_close(heads["probe"][name], expected, msg=name)
    weights = [n for n in probe if n.endswith("weight")]
    assert any(not torch.allclose(heads["fresh"][n], probe[n]) for n in weights)
    assert "st_start" not in cell_key("selftrain", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig())
    keyed = cell_key("selftrain", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig(st_start="probe"))
    assert keyed["st_start"] == "probe"
    with pytest.raises(ValueError, match=r"^st_start='teacher' is not known; allowed: fresh, probe"):
        ev.EvalConfig(st_start="teacher").validate()
