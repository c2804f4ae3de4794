"""Label-budget curves: every method × protocol × budget × seed of a sweep, computed (or found)
cell by cell in the run store, collected into one :class:`~.table.ResultTable`."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional, Sequence

from .. import store
from ..checks import MAX_COUNT, check_choice_list, check_int
from ..parallel import Progress, default_workers, run_all
from ..pretrain import Run, load_run
from ..train import resolve_device
from .cells import EvalConfig, check_budgets, check_seeds, open_cell, protocol_key, stored_row
from .end_to_end import compute_finetune, compute_scratch
from .fixmatch import compute_fixmatch
from .labelprop import compute_labelprop
from .probe import compute_probe, probe_cells_together
from .selftrain import compute_selftrain
from .table import ResultTable

BUDGETS = (1, 2, 4, 8, 16, 32, 64)
# Every protocol a sweep can run, in the order its cells are computed and listed; scratch is the
# baseline and comes last in each (budget, seed).
PROTOCOLS = ("probe", "finetune", "labelprop", "selftrain", "fixmatch", "scratch")
DEFAULT_PROTOCOLS = ("probe", "scratch")
# What computes a cell of each protocol (see :mod:`.cells`: every protocol enters the same way).
COMPUTE = {"probe": compute_probe, "finetune": compute_finetune, "labelprop": compute_labelprop,
           "selftrain": compute_selftrain, "fixmatch": compute_fixmatch, "scratch": compute_scratch}


def check_protocols(protocols, name: str = "protocols") -> tuple:
    """A non-empty list of distinct protocols (text forms as in :func:`sslab.checks.list_items`),
    returned in :data:`PROTOCOLS` order."""
    chosen = check_choice_list(name, protocols, PROTOCOLS, "protocols")
    return tuple(p for p in PROTOCOLS if p in chosen)


def _protocols(protocols, scratch: Optional[bool], finetune: Optional[bool]) -> tuple:
    """``protocols``, or for callers that still say it with flags: probe, + finetune, + scratch."""
    if protocols is not None:
        return check_protocols(protocols)
    chosen = ["probe"] + (["finetune"] if finetune else []) + ([] if scratch is False else ["scratch"])
    return tuple(chosen)


def curve_cells(methods: Sequence[str], budgets, seeds, protocols=DEFAULT_PROTOCOLS) -> list:
    """Every (method, protocol, budget, seed) a sweep computes, in a fixed order."""
    cells = []
    for budget in budgets:
        for seed in seeds:
            for method in methods:
                cells += [(method, protocol, budget, seed) for protocol in protocols if protocol != "scratch"]
            if "scratch" in protocols:
                cells.append(("scratch", "scratch", budget, seed))
    return cells


def _arch(runs) -> str:
    archs = {r.arch for r in runs}
    if len(archs) > 1:
        raise ValueError(f"pretrained_runs mix backbones ({', '.join(sorted(archs))}); allowed: runs of one backbone")
    return archs.pop() if archs else "alexnet"


def cell_key(protocol: str, budget: int, seed: int, run: Run, cfg: EvalConfig) -> dict:
    """The stored config of one cell of a sweep (a scratch cell is shaped like ``run``)."""
    return protocol_key(protocol, run, budget, seed, cfg)


def compute_cell(protocol: str, budget: int, seed: int, run: Run, cfg: EvalConfig, device, out,
                 deterministic: bool = False, progress: bool = False, label: Optional[str] = None) -> dict:
    """The result row of one cell of a sweep, computed now or found in the store (a scratch cell
    is shaped like ``run``; ``label``: what the row calls the run's method, see :func:`run_names`)."""
    row = open_cell(protocol, run, budget, seed, device=device, out=out, config=cfg, progress=progress,
                    deterministic=deterministic).computed(COMPUTE[protocol])
    return labelled(row, label)


def labelled(row: dict, label: Optional[str]) -> dict:
    """``row`` as a table shows it: a sweep's run named by its ``label`` (scratch stays scratch)."""
    return row if label is None or row["protocol"] == "scratch" else {**row, "method": label}


def run_names(runs) -> dict:
    """``{label: run}``: each run by its method, and where several runs share a method (a sweep of
    one setting), by its method and the task settings in which they differ — ``siamese-vae
    [triplet_weight=5.0]`` — so their rows stay apart in one table."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    labels = {}
    for method, group in groups.items():
        differ = sorted({k for r in group for k in r.config.settings
                         if len({json.dumps(x.config.settings.get(k), sort_keys=True) for x in group}) > 1})
        for run in group:
            shown = ", ".join(f"{k}={run.config.settings.get(k)}" for k in differ)
            label = f"{method} [{shown}]" if shown else method
            if label in labels:
                raise ValueError(f"pretrained_runs hold two runs of {label} with the same settings "
                                 f"({labels[label].path.name} and {run.path.name}); allowed: one run per method and "
                                 f"setting")
            labels[label] = run
    return labels


def _resolved(config: Optional[EvalConfig], layer: Optional[str], head: Optional[str], device, runs) -> EvalConfig:
    """A sweep's settings as its cells are keyed: ``config`` with ``layer`` and ``head`` where given,
    resolved for the device and the runs' backbone."""
    return (config or EvalConfig()).with_(layer=layer, head=head).resolved(resolve_device(device), _arch(runs))


def _train_probes(cells: Sequence[tuple], by_method: dict, cfg: EvalConfig, device, out, deterministic: bool) -> None:
    """Every probe head the ``(method, protocol, budget, seed)`` cells need, trained together in
    batched groups: fine-tuning and FixMatch start from the mlp probe, label propagation and
    self-training weigh it against the graph."""
    probe_cells_together([(by_method[m], b, s, cfg.head if protocol == "probe" else "mlp")
                          for m, protocol, b, s in cells if protocol != "scratch"], cfg, device, out, deterministic)


def label_curve(pretrained_runs, budgets=BUDGETS, seeds=(0, 1, 2), layer: Optional[str] = None,
                head: Optional[str] = None, protocols=None, scratch: Optional[bool] = None,
                finetune: Optional[bool] = None, device="auto", out=None, config: Optional[EvalConfig] = None,
                name: Optional[str] = None, progress: bool = True, shard: Optional[tuple] = None,
                deterministic: bool = False, batch_probes: bool = True, workers: Optional[int] = None) -> ResultTable:
    """Accuracy against labels per class for each pretrained run, by each protocol.

    ``pretrained_runs``: Runs (or run folders) of one dataset and backbone. ``protocols``: from
    :data:`PROTOCOLS` (default probe and scratch; ``scratch=False`` / ``finetune=True`` say the
    same as leaving scratch out / adding finetune). ``layer`` and ``head`` override ``config``'s.
    Every method is evaluated on the same labeled/validation images for a given budget and
    seed; features are extracted once per run and layer. Writes ``outputs/tables/<name>.csv``
    and ``.json`` and returns the :class:`ResultTable`. ``shard=(i, n)`` computes only every
    n-th cell starting at i. ``batch_probes``: train the probe heads the sweep needs together,
    in batched groups (:func:`probe_cells_together`; the same training as one at a time, to
    rounding), before the cells are read in order. ``workers``: the cells still missing after the
    probes are computed in that many worker processes of one thread each (:mod:`sslab.parallel`;
    default ``SSLAB_WORKERS``, else 1: all here), the longest first.
    """
    if name is not None:
        store.check_file_name("name", name)
    protocols = _protocols(protocols, scratch, finetune)
    runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
    if not runs:
        raise ValueError("label_curve needs at least one pretrained run (scratch is shaped like the first one)")
    datasets = {r.config.dataset for r in runs}
    if len(datasets) > 1:
        raise ValueError(f"pretrained_runs mix datasets ({', '.join(sorted(datasets))}); allowed: runs of one dataset")
    budgets, seeds = check_budgets(budgets), check_seeds(seeds)
    cfg = _resolved(config, layer, head, device, runs)
    by_method = run_names(runs)
    cells = curve_cells(list(by_method), budgets, seeds, protocols)
    if shard is not None:
        index, count = shard
        cells = cells[index::count]
    like = runs[0] if runs else None
    if batch_probes:
        # the probe heads first; the loop below then finds those cells stored
        _train_probes(cells, by_method, cfg, device, out, deterministic)
    workers = default_workers() if workers is None else check_int("workers", workers, 1, maximum=MAX_COUNT)
    if workers > 1:
        _compute_in_workers([(*cell, cfg) for cell in cells], by_method, like, device, out, deterministic, workers)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cells), desc="label curve", unit="cell", leave=False)
    report = Progress(f"{len(cells)} cells", len(cells)) if workers == 1 else None
    for method, protocol, budget, seed in cells:
        if bar is not None:
            bar.set_postfix_str(f"{method} {protocol} k={budget} seed={seed}")
        rows.append(compute_cell(protocol, budget, seed, by_method.get(method, like), cfg, device, out,
                                 deterministic, label=method))
        if bar is not None:
            bar.update(1)
        if report is not None:
            report.done(f"{method} {protocol} k={budget} seed={seed}")
    if bar is not None:
        bar.close()
    table = ResultTable(rows)
    if shard is None:
        stem = name or default_table_name(runs, budgets, seeds, protocols, cfg)
        table.path = table.save(store.outputs_root(out) / "tables" / stem)[0]
    return table


# The order the workers take the missing cells in: the longest first, so the last to finish is short
# (by protocol, and within one the largest budget first: its epochs are longer).
COST_ORDER = ("fixmatch", "selftrain", "finetune", "scratch", "labelprop", "probe")
# Cells of these protocols take a second or two once their run's graph and features are loaded:
# one job computes all of a run's, so each worker process does not load them again.
GROUPED = ("labelprop", "probe")


def compute_cells(cells: Sequence[tuple]) -> list:
    """:func:`compute_cell` of each ``(protocol, budget, seed, run, cfg, device, out, deterministic)``, in order."""
    return [compute_cell(*cell) for cell in cells]


def _compute_in_workers(cells: list, by_method: dict, like: Run, device, out, deterministic: bool,
                        workers: int) -> None:
    """Every missing cell of ``cells`` — ``(method, protocol, budget, seed, resolved settings)`` —
    computed (and stored) by ``workers`` worker processes: each long cell a job of its own, the
    quick ones of a run one job together; the longest first."""
    dev = resolve_device(device)
    missing = [(method, protocol, budget, seed, cfg) for method, protocol, budget, seed, cfg in cells
               if stored_row(cell_key(protocol, budget, seed, by_method.get(method, like), cfg), out) is None]
    missing.sort(key=lambda c: (COST_ORDER.index(c[1]), -c[2]))
    jobs, names, grouped = [], [], {}
    for method, protocol, budget, seed, cfg in missing:
        cell = (protocol, budget, seed, by_method.get(method, like), cfg, dev, out, deterministic)
        if protocol in GROUPED:
            grouped.setdefault(method, []).append(cell)
        else:
            jobs.append((compute_cells, ([cell],), {}))
            names.append(f"{method} {protocol} k={budget} seed={seed}")
    for method, group in grouped.items():
        jobs.append((compute_cells, (group,), {}))
        names.append(f"{method}: {len(group)} quick cells")
    described = {id(job): name for job, name in zip(jobs, names)}
    run_all(jobs, workers, lambda job: described[id(job)], Progress(f"{len(cells)} cells, {workers} workers",
                                                                     len(jobs)))


def compute_sweeps(sweeps: Sequence[tuple], budgets, seeds, layer: Optional[str] = None, head: Optional[str] = None,
                   device="auto", out=None, deterministic: bool = False, workers: Optional[int] = None) -> None:
    """The missing cells of several sweeps at the same budgets and seeds — ``sweeps`` =
    [(pretrained runs, protocols, config)], e.g. one per way of choosing the labeled images, or
    the pretrained runs and the random-init backbone with fewer protocols — computed as
    :func:`label_curve` computes them, each sweep's probe heads trained together here first, then
    the other cells of all the sweeps in one batch of ``workers`` worker processes (default
    ``SSLAB_WORKERS``): one start of the workers, each loads a run's features and graph once, and
    the quick cells fill in while the long ones finish. A :func:`label_curve` per sweep (with the
    same ``layer`` and ``head``) then finds its cells stored. With one worker, nothing is done here
    (each label_curve computes its own)."""
    workers = default_workers() if workers is None else check_int("workers", workers, 1, maximum=MAX_COUNT)
    if workers <= 1:
        return
    budgets, seeds = check_budgets(budgets), check_seeds(seeds)
    cells, by_method, like = [], {}, None
    for pretrained_runs, protocols, config in sweeps:
        runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
        cfg = _resolved(config, layer, head, device, runs)
        names = run_names(runs)
        sweep = curve_cells(list(names), budgets, seeds, _protocols(protocols, None, None))
        _train_probes(sweep, names, cfg, device, out, deterministic)
        by_method.update(names)
        like = like or runs[0]
        cells += [(*cell, cfg) for cell in sweep]
    _compute_in_workers(cells, by_method, like, device, out, deterministic, workers)


def default_table_name(runs, budgets, seeds, protocols=DEFAULT_PROTOCOLS, config: Optional[EvalConfig] = None) -> str:
    """``curve-<dataset>-<layer>-<head>[-<other protocols>]-<8 hex>``: the hash of the pretraining
    runs, the budgets, seeds and protocols and the evaluation settings, so two different sweeps
    never write over each other's table (and the same sweep, run again, rewrites its own)."""
    config = config or EvalConfig()
    dataset = runs[0].config.dataset if runs else "fashion-mnist"
    digest = store.config_hash({"runs": sorted(r.path.name for r in runs), "budgets": sorted(budgets),
                                "seeds": sorted(seeds), "protocols": list(protocols),
                                "settings": asdict(config)})[:8]
    extra = "".join(f"-{p}" for p in protocols if p not in DEFAULT_PROTOCOLS)
    return f"curve-{store.slug(dataset)}-{config.layer}-{config.head}{extra}-{digest}"


def merge_curve(pretrained_runs, budgets=BUDGETS, seeds=(0, 1, 2), layer: Optional[str] = None,
                head: Optional[str] = None, protocols=None, scratch: Optional[bool] = None,
                finetune: Optional[bool] = None, out=None, config: Optional[EvalConfig] = None,
                name: Optional[str] = None, device="auto"):
    """Collect a sweep computed by shards: ``(table, missing)`` where ``missing`` lists the cells
    not computed yet. The table is written only when nothing is missing. ``device`` resolves a
    precision of ``auto`` as the shards did on theirs (give the shards' precision explicitly when
    merging on another kind of machine)."""
    if name is not None:
        store.check_file_name("name", name)
    protocols = _protocols(protocols, scratch, finetune)
    runs = [r if isinstance(r, Run) else load_run(r) for r in pretrained_runs]
    cfg = _resolved(config, layer, head, device, runs)
    by_method = run_names(runs)
    like = runs[0] if runs else None
    budgets, seeds = check_budgets(budgets), check_seeds(seeds)
    rows, missing = [], []
    for method, protocol, budget, seed in curve_cells(list(by_method), budgets, seeds, protocols):
        cached = stored_row(cell_key(protocol, budget, seed, by_method.get(method, like), cfg), out)
        if cached is None:
            missing.append(f"{method} {protocol} labels={budget} seed={seed}")
        else:
            rows.append(labelled(cached, method))
    table = ResultTable(rows)
    if not missing:
        stem = name or default_table_name(runs, budgets, seeds, protocols, cfg)
        table.path = table.save(store.outputs_root(out) / "tables" / stem)[0]
    return table, missing
