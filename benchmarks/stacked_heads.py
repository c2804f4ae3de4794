"""What stacking probe heads saves once each head's arithmetic dominates: the lab's MLP head
(1024 → 200 → 200 → 10, BatchNorm) trained by ``train_heads`` alone and 4, 16 and 48 together,
30 epochs of 1024 samples in batches of 128, bf16, one thread; seconds per head.

    python -m benchmarks.stacked_heads
"""
from __future__ import annotations

import time

import torch

from sslab.evaluate.batched_heads import train_heads
from sslab.evaluate.heads import FeatureHead
from sslab.train import TrainConfig


def seconds_per_head(count: int, dim: int = 1024) -> float:
    generator = torch.Generator().manual_seed(count)
    cfg = TrainConfig(epochs=30, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=5e-4, schedule="cosine",
                      patience=0, seed=0)
    probes = [FeatureHead(dim, 10, "mlp", 200) for _ in range(count)]
    train = [(torch.randn(1024, dim, generator=generator), torch.randint(0, 10, (1024,), generator=generator))
             for _ in range(count)]
    val = [(torch.randn(100, dim, generator=generator), torch.randint(0, 10, (100,), generator=generator))
           for _ in range(count)]
    started = time.perf_counter()
    train_heads(probes, train, val, cfg, list(range(count)), torch.device("cpu"), precision="bf16")
    return (time.perf_counter() - started) / count


def main() -> int:
    torch.set_num_threads(1)
    print("| heads trained together | seconds per head |\n|---|---|")
    for count in (1, 4, 16, 48):
        print(f"| {count} | {seconds_per_head(count):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
