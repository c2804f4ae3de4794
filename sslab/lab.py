"""The notebooks' side of sslab, and ``python -m sslab.lab`` (``make lab``).

The five notebooks in ``notebooks/`` stay short because everything they do lives here:
checking their parameters (:func:`check_notebook_params`), deriving the one
:class:`~sslab.pretrain.PretrainConfig` per method that every notebook shares (so 02–05
find the runs 01 trained, by the hash of the same config), the small computations behind
the figures, tables as pandas frames, and the ipywidgets explorers. ``main`` runs the five
notebooks in order with papermill and prints the headline table.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import store
from .data import check_dataset_name, load_dataset
from .embed import SCORES as SCORE_FUNCTIONS
from .evaluate import PROBES
from .models import LAYERS, check_layer
from .pretext import TASKS, check_method
from .pretrain import PretrainConfig, Run, describe, pretrain
from .train import make_deterministic, resolve_device

NOTEBOOKS = ("01_pretext", "02_probe", "03_latent_umap", "04_label_curves", "05_finetune")
SCORES = tuple(SCORE_FUNCTIONS)
# Table names under outputs/tables/ written by the notebooks (the last run of each wins).
TABLES = {"02_probe": "nb02_probe", "04_label_curves": "nb04_label_curves", "05_finetune": "nb05_finetune"}


# ---------------------------------------------------------------- parameters

def _fail(name: str, value, allowed: str):
    raise ValueError(f"parameter {name}={value!r} is not allowed; allowed: {allowed}")


def _check_int(name: str, value, minimum: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        _fail(name, value, f"an integer ≥ {minimum}{what}")
    return int(value)


def _string_items(value: str) -> list:
    """The items of a list written as text: '1,4,16' (the command line's way) or '[1, 4, 16]'
    (papermill's ``-p`` hands a list written that way to the notebook as a string)."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [v.strip().strip("'\"") for v in text.split(",") if v.strip()]


def _check_int_list(name: str, value, minimum: int, what: str) -> tuple:
    """A list of integers; one integer or a string ('1,4,16' as the command line writes it, or
    '[1, 4, 16]') is accepted too."""
    items = value
    if isinstance(value, str):
        try:
            items = [int(v) for v in _string_items(value)]
        except ValueError:
            _fail(name, value, f"a list of integers ≥ {minimum}{what}, e.g. [1, 4, 16] or '1,4,16'")
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, (list, tuple)) or not items or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in items):
        _fail(name, value, f"a non-empty list of integers ≥ {minimum}{what}, e.g. [1, 4, 16]")
    if len(set(items)) != len(items):
        _fail(name, value, "a list without repeated values")
    return tuple(sorted(int(v) for v in items))


def _check_methods(value) -> tuple:
    items = _string_items(value) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(m, str) for m in items):
        _fail("methods", value, f"a non-empty list of pretext tasks from: {', '.join(TASKS)}")
    for m in items:
        if m not in TASKS:
            _fail("methods", value, f"pretext tasks from: {', '.join(TASKS)} ({m!r} is not one)")
    if len(set(items)) != len(items):
        _fail("methods", value, "a list without repeated methods")
    return tuple(items)


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        _fail(name, value, ", ".join(choices))
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")
    return value


def _check_limit(value) -> Optional[int]:
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == 0):
        return None
    return _check_int("limit", value, 2, " (unlabeled images used for pretraining), or None for all")


def _check_dataset(value) -> str:
    try:
        return check_dataset_name(value)
    except ValueError:
        _fail("dataset", value, "fashion-mnist, cifar10, stl10 or folder:PATH")


def _check_device(value) -> torch.device:
    if not isinstance(value, str):
        _fail("device", value, "auto, cpu, cuda or cuda:N")
    try:
        return resolve_device(value)
    except ValueError as exc:
        raise ValueError(f"parameter device={value!r} is not allowed: {exc}") from None


def _check_out(value) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        _fail("out", value, "None (the repository's outputs/, or $SSLAB_OUTPUTS) or a folder path")
    return value or None


# name → checker; the notebooks' parameter cells use these names and nothing else.
CHECKS = {
    "dataset": _check_dataset,
    "methods": _check_methods,
    "epochs": lambda v: _check_int("epochs", v, 1, " (pretraining epochs)"),
    "limit": _check_limit,
    "device": _check_device,
    "interactive": lambda v: _check_bool("interactive", v),
    "labels": lambda v: _check_int("labels", v, 1, " (labeled images per class)"),
    "budgets": lambda v: _check_int_list("budgets", v, 1, " (labeled images per class)"),
    "seeds": lambda v: _check_int_list("seeds", v, 0, ""),
    "layer": lambda v: _check_choice("layer", v, LAYERS),
    "probe": lambda v: _check_choice("probe", v, PROBES),
    "points": lambda v: _check_int("points", v, 20, " (test images in each UMAP)"),
    "vae_latent": lambda v: _check_bool("vae_latent", v),
    "score": lambda v: _check_choice("score", v, SCORES),
    "examples": lambda v: _check_int("examples", v, 1, " (images per gallery)"),
    "out": _check_out,
    "deterministic": lambda v: _check_bool("deterministic", v),
}


@dataclass
class LabSettings:
    """A notebook's checked parameters and what follows from them."""

    dataset: str = "fashion-mnist"
    methods: tuple = tuple(TASKS)
    epochs: int = 3
    limit: Optional[int] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    interactive: bool = True
    labels: Optional[int] = None
    budgets: tuple = ()
    seeds: tuple = (0,)
    layer: str = "conv4"
    probe: str = "mlp"
    points: int = 2000
    vae_latent: bool = True
    score: str = "knn"
    examples: int = 8
    out: Optional[str] = None
    deterministic: bool = False
    given: tuple = ()  # the parameter names the notebook set (what frame() shows)

    def pretrain_config(self, method: str) -> PretrainConfig:
        """The one pretraining config of ``method`` that every notebook (and
        ``python -m sslab curve --pretrain-epochs E --limit L``) derives from the same parameters."""
        return PretrainConfig(method=check_method(method), dataset=self.dataset, epochs=self.epochs, limit=self.limit)

    def eval_config(self):
        from .evaluate import EvalConfig
        return EvalConfig(layer=self.layer, probe=self.probe)

    @property
    def splits(self):
        return load_dataset(self.dataset)

    def frame(self):
        """The notebook's parameters as checked, and the pretraining config they give (what
        produced this notebook's outputs), as a one-column table."""
        import pandas as pd
        names = self.given or [f for f in asdict(self) if f != "given"]
        values = {}
        for name in names:
            value = getattr(self, name)
            values[name] = ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        values["device"] = str(self.device)
        config = self.pretrain_config(self.methods[0]).resolved(self.device)
        values["pretraining images × epochs"] = f"{config.limit or 'all'} × {config.epochs}"
        values["backbone width"] = f"{config.width:g}"
        return pd.DataFrame({"value": values})


def check_notebook_params(**params) -> LabSettings:
    """Check a notebook's parameters (as papermill or a person set them) and return the
    :class:`LabSettings`. A bad value raises ``ValueError`` naming the parameter, the value and
    what is allowed — e.g. ``-p labels abc`` or an unknown method."""
    unknown = sorted(set(params) - set(CHECKS))
    if unknown:
        raise TypeError(f"unknown notebook parameter(s): {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    checked = {name: CHECKS[name](value) for name, value in params.items()}
    settings = LabSettings(**checked, given=tuple(params))
    if "device" not in params:
        settings.device = resolve_device("auto")
    if settings.deterministic:
        make_deterministic()  # process-wide: feature extraction and the UMAP inputs repeat too
    return settings


# ---------------------------------------------------------------- runs

def dataset_summary(settings: LabSettings) -> str:
    """One line per split: what the dataset is (the same whatever the other parameters)."""
    s = settings.splits
    kind = "grey" if s.train.channels == 1 else "colour"
    counts = torch.bincount(s.train.labels[s.train.labels >= 0]).tolist()
    return (f"{s.name}: {len(s.train)} labeled train images ({min(counts)}–{max(counts)} per class), "
            f"{len(s.test)} test images, {len(s.unlabeled)} unlabeled for pretraining; "
            f"{s.train.num_classes} classes, {s.train.image_size}×{s.train.image_size} px, {kind}\n"
            f"classes: {', '.join(s.train.classes)}")


def pretrain_runs(settings: LabSettings, progress: bool = False, announce=print) -> dict:
    """Pretrain every method in ``settings.methods`` unless the run store already holds the same
    config (then it is reused); returns ``{method: Run}`` and says which happened."""
    runs = {}
    for method in settings.methods:
        config = settings.pretrain_config(method)
        resolved = config.resolved(settings.device)
        folder = store.run_dir("pretrain", method, config.dataset, asdict(resolved), settings.out)
        reused = store.is_complete(folder)
        started = time.perf_counter()
        run = pretrain(config, device=settings.device, out=settings.out, progress=progress,
                       deterministic=settings.deterministic)
        if announce:
            how = "reused" if reused else f"trained now in {time.perf_counter() - started:.0f} s"
            announce(f"{how}: {run.path.name} — {describe(run)}")
        runs[method] = run
    return runs


def _class_examples(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` test-image indices, one per class first (class order), seeded."""
    from .embed import stratified_sample
    return torch.from_numpy(stratified_sample(labels, n, seed, sort=False, name="examples"))


@torch.no_grad()
def rotation_predictions(run: Run, settings: LabSettings, n: Optional[int] = None, seed: int = 0) -> dict:
    """Test images (one per class first) shown at 0/90/180/270° with the rotation the
    pretrained net predicts: ``images`` N×4×C×H×W (float, [0, 1]), ``predicted`` N×4 (0-3),
    ``confidence`` N×4 (softmax probability of the prediction)."""
    from .augment import rotate4, to_float
    if run.method != "rotation":
        raise ValueError(f"run={run.path.name!r} is a {run.method} run; rotation examples need a rotation run")
    n = n or settings.examples
    test = settings.splits.test
    index = _class_examples(test.labels, n, seed)
    task = run.load_task(settings.device)
    x = to_float(test.images[index].to(settings.device))
    rotated, _ = rotate4(x)
    probs = torch.softmax(task.logits(rotated).float(), dim=1).cpu()
    predicted = probs.argmax(1)
    confidence = probs.max(1).values
    k = len(index)
    images = rotated.cpu().reshape(4, k, *x.shape[1:]).transpose(0, 1)
    return {"images": images.numpy(), "predicted": predicted.reshape(4, k).T.numpy(),
            "confidence": confidence.reshape(4, k).T.numpy()}


@torch.no_grad()
def vae_gallery(runs: dict, settings: LabSettings, n: Optional[int] = None, seed: int = 0) -> dict:
    """For every VAE-type run: reconstructions of the same test images (decoded latent means)
    and images decoded from ``n`` draws of the prior N(0, I) (seeded)."""
    from .augment import to_float
    n = n or settings.examples
    test = settings.splits.test
    index = _class_examples(test.labels, n, seed)
    x = to_float(test.images[index].to(settings.device))
    gallery = {"inputs": x.cpu().numpy(), "reconstructions": {}, "samples": {}}
    generator = torch.Generator().manual_seed(seed)
    for method, run in runs.items():
        task = run.load_task(settings.device)
        if not hasattr(task, "decode"):
            continue
        mu, _ = task.encode(x)
        gallery["reconstructions"][method] = task.decode(mu).float().cpu().numpy()
        z = torch.randn(n, task.latent, generator=generator).to(settings.device)
        gallery["samples"][method] = task.decode(z).float().cpu().numpy()
    if not gallery["reconstructions"]:
        raise ValueError(f"methods={list(runs)!r} has no VAE; reconstructions need vae or siamese-vae")
    return gallery


def pretext_sentence(runs: dict) -> str:
    """One sentence on what each pretext task reached on held-out test images."""
    parts = []
    for method, run in runs.items():
        s = run.summary
        if "test_rot_acc" in s:
            parts.append(f"{method} predicts {100 * s['test_rot_acc']:.1f}% of test rotations (chance 25%)")
        elif "test_recon" in s:
            text = f"{method} reconstructs test images with {s['test_recon']:.1f} summed squared error per image"
            if "test_triplet" in s:
                text += f" (triplet loss {s['test_triplet']:.3f}, margin 0.5)"
            parts.append(text)
    epochs = {run.summary.get("epochs_run") for run in runs.values()}
    images = {run.summary.get("images") for run in runs.values()}
    return (f"After {'/'.join(map(str, sorted(epochs)))} epoch(s) on {'/'.join(map(str, sorted(images)))} unlabeled "
            f"images: " + "; ".join(parts) + ".")


@torch.no_grad()
def rotation_accuracy_by_class(run: Run, settings: LabSettings, n: int = 2000) -> dict:
    """Class name → fraction of the 4 rotations predicted right, on ``n`` test images (stratified)."""
    from .augment import rotate4, to_float
    from .embed import stratified_sample
    test = settings.splits.test
    index = torch.from_numpy(stratified_sample(test.labels, n, seed=0))
    task = run.load_task(settings.device)
    right = torch.zeros(test.num_classes)
    total = torch.zeros(test.num_classes)
    for chunk in index.split(500):
        rotated, target = rotate4(to_float(test.images[chunk].to(settings.device)))
        ok = (task.logits(rotated).argmax(1) == target).float().cpu()
        classes = test.labels[chunk].repeat(4)
        right.index_add_(0, classes, ok)
        total.index_add_(0, classes, torch.ones_like(ok))
    return {name: float(right[i] / total[i]) for i, name in enumerate(test.classes) if total[i] > 0}


def rotation_sentence(run: Run, settings: LabSettings) -> str:
    accuracy = rotation_accuracy_by_class(run, settings)
    ranked = sorted(accuracy.items(), key=lambda kv: kv[1])
    (hard, hard_acc), (easy, easy_acc) = ranked[0], ranked[-1]
    return (f"On 2000 test images, rotation is hardest to predict for {hard} ({100 * hard_acc:.0f}% right) and "
            f"easiest for {easy} ({100 * easy_acc:.0f}%).")


def vae_sentence(runs: dict) -> str:
    parts = [f"{m} {r.summary['test_recon']:.1f}" for m, r in runs.items() if "test_recon" in r.summary]
    return ("Test reconstruction error (summed squared error per image, lower is closer to the input): "
            + ", ".join(parts) + ".")


# ---------------------------------------------------------------- results

def evaluate_budgets(runs: dict, settings: LabSettings, budgets=None, scratch: bool = True,
                     finetune: bool = False, name: Optional[str] = None):
    """The label-budget sweep of ``runs`` at ``budgets`` (default ``settings.budgets``) × ``settings.seeds``
    through the run store (cells already computed are reused); returns the ResultTable."""
    from .evaluate import label_curve
    budgets = budgets if budgets is not None else settings.budgets
    return label_curve(list(runs.values()), budgets=list(budgets), seeds=list(settings.seeds),
                       layer=settings.layer, probe=settings.probe, scratch=scratch, finetune=finetune,
                       device=settings.device, out=settings.out, config=settings.eval_config(), name=name,
                       progress=False, deterministic=settings.deterministic)


def _pm(mean, std, n: int = 2) -> str:
    """``mean ± std`` in %; a single seed has no spread to show."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def series_name(method: str, protocol: str) -> str:
    """How a (method, protocol) series is named in tables and legends: ``rotation``,
    ``rotation (finetune)``, ``scratch``."""
    return method if protocol in ("probe", "scratch") else f"{method} ({protocol})"


def results_frame(table, budget: Optional[int] = None):
    """Mean ± std over seeds (in %) per method and protocol, one row per budget: columns
    method, protocol, labels per class, seeds, top-1 %, top-5 %."""
    import pandas as pd
    rows = [{"method": e["method"], "protocol": e["protocol"], "labels per class": e["budget"], "seeds": e["n"],
             "top-1 %": _pm(e["top1_mean"], e["top1_std"], e["n"]),
             "top-5 %": _pm(e["top5_mean"], e["top5_std"], e["n"])}
            for e in table.summary() if budget is None or e["budget"] == budget]
    order = {name: i for i, name in enumerate(_series_order(table))}
    rows.sort(key=lambda r: (r["labels per class"], order[series_name(r["method"], r["protocol"])]))
    return pd.DataFrame(rows)


def pivot_frame(table, metric: str = "top1"):
    """Methods × budgets, mean ± std over seeds in %, with the scratch row last."""
    import pandas as pd
    cells: dict = {}
    for e in table.summary():
        cells.setdefault(series_name(e["method"], e["protocol"]), {})[e["budget"]] = _pm(e[f"{metric}_mean"],
                                                                                       e[f"{metric}_std"], e["n"])
    frame = pd.DataFrame(cells).T.loc[_series_order(table)]
    frame = frame[sorted(frame.columns)]
    frame.columns = [f"{b}" for b in frame.columns]
    frame.columns.name = "labels per class →"
    return frame


def _series_order(table) -> list:
    """Series in the order the sweep computed them (methods as given, scratch last)."""
    names = list(dict.fromkeys(series_name(r["method"], r["protocol"]) for r in table.rows))
    return [n for n in names if n != "scratch"] + [n for n in names if n == "scratch"]


def gain_frame(table, metric: str = "top1"):
    """Paired gain over scratch (percentage points, mean ± std over seeds, and seeds won) per
    method × budget."""
    import pandas as pd
    cells: dict = {}
    for g in table.paired_gain(metric):
        cells.setdefault(series_name(g["method"], g["protocol"]), {})[g["budget"]] = (
            f"{100 * g[f'gain_{metric}_mean']:+.1f}"
            + (f" ± {100 * g[f'gain_{metric}_std']:.1f}" if g["n"] > 1 else "") + f" ({g['wins']}/{g['n']})")
    frame = pd.DataFrame(cells).T
    if len(frame):
        frame = frame.loc[[n for n in _series_order(table) if n in frame.index]]
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
    text = (f"At {budget} labeled image{'s' if budget != 1 else ''} per class the best is {series_name(method, protocol)} "
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


# ---------------------------------------------------------------- embeddings

@torch.no_grad()
def embeddings(runs: dict, settings: LabSettings, layer: Optional[str] = None, random_init: bool = True) -> list:
    """UMAP panels of ``settings.points`` test images (stratified, seeded): each run's pooled
    ``layer`` features (what the probe sees), VAE runs in their latent mean μ when
    ``settings.vae_latent``, and — as the reference that shows what the architecture alone
    gives — the same backbone with random weights."""
    from .embed import embed, stratified_sample
    from .evaluate import extract_features
    from .models import AlexNetBackbone, BackboneConfig
    from .augment import to_float
    layer = check_layer(layer or settings.layer)
    test = settings.splits.test
    index = torch.from_numpy(stratified_sample(test.labels, settings.points, seed=0))
    images, labels = test.images[index], test.labels[index]
    grid = settings.eval_config().grid
    panels = []
    for method, run in runs.items():
        task = run.load_task(settings.device)
        if settings.vae_latent and hasattr(task, "encode"):
            feats = torch.cat([task.encode(to_float(c.to(settings.device)))[0].float().cpu()
                               for c in images.split(1024)])
            space = "latent μ"
        else:
            feats = extract_features(task.backbone, images, layer, grid, settings.device).cpu()
            space = f"{layer} ({grid}×{grid} pooled)"
        panels.append(embed(method, feats, labels, space, test.classes, settings.score))
    if random_init and runs:
        like = next(iter(runs.values()))
        torch.manual_seed(0)
        backbone = AlexNetBackbone(BackboneConfig(**like.summary["backbone"])).to(settings.device)
        feats = extract_features(backbone, images, layer, grid, settings.device).cpu()
        panels.append(embed("random init", feats, labels, f"{layer} ({grid}×{grid} pooled)", test.classes,
                            settings.score))
    return panels


def separation_sentence(panels: list) -> str:
    ranked = sorted(panels, key=lambda e: e.score, reverse=True)
    text = ", ".join(f"{e.name} ({e.score_label})" for e in ranked)
    return f"Classes separate best in {ranked[0].name}'s space: {text}."


# ---------------------------------------------------------------- figures in notebooks

def show(fig, name: str, out: Optional[str] = None) -> None:
    """Save ``fig`` (a Figure, or Axes drawn into one) as outputs/figures/<name>.png and .pdf,
    display it once, and close it."""
    from .plots import save_figure
    fig = getattr(fig, "figure", fig)
    save_figure(fig, name, out)
    try:
        from IPython.display import display
        display(fig)
    except ImportError:  # plain Python: the files are the output
        pass
    import matplotlib.pyplot as plt
    plt.close(fig)


# ---------------------------------------------------------------- widgets (JupyterLab)

# The explorers redraw into an Image widget (and an HTML widget for tables) instead of
# capturing output in an Output widget: Output-widget capture can leave papermill/nbclient
# waiting forever for a cell to finish (nteract/papermill#723), and batch runs must not hang.

def _explorer(draw, controls: dict):
    """``controls`` above a table and a figure that ``draw(**values)`` refills on every change.
    ``draw`` returns a Figure, ``(html, Figure)`` or None (nothing to show)."""
    import ipywidgets as widgets
    html, image = widgets.HTML(), widgets.Image(format="png")

    def update(change=None):
        result = draw(**{name: control.value for name, control in controls.items()})
        table, fig = result if isinstance(result, tuple) else ("", result)
        html.value = table
        image.value = _png(fig) if fig is not None else b""
        image.layout.display = None if fig is not None else "none"

    for control in controls.values():
        control.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox(list(controls.values())), html, image])


def _png(fig, dpi: int = 90) -> bytes:
    """A figure as PNG bytes; the figure is closed so the inline backend does not show it again."""
    import io
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def confusion_explorer(table):
    """Pick a method (and protocol) and a seed-summed confusion matrix and per-class bars redraw."""
    import ipywidgets as widgets
    from . import plots
    series = list(dict.fromkeys((r["method"], r["protocol"]) for r in table.rows))
    classes = table.rows[0]["classes"]
    choice = widgets.Dropdown(options=[(series_name(m, p), (m, p)) for m, p in series], description="method")

    def draw(pick):
        method, protocol = pick
        rows = [r for r in table.rows if (r["method"], r["protocol"]) == (method, protocol)]
        return plots.confusion(confusion_of(table, method, protocol), classes, f"{series_name(method, protocol)}: "
                               f"{rows[0]['budget']} labels/class, {len(rows)} seed(s)")
    return _explorer(draw, {"pick": choice})


def curve_explorer(table):
    """Metric, protocols and methods to show; the label curves redraw from the computed table."""
    import ipywidgets as widgets
    from . import plots
    protocols = list(dict.fromkeys(r["protocol"] for r in table.rows))
    methods = list(dict.fromkeys(r["method"] for r in table.rows if r["protocol"] != "scratch"))
    controls = {
        "metric": widgets.ToggleButtons(options=[("top-1", "top1"), ("top-5", "top5")], description="metric"),
        "protocols": widgets.SelectMultiple(options=protocols, value=tuple(protocols), description="protocol"),
        "methods": widgets.SelectMultiple(options=methods, value=tuple(methods), description="method"),
    }

    def draw(metric, protocols, methods):
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        plots.plot_label_curves(table, metric, ax, protocols=set(protocols), methods=set(methods))
        return fig
    return _explorer(draw, controls)


def budget_explorer(table):
    """A budget slider: the table and accuracy bars of that budget."""
    import ipywidgets as widgets
    from . import plots
    budgets = sorted({r["budget"] for r in table.rows})
    slider = widgets.SelectionSlider(options=budgets, value=budgets[0], description="labels/class")

    def draw(budget):
        return (results_frame(table, budget).to_html(index=False),
                plots.accuracy_bars([r for r in table.rows if r["budget"] == budget],
                                    title=f"{budget} labeled images per class"))
    return _explorer(draw, {"budget": slider})


def umap_explorer(runs: dict, settings: LabSettings, panels: list):
    """Pick the layer (computed on first use, then kept) and which panels to show."""
    import ipywidgets as widgets
    from . import plots
    cache = {settings.layer: panels}
    classes = settings.splits.test.classes
    layer = widgets.Dropdown(options=list(LAYERS), value=settings.layer, description="layer")
    names = [e.name for e in panels]
    shown = widgets.SelectMultiple(options=names, value=tuple(names), description="panels")

    def draw(layer, shown):
        if layer not in cache:
            cache[layer] = embeddings(runs, settings, layer)
        chosen = [e for e in cache[layer] if e.name in shown]
        return plots.umap_panels(chosen, classes) if chosen else None
    return _explorer(draw, {"layer": layer, "shown": shown})


# ---------------------------------------------------------------- make lab

def notebooks_dir() -> Path:
    root = store.repo_root()
    if root is None or not (root / "notebooks").is_dir():
        raise FileNotFoundError("the notebooks/ folder was not found next to the sslab package; run from a "
                                "clone of the repository (pip install -e .)")
    return root / "notebooks"


def load_params(path: Optional[str]) -> dict:
    """A papermill parameter file (YAML mapping) → dict; None → {}."""
    if not path:
        return {}
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--params={str(path)!r} does not exist; allowed: a YAML file such as params/full.yml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--params={str(path)!r} must hold a mapping of parameter: value")
    return data


def notebook_parameters(path: Path) -> set:
    """The parameter names a notebook declares in its ``parameters`` cell."""
    import papermill
    return set(papermill.inspect_notebook(str(path)))


def run_notebooks(params: dict, names: Sequence[str] = NOTEBOOKS, output_dir: Optional[Path] = None,
                  announce=print) -> list:
    """Execute the notebooks in order with papermill (each gets only the parameters it
    declares); returns ``[(name, output path, seconds)]``. Stops at the first failure with the
    notebook, cell and error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    source = notebooks_dir()
    # A name no notebook declares (a typo such as 'lables') would be dropped without a word.
    known = set().union(*(notebook_parameters(source / f"{n}.ipynb") for n in NOTEBOOKS))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"parameter {unknown[0]}={params[unknown[0]]!r} is not declared by any notebook; allowed: "
                         f"{', '.join(sorted(known))}")
    # Each notebook's check cell would refuse a bad value too, but only once the notebooks before
    # it had run (minutes of pretraining for `-p labels abc`): check every value first.
    for name, value in params.items():
        if name in CHECKS:
            CHECKS[name](value)
    output_dir = Path(output_dir) if output_dir else store.outputs_root() / "notebooks"
    output_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names:
        src = source / f"{name}.ipynb"
        dst = output_dir / f"{name}.ipynb"
        declared = notebook_parameters(src)
        mine = {k: v for k, v in params.items() if k in declared}
        announce(f"[{len(done) + 1}/{len(names)}] {name} " + (" ".join(f"{k}={v}" for k, v in mine.items()) or
                                                                "(defaults)"))
        started = time.perf_counter()
        try:
            papermill.execute_notebook(str(src), str(dst), parameters=mine, cwd=str(source), kernel_name="python3",
                                       progress_bar=False, log_output=False)
        except PapermillExecutionError as exc:
            raise RuntimeError(f"notebook {name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}; "
                               f"the executed copy with the error is {dst}") from None
        seconds = time.perf_counter() - started
        announce(f"      done in {seconds:.0f} s → {dst}")
        done.append((name, dst, seconds))
    return done


OUTPUTS_NOTE = "**Outputs shown below**:"
# Cell metadata papermill and the kernel add on every run (times, status): volatile, not committed.
VOLATILE_CELL_KEYS = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")


def machine_description() -> str:
    """What ran the notebooks, in words, for the committed notebooks' first cell."""
    import os
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__.split('+')[0]}"
    return (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), "
            f"torch {torch.__version__.split('+')[0]}")


def published_notebook(executed: Path, machine: str, total_seconds: Optional[float] = None):
    """An executed notebook made fit to commit: papermill's injected-parameters cell and the
    volatile metadata (times, status) removed, outputs and execution counts kept, and the
    first cell's "Outputs shown below" paragraph rewritten from the run itself — parameters
    papermill set, date, machine, and how long the notebook took."""
    import nbformat
    nb = nbformat.read(str(executed), as_version=4)
    run = nb.metadata.get("papermill")
    if run is None:
        raise ValueError(f"{executed} was not executed by papermill; allowed: an executed copy from make lab")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    if errors or run.get("exception"):
        raise ValueError(f"{executed} holds an error output ({errors[0].ename if errors else 'exception'}); "
                         f"only complete runs are published")
    injected = run.get("parameters") or {}
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
    nb.metadata = nbformat.from_dict({k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")})
    given = ", ".join(f"`{k}` = {v!r}" for k, v in injected.items())
    if given:
        given = f" except {given}"
        if injected.get("interactive") is False:
            given += " (a batch run: static figures, no widgets)"
    day = str(run.get("end_time") or "")[:10]
    took = f"This notebook took {run['duration']:.0f} s" if run.get("duration") is not None else ""
    if took and total_seconds is not None:
        took += f" (all five: {total_seconds:.0f} s)"
    note = (f"{OUTPUTS_NOTE} a real run of the whole pipeline with `make lab` (`python -m sslab.lab`) at this "
            f"notebook's defaults{given}, on {machine}, on {day}. {took + '. ' if took else ''}"
            f"The parameters are the table under the parameters cell.")
    first = nb.cells[0]
    paragraphs = first.source.split("\n\n")
    kept = [p for p in paragraphs if not p.startswith(OUTPUTS_NOTE)]
    first.source = "\n\n".join([*kept, note])
    return nb


def publish(executed_dir: Path, names: Sequence[str] = NOTEBOOKS, machine: Optional[str] = None,
            announce=print, dest: Optional[Path] = None) -> list:
    """Copy the executed notebooks in ``executed_dir`` over ``notebooks/`` (or ``dest``), made fit
    to commit by :func:`published_notebook`. All of them are checked before any is written."""
    import nbformat
    executed = [Path(executed_dir) / f"{name}.ipynb" for name in names]
    missing = [str(p) for p in executed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no executed notebook at {', '.join(missing)}; run make lab first")
    durations = [nbformat.read(str(p), as_version=4).metadata.get("papermill", {}).get("duration") for p in executed]
    total = sum(durations) if all(d is not None for d in durations) and len(names) == len(NOTEBOOKS) else None
    machine = machine or machine_description()
    published = [published_notebook(p, machine, total) for p in executed]
    written = []
    for name, nb in zip(names, published):
        target = Path(dest or notebooks_dir()) / f"{name}.ipynb"
        store.write_text(target, nbformat.writes(nb) + "\n")
        if announce:
            announce(f"published {target}")
        written.append(target)
    return written


def headline(out: Optional[str] = None) -> str:
    """The label-curve table written by notebook 04 (top-1 mean ± std, paired gains), as text."""
    from .evaluate import ResultTable
    path = store.outputs_root(out) / "tables" / f"{TABLES['04_label_curves']}.json"
    if not path.is_file():
        return f"(no label-curve table at {path}: notebook 04 did not run)"
    table = ResultTable.load(path)
    lines = ["top-1 test accuracy, % (mean ± std over seeds):", pivot_frame(table, "top1").to_string(), "",
             "paired gain over scratch, top-1 percentage points (seeds won):", gain_frame(table, "top1").to_string(),
             "", curve_sentence(table), f"table: {path.with_suffix('.csv')}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .__main__ import _Formatter
    parser = argparse.ArgumentParser(prog="python -m sslab.lab", formatter_class=_Formatter,
                                     description="Run the five notebooks in order with papermill (make lab), write "
                                                 "executed copies to outputs/notebooks/ and figures to "
                                                 "outputs/figures/, then print the headline table.")
    parser.add_argument("--params", default=None,
                        help="papermill parameter file (e.g. params/smoke.yml, params/full.yml); default: the "
                             "notebooks' own defaults")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="one more parameter (YAML value), e.g. -p labels 5; wins over --params")
    parser.add_argument("--notebooks", default=",".join(n[:2] for n in NOTEBOOKS),
                        help="which notebooks to run, by number, e.g. 01,04")
    parser.add_argument("--interactive", action="store_true",
                        help="keep the ipywidgets in the executed copies (batch runs are static by default)")
    parser.add_argument("--output-dir", default=None, help="where executed notebooks go (default: outputs/notebooks)")
    parser.add_argument("--publish", action="store_true",
                        help="after the run, copy the executed notebooks over notebooks/ (outputs kept, volatile "
                             "metadata removed, first cell says which run produced them): how the committed "
                             "notebooks are made")
    parser.add_argument("--publish-from", default=None, metavar="DIR",
                        help="only publish the executed notebooks already in DIR (e.g. a fresh clone's "
                             "outputs/notebooks), without running anything")
    parser.add_argument("--machine", default=None,
                        help="what ran the notebooks, for the published first cell (default: this machine)")
    args = parser.parse_args(argv)
    if args.publish_from:
        try:
            publish(Path(args.publish_from), machine=args.machine)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        import yaml
        params = load_params(args.params)
        for name, value in args.parameter:
            params[name] = yaml.safe_load(value)
        if not args.interactive:
            params.setdefault("interactive", False)
        wanted = {n.strip() for n in args.notebooks.split(",") if n.strip()}
        names = [n for n in NOTEBOOKS if n[:2] in wanted or n in wanted]
        unknown = wanted - {n[:2] for n in NOTEBOOKS} - set(NOTEBOOKS)
        if unknown or not names:
            raise ValueError(f"--notebooks={args.notebooks!r} is not allowed; allowed: numbers from "
                             f"{', '.join(n[:2] for n in NOTEBOOKS)}")
        started = time.perf_counter()
        done = run_notebooks(params, names, args.output_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started
    print()
    if "04_label_curves" in names:
        print(headline())
        print()
    print(f"wall time: {total:.0f} s (" + ", ".join(f"{n} {s:.0f} s" for n, _, s in done) + ")")
    print(f"executed notebooks: {done[0][1].parent}")
    print(f"figures (PNG + PDF): {store.outputs_root() / 'figures'}")
    print(f"tables (CSV + JSON): {store.outputs_root() / 'tables'}")
    print(f"runs: {store.outputs_root() / 'runs'}")
    if args.publish:
        publish(done[0][1].parent, [n for n, _, _ in done], machine=args.machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
