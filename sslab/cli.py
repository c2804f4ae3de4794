"""The command line: ``python -m sslab {pretrain,evaluate,curve,datasets,bench} ...``.

Runs with torch and torchvision alone; notebook-only packages (matplotlib) are used only when
present. Every error a person can act on is one line, ``error: …``, with exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from .checks import (MAX_COUNT, MAX_EPOCHS, MAX_STEPS, HelpFormatter, Parser, check_choice, check_choice_list,
                     check_int, check_int_list, check_number)
from .data import DATASETS, check_budgets_fit, load_dataset


# ---------------------------------------------------------------- flags shared by several commands

def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto",
                   help="bf16 (bfloat16 autocast + channels_last), fp32, or auto: bf16 on CUDA and on CPUs with "
                        "native bf16 (AVX-512 BF16 or AMX), fp32 elsewhere. Part of a run's settings")
    p.add_argument("--data-root", default=None, help="folder to look in first for datasets (and to download into)")
    p.add_argument("--out", default=None, help="outputs folder (default: the repository's outputs/, or $SSLAB_OUTPUTS)")
    p.add_argument("--deterministic", action="store_true", help="bit-for-bit repeatable runs (CPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _pretrain_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .pretext import TASKS, setting_names, task_settings
    from .checkpoint import CHECKPOINT_EVERY_S
    defaults = {method: task_settings(method) for method in TASKS}

    def per_method(setting: str) -> str:
        return ", ".join(f"{method} {getattr(s, setting)}" for method, s in defaults.items())

    p.add_argument(f"--{prefix}epochs", dest="epochs", type=int, default=3, help="pretraining epochs")
    p.add_argument("--limit", type=int, default=None, help="use only N unlabeled images (seeded shuffle)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step, the setting batch_size (default per method: {per_method('batch_size')})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate, the setting lr (default per method: {per_method('lr')})")
    p.add_argument("--schedule", default=None,
                   help=f"learning-rate schedule: cosine, step or constant, the setting schedule (default per "
                        f"method: {per_method('schedule')})")
    shared = [name for name in setting_names("rotation") if all(name in setting_names(m) for m in TASKS)]
    own = "; ".join(f"{m}: {', '.join(n for n in setting_names(m) if n not in shared)}" for m in TASKS)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a pretext task's setting (repeatable; part of the run's config), e.g. --set "
                        f"triplet_weight=10; where several methods are pretrained, each that has the setting takes "
                        f"it. Defaults and ranges: sslab/pretext/<task>.py. Every task: {', '.join(shared)}; "
                        f"{own}")
    p.add_argument("--image-size", type=int, default=None, help="resize images to N px (default: native size)")
    p.add_argument("--backbone", default="alexnet",
                   help="alexnet (the study's BatchNorm AlexNet) or resnet18 (CIFAR stem under 64 px)")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier of the backbone (default: 1.0 on CUDA = the study's net, 0.25 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="run the training loss through torch.compile (no measurement has shown it faster here)")
    p.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY_S, metavar="SECONDS",
                   help="write the resume checkpoint at the end of an epoch once this many seconds have passed "
                        "since the last one (0: after every epoch); the last epoch's is always written")
    p.add_argument("--knn-monitor", action="store_true",
                   help="after every pretraining epoch, write the kNN top-1 of the backbone's features (100 labeled "
                        "train images per class classifying 20 others) into metrics.jsonl as knn_acc")
    p.add_argument("--pool-memory", type=float, default=None, metavar="GB",
                   help="device memory the unlabeled images may take (default: half the free memory on CUDA); "
                        "a larger pool streams from pinned host memory in chunks, with the same result")


def _eval_args(p: argparse.ArgumentParser) -> None:
    from .evaluate import HEADS, PROTOCOLS
    from .models import LAYERS_BY_ARCH
    layers = "; ".join(f"{arch}: {', '.join(names)}" for arch, names in LAYERS_BY_ARCH.items())
    p.add_argument("--layer", default="auto",
                   help=f"backbone layer the classifier reads: auto (conv4 on alexnet, layer4 on resnet18) or "
                        f"one of {layers}")
    p.add_argument("--protocols", default=None,
                   help=f"comma-separated evaluation protocols: {', '.join(PROTOCOLS)} (default: probe,scratch for "
                        f"curve, probe for evaluate); --finetune and --no-scratch/--scratch add or leave out one")
    p.add_argument("--head", default="mlp", help=f"classifier of the probe on frozen features: {', '.join(HEADS)}")
    p.add_argument("--val-per-class", type=int, default=10,
                   help="labeled validation images per class (early stopping and the protocols' choices); 0: none, "
                        "every trained protocol runs its fixed schedule, so K labels per class are K × classes "
                        "labeled images in all")
    p.add_argument("--selection", default="balanced",
                   help="which images are labeled: balanced (K of every class, the study's draw), uniform (K × classes "
                        "at random from the pool, classes unknown), typical (TypiClust) or cover (ProbCover), both "
                        "from the method's features without labels")
    p.add_argument("--select-starts", type=int, default=1,
                   help="typical: k-means++ starts of the clustering, the one of lowest inertia kept (scikit-learn's "
                        "n_init: TypiClust's code ran 10); default 1")
    p.add_argument("--lp-balance", type=int, default=0,
                   help="labelprop and selftrain: Sinkhorn steps that scale the pool's propagated labels to equal "
                        "class mass before the test images vote (class mass normalisation to a uniform prior: it "
                        "assumes the classes about equally frequent); 0 (default): none")
    p.add_argument("--choice-margin", type=float, default=0.0,
                   help="labelprop and selftrain: leave the probe for another candidate only where it wins on the "
                        "validation images by more than this many standard errors of the paired difference (1: the "
                        "one-standard-error rule); 0 (default): the best count, as the study chooses")
    p.add_argument("--choice-folds", type=int, default=5,
                   help="labelprop's weight and selftrain's teacher: judged on the validation images and on F − 1 "
                        "more held-out splits of the labeled and validation images (each trains the probe and "
                        "propagates labels again); default 5; 1: the validation images alone, as in the study")
    p.add_argument("--st-steps", type=int, default=600, help="selftrain: training steps of each student")
    p.add_argument("--st-rounds", type=int, default=1,
                   help="selftrain: rounds; each round after the first learns from the last student's graph "
                        "(default 1)")
    p.add_argument("--st-per-class", type=int, default=1000,
                   help="selftrain: the teacher's most confident pseudo-labels of each class a student trains on "
                        "(default 1000)")
    p.add_argument("--st-start", default="fresh",
                   help="selftrain: the student's head starts fresh (random weights, the default) or as the "
                        "budget's probe head (probe: linear probing, then fine-tuning)")
    p.add_argument("--st-predict", default="blend",
                   help="selftrain: the test prediction, the best on the validation images of the teacher, the "
                        "student's graph and their mean (blend, the default), or of those of auto (the student's "
                        "graph, head, both, the teacher, the probe), or one of graph, head, both")
    p.add_argument("--fm-steps", type=int, default=1000,
                   help="fixmatch: training steps of 32 labeled + 224 unlabeled images")
    p.add_argument("--fm-threshold-mode", default="freematch",
                   help="fixmatch: the confidence threshold, fixed (τ = 0.95, FixMatch's) or freematch "
                        "(FreeMatch's self-adaptive threshold, per class)")
    p.add_argument("--fm-backbone-lr-scale", type=float, default=0.1,
                   help="fixmatch: the backbone's learning rate as a share of the head's (0 to 1; default 0.1; "
                        "1: FixMatch's own)")
    p.add_argument("--fm-warmup", type=float, default=1.0,
                   help="fixmatch: epochs of linear learning-rate warm-up (default 1; 0: FixMatch's own)")


def build_parser() -> argparse.ArgumentParser:
    from .distributed import HELP as distributed_help
    from .pretext import TASKS
    from .pretrain import RANDOM_INIT
    parser = Parser(prog="python -m sslab", formatter_class=HelpFormatter,
                    description="sslab: self-supervised pretraining when labels are scarce.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pretrain", formatter_class=HelpFormatter, epilog=distributed_help,
                       help="pretrain one pretext task (reuses a complete run with the same config)",
                       description="Pretrain a pretext task on the dataset's unlabeled pool. The last line "
                                   "printed is the run folder.")
    p.add_argument("--method", default="rotation",
                   help=f"{', '.join(TASKS)}, or {RANDOM_INIT} (the backbone as initialised: what evaluation gets "
                        f"without pretraining)")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASETS)}")
    _pretrain_args(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling, augmentation)")
    p.add_argument("--force", action="store_true", help="train again even if a complete run exists")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: SyncBatchNorm, batch statistics over all processes (CUDA only)")
    _device_args(p)
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("evaluate", aliases=["probe"], formatter_class=HelpFormatter,
                       help="evaluate one pretrained run at one label budget (`probe` is another name for it)",
                       description="Train a classifier on frozen features of a pretrained run with K labeled "
                                   "images per class and print top-1/top-5 on the test split; optionally also the "
                                   "scratch baseline and fine-tuning.")
    p.add_argument("--run", required=True, help="a run folder printed by `python -m sslab pretrain`")
    p.add_argument("--labels", type=int, required=True, help="labeled images per class (K)")
    _eval_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the label split and the head")
    p.add_argument("--finetune", action="store_true", help="also fine-tune backbone + head together (adds finetune)")
    p.add_argument("--scratch", action="store_true", default=None,
                   help="also train the same net from scratch on the same labels (adds scratch)")
    _device_args(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("curve", formatter_class=HelpFormatter, help="label-budget curves: methods × budgets × seeds",
                       description="Pretrain what is missing, evaluate every method at every budget and seed "
                                   "(plus the scratch baseline), print mean ± std top-1/top-5 and write the "
                                   "table as CSV/JSON (and a figure when matplotlib is installed).")
    p.add_argument("--methods", default=",".join(TASKS),
                   help=f"comma-separated pretext tasks, and {RANDOM_INIT} for the same protocols from a randomly "
                        f"initialised backbone")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name")
    p.add_argument("--budgets", default="1,2,4,8,16,32,64", help="labels per class, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    _eval_args(p)
    p.add_argument("--finetune", action="store_true", help="also fine-tune each pretrained net (adds finetune)")
    p.add_argument("--no-scratch", dest="scratch", action="store_false", default=None,
                   help="skip the scratch baseline (leaves out scratch)")
    _pretrain_args(p, prefix="pretrain-")
    p.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...",
                   help="pretrain one run per value of one pretext setting (each method that has it) and evaluate "
                        "them all in one table, e.g. --sweep triplet_weight=0,1,5,20; rows name each run by the "
                        "settings it changed, e.g. siamese-vae [triplet_weight=5.0]")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pretraining runs")
    p.add_argument("--name", default=None, help="table name under outputs/tables/ (default: from the settings)")
    p.add_argument("--shard", default=None, help="I/N: compute only this share of the cells (e.g. 0/4)")
    p.add_argument("--merge", action="store_true", help="collect the table from cells computed by shards")
    _device_args(p)
    p.set_defaults(handler=cmd_curve)

    p = sub.add_parser("datasets", formatter_class=HelpFormatter, help="list datasets and where each was found")
    p.add_argument("--data-root", default=None, help="folder to look in first")
    p.add_argument("--ensure", "--download", dest="ensure", default=None, metavar="NAME",
                   help="make sure dataset NAME is available (download it when the network allows); "
                        "exits non-zero with instructions otherwise")
    p.set_defaults(handler=cmd_datasets)

    sub.add_parser("bench", help="speed: the pretraining step against a plain-PyTorch step, or the whole study "
                                 "(benchmarks/bench.py; `python -m sslab bench --help`)", add_help=False)
    return parser


# ---------------------------------------------------------------- commands

SETTING_FLAGS = {"batch_size": "--batch-size", "lr": "--lr", "schedule": "--schedule"}


def pretext_settings(args, methods) -> dict:
    """``{method: its settings}`` from ``--set NAME=VALUE`` and the flags that set one setting
    (``--lr``, ``--batch-size``, ``--schedule``), each checked under the name the user typed
    before any data is loaded. Each method takes the settings it has."""
    from .pretext import parse_value
    from .pretrain import settings_by_method
    values, given_by = {}, {}
    for setting, flag in SETTING_FLAGS.items():
        if getattr(args, setting) is not None:
            values[setting], given_by[setting] = getattr(args, setting), flag
    for item in args.settings:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"--set {item!r} is not allowed; allowed: NAME=VALUE, e.g. --set triplet_weight=10")
        if key in values:
            raise ValueError(f"--set {item!r} is not allowed: {key} is already set by {given_by[key]}; allowed: "
                             f"one value per setting")
        values[key], given_by[key] = parse_value(text), f"--set {key}"
    return settings_by_method(methods, values, lambda key: given_by.get(key, f"--set {key}"))


def swept_settings(args, methods, settings: dict) -> dict:
    """``{method: [the settings of each run]}`` for ``--sweep NAME=V1,V2,...``: one run per value
    for each method that has the setting, one run (no change) for the others; each value checked
    like ``--set``'s, and a setting given to both is an error."""
    from .pretext import parse_value
    from .pretrain import settings_by_method
    if args.sweep is None:
        return {method: [{}] for method in methods}
    key, equals, text = args.sweep.partition("=")
    key = key.strip()
    values = [parse_value(v.strip()) for v in text.split(",") if v.strip()]
    if not equals or not key or len(values) < 2:
        raise ValueError(f"--sweep={args.sweep!r} is not allowed; allowed: NAME=V1,V2,... with two values or more, "
                         f"e.g. --sweep triplet_weight=0,1,5,20")
    if any(key in given for given in settings.values()) or any(s.startswith(f"{key}=") for s in args.settings):
        raise ValueError(f"--sweep={args.sweep!r} is not allowed: {key} is also set by --set; allowed: one of the two")
    runs = {method: [] for method in methods}
    for value in values:
        checked = settings_by_method(methods, {key: value}, lambda name: f"--sweep {name}")
        for method in methods:
            if key in checked[method]:
                runs[method].append(checked[method])
    return {method: chosen or [{}] for method, chosen in runs.items()}


def cmd_pretrain(args) -> int:
    from .distributed import is_main_process
    from .pretrain import METHODS, PretrainConfig, describe, pretrain
    check_choice("method", args.method, METHODS)
    config = PretrainConfig(method=args.method, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                            image_size=args.image_size, width=args.width, seed=args.seed, data_root=args.data_root,
                            precision=args.precision, backbone=args.backbone,
                            settings=pretext_settings(args, [args.method])[args.method])
    run = pretrain(config, device=args.device, out=args.out, force=args.force, progress=args.progress,
                   deterministic=args.deterministic, sync_bn=args.sync_bn, pool_memory=args.pool_memory,
                   compile=args.compile, checkpoint_every=args.checkpoint_every, knn_monitor=args.knn_monitor)
    if is_main_process():  # under torchrun, rank 0 speaks for all
        print(describe(run))
        print(run.path)
    return 0


def cmd_datasets(args) -> int:
    from .data import dataset_status
    if args.ensure:
        splits = load_dataset(args.ensure, args.data_root)
        print(f"{splits.name}: {len(splits.train)} train, {len(splits.test)} test, "
              f"{len(splits.unlabeled)} unlabeled images of {tuple(splits.train.images.shape[1:])} "
              f"from {splits.source}")
        return 0
    for name, where in dataset_status(args.data_root):
        print(f"{name:14s} {where}")
    return 0


def _print_row(row: dict) -> None:
    top5 = "-" if row["top5"] is None else f"{100 * row['top5']:.2f} %"
    print(f"{row['method']:<12} {row['protocol']:<9} {row['head']:<6} {row['layer']} labels={row['budget']} "
          f"seed={row['seed']}: top-1 {100 * row['top1']:.2f} %  top-5 {top5}  ({row['epochs']} epochs)")


def _protocol_list(args, default: tuple) -> tuple:
    """--protocols (or ``default``), with --finetune added and scratch added or left out by its flag."""
    from .evaluate import check_protocols
    chosen = list(check_protocols(args.protocols, "--protocols") if args.protocols is not None else default)
    if args.finetune and "finetune" not in chosen:
        chosen.append("finetune")
    if args.scratch is True and "scratch" not in chosen:
        chosen.append("scratch")
    if args.scratch is False and "scratch" in chosen:
        chosen.remove("scratch")
    return check_protocols(chosen, "--protocols")


def cmd_evaluate(args) -> int:
    from dataclasses import replace

    from .evaluate import HEADS, compute_cell
    from .pretrain import load_run
    check_choice("--head", args.head, HEADS)
    protocols = _protocol_list(args, ("probe",))
    check_int("--labels", args.labels, 1, " (labeled images per class)", maximum=MAX_COUNT)
    check_int("--seed", args.seed, 0, " (a seed)", maximum=MAX_COUNT)
    run = load_run(args.run)
    if args.data_root is not None:  # where the run's dataset is on this machine (not part of any key)
        run.config = replace(run.config, data_root=args.data_root)
    cfg = _eval_config(args)
    for protocol in protocols:
        _print_row(compute_cell(protocol, args.labels, args.seed, run, cfg, args.device, args.out, args.deterministic,
                                args.progress))
    return 0


def parse_shard(text):
    if text is None:
        return None
    allowed = f"--shard={text!r} is not allowed; allowed: I/N with 0 ≤ I < N, e.g. 0/4"
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(allowed) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(allowed)
    return index, count


def _eval_config(args):
    """The evaluation settings the command line sets, checked under their flags' names."""
    from .evaluate import EvalConfig
    from .evaluate.cells import FM_THRESHOLD_MODES, ST_PREDICTS, ST_STARTS, check_choice_folds, check_choice_margin
    from .evaluate.selection import MAX_STARTS, SELECTIONS
    check_int("--st-steps", args.st_steps, 1, maximum=MAX_STEPS)
    check_int("--st-rounds", args.st_rounds, 1, maximum=MAX_STEPS)
    check_int("--st-per-class", args.st_per_class, 1, " (pseudo-labels per class)", maximum=MAX_COUNT)
    check_int("--fm-steps", args.fm_steps, 1, maximum=MAX_STEPS)
    check_int("--val-per-class", args.val_per_class, 0, maximum=MAX_COUNT)
    check_choice("--selection", args.selection, SELECTIONS)
    check_int("--select-starts", args.select_starts, 1, " (k-means starts)", maximum=MAX_STARTS)
    check_int("--lp-balance", args.lp_balance, 0, " (Sinkhorn steps; 0: none)", maximum=MAX_STEPS)
    check_choice("--fm-threshold-mode", args.fm_threshold_mode, FM_THRESHOLD_MODES)
    check_choice_margin("--choice-margin", args.choice_margin)
    check_choice_folds("--choice-folds", args.choice_folds)
    check_choice("--st-start", args.st_start, ST_STARTS)
    check_choice("--st-predict", args.st_predict, ST_PREDICTS)
    return EvalConfig(layer=args.layer, head=args.head, val_per_class=args.val_per_class, selection=args.selection,
                      select_starts=args.select_starts, lp_balance=args.lp_balance,
                      precision=args.precision, st_steps=args.st_steps, st_rounds=args.st_rounds,
                      st_per_class=args.st_per_class, fm_steps=args.fm_steps,
                      fm_threshold_mode=args.fm_threshold_mode, choice_margin=args.choice_margin,
                      choice_folds=args.choice_folds, st_start=args.st_start, st_predict=args.st_predict,
                      fm_backbone_lr_scale=check_number("--fm-backbone-lr-scale", args.fm_backbone_lr_scale, 0.0, 1.0,
                                                        low_open=False),
                      fm_warmup=check_number("--fm-warmup", args.fm_warmup, 0.0, float(MAX_EPOCHS),
                                             low_open=False)).validate()


def cmd_curve(args) -> int:
    from .evaluate import HEADS, label_curve, merge_curve
    from .pretrain import METHODS, PretrainConfig, find_run, pretrain
    from .train import resolve_device

    # Everything the sweep will check, checked before any pretraining starts.
    methods = check_choice_list("--methods", args.methods, METHODS, "methods")
    budgets = list(check_int_list("--budgets", args.budgets, 1, "labeled images per class"))
    seeds = list(check_int_list("--seeds", args.seeds, 0, "seeds"))
    check_choice("--head", args.head, HEADS)
    shard = parse_shard(args.shard)
    if args.name is not None:
        from .store import check_file_name
        check_file_name("--name", args.name)
    cfg = _eval_config(args)
    settings = pretext_settings(args, methods)
    device = resolve_device(args.device)
    sweep = swept_settings(args, methods, settings)
    configs = [PretrainConfig(method=method, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                              image_size=args.image_size, width=args.width, seed=args.pretrain_seed,
                              data_root=args.data_root, precision=args.precision, backbone=args.backbone,
                              settings={**settings[method], **swept})
               for method in methods for swept in sweep[method]]
    for config in configs:  # every pretraining setting (epochs, limit, …) before the dataset is read
        config.resolved(device)
    check_budgets_fit(args.dataset, load_dataset(args.dataset, args.data_root, args.image_size).train.labels, budgets,
                      args.val_per_class, "--budgets", "--val-per-class")
    started = time.perf_counter()
    protocols = dict(protocols=_protocol_list(args, ("probe", "scratch")))
    if args.merge:
        # A merge only collects: a pretraining run that is missing is reported, never trained here.
        found = [find_run(config, args.device, args.out) for config in configs]
        absent = [f"pretrain {c.method}: no complete run at {folder}" for c, (run, folder) in zip(configs, found)
                  if run is None]
        if absent:
            return _missing(f"{len(absent)} pretraining run(s) are not there (the same settings as the pretraining "
                            f"and shard jobs are needed, --width included: the default width differs between CPU "
                            f"and CUDA):", absent)
        table, missing = merge_curve([run for run, _ in found], budgets, seeds, args.layer, args.head,
                                     out=args.out, config=cfg, name=args.name, device=args.device, **protocols)
        if missing:
            return _missing(f"{len(missing)} cell(s) are not computed yet:", missing)
    else:
        runs = []
        for config in configs:
            runs.append(pretrain(config, device=args.device, out=args.out, progress=args.progress,
                                 deterministic=args.deterministic, pool_memory=args.pool_memory,
                                 compile=args.compile, checkpoint_every=args.checkpoint_every,
                                 knn_monitor=args.knn_monitor))
            print(f"pretrained {config.method}: {runs[-1].path}", file=sys.stderr)
        table = label_curve(runs, budgets, seeds, args.layer, args.head, device=args.device, out=args.out,
                            config=cfg, name=args.name, progress=args.progress, shard=shard,
                            deterministic=args.deterministic, **protocols)
        if shard is not None:
            print(f"shard {shard[0]}/{shard[1]}: its {len(table)} cell(s) are in the store (computed now or found "
                  f"there); run with --merge when all shards are done")
            return 0
    _print_table(table, args.out)
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


def _missing(title: str, lines: list) -> int:
    print(f"error: {title}", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return 3


def _print_table(table, out) -> None:
    from . import store
    print(table.format())
    print()
    print("paired gain over scratch (top-1, percentage points: mean over seeds [95 % confidence interval], "
          "✓ where it excludes 0, seeds won):")
    from .evaluate.table import format_gain
    for g in table.paired_gain("top1"):
        print(f"  {g['method']:<12} {g['protocol']:<9} labels={g['budget']:<3} {format_gain(g)}")
    print(f"table: {table.path}")
    try:
        from .plots import save_label_curves
        print(f"figure: {save_label_curves(table, store.outputs_root(out) / 'figures' / table.path.stem)}")
    except ImportError:
        print("figure: skipped (matplotlib is not installed)")


def _bench(argv: list) -> int:
    """``python -m sslab bench …`` runs the benchmark tool in the repository's benchmarks/ folder."""
    from .store import repo_root
    root = repo_root()
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from benchmarks.bench import main as bench_main
    except ImportError:
        print("error: `bench` needs the repository's benchmarks/ folder (a clone of sslab, installed with "
              "pip install -e .); run it from there, e.g. python -m benchmarks.bench", file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    from . import distributed
    from .allocator import keep_freed_memory_here
    keep_freed_memory_here()  # training steps reuse freed memory: the same results, less system time
    from .integrity import CorruptCheckpoint
    from .train import TrainingDiverged
    # Under torchrun every process runs this; each message is shown once per node at most.
    speaks = distributed.reports_errors()
    if distributed.launched() and args.command != "pretrain":
        if speaks:
            print(f"error: under torchrun only `pretrain` runs on several processes; run `{args.command}` as one "
                  f"process (a sweep spreads over machines with `curve --shard I/N`, then `curve --merge`)",
                  file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    # Errors a person can act on (bad parameter, missing or unwritable folder, damaged file,
    # diverged loss): their message says what to do, a traceback would only hide it.
    except (ValueError, OSError, CorruptCheckpoint, TrainingDiverged) as exc:
        if speaks:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speaks:
            print("interrupted; the last complete checkpoint is kept and the same command resumes from it",
                  file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
