"""The AlexNet backbone's training step as its stages are written and as the lab runs them.

As written: conv, BN, ReLU, then the max-pool that follows (every tap computed), and
``F.adaptive_avg_pool2d``'s own backward where a head reads a map pooled to its grid. As the lab
runs them: a pooled stage's ReLU after its pool (``AlexNetBackbone._taps``), pool5's gradient
back in its map's layout, and the grid pool's backward one window at a time
(``sslab.models.average_pool_to_grid``). Each pretext task, and the classifier the end-to-end
protocols train (scratch, fine-tuning, FixMatch, self-training's students).

Three copies of each, the same weights and the same batches — as written, with ReLU after the
pool only, and as the lab runs it — take their steps in turn on one thread (so a change of the
machine's speed hits all); the median step gives images/s, and at the end the copies' weights,
BatchNorm statistics and optimiser states must be equal bit for bit.

    python -m benchmarks.backbone_step                  # the CPU default: 28 px, quarter width, bf16
    python -m benchmarks.backbone_step --precision fp32 --steps 30
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.step import VIEWS  # images per source image, as pretrain counts them
from sslab import models
from sslab.allocator import keep_freed_memory_here
from sslab.evaluate.heads import FeatureHead, ImageClassifier
from sslab.models import AlexNetBackbone, BackboneConfig, pooled_dim
from sslab.pretext import TASKS, build_task
from sslab.pretrain import DEFAULT_WIDTH, PretrainConfig
from sslab.train import make_optimizer, prepare_model, train_step

WIDTH = DEFAULT_WIDTH["cpu"]
CLASSIFIER = "classifier"
CLASSIFIER_BATCH = 256  # a FixMatch step's 32 labeled + 224 strong views
AS_WRITTEN, RELU_AFTER_POOL, LAB = "as written", "ReLU after the pool", "the lab's step"


def relu_first(self, x: torch.Tensor, layer: str = "conv4") -> torch.Tensor:
    """``features`` with every stage as written: conv, BN, ReLU, then the pool."""
    return self._taps(x, layer, every=True)[layer]


@contextlib.contextmanager
def variant(name: str):
    """The backbone's arithmetic of ``name`` while inside."""
    features, pool = AlexNetBackbone.features, models.average_pool_to_grid
    if name == AS_WRITTEN:
        AlexNetBackbone.features = relu_first
    if name != LAB:
        models.average_pool_to_grid = F.adaptive_avg_pool2d
    try:
        yield
    finally:
        AlexNetBackbone.features, models.average_pool_to_grid = features, pool


def classifier(size: int) -> ImageClassifier:
    """What the end-to-end protocols train: the backbone, its conv4 map pooled to 4×4, the lab's MLP head."""
    backbone = AlexNetBackbone(BackboneConfig(1, size, WIDTH))
    return ImageClassifier(backbone, FeatureHead(pooled_dim(backbone, "conv4", 4), 10), "conv4", 4)


def same_state(a, b, opt_a, opt_b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())) and \
        all(torch.equal(x, y) for sa, sb in zip(opt_a.state.values(), opt_b.state.values())
            for x, y in zip(sa.values(), sb.values()) if torch.is_tensor(x))


def one_task(method: str, precision: str, steps: int, warmup: int, size: int, seed: int = 0) -> dict:
    device = torch.device("cpu")
    torch.manual_seed(seed)
    task = (classifier(size) if method == CLASSIFIER else build_task(method, BackboneConfig(1, size, WIDTH))).train()
    prepare_model(task, precision)
    cfg = PretrainConfig(method="rotation" if method == CLASSIFIER else method, epochs=1,
                         width=WIDTH).resolved(device).train_config()
    batch = CLASSIFIER_BATCH if method == CLASSIFIER else cfg.batch_size

    def optimizer_of(model):
        return make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}], cfg)

    models_ = {}
    for name in (AS_WRITTEN, RELU_AFTER_POOL, LAB):
        model = copy.deepcopy(task)
        models_[name] = (model, optimizer_of(model), {})
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (4 * batch, 1, size, size), dtype=torch.uint8, generator=generator)
    data = (pool, torch.randint(0, 10, (len(pool),), generator=generator)) if method == CLASSIFIER else (pool,)
    seconds = {name: [] for name in models_}
    for step in range(warmup + steps):
        index = torch.randperm(len(pool), generator=generator)[:batch]
        for name, (model, optimizer, sums) in models_.items():
            with variant(name):
                torch.manual_seed(seed + step)  # the same augmentation draws for every copy
                started = time.perf_counter()
                train_step(model, data, index, optimizer, cfg.lr, sums, precision)
                elapsed = time.perf_counter() - started
            if step >= warmup:
                seconds[name].append(elapsed)
    (a, opt_a, _), *others = models_.values()
    same = all(same_state(a, b, opt_a, opt_b) for b, opt_b, _ in others)
    return {"batch": batch, "images": batch * VIEWS.get(method, 1), "same": same,
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
    print(f"| task | batch | {AS_WRITTEN}: ms / step | {RELU_AFTER_POOL}: ms / step | {LAB}: ms / step | speed-up | "
          f"the same weights |\n|---|---|---|---|---|---|---|")
    every_same = True
    for method in args.methods.split(","):
        row = one_task(method, args.precision, args.steps, args.warmup, args.size)
        every_same &= row["same"]
        cells = " | ".join(f"{1000 * row[name]:.1f} ({row['images'] / row[name]:.0f} images/s)"
                           for name in (AS_WRITTEN, RELU_AFTER_POOL, LAB))
        print(f"| {method} | {row['batch']} | {cells} | {row[AS_WRITTEN] / row[LAB]:.2f}× | "
              f"{'yes' if row['same'] else 'NO'} |", flush=True)
    print(f"\n{args.precision}, {args.size} px, width {WIDTH}, one thread, median of {args.steps} steps after "
          f"{args.warmup}; speed-up: as written over the lab's step")
    return 0 if every_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
