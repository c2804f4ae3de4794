"""What notebook 01 shows and what every notebook starts with: the dataset, the pretrained
runs (trained now or found in the store), and what each pretext task learned."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Optional, Sequence

import torch

from .. import store
from ..pretrain import EVAL_BATCH, Run, describe, pretrain
from .params import LabSettings


def dataset_summary(settings: LabSettings) -> str:
    """One line per split: what the dataset is (the same whatever the other parameters)."""
    s = settings.splits
    kind = "grey" if s.train.channels == 1 else "colour"
    counts = torch.bincount(s.train.labels[s.train.labels >= 0]).tolist()
    return (f"{s.name}: {len(s.train)} labeled train images ({min(counts)}–{max(counts)} per class), "
            f"{len(s.test)} test images, {len(s.unlabeled)} unlabeled for pretraining; "
            f"{s.train.num_classes} classes, {s.train.image_size}×{s.train.image_size} px, {kind}\n"
            f"classes: {', '.join(s.train.classes)}")


def pretrain_runs(settings: LabSettings, progress: bool = False, announce=print, also: Sequence = ()) -> dict:
    """Pretrain every method in ``settings.methods`` unless the run store already holds the same
    config (then it is reused), and add the random-init backbone when ``settings.random_init``;
    returns ``{method: Run}`` and says which happened. The runs that are missing train side by
    side in worker processes of one thread each when ``SSLAB_WORKERS`` allows (:mod:`sslab.parallel`),
    in the order that ends the batch soonest. ``also``: more configs to pretrain in the same batch
    (e.g. :func:`sweep_configs`, for a sweep later in the notebook), stored but not returned, so the
    workers start once."""
    configs = {method: settings.pretrain_config(method) for method in settings.run_methods}
    options = dict(device=settings.device, out=settings.out, progress=progress, deterministic=settings.deterministic)
    folders = {method: _folder(config, settings) for method, config in configs.items()}
    extra = {}  # the runs of ``also`` still to train: folder → config (one that is the notebook's own run is not)
    for config in also:
        folder = _folder(config, settings)
        if folder not in folders.values() and not store.is_complete(folder):
            extra.setdefault(folder, config)
    missing = {folder for folder in folders.values() if not store.is_complete(folder)} | set(extra)
    seconds = _pretrain_batch([*configs.values(), *extra.values()], settings, options)
    runs = {}
    for method, config in configs.items():
        run, took = timed_pretrain(config, **options)  # trained by the batch (then read back), or here
        if announce:
            how = f"trained now in {seconds.get(folders[method], took):.0f} s" if folders[method] in missing \
                else "reused"
            announce(f"{how}: {run.path.name} — {describe(run)}")
        runs[method] = run
    for folder, config in extra.items():
        if folder not in seconds:  # no batch: trained here
            timed_pretrain(config, **options)
    if announce and extra:
        counts = Counter(config.method for config in extra.values())
        announce(f"and {len(extra)} more run(s) trained alongside, for later in the notebook: "
                 + ", ".join(f"{method} ×{n}" for method, n in sorted(counts.items())))
    return runs


def _pretrain_batch(configs: Sequence, settings: LabSettings, options: dict) -> dict:
    """The runs of ``configs`` that the store does not hold, trained side by side in worker
    processes (:mod:`sslab.parallel`), in the order that ends soonest by their estimated times;
    ``{run folder: seconds}``. Empty when there are fewer than two to train or one worker: the
    caller trains them one by one."""
    from ..parallel import Progress, default_workers, dispatch_order, run_all
    unique: dict = {}
    for config in configs:
        unique.setdefault(_folder(config, settings), config)
    missing = [(folder, config) for folder, config in unique.items() if not store.is_complete(folder)]
    if default_workers() <= 1 or len(missing) <= 1:
        return {}
    # the order that ends the batch soonest by the runs' estimated times (not always longest first)
    missing = [missing[i] for i in dispatch_order([pretrain_cost(config) for _, config in missing], default_workers())]
    jobs = [(timed_pretrain, (config,), options) for _, config in missing]
    names = {id(job): config.method for job, (_, config) in zip(jobs, missing)}
    finished = run_all(jobs, default_workers(), lambda job: f"pretrain {names[id(job)]}",
                       Progress(f"{len(missing)} pretraining runs", len(missing)))
    return {folder: took for (folder, _), (_, took) in zip(missing, finished)}


# Relative cost of a pretraining step per source image on the lab's AlexNet (measured one thread,
# 20 000 images × 3 epochs: rotation 88 s, siamese-VAE 57, VAE 42, SimCLR 40): enough to order a
# batch so that it ends soonest.
_STEP_COST = {"rotation": 2.1, "siamese-vae": 1.4, "vae": 1.0, "simclr": 1.0}


def pretrain_cost(config) -> float:
    """An estimate of a pretraining run's time (arbitrary units), to order a batch."""
    from ..pretrain import RANDOM_INIT
    if config.method == RANDOM_INIT:
        return 0.0  # nothing to train
    images = config.limit if config.limit is not None else 60_000
    return _STEP_COST.get(config.method, 1.0) * images * config.epochs


def _folder(config, settings: LabSettings):
    return store.run_dir("pretrain", config.method, config.dataset, asdict(config.resolved(settings.device)),
                         settings.out)


def timed_pretrain(config, **options) -> tuple:
    """``(the run pretrain(config) returns, its seconds)``: a job a worker process can run."""
    started = time.perf_counter()
    run = pretrain(config, **options)
    return run, time.perf_counter() - started


def _class_examples(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` test-image indices, one per class first (class order), seeded."""
    from ..embed import stratified_sample
    return torch.from_numpy(stratified_sample(labels, n, seed, sort=False, name="examples"))


@torch.no_grad()
def rotation_predictions(run: Run, settings: LabSettings, n: Optional[int] = None, seed: int = 0) -> dict:
    """Test images (one per class first) shown at the R angles the run was trained on (R = its
    setting ``rotations``: 0/90/180/270°, or 0/180°) with the rotation the pretrained net
    predicts: ``images`` N×R×C×H×W (float, [0, 1]), ``predicted`` N×R (0 … R−1), ``confidence``
    N×R (softmax probability of the prediction), ``angles`` (the R angles in degrees)."""
    from ..augment import to_float
    if run.method != "rotation":
        raise ValueError(f"run={run.path.name!r} is a {run.method} run; rotation examples need a rotation run")
    n = n or settings.examples
    test = settings.splits.test
    index = _class_examples(test.labels, n, seed)
    task = run.load_task(settings.device)
    x = to_float(test.images[index].to(settings.device))
    rotated, _ = task.rotate(x)
    probs = torch.softmax(task.logits(rotated).float(), dim=1).cpu()
    predicted = probs.argmax(1)
    confidence = probs.max(1).values
    k, r = len(index), task.rotations
    images = rotated.cpu().reshape(r, k, *x.shape[1:]).transpose(0, 1)
    return {"images": images.numpy(), "predicted": predicted.reshape(r, k).T.numpy(),
            "confidence": confidence.reshape(r, k).T.numpy(), "angles": [360 // r * i for i in range(r)]}


@torch.no_grad()
def vae_reconstructions(runs: dict, settings: LabSettings, n: Optional[int] = None, seed: int = 0) -> dict:
    """For every VAE-type run: reconstructions of the same test images (decoded latent means)
    and images decoded from ``n`` draws of the prior N(0, I) (seeded)."""
    from ..augment import to_float
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


@torch.no_grad()
def simclr_views(run: Run, settings: LabSettings, n: Optional[int] = None, seed: int = 0) -> dict:
    """Test images (one per class first) and two views of each drawn by the SimCLR run's own
    augmentation (seeded): ``images``, ``first``, ``second``, each N×C×H×W floats in [0, 1]."""
    from ..augment import to_float
    if run.method != "simclr":
        raise ValueError(f"run={run.path.name!r} is a {run.method} run; the views need a simclr run")
    n = n or settings.examples
    test = settings.splits.test
    x = to_float(test.images[_class_examples(test.labels, n, seed)])
    augment = run.load_task("cpu").augment
    generator = torch.Generator().manual_seed(seed)
    return {"images": x.numpy(), "first": augment.apply(x, generator).numpy(),
            "second": augment.apply(x, generator).numpy()}


def pretext_sentence(runs: dict) -> str:
    """One sentence on what each pretext task reached on held-out test images."""
    parts = []
    for method, run in runs.items():
        s = run.summary
        if "test_rot_acc" in s:
            rotations = run.config.settings.get("rotations", 4)
            parts.append(f"{method} predicts {100 * s['test_rot_acc']:.1f}% of test rotations "
                         f"(chance {100 / rotations:.0f}%)")
        elif "test_recon" in s:
            text = f"{method} reconstructs test images with {s['test_recon']:.1f} summed squared error per image"
            if "test_triplet" in s:
                text += f" (triplet loss {s['test_triplet']:.3f}, margin {run.config.settings['margin']:g})"
            parts.append(text)
        elif "test_contrastive_acc" in s:
            candidates = 2 * EVAL_BATCH - 1  # the other views of a test batch
            parts.append(f"{method} picks out the other view of a test image among {candidates} candidates "
                         f"{100 * s['test_contrastive_acc']:.1f}% of the time (chance {100 / candidates:.2f}%)")
    epochs = {run.summary.get("epochs_run") for run in runs.values()}
    images = {run.summary.get("images") for run in runs.values()}
    return (f"After {'/'.join(map(str, sorted(epochs)))} epoch(s) on {'/'.join(map(str, sorted(images)))} unlabeled "
            f"images: " + "; ".join(parts) + ".")


@torch.no_grad()
def rotation_accuracy_by_class(run: Run, settings: LabSettings, n: int = 2000) -> dict:
    """Class name → fraction of the rotations (the run's angles) predicted right, on ``n`` test
    images (stratified)."""
    from ..augment import to_float
    from ..embed import stratified_sample
    test = settings.splits.test
    index = torch.from_numpy(stratified_sample(test.labels, n, seed=0))
    task = run.load_task(settings.device)
    right = torch.zeros(test.num_classes)
    total = torch.zeros(test.num_classes)
    for chunk in index.split(500):
        rotated, target = task.rotate(to_float(test.images[chunk].to(settings.device)))
        ok = (task.logits(rotated).argmax(1) == target).float().cpu()
        classes = test.labels[chunk].repeat(task.rotations)
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



def setting_sweep(settings: LabSettings, setting: str, values, budget: int = 4, name: Optional[str] = None):
    """What one pretext setting does to the probe: for each method of ``settings.methods`` that has
    ``setting``, one run per value of ``values`` (the other settings as the notebook gives them;
    the value the run already has is its own run, reused), probed at ``budget`` labeled images per
    class over ``settings.seeds``; returns the ResultTable, its rows naming each run by the setting
    (``siamese-vae [triplet_weight=20.0]``). The missing runs pretrain side by side in worker
    processes where ``SSLAB_WORKERS`` allows (:mod:`sslab.parallel`), as ``python -m sslab curve
    --sweep NAME=V1,V2,...`` does."""
    from ..evaluate import label_curve
    configs = sweep_configs(settings, setting, values)
    options = dict(device=settings.device, out=settings.out, progress=False, deterministic=settings.deterministic)
    _pretrain_batch(configs, settings, options)
    runs = [timed_pretrain(c, **options)[0] for c in configs]  # trained by the batch (then read back), or here
    return label_curve(runs, budgets=[budget], seeds=list(settings.seeds), layer=settings.layer, head=settings.head,
                       protocols=["probe"], device=settings.device, out=settings.out, config=settings.eval_config(),
                       name=name, progress=False, deterministic=settings.deterministic)


def sweep_configs(settings: LabSettings, setting: str, values) -> list:
    """The pretraining configs :func:`setting_sweep` reads: one per value of ``values`` for each
    method of ``settings.methods`` that has ``setting`` (the other settings as the notebook gives
    them). Given to :func:`pretrain_runs` as ``also``, they train in the notebook's first batch."""
    from dataclasses import replace

    from ..pretext import setting_names
    from ..pretrain import RANDOM_INIT, settings_by_method
    methods = [m for m in settings.methods if m != RANDOM_INIT and setting in setting_names(m)]
    if not methods:
        raise ValueError(f"setting={setting!r} is not allowed: no method of this notebook has it; allowed: a setting "
                         f"of {', '.join(settings.methods)}")
    configs = []
    for value in values:
        checked = settings_by_method(methods, {setting: value}, lambda n: f"parameter sweep_values ({n})")
        for method in methods:
            config = settings.pretrain_config(method)
            configs.append(replace(config, settings={**config.settings, **checked[method]}))
    return configs
