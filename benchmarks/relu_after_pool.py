"""ReLU after the max-pool: the AlexNet backbone's training step with each pooled stage's ReLU
before its pool (every tap computed, as the stages are written) and after it (what the lab runs),
for each pretext task and for the classifier the end-to-end protocols train.

Two copies of each pretext task, the same weights and the same batches, one per order, take their
steps in turn on one thread (so a change of the machine's speed hits both); the median step gives
images/s, and at the end the two copies' weights, BatchNorm statistics and optimiser states must
be equal bit for bit.

    python -m benchmarks.relu_after_pool                  # the CPU default: 28 px, quarter width, bf16
    python -m benchmarks.relu_after_pool --precision fp32 --steps 30
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from sslab.allocator import keep_freed_memory_here
from sslab.evaluate.heads import FeatureHead, ImageClassifier
from sslab.models import AlexNetBackbone, BackboneConfig, pooled_dim
from sslab.pretext import TASKS, build_task
from sslab.pretrain import DEFAULT_WIDTH, PretrainConfig
from sslab.train import make_optimizer, prepare_model, train_step

WIDTH = DEFAULT_WIDTH["cpu"]
VIEWS = {"rotation": 4, "simclr": 2}  # images per source image, as pretrain counts them
CLASSIFIER = "classifier"
CLASSIFIER_BATCH = 256  # a FixMatch step's 32 labeled + 224 strong views


def relu_first(self, x: torch.Tensor, layer: str = "conv4") -> torch.Tensor:
    """``features`` with every stage as written: conv, BN, ReLU, then the pool."""
    return self._taps(x, layer, every=True)[layer]


def classifier(size: int) -> ImageClassifier:
    """What the end-to-end protocols train (scratch, fine-tuning, FixMatch, self-training's
    students): the backbone, its conv4 map pooled to 4×4, the lab's MLP head."""
    backbone = AlexNetBackbone(BackboneConfig(1, size, WIDTH))
    return ImageClassifier(backbone, FeatureHead(pooled_dim(backbone, "conv4", 4), 10), "conv4", 4)


def one_task(method: str, precision: str, steps: int, warmup: int, size: int, seed: int = 0) -> dict:
    device = torch.device("cpu")
    torch.manual_seed(seed)
    task = (classifier(size) if method == CLASSIFIER else build_task(method, BackboneConfig(1, size, WIDTH))).train()
    prepare_model(task, precision)
    twin = copy.deepcopy(task)
    cfg = PretrainConfig(method="rotation" if method == CLASSIFIER else method, epochs=1,
                         width=WIDTH).resolved(device).train_config()
    batch = CLASSIFIER_BATCH if method == CLASSIFIER else cfg.batch_size

    def optimizer_of(model):
        return make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}], cfg)

    models = {"ReLU, then pool": (twin, optimizer_of(twin), {}), "pool, then ReLU": (task, optimizer_of(task), {})}
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (4 * batch, 1, size, size), dtype=torch.uint8, generator=generator)
    data = (pool, torch.randint(0, 10, (len(pool),), generator=generator)) if method == CLASSIFIER else (pool,)
    seconds = {name: [] for name in models}
    original = AlexNetBackbone.features
    for step in range(warmup + steps):
        index = torch.randperm(len(pool), generator=generator)[:batch]
        for name, (model, optimizer, sums) in models.items():
            AlexNetBackbone.features = relu_first if name == "ReLU, then pool" else original
            try:
                # the same augmentation draws for both copies
                torch.manual_seed(seed + step)
                started = time.perf_counter()
                train_step(model, data, index, optimizer, cfg.lr, sums, precision)
                elapsed = time.perf_counter() - started
            finally:
                AlexNetBackbone.features = original
            if step >= warmup:
                seconds[name].append(elapsed)
    (a, opt_a, _), (b, opt_b, _) = models.values()
    same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())) and \
        all(torch.equal(x, y) for sa, sb in zip(opt_a.state.values(), opt_b.state.values())
            for x, y in zip(sa.values(), sb.values()) if torch.is_tensor(x))
    images = batch * VIEWS.get(method, 1)
    return {"batch": batch, "images": images, "same": same,
            **{name: statistics.median(times) for name, times in seconds.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(tuple(TASKS) + (CLASSIFIER,)),
                        help=f"pretext tasks, and {CLASSIFIER}: the end-to-end protocols' classifier")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=28)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory_here()  # as in the lab's processes
    print("| task | batch | ReLU, then pool: ms / step | pool, then ReLU: ms / step | speed-up | the same weights |\n"
          "|---|---|---|---|---|---|")
    every_same = True
    for method in args.methods.split(","):
        row = one_task(method, args.precision, args.steps, args.warmup, args.size)
        before, after = row["ReLU, then pool"], row["pool, then ReLU"]
        every_same &= row["same"]
        print(f"| {method} | {row['batch']} | {1000 * before:.1f} ({row['images'] / before:.0f} images/s) | "
              f"{1000 * after:.1f} ({row['images'] / after:.0f} images/s) | {before / after:.2f}× | "
              f"{'yes' if row['same'] else 'NO'} |", flush=True)
    print(f"\n{args.precision}, {args.size} px, width {WIDTH}, one thread, median of {args.steps} steps "
          f"after {args.warmup}")
    return 0 if every_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
