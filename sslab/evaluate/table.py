"""A results table: one row per evaluated cell, its summary over seeds and the paired gains."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import store

TABLE_COLUMNS = ("method", "protocol", "head", "layer", "budget", "seed", "top1", "top5", "epochs", "seconds")
# The order protocols are listed in, within a method (scratch, the baseline, always last).
PROTOCOL_ORDER = ("probe", "finetune", "scratch")


def series_name(method: str, protocol: str) -> str:
    """How a (method, protocol) series is named in tables and legends: ``rotation``,
    ``rotation (finetune)``, ``scratch``."""
    return method if protocol in ("probe", "scratch") else f"{method} ({protocol})"


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
        """Mean and standard deviation over seeds per method × protocol × budget."""
        groups: dict = {}
        for r in self.rows:
            groups.setdefault((r["method"], r["protocol"], r["budget"]), []).append(r)
        out = []
        for (method, protocol, budget), rows in sorted(groups.items(), key=_summary_order):
            entry = {"method": method, "protocol": protocol, "budget": budget, "n": len(rows)}
            for metric in ("top1", "top5"):
                values = np.array([r[metric] for r in rows if r[metric] is not None], dtype=float)
                entry[f"{metric}_mean"] = float(values.mean()) if values.size else None
                entry[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
            out.append(entry)
        return out

    def paired_gain(self, metric: str = "top1") -> list:
        """Per method and budget: mean ± std over seeds of (method − scratch) on the same split."""
        scratch = {(r["budget"], r["seed"]): r[metric] for r in self.rows if r["protocol"] == "scratch"}
        groups: dict = {}
        for r in self.rows:
            if r["protocol"] == "scratch" or (r["budget"], r["seed"]) not in scratch or r[metric] is None:
                continue
            groups.setdefault((r["method"], r["protocol"], r["budget"]), []).append(
                r[metric] - scratch[(r["budget"], r["seed"])])
        out = []
        for (method, protocol, budget), diffs in sorted(groups.items(), key=_summary_order):
            d = np.array(diffs)
            out.append({"method": method, "protocol": protocol, "budget": budget, "n": len(d),
                        f"gain_{metric}_mean": float(d.mean()),
                        f"gain_{metric}_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
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


def _summary_order(item):
    (method, protocol, budget) = item[0]
    rank = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
    return (protocol == "scratch", method, rank, budget)
