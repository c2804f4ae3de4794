"""The label-budget sweeps the notebooks run, as tables (pandas frames) and one-sentence readings."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..evaluate.table import format_gain, series_name, series_order
from .params import LabSettings


def evaluate_budgets(runs: dict, settings: LabSettings, budgets=None, scratch: bool = True,
                     finetune: bool = False, name: Optional[str] = None, protocols=None):
    """The label-budget sweep of ``runs`` at ``budgets`` (default ``settings.budgets``) × ``settings.seeds``
    through the run store (cells already computed are reused); returns the ResultTable.
    ``protocols`` (e.g. ``settings.protocols``) replaces the probe + ``scratch`` + ``finetune`` choice;
    the random-init run gets only those of them in ``settings.random_init_protocols``."""
    from .. import store
    from ..evaluate import ResultTable, label_curve
    from ..evaluate.curve import compute_sweeps
    from ..pretrain import RANDOM_INIT
    budgets = budgets if budgets is not None else settings.budgets
    if protocols is not None:
        scratch = finetune = None
    common = dict(budgets=list(budgets), seeds=list(settings.seeds), layer=settings.layer, head=settings.head,
                  device=settings.device, out=settings.out, config=settings.eval_config(), progress=False,
                  deterministic=settings.deterministic)
    untrained = [r for m, r in runs.items() if m == RANDOM_INIT]
    fewer = [p for p in (protocols or ()) if p in settings.random_init_protocols and p != "scratch"]
    if protocols is None or not untrained or len(untrained) == len(runs) or fewer == [p for p in protocols
                                                                                      if p != "scratch"]:
        return label_curve(list(runs.values()), protocols=protocols, scratch=scratch, finetune=finetune, name=name,
                           **common)
    pretrained = [r for m, r in runs.items() if m != RANDOM_INIT]
    # both sweeps' cells in one batch of the worker processes: random-init's quick cells fill in
    # while the pretrained runs' long ones finish
    sweeps = [(pretrained, protocols, common["config"])] + ([(untrained, fewer, common["config"])] if fewer else [])
    compute_sweeps(sweeps, common["budgets"], common["seeds"], settings.layer, settings.head, settings.device,
                   settings.out, settings.deterministic)
    rows = label_curve(pretrained, protocols=protocols, **common).rows
    if fewer:  # random-init from the same labeled images, with the protocols asked of it
        rows += label_curve(untrained, protocols=fewer, **common).rows
    table = ResultTable(rows)
    if name:
        table.path = table.save(store.outputs_root(settings.out) / "tables" / name)[0]
    return table


def _pm(mean, std, n: int = 2) -> str:
    """``mean ± std`` in %; a single seed has no spread to show."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def results_frame(table, budget: Optional[int] = None):
    """Mean ± std over seeds (in %) per method and protocol, one row per budget: columns
    method, protocol, labels per class, seeds, top-1 %, top-5 %."""
    import pandas as pd
    rows = [{"method": e["method"], "protocol": e["protocol"], "labels per class": e["budget"], "seeds": e["n"],
             "top-1 %": _pm(e["top1_mean"], e["top1_std"], e["n"]),
             "top-5 %": _pm(e["top5_mean"], e["top5_std"], e["n"])}
            for e in table.summary() if budget is None or e["budget"] == budget]
    order = {name: i for i, name in enumerate(_series_names(table))}
    rows.sort(key=lambda r: (r["labels per class"], order[series_name(r["method"], r["protocol"])]))
    return pd.DataFrame(rows)


def pivot_frame(table, metric: str = "top1"):
    """Methods × budgets, mean ± std over seeds in %, with the scratch row last."""
    import pandas as pd
    cells: dict = {}
    for e in table.summary():
        cells.setdefault(series_name(e["method"], e["protocol"]), {})[e["budget"]] = _pm(e[f"{metric}_mean"],
                                                                                       e[f"{metric}_std"], e["n"])
    frame = pd.DataFrame(cells).T.loc[_series_names(table)]
    frame = frame[sorted(frame.columns)]
    frame.columns = [f"{b}" for b in frame.columns]
    frame.columns.name = "labels per class →"
    return frame


def _series_names(table) -> list:
    """The table's series names in the order they were computed, scratch last."""
    return [series_name(m, p) for m, p in series_order(table.rows)]


def gain_frame(table, metric: str = "top1", over: str = "scratch"):
    """Paired gain over ``over`` (scratch, random-init or probe; percentage points) per method ×
    budget: mean, 95 % confidence interval over seeds (✓: it excludes 0) and seeds won."""
    import pandas as pd
    cells: dict = {}
    for g in table.paired_gain(metric, over=over):
        cells.setdefault(series_name(g["method"], g["protocol"]), {})[g["budget"]] = format_gain(g, metric)
    frame = pd.DataFrame(cells).T
    if len(frame):
        frame = frame.loc[[n for n in _series_names(table) if n in frame.index]]
    if len(frame.columns):
        frame = frame[sorted(frame.columns)]
    frame.columns = [f"{b}" for b in frame.columns]
    frame.columns.name = "labels per class →"
    return frame


def best_series(table, metric: str = "top1") -> tuple:
    """(method, protocol) with the highest mean ``metric`` over the table's rows."""
    entries = [e for e in table.summary() if e[f"{metric}_mean"] is not None]
    if not entries:
        raise ValueError("the table is empty")
    best = max(entries, key=lambda e: e[f"{metric}_mean"])
    return best["method"], best["protocol"]


def confusion_of(table, method: str, protocol: str, budget: Optional[int] = None) -> np.ndarray:
    """The confusion matrix of one method and protocol, summed over seeds (and budgets, unless one is given)."""
    rows = [r for r in table.rows if r["method"] == method and r["protocol"] == protocol
            and (budget is None or r["budget"] == budget)]
    if not rows:
        raise ValueError(f"no rows for method={method!r}, protocol={protocol!r}")
    return np.sum([np.asarray(r["confusion"]) for r in rows], axis=0)


def confusion_sentence(table, method: str, protocol: str) -> str:
    """The most frequent confusion of one method: which true class is taken for which."""
    m = confusion_of(table, method, protocol).astype(float)
    classes = table.rows[0]["classes"]
    rates = m / np.maximum(m.sum(1, keepdims=True), 1)
    np.fill_diagonal(rates, 0)
    i, j = np.unravel_index(rates.argmax(), rates.shape)
    diag = np.diag(m) / np.maximum(m.sum(1), 1)
    worst = int(diag.argmin())
    return (f"{series_name(method, protocol)}: most often {classes[i]} is taken for {classes[j]} "
            f"({100 * rates[i, j]:.0f}% of {classes[i]}); the hardest class is {classes[worst]} "
            f"({100 * diag[worst]:.0f}% right).")


def probe_sentence(table) -> str:
    """One sentence on a single-budget table: the best method and its margin over scratch."""
    entries = table.summary()
    budget = entries[0]["budget"]
    method, protocol = best_series(table)
    best = next(e for e in entries if (e["method"], e["protocol"]) == (method, protocol))
    scratch = next((e for e in entries if e["protocol"] == "scratch"), None)
    text = (f"At {budget} labeled image{'s' if budget != 1 else ''} per class the best is "
            f"{series_name(method, protocol)} "
            f"with {100 * best['top1_mean']:.1f}% top-1")
    if scratch is not None and (method, protocol) != ("scratch", "scratch"):
        text += f", {100 * (best['top1_mean'] - scratch['top1_mean']):+.1f} points over scratch"
    elif scratch is not None:
        others = [e for e in entries if e["protocol"] != "scratch"]
        if others:
            runner = max(others, key=lambda e: e["top1_mean"])
            text += (f"; no pretrained backbone beats training from scratch here (best: {runner['method']}, "
                     f"{100 * (runner['top1_mean'] - scratch['top1_mean']):+.1f} points)")
    return text + f" (mean over {best['n']} seed{'s' if best['n'] != 1 else ''})."


def curve_sentence(table, metric: str = "top1") -> str:
    """One sentence on a sweep: for each method, at which budgets it beats scratch on average."""
    gains = table.paired_gain(metric)
    if not gains:
        return "No paired comparison with scratch in this table."
    parts = []
    for method in dict.fromkeys(g["method"] for g in gains if g["protocol"] == "probe"):
        mine = [g for g in gains if g["method"] == method and g["protocol"] == "probe"]
        wins = [g["budget"] for g in mine if g[f"gain_{metric}_mean"] > 0]
        peak = max(mine, key=lambda g: g[f"gain_{metric}_mean"])
        if wins:
            parts.append(f"{method} beats scratch at {_budget_list(wins)} label(s) per class "
                         f"(largest gain {100 * peak[f'gain_{metric}_mean']:+.1f} points at {peak['budget']})")
        else:
            parts.append(f"{method} never beats scratch (closest {100 * peak[f'gain_{metric}_mean']:+.1f} points "
                         f"at {peak['budget']})")
    return "; ".join(parts) + f" — {METRIC_WORDS[metric]}, mean over seeds."


METRIC_WORDS = {"top1": "top-1", "top5": "top-5"}


def _budget_list(budgets: list) -> str:
    return ", ".join(map(str, budgets))


def finetune_sentence(table, metric: str = "top1") -> str:
    """One sentence: fine-tuned minus frozen probe, per method and budget (mean over seeds)."""
    entries = table.summary()
    parts = []
    for method in dict.fromkeys(e["method"] for e in entries if e["protocol"] == "finetune"):
        probe = {e["budget"]: e[f"{metric}_mean"] for e in entries if (e["method"], e["protocol"]) == (method, "probe")}
        tuned = {e["budget"]: e[f"{metric}_mean"] for e in entries
                 if (e["method"], e["protocol"]) == (method, "finetune")}
        diffs = [f"{100 * (tuned[b] - probe[b]):+.1f} at {b}" for b in sorted(tuned) if b in probe]
        if diffs:
            parts.append(f"{method} {', '.join(diffs)}")
    if not parts:
        return "No fine-tuning rows."
    return (f"Fine-tuned minus frozen probe, {METRIC_WORDS[metric]} percentage points by labels per class "
            f"(mean over seeds): " + "; ".join(parts) + ".")


def references(dataset: str, budgets: Sequence[int], protocol: str = "probe") -> list:
    """Published numbers comparable to this lab's measurement, as labelled reference points.

    Only the RotNet paper's CIFAR-10 semi-supervised numbers (Gidaris et al. 2018, Fig. 5 /
    Table: classifier on frozen RotNet features, 20/100/400/1000/5000 labels per class)
    are known here, and they are drawn only for ``cifar10`` at budgets inside the swept
    range. For Fashion-MNIST no comparable published curve exists, so nothing is drawn."""
    if dataset != "cifar10" or protocol != "probe" or not budgets:
        return []
    points = {20: 64.6, 100: 75.3, 400: 82.8, 1000: 86.4, 5000: 92.0}
    low, high = min(budgets), max(budgets)
    chosen = {b: v for b, v in points.items() if low <= b <= high}
    if not chosen:
        return []
    return [{"label": "RotNet paper, CIFAR-10 (NIN, reference)", "budgets": list(chosen),
             "values": list(chosen.values())}]


def semi_sentence(table, metric: str = "top1") -> str:
    """One line per budget: the best method and protocol, what each protocol that uses the
    unlabeled pool adds over the same method's frozen probe, and what the best method's
    pretraining adds over random-init under the same protocol (paired, mean over seeds)."""
    entries = table.summary()
    over_probe = {(g["method"], g["protocol"], g["budget"]): g for g in table.paired_gain(metric, over="probe")}
    over_init = {(g["method"], g["protocol"], g["budget"]): g for g in table.paired_gain(metric, over="random-init")}
    lines = []
    for budget in sorted({e["budget"] for e in entries}):
        here = [e for e in entries if e["budget"] == budget and e[f"{metric}_mean"] is not None]
        best = max(here, key=lambda e: e[f"{metric}_mean"])
        method, protocol = best["method"], best["protocol"]
        text = (f"{budget} label{'s' if budget != 1 else ''} per class: best {series_name(method, protocol)} "
                f"{100 * best[f'{metric}_mean']:.1f}%")
        # The method whose protocols are compared: the best one, or the best non-scratch one.
        if protocol == "scratch":
            others = [e for e in here if e["protocol"] != "scratch"]
            method = max(others, key=lambda e: e[f"{metric}_mean"])["method"] if others else None
        gains = [f"{p} {_gain_pp(over_probe[(method, p, budget)], metric)}" for p in dict.fromkeys(
            e["protocol"] for e in here) if (method, p, budget) in over_probe]
        if gains:
            text += f"; over {method}'s probe: " + ", ".join(gains)
        if (method, protocol, budget) in over_init:
            text += (f"; {method} over random-init ({protocol}): "
                     f"{_gain_pp(over_init[(method, protocol, budget)], metric)}")
        lines.append(text)
    if not lines:
        return "The table is empty."
    return "\n".join(lines) + f"\n({METRIC_WORDS[metric]}, percentage points, mean over seeds; ✓: the 95 % interval " \
                              "of the paired difference excludes 0.)"


def _gain_pp(gain: dict, metric: str) -> str:
    return f"{100 * gain[f'gain_{metric}_mean']:+.1f}{' ✓' if gain['resolved'] else ''}"


def sweep_sentence(table, setting: str, metric: str = "top1") -> str:
    """One sentence on a sweep of one pretext setting: each value's probe accuracy (mean ± std over
    seeds) and the best value, per method."""
    entries = [e for e in table.summary() if e[f"{metric}_mean"] is not None]
    if not entries:
        return "The sweep is empty."
    parts = []
    for base in dict.fromkeys(e["method"].split(" [")[0] for e in entries):
        mine = sorted((e for e in entries if e["method"].split(" [")[0] == base), key=_swept_value)
        shown = ", ".join(f"{e['method'].split('=')[-1].rstrip(']') if '=' in e['method'] else '(default)'}: "
                          f"{_pm(e[f'{metric}_mean'], e[f'{metric}_std'], e['n'])}" for e in mine)
        best = max(mine, key=lambda e: e[f"{metric}_mean"])
        parts.append(f"{base}, {setting} = {shown} — best {best['method']}")
    budget = entries[0]["budget"]
    return (f"Probe at {budget} labeled image{'s' if budget != 1 else ''} per class, {METRIC_WORDS[metric]} % "
            f"(mean ± std over seeds): " + "; ".join(parts) + ".")


def _swept_value(entry: dict):
    """The swept value a sweep's row names (``siamese-vae [triplet_weight=5.0]`` → 5.0), for order."""
    text = entry["method"].rsplit("=", 1)[-1].rstrip("]") if "=" in entry["method"] else ""
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)

