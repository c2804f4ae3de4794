"""Two of the levers that shortened `make lab`, each timed against what it replaced, on the shapes
the lab uses:

- the optimiser step: torch's per-tensor Adam and SGD against their fused form (one kernel a
  step), on the parameters of 32 stacked probe heads (Adam) and of a quarter-width AlexNet
  (SGD, Nesterov momentum, as rotation and FixMatch use it);
- label propagation's 20 multiplications by the normalised affinity of a 20 000-node k-NN graph
  (k = 20, the notebooks' pool), with the sparse matrix in coordinate form and in compressed rows.

    python -m benchmarks.levers            # one thread, the median of 5 repeats each
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch


def _median_seconds(step, repeats: int = 5, per_repeat: int = 20) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(per_repeat):
            step()
        times.append((time.perf_counter() - started) / per_repeat)
    return statistics.median(times)


def optimizer_step(kind: str, fused: bool) -> float:
    """Seconds of one step of ``kind`` (adam, sgd) over the lab's parameter shapes."""
    from sslab.models import BackboneConfig, build_backbone
    generator = torch.Generator().manual_seed(0)
    if kind == "adam":  # 32 probe heads stacked: 1024 → 200 → 200 → 10, with BatchNorm
        shapes = [(32, 200, 1024), (32, 200), (32, 200), (32, 200), (32, 200, 200), (32, 200), (32, 200), (32, 200),
                  (32, 10, 200), (32, 10)]
        params = [torch.randn(*s, generator=generator).requires_grad_() for s in shapes]
    else:
        params = list(build_backbone(BackboneConfig(1, 28, 0.25)).parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    options = dict(fused=True) if fused else {}
    optimizer = (torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4, **options) if kind == "adam" else
                 torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, **options))
    return _median_seconds(optimizer.step)


def propagation(layout: str, nodes: int = 20000, k: int = 20, classes: int = 10) -> float:
    """Seconds of label propagation's 20 multiplications, the affinity in ``layout`` (coo, csr)."""
    from sslab.evaluate.graph import normalized_affinity
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(nodes).repeat_interleave(k)
    cols = torch.randint(nodes, (nodes * k,), generator=generator)
    affinity = normalized_affinity(rows, cols, torch.rand(nodes * k, generator=generator), nodes)
    if layout == "csr":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            affinity = affinity.to_sparse_csr()
    z = torch.rand(nodes, classes, generator=generator)

    def twenty():
        for _ in range(20):
            affinity @ z
    return _median_seconds(twenty, per_repeat=1)


def main() -> int:
    torch.set_num_threads(1)
    print("| what | before | after | speed-up |\n|---|---|---|---|")
    for kind, what in (("adam", "Adam step, 32 stacked probe heads"), ("sgd", "SGD step, quarter-width AlexNet")):
        before, after = optimizer_step(kind, False), optimizer_step(kind, True)
        print(f"| {what} | {1e3 * before:.2f} ms (per tensor) | {1e3 * after:.2f} ms (fused) | {before / after:.1f}× |")
    before, after = propagation("coo"), propagation("csr")
    print(f"| label propagation, 20 steps on 20 000 nodes | {1e3 * before:.0f} ms (coordinates) | "
          f"{1e3 * after:.0f} ms (compressed rows) | {before / after:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
