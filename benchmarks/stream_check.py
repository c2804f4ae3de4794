"""Pretraining on a pool streamed from pinned host memory against the same pool on the device.

    python benchmarks/stream_check.py [--method rotation] [--image-size 96] [--epochs 2]
        [--limit N] [--device auto] [--data-root DIR] [--json PATH]

Runs `pretrain` twice with the same config into two fresh temporary stores: once with the pool
resident on the device (no memory limit), once with `pool_memory=0`, so every image streams
from pinned host memory in chunks (at 96 px, Fashion-MNIST's 60 000 grey images are 553 MB:
two chunks of at most 512 MiB). Prints the images per second of each (the fit's own clock,
`train_seconds` in the run summary), their ratio, and how far the two runs' final weights are
apart (on the CPU they are bit-identical; on CUDA, kernels that are not deterministic may make
them differ in rounding).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for sslab

from sslab import store  # noqa: E402
from sslab.pretrain import PretrainConfig, pretrain  # noqa: E402
from sslab.train import resolve_device  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="rotation")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="unlabeled images (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    dev = resolve_device(args.device)
    config = PretrainConfig(method=args.method, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                            image_size=args.image_size, data_root=args.data_root)
    result = {"device": str(dev), "torch": torch.__version__, "config": vars(args)}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, budget in (("resident", None), ("streamed", 0)):
            run = pretrain(config, device=dev, out=str(Path(tmp) / name), progress=False, pool_memory=budget)
            s = run.summary
            seen = s["images"] * s["epochs_run"] * (4 if args.method == "rotation" else 1)
            result[name] = {"train_seconds": s["train_seconds"], "images_per_second": seen / s["train_seconds"],
                            "images": s["images"], "epochs": s["epochs_run"]}
            runs[name] = store.load_torch(run.path / "model.pt")["model"]
            print(f"{name:9s} {s['images']} images × {s['epochs_run']} epochs in {s['train_seconds']:.2f} s: "
                  f"{result[name]['images_per_second']:.0f} img/s", flush=True)
    result["ratio_streamed_to_resident"] = (result["streamed"]["images_per_second"]
                                            / result["resident"]["images_per_second"])
    result["max_abs_weight_difference"] = max(
        float((runs["streamed"][k].float() - runs["resident"][k].float()).abs().max()) if runs["resident"][k].numel()
        else 0.0 for k in runs["resident"])
    print(f"streamed / resident: {result['ratio_streamed_to_resident']:.3f}; largest weight difference "
          f"{result['max_abs_weight_difference']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
