"""Label-budget curves: every method × protocol × budget × seed of a sweep, computed (or found)
cell by cell in the run store, collected into one :class:`~.table.ResultTable`."""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Optional, Sequence

from .. import store
from ..pretrain import Run, load_run
from ..train import resolve_device
from .cells import EvalConfig, check_budgets, check_seeds, stored_row
from .end_to_end import finetune_cell, finetune_key, scratch_cell, scratch_key
from .probe import probe_cell, probe_cells_together, probe_key
from .table import ResultTable

BUDGETS = (1, 2, 4, 8, 16, 32, 64)


def curve_cells(methods: Sequence[str], budgets, seeds, scratch: bool, finetune: bool) -> list:
    """Every (method, protocol, budget, seed) a sweep computes, in a fixed order."""
    cells = []
    for budget in budgets:
        for seed in seeds:
            for method in methods:
                cells.append((method, "probe", budget, seed))
                if finetune:
                    cells.append((method, "finetune", budget, seed))
            if scratch:
                cells.append(("scratch", "scratch", budget, seed))
    return cells


def cell_key(method: str, protocol: str, budget: int, seed: int, run: Optional[Run], like: Optional[Run],
             cfg: EvalConfig) -> dict:
    """The stored config of one cell of a sweep (a scratch cell is shaped ``like`` a pretrained run)."""
    if protocol == "scratch":
        return scratch_key(like.config.dataset, budget, seed, cfg, like.config.width, like.config.image_size)
    if protocol == "finetune":
        return finetune_key(run, budget, seed, cfg)
    return probe_key(run, budget, seed, cfg)


def label_curve(pretrained_runs, budgets=BUDGETS, seeds=(0, 1, 2), layer: str = "conv4", head: str = "mlp",
                scratch: bool = True, finetune: bool = False, device="auto", out=None,
                config: Optional[EvalConfig] = None, name: Optional[str] = None, progress: bool = True,
                shard: Optional[tuple] = None, deterministic: bool = False,
                batch_probes: bool = True) -> ResultTable:
    """Accuracy against labels per class for each pretrained run (and the scratch baseline).

    ``pretrained_runs``: Runs (or run folders) of one dataset. Every method is evaluated on
    the same labeled/validation images for a given budget and seed. Features are extracted
    once per run and layer. Writes ``outputs/tables/<name>.csv`` and ``.json`` and returns
    the :class:`ResultTable`. ``shard=(i, n)`` computes only every n-th cell starting at i.
    ``batch_probes``: train the probe heads the sweep needs together, in batched groups
    (:func:`probe_cells_together`; the same training as one at a time, to rounding), before
    the cells are read in order; ``False`` trains each one alone in :func:`probe_cell`.
    """
    if name is not None:
        store.check_file_name("name", name)
    runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
    if not runs and not scratch:
        raise ValueError("label_curve needs at least one pretrained run or scratch=True")
    datasets = {r.config.dataset for r in runs}
    if len(datasets) > 1:
        raise ValueError(f"pretrained_runs mix datasets ({', '.join(sorted(datasets))}); allowed: runs of one dataset")
    budgets, seeds = check_budgets(budgets), check_seeds(seeds)
    cfg = replace(config or EvalConfig(), layer=layer, head=head).resolved(resolve_device(device))
    by_method = {r.method: r for r in runs}
    cells = curve_cells(list(by_method), budgets, seeds, scratch, finetune)
    if shard is not None:
        index, count = shard
        cells = cells[index::count]
    like = runs[0] if runs else None
    if batch_probes:
        # Every probe head this sweep needs (fine-tuning starts from the mlp probe) trains in
        # batched groups first; the loop below then finds those cells stored.
        needed = [(by_method[m], b, s, head if protocol == "probe" else "mlp")
                  for m, protocol, b, s in cells if protocol in ("probe", "finetune")]
        probe_cells_together(needed, cfg, device, out, deterministic)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cells), desc="label curve", unit="cell", leave=False)
    for method, protocol, budget, seed in cells:
        if bar is not None:
            bar.set_postfix_str(f"{method} {protocol} k={budget} seed={seed}")
        if protocol == "scratch":
            rows.append(scratch_cell(like.config.dataset if like else "fashion-mnist", budget, seed, like=like,
                                     layer=layer, device=device, out=out, config=cfg, deterministic=deterministic))
        elif protocol == "finetune":
            rows.append(finetune_cell(by_method[method], budget, seed, layer, device, out, cfg,
                                      deterministic=deterministic))
        else:
            rows.append(probe_cell(by_method[method], budget, seed, layer, head, device, out, cfg,
                                   deterministic=deterministic))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = ResultTable(rows)
    if shard is None:
        stem = name or default_table_name(runs, budgets, seeds, layer, head, scratch, finetune, cfg)
        table.path = table.save(store.outputs_root(out) / "tables" / stem)[0]
    return table


def default_table_name(runs, budgets, seeds, layer: str, head: str, scratch: bool, finetune: bool,
                       config: Optional[EvalConfig] = None) -> str:
    """``curve-<dataset>-<layer>-<head>[-finetune]-<8 hex>``: the hash of the pretraining runs, the
    budgets, seeds and protocols and the evaluation settings, so two different sweeps never write
    over each other's table (and the same sweep, run again, rewrites its own)."""
    dataset = runs[0].config.dataset if runs else "fashion-mnist"
    settings = asdict(replace(config or EvalConfig(), layer=layer, head=head))
    digest = store.config_hash({"runs": sorted(r.path.name for r in runs), "budgets": sorted(budgets),
                                "seeds": sorted(seeds), "scratch": scratch, "finetune": finetune,
                                "settings": settings})[:8]
    return f"curve-{store.slug(dataset)}-{layer}-{head}{'-finetune' if finetune else ''}-{digest}"


def merge_curve(pretrained_runs, budgets=BUDGETS, seeds=(0, 1, 2), layer: str = "conv4", head: str = "mlp",
                scratch: bool = True, finetune: bool = False, out=None, config: Optional[EvalConfig] = None,
                name: Optional[str] = None, device="auto"):
    """Collect a sweep computed by shards: ``(table, missing)`` where ``missing`` lists the cells
    not computed yet. The table is written only when nothing is missing. ``device`` resolves a
    precision of ``auto`` as the shards did on theirs (give the shards' precision explicitly when
    merging on another kind of machine)."""
    if name is not None:
        store.check_file_name("name", name)
    runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
    cfg = replace(config or EvalConfig(), layer=layer, head=head).resolved(resolve_device(device))
    by_method = {r.method: r for r in runs}
    like = runs[0] if runs else None
    budgets, seeds = check_budgets(budgets), check_seeds(seeds)
    rows, missing = [], []
    for method, protocol, budget, seed in curve_cells(list(by_method), budgets, seeds, scratch, finetune):
        cached = stored_row(cell_key(method, protocol, budget, seed, by_method.get(method), like, cfg), out)
        if cached is None:
            missing.append(f"{method} {protocol} labels={budget} seed={seed}")
        else:
            rows.append(cached)
    table = ResultTable(rows)
    if not missing:
        stem = name or default_table_name(runs, budgets, seeds, layer, head, scratch, finetune, cfg)
        table.path = table.save(store.outputs_root(out) / "tables" / stem)[0]
    return table, missing
