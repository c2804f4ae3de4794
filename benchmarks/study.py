"""Study timing: the whole study — pretraining per method, feature extraction, probes, scratch
baselines, fine-tuning, UMAP — phase by phase, in a fresh outputs folder so nothing is reused
from the run store. UMAP is timed only where umap-learn is installed."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from sslab import evaluate
from sslab.data import load_dataset
from sslab.pretext import TASKS, check_method
from sslab.pretrain import PretrainConfig, pretrain
from sslab.train import resolve_device

from .step import synchronize


@dataclass
class StudyConfig:
    """The study whose wall time ``--study`` measures. Defaults = the full Fashion-MNIST
    study: three tasks × 30 epochs on all 60k images, 7 budgets × 3 seeds of probe and scratch
    baseline, fine-tuning, UMAP of 2000 test points. ``eval`` overrides fields of
    :class:`sslab.evaluate.EvalConfig`."""

    methods: tuple = tuple(TASKS)
    dataset: str = "fashion-mnist"
    epochs: int = 30
    limit: Optional[int] = None
    batch_size: Optional[int] = None
    width: Optional[float] = None
    budgets: tuple = (1, 2, 4, 8, 16, 32, 64)
    seeds: tuple = (0, 1, 2)
    layer: str = "conv4"
    scratch: bool = True
    finetune: bool = True
    umap_points: int = 2000
    data_root: Optional[str] = None
    eval: dict = field(default_factory=dict)
    probes_alone: bool = True  # also time the probe sweep one head at a time, for comparison


def quick_study(**changes) -> StudyConfig:
    """A small study for 2 CPU cores: 1 epoch on 2000 images, three budgets, one seed, shorter
    end-to-end trainings."""
    base = StudyConfig(epochs=1, limit=2000, budgets=(1, 8, 64), seeds=(0,), umap_points=1000,
                       eval={"scratch_epochs": 10, "finetune_epochs": 5})
    return replace(base, **changes)


@dataclass
class PhaseRow:
    phase: str
    count: int
    seconds: float
    detail: str = ""


class _Phase:
    """Wall time of a block, the device synchronised at both ends."""

    def __init__(self, rows: list, device: torch.device, phase: str, progress: bool):
        self.rows, self.device, self.phase, self.progress = rows, device, phase, progress
        self.count, self.detail = 0, ""

    def __enter__(self):
        synchronize(self.device)
        if self.progress:
            print(f"  {self.phase} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, kind, value, traceback):
        synchronize(self.device)
        if kind is None:
            self.rows.append(PhaseRow(self.phase, self.count, time.perf_counter() - self.t0, self.detail))
            if self.progress:  # as it happens, so a study stopped by a time limit still shows its phases
                print(f"  {self.phase}: {self.rows[-1].seconds:.1f} s  {self.detail}", file=sys.stderr, flush=True)
        elif kind is KeyboardInterrupt:
            self.rows.append(PhaseRow(f"{self.phase} (stopped)", self.count, time.perf_counter() - self.t0,
                                      f"interrupted here after {self.count} done; {self.detail}".rstrip("; ")))
        return False


class StudyInterrupted(KeyboardInterrupt):
    """The study was interrupted (Ctrl-C, a time limit's SIGINT); ``rows`` holds the phases that
    finished, the one that was stopped, and the total so far."""

    def __init__(self, rows: list):
        super().__init__("study interrupted")
        self.rows = rows


def time_study(config: StudyConfig, device="auto", out: Optional[str] = None, progress: bool = True) -> list:
    """Run the whole study in a fresh outputs folder (a temporary one unless ``out`` is given) and
    return one :class:`PhaseRow` per phase, then ``total``. Interrupted (Ctrl-C, SIGINT), it
    raises :class:`StudyInterrupted` with the rows so far."""
    dev = resolve_device(device)
    for method in config.methods:
        check_method(method)
    cfg = replace(evaluate.EvalConfig(layer=config.layer), **config.eval).validate()
    budgets, seeds = evaluate.check_budgets(list(config.budgets)), evaluate.check_seeds(list(config.seeds))
    scratch_folder = None
    if out is None:
        scratch_folder = tempfile.mkdtemp(prefix="sslab-bench-study-")
        out = scratch_folder
    elif any(Path(out).iterdir() if Path(out).is_dir() else ()):
        raise ValueError(f"out={out!r} is not empty; allowed: a new or empty folder, so no result is reused "
                         f"from an earlier run")
    rows: list = []
    started = time.perf_counter()
    try:
        with _Phase(rows, dev, "load data", progress) as phase:
            splits = load_dataset(config.dataset, config.data_root)
            phase.count = len(splits.train) + len(splits.test)
            phase.detail = f"{config.dataset}: {len(splits.train)} train, {len(splits.test)} test images"
        runs = []
        for method in config.methods:
            with _Phase(rows, dev, f"pretrain {method}", progress) as phase:
                settings = {} if config.batch_size is None else {"batch_size": config.batch_size}
                pre = PretrainConfig(method=method, dataset=config.dataset, epochs=config.epochs, limit=config.limit,
                                     width=config.width, data_root=config.data_root, settings=settings)
                run = pretrain(pre, device=dev, out=out, progress=False)
                runs.append(run)
                phase.count = run.summary["epochs_run"]
                seen = run.summary["images"] * run.summary["epochs_run"]
                fit_s = run.summary["train_seconds"]
                phase.detail = (f"{run.summary['images']} images × {run.summary['epochs_run']} epochs: {fit_s:.1f} s "
                                f"in fit ({seen / max(fit_s, 1e-9):.0f} images/s), the rest setup + test-set "
                                f"pretext evaluation")
        with _Phase(rows, dev, "features", progress) as phase:
            for run in runs:
                for split in ("train", "test"):
                    phase.count += len(evaluate.cached_features(run, split, cfg.layer, cfg.grid, dev))
            phase.detail = f"{cfg.layer} pooled {cfg.grid}×{cfg.grid}, train + test, {len(runs)} nets"
        cells = [(run, budget, seed) for budget in budgets for seed in seeds for run in runs]
        sweep = f"{cfg.head} head, {len(budgets)} budgets × {len(seeds)} seeds × {len(runs)} methods"
        phases = [("probes", out, True, "heads trained together")]
        if config.probes_alone:  # fresh cells in their own store: nothing reused from the phase above
            phases.append(("probes one at a time", str(Path(out) / "probes-alone"), False,
                           "the same cells each trained alone (for comparison; not in a sweep)"))
        for name, store_at, together, how in phases:
            with _Phase(rows, dev, name, progress) as phase:
                if together:  # as label_curve runs them: heads trained in batched groups, then read back
                    evaluate.probe_cells_together([(*cell, cfg.head) for cell in cells], cfg, dev, store_at)
                for run, budget, seed in cells:
                    evaluate.probe_cell(run, budget, seed, cfg.layer, cfg.head, dev, store_at, cfg)
                    phase.count += 1
                phase.detail = f"{sweep}, {how}"
        if config.scratch:
            with _Phase(rows, dev, "scratch", progress) as phase:
                for budget in budgets:
                    for seed in seeds:
                        evaluate.scratch_cell(runs[0], budget, seed, layer=cfg.layer, device=dev, out=out, config=cfg)
                        phase.count += 1
                phase.detail = f"{len(budgets)} budgets × {len(seeds)} seeds, up to {cfg.scratch_epochs} epochs"
        if config.finetune:
            with _Phase(rows, dev, "finetune", progress) as phase:
                for budget in budgets:
                    for seed in seeds:
                        for run in runs:
                            evaluate.finetune_cell(run, budget, seed, cfg.layer, dev, out, cfg)
                            phase.count += 1
                phase.detail = f"up to {cfg.finetune_epochs} epochs per cell"
        if config.umap_points:
            rows.extend(_time_umap(runs, splits, cfg, dev, config.umap_points, progress))
    except KeyboardInterrupt:
        rows.append(_total_row(rows, started, "up to the interruption"))
        raise StudyInterrupted(rows) from None
    finally:
        if scratch_folder is not None:
            shutil.rmtree(scratch_folder, ignore_errors=True)
    rows.append(_total_row(rows, started))
    return rows


def _total_row(rows: list, started: float, until: str = "") -> PhaseRow:
    comparison = sum(r.seconds for r in rows if r.phase == "probes one at a time")
    detail = "wall time of everything above" + (" but the one-at-a-time comparison" if comparison else "")
    return PhaseRow("total", 0, time.perf_counter() - started - comparison, f"{detail} {until}".rstrip())


def _time_umap(runs, splits, cfg, dev, points: int, progress: bool) -> list:
    try:
        import umap  # noqa: F401
    except ImportError:
        return [PhaseRow("umap", 0, 0.0, "skipped: umap-learn is not installed")]
    from sslab.embed import stratified_sample, umap_2d
    rows: list = []
    with _Phase(rows, dev, "umap", progress) as phase:
        index = torch.from_numpy(stratified_sample(splits.test.labels, points))
        for run in runs:
            umap_2d(evaluate.cached_features(run, "test", cfg.layer, cfg.grid, dev, index=index))
            phase.count += 1
        phase.detail = f"{len(index)} test points per method"
    return rows


STUDY_KEYS = {f.name for f in fields(StudyConfig)} - {"eval"}
# The notebooks' parameter names (params/*.yml) where they differ from StudyConfig's.
PARAM_ALIASES = {"points": "umap_points"}


def study_from_params(params: dict, base: StudyConfig) -> tuple:
    """Parameters → (StudyConfig, ignored keys). Keys named like :class:`StudyConfig` fields set
    them (``methods`` may be a comma-separated string; the notebooks' ``points`` is
    ``umap_points``); keys named like EvalConfig fields (``probe``, ``layer`` …) go to ``eval``;
    anything else (``labels``, ``examples``, ``device`` …) is reported back as ignored."""
    eval_keys = {f.name for f in fields(evaluate.EvalConfig)}
    changes, evals, ignored = {}, dict(base.eval), []
    for key, value in params.items():
        key = PARAM_ALIASES.get(key, key)
        if key in STUDY_KEYS:
            if key in ("methods", "budgets", "seeds") and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                value = value if key == "methods" else [int(v) for v in value]
            if key in ("methods", "budgets", "seeds") and isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            changes[key] = tuple(value) if isinstance(value, list) else value
        elif key in eval_keys:
            evals[key] = value
        else:
            ignored.append(key)
    return replace(base, **changes, eval=evals), ignored


def format_study(rows: Sequence[PhaseRow]) -> str:
    width = max([22] + [len(r.phase) for r in rows])
    lines = [f"{'phase':<{width}} {'count':>6} {'seconds':>9}  detail", "-" * (width + 50)]
    for r in rows:
        count = "" if r.phase == "total" else r.count
        lines.append(f"{r.phase:<{width}} {count:>6} {r.seconds:>9.1f}  {r.detail}")
    return "\n".join(lines)


