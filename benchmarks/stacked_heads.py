"""What stacking probe heads saves once each head's arithmetic dominates: the lab's MLP head
(1024 → 200 → 200 → 10, BatchNorm) trained by ``train_heads`` alone and 4, 16 and 48 together,
30 epochs of 1024 samples in batches of 128, bf16, one thread; seconds per head.

    python -m benchmarks.stacked_heads

With ``--products``: what the lab's stacked product (``_StackedProduct``: the weights' gradient
computed in their own layout, one cast to float32) saves against torch's own autograd of
``bmm(x, weight.transpose(1, 2))``, for the group notebook 07 trains without validation images
(12 heads, 60 epochs, no early stopping), on 1 and 2 threads: each version trains the same heads
from the same weights on the same data, in turn, three times; the median seconds of each, and
whether the two ended with the same weights bit for bit.

    python -m benchmarks.stacked_heads --products
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from sslab.evaluate import batched_heads
from sslab.evaluate.batched_heads import train_heads
from sslab.evaluate.heads import FeatureHead
from sslab.train import TrainConfig


def _group(count: int, dim: int, epochs: int, validation: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=5e-4, schedule="cosine",
                      patience=0, seed=0)
    probes = []
    for head in range(count):
        torch.manual_seed(head)
        probes.append(FeatureHead(dim, 10, "mlp", 200, torch.randn(dim, generator=generator),
                                  torch.rand(dim, generator=generator) + 0.5))
    train = [(torch.randn(1024, dim, generator=generator), torch.randint(0, 10, (1024,), generator=generator))
             for _ in range(count)]
    val = [(torch.randn(validation, dim, generator=generator), torch.randint(0, 10, (validation,), generator=generator))
           for _ in range(count)]
    return cfg, probes, train, val


def seconds_per_head(count: int, dim: int = 1024) -> float:
    cfg, probes, train, val = _group(count, dim, 30, 100, count)
    started = time.perf_counter()
    train_heads(probes, train, val, cfg, list(range(count)), torch.device("cpu"), precision="bf16")
    return (time.perf_counter() - started) / count


def _torch_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, weight.transpose(1, 2))


def products(threads: int, count: int = 12, epochs: int = 60, repeats: int = 3) -> dict:
    """Seconds of one group trained with torch's product and with the lab's, in turn."""
    torch.set_num_threads(threads)
    cfg, probes, train, val = _group(count, 1024, epochs, 0, 0)
    lab_product = batched_heads._StackedProduct.apply
    seconds: dict = {"torch's product": [], "the lab's product": []}
    states: dict = {}
    for _ in range(repeats):
        for name, product in (("torch's product", _torch_product), ("the lab's product", lab_product)):
            heads = copy.deepcopy(probes)
            batched_heads._StackedProduct.apply = product
            try:
                started = time.perf_counter()
                train_heads(heads, train, val, cfg, list(range(count)), torch.device("cpu"), precision="bf16")
                seconds[name].append(time.perf_counter() - started)
            finally:
                batched_heads._StackedProduct.apply = lab_product
            states[name] = [h.state_dict() for h in heads]
    same = all(torch.equal(a[key], b[key]) for a, b in zip(*states.values()) for key in a)
    return {name: statistics.median(values) for name, values in seconds.items()} | {"same weights": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", action="store_true", help="torch's product against the lab's (see above)")
    args = parser.parse_args()
    if args.products:
        print("| threads | torch's product: s | the lab's product: s | speed-up | the same weights |")
        print("|---|---|---|---|---|")
        for threads in (1, 2):
            row = products(threads)
            torch_s, lab_s = row["torch's product"], row["the lab's product"]
            print(f"| {threads} | {torch_s:.2f} | {lab_s:.2f} | {torch_s / lab_s:.2f}× | "
                  f"{'yes' if row['same weights'] else 'no'} |")
        return 0
    torch.set_num_threads(1)
    print("| heads trained together | seconds per head |\n|---|---|")
    for count in (1, 4, 16, 48):
        print(f"| {count} | {seconds_per_head(count):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
