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

With ``--groupings``: whether a head's weights depend on the heads it trains beside. The same 36
heads trained as the lab's probe trains them (60 epochs, early stopping on 100 validation images,
patience 10, bf16, one thread) all together, then in groups of 18, 12, 9, 4 and 3: how many heads
end with weights other than together's, bit for bit, and the largest difference of any weight.

    python -m benchmarks.stacked_heads --groupings
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace
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


def groupings(sizes=(36, 18, 12, 9, 4, 3), count: int = 36, dim: int = 1024) -> dict:
    """``{size: (heads whose weights differ from the first size's, largest difference)}`` for the
    same ``count`` heads trained in groups of each of ``sizes`` (the first: the reference)."""
    torch.set_num_threads(1)
    cfg, probes, train, val = _group(count, dim, 60, 100, 0)
    cfg = replace(cfg, patience=10)
    weights = {}
    for size in sizes:
        heads = copy.deepcopy(probes)
        for start in range(0, count, size):
            part = slice(start, start + size)
            train_heads(heads[part], train[part], val[part], cfg, list(range(count))[part], torch.device("cpu"),
                        precision="bf16")
        weights[size] = [head.state_dict() for head in heads]
    reference = weights[sizes[0]]
    found = {}
    for size in sizes[1:]:
        pairs = list(zip(reference, weights[size]))
        differ = sum(any(not torch.equal(a[key], b[key]) for key in a) for a, b in pairs)
        largest = max(float((a[key].double() - b[key].double()).abs().max()) for a, b in pairs for key in a)
        found[size] = (differ, largest)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--products", action="store_true", help="torch's product against the lab's (see above)")
    only.add_argument("--groupings", action="store_true", help="the same heads in groups of other sizes (see above)")
    args = parser.parse_args()
    if args.groupings:
        print("| heads a group | heads whose weights differ from 36 together's | largest difference |\n|---|---|---|")
        for size, (differ, largest) in groupings().items():
            print(f"| {size} | {differ} of 36 | {largest:.1e} |")
        return 0
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
