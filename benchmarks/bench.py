"""How fast the lab trains: ``python -m sslab bench`` (or ``python -m benchmarks.bench`` from the
repository). Two measurements, both printed as a table last and optionally written as JSON:
the step benchmark (:mod:`benchmarks.step`, the default) and the study timing
(:mod:`benchmarks.study`, ``--study``). Runs with torch and torchvision alone; ``--params``
reads a papermill parameter file with sslab's own reader, which needs PyYAML.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sslab.checks import HelpFormatter, Parser, check_choice_list, check_int_list
from sslab.pretext import TASKS
from sslab.train import resolve_device

from .step import BenchConfig, format_rows, max_rss_mib, quick_config, measure_steps
from .study import StudyConfig, StudyInterrupted, format_study, quick_study, study_from_params, time_study


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": _cpu_name()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["load_avg_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sslab bench", formatter_class=HelpFormatter,
        description="Step benchmark (default): per pretext task and resolution, images/s of the real pretraining "
                    "step (sslab.train.train_step) and of a minimal plain-PyTorch step on the same model and batch, "
                    "their ratio, model FLOPs per image, TFLOP/s and peak device memory. img/s counts the images "
                    "the network sees (4 rotated copies per image for rotation), as `pretrain` does.\n\n"
                    "--study: the whole study (pretraining per method, features, probes, scratch, fine-tuning, UMAP) "
                    "timed phase by phase in a fresh outputs folder.")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="small batches, width 0.25, few steps (step benchmark: 1-2 min on 2 CPU cores, see --threads); "
                        "with --study: 1 epoch on 2000 images, budgets 1,8,64, seed 0")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table (and machine info) as JSON")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated pretext tasks (default: {','.join(TASKS)})")
    p.add_argument("--sizes", default=None,
                   help="comma-separated image sizes, 28 px grey, others colour (default: 28,32,96)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 60, quick 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, quick 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="sslab and reference alternate in this many rounds (default: every step on CPU, so a "
                        "change of machine load hits both alike; 6 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: pretrain's, rotation 150, VAEs 128, simclr 256; quick 64)")
    p.add_argument("--width", type=float, default=None, help="AlexNet width (default: 1.0 CUDA, 0.25 CPU/quick)")
    p.add_argument("--compile", action="store_true", help="torch.compile the sslab loss and the reference loss")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and synthetic images")
    p.add_argument("--precision", default="auto",
                   help="of the sslab and reference steps: bf16, fp32 or auto (bf16 on CUDA and on CPUs with native "
                        "bf16); sslab's step in fp32 is always measured too (the fp32 img/s and gain columns)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice). On a busy shared machine 1 thread "
                        "gives steadier numbers: threads that wait on each other while descheduled slow every op")
    study = p.add_argument_group("study timing")
    study.add_argument("--study", action="store_true", help="time the whole study phase by phase instead")
    study.add_argument("--params", default=None, metavar="FILE",
                       help="papermill parameter file (e.g. params/full.yml) to take the study settings from")
    study.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default 30, quick 1)")
    study.add_argument("--limit", type=int, default=None, help="unlabeled images per pretraining (default: all)")
    study.add_argument("--budgets", default=None,
                       help="labels per class (default 1,2,4,8,16,32,64)")
    study.add_argument("--seeds", default=None, help="seeds (default 0,1,2)")
    study.add_argument("--no-finetune", dest="finetune", action="store_false", default=None, help="skip fine-tuning")
    study.add_argument("--no-scratch", dest="scratch", action="store_false", default=None,
                       help="skip the scratch baselines")
    study.add_argument("--no-probes-alone", dest="probes_alone", action="store_false", default=None,
                       help="skip timing the probe sweep one head at a time (the comparison with batched heads)")
    study.add_argument("--umap-points", type=int, default=None, help="test points per UMAP (0 = skip; default 2000)")
    study.add_argument("--dataset", default=None, help="dataset (default fashion-mnist)")
    study.add_argument("--data-root", default=None, help="folder to look in first for the dataset")
    study.add_argument("--out", default=None,
                       help="empty folder for the study's runs (default: a temporary folder, removed afterwards)")
    return p


def main(argv=None) -> int:
    """The benchmark's command line; every error a person can act on is one line (exit code 2)."""
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_bench(args) -> int:
    device = resolve_device(args.device)
    if args.threads is not None:
        if isinstance(args.threads, bool) or args.threads < 1:
            raise ValueError(f"threads={args.threads!r} is not allowed; allowed: an integer ≥ 1")
        torch.set_num_threads(args.threads)
    command = "python -m sslab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "python -m sslab bench"
    info = {**machine_info(device), "command": command}
    if args.study:
        return _cmd_study(args, device, info)
    values = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup), ("rounds", args.rounds))
              if v is not None}
    base = quick_config() if args.quick else BenchConfig()
    if args.methods is not None:
        values["methods"] = check_choice_list("--methods", args.methods, tuple(TASKS), "pretext tasks")
    if args.sizes is not None:
        values["sizes"] = check_int_list("--sizes", args.sizes, 16, "image sizes in px")
    config = replace(base, batch_size=args.batch_size, width=args.width, compile=args.compile, seed=args.seed,
                     precision=args.precision, **values).validate()
    _busy_note(device, info)
    print(f"bench on {_describe(info)}: {len(config.methods) * len(config.sizes)} configurations, "
          f"{config.warmup} warm-up + {config.steps} timed steps each", file=sys.stderr, flush=True)
    rows = measure_steps(config, device)
    info["max_rss_mib"] = max_rss_mib()
    if hasattr(os, "getloadavg"):
        info["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        _write_json(args.json, {"machine": info, "config": asdict(config), "rows": [asdict(r) for r in rows]})
    print(f"# {info['command']}")
    print(f"# {_describe(info)}; width {config.width_for(device)}; {config.steps} timed steps per variant "
          f"(median); compile {'on' if config.compile else 'off'}")
    print("# img/s counts images as pretrain does: ×4 rotated copies for rotation; siamese-vae counts each source "
          "image once though its encoder also sees the positive view; ratio = sslab / reference (same precision); "
          "gain = sslab / sslab's own step in fp32")
    if config.compile:
        print("# warm-up incl. compilation: " + ", ".join(f"{r.method} {r.size} px {r.warmup_s:.0f} s" for r in rows))
    print(format_rows(rows))
    return 0


def _cmd_study(args, device: torch.device, info: dict) -> int:
    config = quick_study() if args.quick else StudyConfig()
    ignored = []
    if args.params:
        from sslab.lab.params import load_params
        config, ignored = study_from_params(load_params(args.params), config)
    lists = {"methods": args.methods and check_choice_list("--methods", args.methods, tuple(TASKS), "pretext tasks"),
             "budgets": args.budgets and check_int_list("--budgets", args.budgets, 1, "labeled images per class"),
             "seeds": args.seeds and check_int_list("--seeds", args.seeds, 0, "seeds")}
    flags = {**lists, "epochs": args.epochs, "limit": args.limit, "finetune": args.finetune,
             "umap_points": args.umap_points, "dataset": args.dataset, "data_root": args.data_root,
             "batch_size": args.batch_size, "width": args.width, "probes_alone": args.probes_alone,
             "scratch": args.scratch}
    config = replace(config, **{k: v for k, v in flags.items() if v is not None})
    if isinstance(config.epochs, bool) or not isinstance(config.epochs, int) or config.epochs < 1:
        raise ValueError(f"epochs={config.epochs!r} is not allowed; allowed: an integer ≥ 1")
    if ignored:
        print(f"params: ignoring {', '.join(ignored)} (not study settings)", file=sys.stderr)
    _busy_note(device, info)
    print(f"study timing on {_describe(info)}: {asdict(config)}", file=sys.stderr, flush=True)
    try:
        rows, stopped = time_study(config, device, args.out), False
    except StudyInterrupted as interrupted:  # e.g. a time limit: what finished is still worth keeping
        rows, stopped = interrupted.rows, True
    info["max_rss_mib"] = max_rss_mib()
    if args.json:
        _write_json(args.json, {"machine": info, "study": asdict(config), "stopped": stopped,
                                "phases": [asdict(r) for r in rows]})
    print(f"# {info['command']}")
    print(f"# {_describe(info)}")
    if stopped:
        print("# STOPPED part-way (interrupted): the phases below are the ones reached")
    print(format_study(rows))
    return 130 if stopped else 0


def _busy_note(device: torch.device, info: dict) -> None:
    load, cores = info.get("load_avg_1min_at_start"), os.cpu_count() or 1
    if device.type == "cpu" and torch.get_num_threads() > 1 and load is not None and load >= cores:
        print(f"note: this machine is busy (load {load} on {cores} cores); with {torch.get_num_threads()} threads "
              f"per op, threads wait on each other while descheduled and timings get slow and noisy. "
              f"--threads 1 gives steadier numbers.", file=sys.stderr)


def _describe(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_threads']} threads)"
    return f"{info['device']} = {where}, torch {info['torch']}, {info['date']}"


def _write_json(path, data) -> None:
    from sslab import store
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_json(path, json.loads(json.dumps(data, default=str)))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
