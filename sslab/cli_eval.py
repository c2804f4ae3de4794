"""The ``probe`` and ``curve`` commands."""
from __future__ import annotations

import sys
import time

from .evaluate import BUDGETS, PROBES
from .models import LAYERS


def add_eval_commands(sub, formatter, device_args, pretrain_args, int_list) -> None:
    p = sub.add_parser("probe", formatter_class=formatter, help="evaluate one pretrained run at one label budget",
                       description="Train a classifier on frozen features of a pretrained run with K labeled "
                                   "images per class and print top-1/top-5 on the test split.")
    p.add_argument("--run", required=True, help="a run folder printed by `python -m sslab pretrain`")
    p.add_argument("--labels", type=int, required=True, help="labeled images per class (K)")
    p.add_argument("--layer", default="conv4", help=f"feature layer: {', '.join(LAYERS)}")
    p.add_argument("--probe", default="mlp", help=f"classifier on the frozen features: {', '.join(PROBES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the label split and the head")
    p.add_argument("--val-per-class", type=int, default=10, help="validation images per class (early stopping)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune backbone + head together")
    p.add_argument("--scratch", action="store_true", help="also train the same net from scratch on the same labels")
    device_args(p)
    p.set_defaults(handler=cmd_probe)

    p = sub.add_parser("curve", formatter_class=formatter, help="label-budget curves: methods × budgets × seeds",
                       description="Pretrain what is missing, evaluate every method at every budget and seed "
                                   "(plus the scratch baseline), print mean ± std top-1/top-5 and write the "
                                   "table as CSV/JSON (and a figure when matplotlib is installed).")
    p.add_argument("--methods", default="rotation,vae,siamese-vae", help="comma-separated pretext tasks")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name")
    p.add_argument("--budgets", type=int_list("budgets"), default=list(BUDGETS), help="labels per class, comma-separated")
    p.add_argument("--seeds", type=int_list("seeds"), default=[0, 1, 2], help="seeds, comma-separated")
    p.add_argument("--layer", default="conv4", help=f"feature layer: {', '.join(LAYERS)}")
    p.add_argument("--probe", default="mlp", help=f"classifier on the frozen features: {', '.join(PROBES)}")
    p.add_argument("--val-per-class", type=int, default=10, help="validation images per class (early stopping)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune each pretrained net")
    p.add_argument("--no-scratch", dest="scratch", action="store_false", help="skip the scratch baseline")
    pretrain_args(p, prefix="pretrain-")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pretraining runs")
    p.add_argument("--name", default=None, help="table name under outputs/tables/ (default: from the settings)")
    p.add_argument("--shard", default=None, help="I/N: compute only this share of the cells (e.g. 0/4)")
    p.add_argument("--merge", action="store_true", help="collect the table from cells computed by shards")
    device_args(p)
    p.set_defaults(handler=cmd_curve)


def cmd_probe(args) -> int:
    from dataclasses import replace

    from .evaluate import EvalConfig, finetune_run, probe_run, scratch_run
    from .pretrain import load_run
    run = load_run(args.run)
    if args.data_root is not None:  # where the run's dataset is on this machine (not part of any key)
        run.config = replace(run.config, data_root=args.data_root)
    cfg = EvalConfig(val_per_class=args.val_per_class)
    rows = [probe_run(run, args.labels, args.seed, args.layer, args.probe, args.device, args.out, cfg,
                      progress=args.progress, deterministic=args.deterministic)]
    if args.finetune:
        rows.append(finetune_run(run, args.labels, args.seed, args.layer, args.device, args.out, cfg,
                                 progress=args.progress, deterministic=args.deterministic))
    if args.scratch:
        rows.append(scratch_run(run.config.dataset, args.labels, args.seed, like=run, layer=args.layer,
                                device=args.device, out=args.out, config=cfg, progress=args.progress,
                                deterministic=args.deterministic))
    for row in rows:
        top5 = "-" if row["top5"] is None else f"{100 * row['top5']:.2f} %"
        print(f"{row['method']:<12} {row['protocol']:<9} {row['probe']:<6} {row['layer']} labels={row['budget']} "
              f"seed={row['seed']}: top-1 {100 * row['top1']:.2f} %  top-5 {top5}  ({row['epochs']} epochs)")
    return 0


def parse_shard(text):
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard={text!r} is not allowed; allowed: I/N with 0 ≤ I < N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard={text!r} is not allowed; allowed: I/N with 0 ≤ I < N, e.g. 0/4")
    return index, count


def check_curve_budgets(dataset: str, data_root, image_size, budgets, val_per_class: int) -> None:
    """Every budget must leave ``val_per_class`` validation images in every class of the
    dataset's labeled train split — checked before any pretraining, not hours into a sweep."""
    from .data import load_dataset, max_per_class
    most = max_per_class(load_dataset(dataset, data_root, image_size).train.labels, val_per_class)
    if most < 1:  # not even one labeled image per class is left: the validation share is the problem
        raise ValueError(f"--val-per-class={val_per_class} is not allowed: {dataset}'s smallest class has "
                         f"{most + val_per_class} labeled images, and at least 1 must be left for the budget; "
                         f"allowed: --val-per-class ≤ {most + val_per_class - 1}")
    too_many = [b for b in budgets if b > most]
    if too_many:
        raise ValueError(f"--budgets={','.join(map(str, budgets))} is not allowed: {dataset} has too few labeled "
                         f"images per class for {','.join(map(str, too_many))} with --val-per-class "
                         f"{val_per_class}; allowed: budgets ≤ {most}")


def cmd_curve(args) -> int:
    from . import store
    from .evaluate import EvalConfig, check_budgets, check_probe, check_seeds, label_curve
    from .models import check_layer
    from .pretext import TASKS, check_method
    from .pretrain import COMPILE_CHOICES, PretrainConfig, find_run, pretrain

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods={args.methods!r} is not allowed; allowed: one or more of {', '.join(TASKS)}")
    for method in methods:
        check_method(method)
    check_layer(args.layer)
    check_probe(args.probe)
    shard = parse_shard(args.shard)
    # Everything the sweep will check, checked before any pretraining starts.
    check_budgets(args.budgets)
    check_seeds(args.seeds)
    cfg = EvalConfig(layer=args.layer, probe=args.probe, val_per_class=args.val_per_class).validate()
    configs = [PretrainConfig(method=method, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                              batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, width=args.width,
                              seed=args.pretrain_seed, data_root=args.data_root) for method in methods]
    check_curve_budgets(args.dataset, args.data_root, args.image_size, args.budgets, args.val_per_class)
    started = time.perf_counter()
    if args.merge:
        # A merge only collects: a pretraining run that is missing is reported, never trained here.
        found = [find_run(config, args.device, args.out) for config in configs]
        absent = [f"pretrain {c.method}: no complete run at {folder}" for c, (run, folder) in zip(configs, found)
                  if run is None]
        if absent:
            print(f"error: {len(absent)} pretraining run(s) are not there (the same settings as the pretraining "
                  f"and shard jobs are needed, --width included: the default width differs between CPU and CUDA):",
                  file=sys.stderr)
            for line in absent:
                print(f"  {line}", file=sys.stderr)
            return 3
        from .evaluate import merge_curve
        table, missing = merge_curve([run for run, _ in found], args.budgets, args.seeds, args.layer, args.probe,
                                     args.scratch, args.finetune, args.out, cfg, args.name)
        if missing:
            print(f"error: {len(missing)} cell(s) are not computed yet:", file=sys.stderr)
            for cell in missing:
                print(f"  {cell}", file=sys.stderr)
            return 3
    else:
        runs = []
        for config in configs:
            runs.append(pretrain(config, device=args.device, out=args.out, progress=args.progress,
                                 deterministic=args.deterministic, data_budget=args.data_budget,
                                 compile=COMPILE_CHOICES[args.compile], checkpoint_every=args.checkpoint_every))
            print(f"pretrained {config.method}: {runs[-1].path}", file=sys.stderr)
        table = label_curve(runs, args.budgets, args.seeds, args.layer, args.probe, args.scratch, args.finetune,
                            args.device, args.out, cfg, args.name, progress=args.progress, shard=shard,
                            deterministic=args.deterministic)
        if shard is not None:
            print(f"shard {shard[0]}/{shard[1]}: its {len(table)} cell(s) are in the store (computed now or found "
                  f"there); run with --merge when all shards are done")
            return 0
    print(table.format())
    print()
    print("paired gain over scratch (top-1, percentage points, mean ± std over seeds):")
    for g in table.paired_gain("top1"):
        print(f"  {g['method']:<12} {g['protocol']:<9} labels={g['budget']:<3} {100 * g['gain_top1_mean']:+.1f} ± "
              f"{100 * g['gain_top1_std']:.1f}  (wins {g['wins']}/{g['n']})")
    print(f"table: {table.path}")
    try:
        from .plots import save_label_curves
        figure = save_label_curves(table, store.outputs_root(args.out) / "figures" / table.path.stem)
        print(f"figure: {figure}")
    except ImportError:
        print("figure: skipped (matplotlib is not installed)")
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0
