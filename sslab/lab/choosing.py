"""What notebook 07 calls: the sweep over ways of choosing which images get labeled, the images
each way picked, the classes it covered, and its tables and sentence."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from ..evaluate.table import ResultTable, format_gain, selection_of
from .params import LabSettings


def selection_sweep(runs: dict, settings: LabSettings, selections: Optional[Sequence[str]] = None,
                    val_per_class: Optional[int] = None, protocols: Optional[Sequence[str]] = None,
                    name: Optional[str] = None) -> ResultTable:
    """Every run × protocol × budget × seed once per way of choosing the labeled images
    (``selections``, default ``settings.selections``), with ``val_per_class`` validation images
    per class (default the notebook's); one table of all the rows (each records its selection and
    validation mode), written to ``outputs/tables/<name>``. Cells already computed are reused."""
    from .. import store
    from ..evaluate import label_curve
    from ..evaluate.curve import compute_sweeps
    from ..evaluate.probe import probe_cells_together
    configs = [replace(settings.eval_config(), selection=selection,
                       val_per_class=settings.val_per_class if val_per_class is None else val_per_class)
               for selection in selections or settings.selections]
    protocols = list(protocols or settings.protocols)
    # The probe heads of every selection train together: they differ only in their labeled images.
    probe_cells_together([(run, budget, seed, config.head if "probe" in protocols else "mlp", config)
                          for config in configs for run in runs.values() for budget in settings.budgets
                          for seed in settings.seeds], configs[0], settings.device, settings.out,
                         settings.deterministic)
    # the other cells of every selection in one batch of the worker processes
    compute_sweeps([(list(runs.values()), protocols, config) for config in configs], settings.budgets, settings.seeds,
                   device=settings.device, out=settings.out, deterministic=settings.deterministic)
    rows = []
    for config in configs:
        table = label_curve(list(runs.values()), budgets=list(settings.budgets), seeds=list(settings.seeds),
                            protocols=protocols, device=settings.device, out=settings.out, config=config,
                            progress=False, deterministic=settings.deterministic)
        rows += table.rows
    table = ResultTable(rows)
    if name:
        table.path = table.save(store.outputs_root(settings.out) / "tables" / name)[0]
    return table


def selection_picks(runs: dict, settings: LabSettings, budget: int = 1, seed: int = 0) -> dict:
    """``{method: {selection: train indices}}``: the images each way of choosing labels at
    ``budget`` per class and ``seed`` (what the sweep's cells train on)."""
    from ..evaluate.cells import open_cell
    picks = {}
    for method, run in runs.items():
        picks[method] = {}
        for selection in settings.selections:
            config = replace(settings.eval_config(), selection=selection)
            cell = open_cell("probe", run, budget, seed, device=settings.device, out=settings.out, config=config)
            picks[method][selection] = cell.labeled_split()[0]
    return picks


def _mean_std(values: list, n: int) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}" if n > 1 else \
        f"{100 * np.mean(values):.1f}"


def selection_frame(table: ResultTable, metric: str = "top1"):
    """Method × protocol × selection (rows) by budget (columns): mean ± std over seeds in %, and
    the classes the labeled images covered (mean over seeds) in brackets."""
    import pandas as pd
    groups: dict = {}
    for r in table.rows:
        key = (r["method"], r["protocol"], selection_of(r))
        groups.setdefault(key, {}).setdefault(r["budget"], []).append(r)
    cells = {}
    for (method, protocol, selection), by_budget in groups.items():
        name = f"{method} · {protocol} · {selection}"
        cells[name] = {str(b): f"{_mean_std([r[metric] for r in rows], len(rows))} "
                               f"({np.mean([r.get('labeled_classes', 0) for r in rows]):.1f})"
                       for b, rows in sorted(by_budget.items())}
    frame = pd.DataFrame(cells).T
    frame.columns.name = "labels per class →"
    return frame


def selection_gain_frame(table: ResultTable, over: str = "uniform", metric: str = "top1"):
    """Each selection's paired gain over ``over`` (uniform or balanced) for the same method,
    protocol, budget and seed: mean [95 % interval] ✓ (seeds won), top-1 points."""
    import pandas as pd
    cells: dict = {}
    for g in table.paired_gain(metric, over=over):
        name = f"{g['method']} · {g['protocol']} · {g['selection']}"
        cells.setdefault(name, {})[str(g["budget"])] = format_gain(g, metric)
    frame = pd.DataFrame(cells).T
    frame.columns.name = "labels per class →"
    return frame


def selection_sentence(table: ResultTable, metric: str = "top1") -> str:
    """Per budget: the best method · protocol · selection with its labels in all, and what the best
    label-free selection gains over uniform (paired, with its interval)."""
    entries = [e for e in table.summary() if e[f"{metric}_mean"] is not None]
    if not entries:
        return "The table is empty."
    classes = len(table.rows[0]["classes"])
    gains = {(g["method"], g["protocol"], g["selection"], g["budget"]): g for g in table.paired_gain(metric, "uniform")}
    lines = []
    for budget in sorted({e["budget"] for e in entries}):
        here = [e for e in entries if e["budget"] == budget]
        best = max(here, key=lambda e: e[f"{metric}_mean"])
        text = (f"{budget} label{'s' if budget != 1 else ''} per class ({budget * classes} in all): best "
                f"{best['method']} · {best['protocol']} · {best['selection']} {100 * best[f'{metric}_mean']:.1f}%")
        blind = [e for e in here if e["selection"] in ("typical", "cover")]
        if blind:
            top = max(blind, key=lambda e: e[f"{metric}_mean"])
            gain = gains.get((top["method"], top["protocol"], top["selection"], budget))
            if gain is not None:
                text += (f"; the best label-free choice, {top['method']} · {top['protocol']} · {top['selection']}, "
                         f"over uniform: {format_gain(gain, metric)}")
        lines.append(text)
    return "\n".join(lines) + f"\n({'top-1' if metric == 'top1' else 'top-5'} %, mean over seeds; gains in points " \
                              f"with their 95 % interval, ✓ where it excludes 0, and the seeds won.)"


def validation_worth(study: ResultTable, realistic: ResultTable, metric: str = "top1"):
    """The same cells with the study's validation images and without any (labels counted in all):
    method · protocol · selection by budget, ``with → without (difference)`` in % (means over seeds)."""
    import pandas as pd

    def means(table):
        return {(e["method"], e["protocol"], e["selection"], e["budget"]): e[f"{metric}_mean"]
                for e in table.summary()}
    with_val, without = means(study), means(realistic)
    cells: dict = {}
    for key in with_val:
        if key in without and with_val[key] is not None and without[key] is not None:
            method, protocol, selection, budget = key
            cells.setdefault(f"{method} · {protocol} · {selection}", {})[str(budget)] = (
                f"{100 * with_val[key]:.1f} → {100 * without[key]:.1f} ({100 * (without[key] - with_val[key]):+.1f})")
    frame = pd.DataFrame(cells).T
    frame.columns.name = "labels per class →"
    return frame
