"""Self-training's teachers and choices against hand computations: the agreement teacher, the
choice on the validation images, and a cell that records which teacher and which prediction it
used; label propagation weighed against the probe."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sslab import evaluate as ev
from sslab.evaluate.cells import ST_PREDICTS
from sslab.evaluate.probe import chosen_on_validation
from sslab.evaluate.selftrain import (PREDICTIONS, TEACHERS, Teacher, agreement, prediction_order, select_balanced,
                                      teacher_order)


def _teacher(pool: list) -> Teacher:
    probs = torch.tensor(pool)
    return Teacher(probs, probs.max(1).values, probs[:1], probs[:1])


def test_agreement_keeps_the_mean_where_both_teachers_predict_the_same_class():
    graph = _teacher([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    probe = _teacher([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.45, 0.5, 0.05], [0.2, 0.2, 0.6]])
    both = agreement(graph, probe)
    torch.testing.assert_close(both.pool, (graph.pool + probe.pool) / 2)
    # rows 0 and 3 agree (classes 0 and 2): confidence = the mean's largest probability, by hand
    torch.testing.assert_close(both.confidence, torch.tensor([0.7, -1.0, -1.0, 0.7]))
    chosen, labels = select_balanced(both.pool, both.confidence, per_class=5)
    assert sorted(zip(chosen.tolist(), labels.tolist())) == [(0, 0), (3, 2)]  # never a row they disagree on


def test_the_validation_images_choose_and_a_tie_or_no_validation_takes_the_first():
    val_y = torch.tensor([0, 1, 1, 0])
    right_three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # 3 of 4
    right_all = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert chosen_on_validation({"a": right_three, "b": right_all}, val_y) == ("b", 1.0)
    assert chosen_on_validation({"a": right_all, "b": right_all.clone()}, val_y) == ("a", 1.0)
    assert chosen_on_validation({"a": right_three, "b": right_all}, val_y[:0]) == ("a", None)


def test_a_margin_keeps_the_default_unless_the_paired_wins_beat_chance():
    """wins − losses > margin · √(wins + losses), counted by hand on ten validation images."""
    val_y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])

    def scores(predicted):
        return torch.nn.functional.one_hot(torch.tensor(predicted), 3).float()

    probe = scores([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])      # 8 of 10: wrong on the last two
    better = scores([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])     # 10 of 10: wins 2, losses 0
    mixed = scores([1, 0, 2, 0, 1, 2, 0, 1, 2, 0])      # 8 of 10: wins 2, losses 2 (a tie in count)
    trade = scores([1, 1, 2, 0, 1, 2, 0, 1, 2, 0])      # 9 of 10: wins 2, losses 1
    # margin 0: the best count, as before
    assert chosen_on_validation({"probe": probe, "c": trade}, val_y, default="probe") == ("c", pytest.approx(0.9))
    # 2 − 0 = 2 > 1 · √2 ≈ 1.41: kept; 2 > 1.5 · √2 ≈ 2.12 is not: the probe
    assert chosen_on_validation({"probe": probe, "c": better}, val_y, default="probe", margin=1.0) == ("c", 1.0)
    name, accuracy = chosen_on_validation({"probe": probe, "c": better}, val_y, default="probe", margin=1.5)
    assert name == "probe" and accuracy == pytest.approx(0.8)
    # 2 − 1 = 1 ≤ 1 · √3: the probe, though the candidate's count is higher
    assert chosen_on_validation({"probe": probe, "c": trade}, val_y, default="probe", margin=1.0)[0] == "probe"
    # an equal count never leaves the default, whatever the order of the candidates
    assert chosen_on_validation({"c": mixed, "probe": probe}, val_y, default="probe", margin=0.5)[0] == "probe"
    # no default among the candidates, or no validation images: as without a margin
    assert chosen_on_validation({"a": probe, "c": better}, val_y, default="probe", margin=1.5)[0] == "c"
    none = val_y[:0]
    assert chosen_on_validation({"probe": probe, "c": better}, none, default="probe", margin=1.0) == ("probe", None)


def test_the_margin_is_in_the_key_only_when_it_is_set():
    from sslab.evaluate.cells import cell_key
    plain = cell_key("labelprop", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig())
    assert "choice_margin" not in plain  # the cells stored before the setting keep their key
    set_ = cell_key("selftrain", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig(choice_margin=1.0))
    assert set_["choice_margin"] == 1.0
    fixmatch = cell_key("fixmatch", "rotation", "fashion-mnist", 4, 0, ev.EvalConfig(choice_margin=1.0))
    assert "choice_margin" not in fixmatch  # FixMatch does not choose this way
    with pytest.raises(ValueError, match="choice_margin.*-1.*standard errors"):
        ev.EvalConfig(choice_margin=-1.0).validate()


def test_auto_lets_every_teacher_and_prediction_compete_and_a_setting_fixes_one():
    assert teacher_order("auto") == TEACHERS and teacher_order("probe") == ("probe",)
    assert prediction_order("auto") == ("student graph", "student both", "student head", "teacher", "probe")
    assert prediction_order("blend") == ("teacher+student", "student graph", "teacher")
    assert prediction_order("head") == ("student head",) and set(PREDICTIONS) == set(ST_PREDICTS)
    assert ev.EvalConfig().st_predict == "blend"
    assert TEACHERS[0] == "agree"  # what no validation image can choose


def test_blend_chooses_on_the_validation_images_among_teacher_student_and_their_mean(noise_run, tmp_path):
    row = ev.selftrain_cell(noise_run, 2, device="cpu", out=str(tmp_path), config=replace(CFG, st_predict="blend"))
    predictions = row["predictions"]
    assert set(predictions) == {"teacher+student", "student graph", "student both", "student head", "teacher",
                                "probe"}
    # the recorded predictions are the row's own: the chosen one's test top-1 is the row's
    assert row["top1"] == pytest.approx(predictions[row["predicted_by"]]["test"])
    assert predictions["teacher"]["test"] == pytest.approx(row["teacher_top1"])
    assert predictions["student graph"]["test"] == pytest.approx(row["student_graph_top1"])
    assert predictions["student head"]["test"] == pytest.approx(row["student_head_top1"])
    # the first of the three with the most validation images right
    order = ("teacher+student", "student graph", "teacher")
    best = max(predictions[k]["val"] for k in order)
    assert row["predicted_by"] == next(k for k in order if predictions[k]["val"] == best)
    assert row["val_acc"] == pytest.approx(best)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory, make_noise_run):
    return make_noise_run(tmp_path_factory.mktemp("selftrain"), 20)


CFG = ev.EvalConfig(val_per_class=2, lp_k=4, lp_pca=8, st_per_class=3, st_steps=2, batch_size=8, probe_epochs=3,
                    precision="fp32", layer="conv4")


@pytest.mark.parametrize("teacher, predict", [("auto", "auto"), ("probe", "head"), ("labelprop", "graph"),
                                              ("auto", "blend")])
def test_a_selftrain_cell_records_its_teacher_and_what_predicted_the_test_images(noise_run, tmp_path, teacher, predict):
    row = ev.selftrain_cell(noise_run, 2, device="cpu", out=str(tmp_path),
                            config=replace(CFG, st_teacher=teacher, st_predict=predict))
    assert row["teacher"] in (TEACHERS if teacher == "auto" else (teacher,))
    assert row["history"][0]["teacher"] == row["teacher"]
    assert row["predicted_by"] in prediction_order(predict)
    named = {"student graph": "student_graph_top1", "student head": "student_head_top1", "teacher": "teacher_top1"}
    if row["predicted_by"] in named:  # the row's top-1 is the chosen prediction's
        assert row["top1"] == pytest.approx(row[named[row["predicted_by"]]])


def test_labelprop_weighs_the_probe_against_the_graph(noise_run, tmp_path):
    out = str(tmp_path)
    graph = ev.labelprop_cell(noise_run, 2, device="cpu", out=out, config=replace(CFG, lp_probe_weights=(0.0,)))
    assert graph["probe_weight"] == 0.0 and graph["top1"] == graph["graph_top1"]
    probe = ev.probe_cell(noise_run, 2, device="cpu", out=out, config=CFG)
    only_probe = ev.labelprop_cell(noise_run, 2, device="cpu", out=out, config=replace(CFG, lp_probe_weights=(1.0,)))
    assert only_probe["probe_weight"] == 1.0 and only_probe["top1"] == pytest.approx(probe["top1"])
    chosen = ev.labelprop_cell(noise_run, 2, device="cpu", out=out, config=CFG)
    assert chosen["probe_weight"] in CFG.lp_probe_weights and chosen["graph_top1"] == graph["graph_top1"]
    assert len({graph["run"], only_probe["run"], chosen["run"]}) == 3  # the weights are part of the key


@pytest.mark.parametrize("field, value", [("st_teacher", "oracle"), ("st_predict", "test"),
                                          ("lp_probe_weights", (1.5,)), ("lp_probe_weights", ())])
def test_bad_teacher_prediction_and_weight_settings_are_one_line(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.* is not (allowed|known); allowed: "):
        replace(ev.EvalConfig(), **{field: value}).validate()


def test_every_round_pseudo_labels_pool_images_only(noise_run, tmp_path, monkeypatch):
    """A second round learns from the student's graph, whose first nodes are the labeled images:
    its teacher must score the pool images alone, in the pool's order, as the first round's does."""
    from sslab.evaluate import selftrain
    sizes, real = [], selftrain.select_balanced

    def recording(probs, confidence, per_class, threshold):
        sizes.append(len(probs))
        return real(probs, confidence, per_class, threshold)

    monkeypatch.setattr(selftrain, "select_balanced", recording)
    row = ev.selftrain_cell(noise_run, 2, device="cpu", out=str(tmp_path),
                            config=replace(CFG, st_rounds=2, st_teacher="labelprop"))
    # 20 train images per class, 3 classes; the cell labels 2 and validates on 2 per class
    assert sizes == [60 - 3 * 4] * 2
    assert [h["round"] for h in row["history"]] == [1, 2]
    assert [h["teacher"] for h in row["history"]] == ["labelprop", "student graph"]
    assert all(0.0 <= h["pseudo_acc"] <= 1.0 for h in row["history"])
