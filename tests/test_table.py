"""sslab/evaluate/table.py: summaries over seeds, paired gains against each baseline, and their
95 % confidence intervals, on rows written by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sslab.evaluate.table import ResultTable, t_interval


def _row(method, protocol, budget, seed, top1):
    return {"method": method, "protocol": protocol, "budget": budget, "seed": seed, "top1": top1, "top5": None}


def test_t_interval_is_students_interval():
    stats = pytest.importorskip("scipy.stats")
    for n in (2, 3, 5, 10, 31, 40):
        d = np.random.default_rng(n).normal(0.02, 0.03, n)
        expected = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        assert t_interval(d) == pytest.approx(expected, rel=1e-3)
    assert t_interval([0.1]) is None
    # by hand: d = (0.01, 0.03, -0.005): mean 0.011667, s = 0.017559, t(0.975, 2) = 4.303
    assert t_interval([0.01, 0.03, -0.005]) == pytest.approx(4.303 * 0.0175594 / math.sqrt(3), rel=1e-4)


def test_paired_gain_against_scratch_random_init_and_probe():
    rows = []
    for seed, (scratch, rand_lp, rot_lp, rot_probe) in enumerate([(0.50, 0.55, 0.70, 0.60),
                                                                  (0.52, 0.54, 0.74, 0.61),
                                                                  (0.48, 0.57, 0.72, 0.59)]):
        rows += [_row("scratch", "scratch", 1, seed, scratch), _row("random-init", "labelprop", 1, seed, rand_lp),
                 _row("rotation", "labelprop", 1, seed, rot_lp), _row("rotation", "probe", 1, seed, rot_probe)]
    table = ResultTable(rows)
    over_scratch = {(g["method"], g["protocol"]): g for g in table.paired_gain("top1")}
    g = over_scratch[("rotation", "labelprop")]
    assert g["gain_top1_mean"] == pytest.approx(np.mean([0.20, 0.22, 0.24]))
    assert g["gain_top1_ci95"] == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)
    assert g["resolved"] and g["wins"] == 3 and g["n"] == 3 and g["over"] == "scratch"
    over_random = {(g["method"], g["protocol"]): g for g in table.paired_gain("top1", over="random-init")}
    assert set(over_random) == {("rotation", "labelprop")}  # probe has no random-init row to pair with
    assert over_random[("rotation", "labelprop")]["gain_top1_mean"] == pytest.approx(np.mean([0.15, 0.20, 0.15]))
    over_probe = {(g["method"], g["protocol"]): g for g in table.paired_gain("top1", over="probe")}
    assert over_probe[("rotation", "labelprop")]["gain_top1_mean"] == pytest.approx(np.mean([0.10, 0.13, 0.13]))
    with pytest.raises(ValueError, match="over='teacher' is not known; allowed: scratch, random-init, probe"):
        table.paired_gain("top1", over="teacher")


def test_a_gain_whose_interval_covers_zero_is_not_resolved():
    rows = []
    for seed, (a, b) in enumerate([(0.50, 0.52), (0.50, 0.47), (0.50, 0.51)]):
        rows += [_row("scratch", "scratch", 4, seed, a), _row("vae", "probe", 4, seed, b)]
    [gain] = ResultTable(rows).paired_gain("top1")
    assert abs(gain["gain_top1_mean"]) < gain["gain_top1_ci95"] and not gain["resolved"]
