"""Probe sweep with heads trained together against the same sweep one head at a time.

    python benchmarks/batched_probe_check.py RUN_DIR [RUN_DIR ...] [--budgets 1,2,4,8,16,32,64]
        [--seeds 0,1,2] [--device auto] [--json PATH]

Both sweeps go to fresh temporary run stores (nothing is reused), on the given pretraining
runs' cached features. Prints the wall time of each (features already extracted before
either clock starts) and, per cell, the top-1 of each way, then the largest and mean absolute
difference in top-1 points and how many cells ended at a different epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for sslab

from sslab import evaluate  # noqa: E402
from sslab.pretrain import load_run  # noqa: E402
from sslab.train import resolve_device  # noqa: E402


def _ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="pretraining run folders (outputs/runs/pretrain-...)")
    parser.add_argument("--budgets", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    parser.add_argument("--layer", default="conv4")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    dev = resolve_device(args.device)
    runs = [load_run(path) for path in args.runs]
    cfg = evaluate.EvalConfig(layer=args.layer)
    for run in runs:  # both sweeps start from the same cached features
        for split in ("train", "test"):
            evaluate.cached_features(run, split, cfg.layer, cfg.grid, dev)
    tables, seconds = {}, {}
    for batched in (True, False):
        with tempfile.TemporaryDirectory(prefix="sslab-probe-check-") as out:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            tables[batched] = evaluate.label_curve(runs, args.budgets, args.seeds, cfg.layer, "mlp", scratch=False,
                                                   device=dev, out=out, config=cfg, progress=False,
                                                   batch_probes=batched)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds[batched] = time.perf_counter() - started
        # Said at once, so a run stopped during the slower sweep still reports the first.
        print(f"{len(tables[batched].rows)} probe cells {'together' if batched else 'one at a time'}: "
              f"{seconds[batched]:.2f} s", flush=True)
    together, alone = tables[True].rows, tables[False].rows
    cells = []
    for a, b in zip(alone, together):
        assert (a["method"], a["budget"], a["seed"]) == (b["method"], b["budget"], b["seed"])
        cells.append({"method": a["method"], "budget": a["budget"], "seed": a["seed"], "top1_alone": a["top1"],
                      "top1_together": b["top1"], "epochs_alone": a["epochs"], "epochs_together": b["epochs"]})
    diffs = [abs(c["top1_alone"] - c["top1_together"]) * 100 for c in cells]
    other_epoch = sum(c["epochs_alone"] != c["epochs_together"] for c in cells)
    print(f"{'method':<12} {'k':>3} {'seed':>4} {'alone':>7} {'together':>8} {'epochs':>9}")
    for c in cells:
        print(f"{c['method']:<12} {c['budget']:>3} {c['seed']:>4} {100 * c['top1_alone']:>7.2f} "
              f"{100 * c['top1_together']:>8.2f} {c['epochs_alone']:>4}/{c['epochs_together']:<4}")
    summary = {"device": str(dev), "cells": len(cells), "seconds_together": round(seconds[True], 2),
               "seconds_alone": round(seconds[False], 2), "max_abs_top1_diff_points": round(max(diffs), 3),
               "mean_abs_top1_diff_points": round(sum(diffs) / len(diffs), 3), "cells_other_epoch": other_epoch}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "cells": cells}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
