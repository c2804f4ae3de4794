"""A results table: one row per evaluated cell, its summary over seeds and the paired gains."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import store

TABLE_COLUMNS = ("method", "protocol", "selection", "val_per_class", "head", "layer", "budget", "seed", "top1", "top5",
                 "epochs", "seconds")
# The order protocols are listed in, within a method (scratch, the baseline, always last).
PROTOCOL_ORDER = ("probe", "finetune", "labelprop", "selftrain", "fixmatch", "scratch")


def series_name(method: str, protocol: str, selection: str = "balanced") -> str:
    """How a (method, protocol) series is named in tables and legends: ``rotation``,
    ``rotation (finetune)``, ``scratch``; with a selection other than the study's balanced draw,
    ``rotation (labelprop, typical)``."""
    parts = [p for p in ((protocol if protocol not in ("probe", "scratch") else None),
                         (selection if selection != "balanced" else None)) if p]
    return f"{method} ({', '.join(parts)})" if parts else method


def selection_of(row: dict) -> str:
    """The selection a row's labeled images were chosen by (rows older than selections: balanced)."""
    return row.get("selection", "balanced")


def series_order(rows: Sequence[dict]) -> list:
    """The (method, protocol) series of ``rows`` in the order they were computed (methods as the
    sweep listed them), scratch last."""
    series = list(dict.fromkeys((r["method"], r["protocol"]) for r in rows))
    return [s for s in series if s[1] != "scratch"] + [s for s in series if s[1] == "scratch"]


class ResultTable:
    """A tidy table of evaluation rows (one per method × protocol × budget × seed)."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = [dict(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def tidy(self) -> list:
        return [{k: r.get(k) for k in TABLE_COLUMNS} for r in self.rows]

    def summary(self) -> list:
        """Mean and standard deviation over seeds per method × protocol × selection × budget."""
        groups: dict = {}
        for r in self.rows:
            groups.setdefault((r["method"], r["protocol"], selection_of(r), r["budget"]), []).append(r)
        out = []
        for (method, protocol, selection, budget), rows in sorted(groups.items(), key=_summary_order):
            entry = {"method": method, "protocol": protocol, "selection": selection, "budget": budget,
                     "n": len(rows)}
            for metric in ("top1", "top5"):
                values = np.array([r[metric] for r in rows if r[metric] is not None], dtype=float)
                entry[f"{metric}_mean"] = float(values.mean()) if values.size else None
                entry[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
            out.append(entry)
        return out

    def paired_gain(self, metric: str = "top1", over: str = "scratch") -> list:
        """Per series and budget: the paired difference (series − baseline) on the same labeled
        images (same budget and seed), its mean, standard deviation and 95 % confidence interval
        over seeds (:func:`t_interval`), and the seeds it won. ``over``: the baseline —
        ``scratch`` (the scratch cell), ``random-init`` (the same protocol from a randomly
        initialised backbone: what pretraining adds), ``probe`` (the same method's probe:
        what the protocol adds over a head on frozen features), all with the same selection;
        or ``uniform`` / ``balanced`` (the same method and protocol with labeled images drawn
        that way: what choosing the images adds)."""
        if over not in GAIN_BASELINES:
            raise ValueError(f"over={over!r} is not known; allowed: {', '.join(GAIN_BASELINES)}")
        values = {(r["method"], r["protocol"], selection_of(r), r["budget"], r["seed"]): r[metric] for r in self.rows}
        groups: dict = {}
        for r in self.rows:
            method, protocol, selection, budget, seed = (r["method"], r["protocol"], selection_of(r), r["budget"],
                                                         r["seed"])
            base = {"scratch": ("scratch", "scratch", selection), "random-init": ("random-init", protocol, selection),
                    "probe": (method, "probe", selection), "uniform": (method, protocol, "uniform"),
                    "balanced": (method, protocol, "balanced")}[over]
            own = (method, protocol, selection)
            if own == base or r[metric] is None or (protocol == "scratch" and over not in SELECTIONS_AS_BASELINE):
                continue
            reference = values.get((*base, budget, seed))
            if reference is None:
                continue
            groups.setdefault((method, protocol, selection, budget), []).append(r[metric] - reference)
        out = []
        for (method, protocol, selection, budget), diffs in sorted(groups.items(), key=_summary_order):
            d = np.array(diffs)
            half = t_interval(d)
            out.append({"method": method, "protocol": protocol, "selection": selection, "budget": budget,
                        "n": len(d), "over": over,
                        f"gain_{metric}_mean": float(d.mean()),
                        f"gain_{metric}_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                        f"gain_{metric}_ci95": half,
                        "resolved": half is not None and abs(float(d.mean())) > half,
                        "wins": int((d > 0).sum())})
        return out

    def format(self) -> str:
        """The summary as a fixed-width text table (accuracies in %)."""
        lines = [f"{'method':<14}{'protocol':<10}{'labels':>7}{'top-1 %':>16}{'top-5 %':>16}{'seeds':>7}"]
        for e in self.summary():
            def cell(metric):
                if e[f"{metric}_mean"] is None:
                    return "-"
                return f"{100 * e[f'{metric}_mean']:.1f} ± {100 * e[f'{metric}_std']:.1f}"
            lines.append(f"{e['method']:<14}{e['protocol']:<10}{e['budget']:>7}{cell('top1'):>16}{cell('top5'):>16}"
                         f"{e['n']:>7}")
        return "\n".join(lines)

    def save(self, stem: Path) -> tuple:
        """Write ``stem.csv`` (the tidy table) and ``stem.json`` (all rows, with per-class
        accuracy, confusion matrices, summary and paired gains). Returns both paths."""
        stem = Path(stem)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(self.tidy())
        store.write_text(stem.with_suffix(".csv"), buffer.getvalue())
        store.write_json(stem.with_suffix(".json"), {"rows": self.rows, "summary": self.summary(),
                                                     "paired_gain_top1": self.paired_gain("top1"),
                                                     "paired_gain_top5": self.paired_gain("top5")})
        return stem.with_suffix(".csv"), stem.with_suffix(".json")

    @classmethod
    def load(cls, path) -> "ResultTable":
        return cls(store.read_json(Path(path).with_suffix(".json"))["rows"])


def format_gain(g: dict, metric: str = "top1") -> str:
    """One paired gain in percentage points: mean, its 95 % interval over seeds, a ✓ when the
    interval excludes 0 (resolved), and the seeds won: ``+3.1 [+1.2, +5.0] ✓ (3/3)``."""
    mean, half = 100 * g[f"gain_{metric}_mean"], g.get(f"gain_{metric}_ci95")
    if half is None:
        return f"{mean:+.1f} ({g['wins']}/{g['n']})"
    half *= 100
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]{' ✓' if g['resolved'] else ''} ({g['wins']}/{g['n']})"


GAIN_BASELINES = ("scratch", "random-init", "probe", "uniform", "balanced")
# The baselines that differ from a series only in how its labeled images were chosen (so the
# scratch baseline has a gain over them too).
SELECTIONS_AS_BASELINE = ("uniform", "balanced")
# Student's t quantile t(0.975, df) for df = 1 … 30 (the 95 % two-sided interval); past 30 it
# comes from the normal quantile by the Cornish-Fisher expansion (within 1e-4 there).
_T975 = (12.7062, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.30600, 2.26216, 2.22814, 2.20099,
         2.17881, 2.16037, 2.14479, 2.13145, 2.11991, 2.10982, 2.10092, 2.09302, 2.08596, 2.07961, 2.07387,
         2.06866, 2.06390, 2.05954, 2.05553, 2.05183, 2.04841, 2.04523, 2.04227)


def t_interval(differences) -> "float | None":
    """Half-width of the 95 % confidence interval of the mean of paired ``differences`` (one per
    seed): t(0.975, n − 1) · s / √n, Student's t interval; None for fewer than two seeds."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return None
    df = d.size - 1
    if df <= len(_T975):
        t = _T975[df - 1]
    else:
        z = 1.959964
        t = z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    return float(t * d.std(ddof=1) / np.sqrt(d.size))


SELECTION_ORDER = ("balanced", "uniform", "typical", "cover")


def _summary_order(item):
    (method, protocol, selection, budget) = item[0]
    rank = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
    chosen = SELECTION_ORDER.index(selection) if selection in SELECTION_ORDER else len(SELECTION_ORDER)
    return (protocol == "scratch", method, rank, chosen, budget)
