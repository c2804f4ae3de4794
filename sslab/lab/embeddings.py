"""UMAP panels of what each pretext task learned (notebook 03)."""
from __future__ import annotations

from typing import Optional

import torch

from ..models import check_layer
from .params import LabSettings


@torch.no_grad()
def embeddings(runs: dict, settings: LabSettings, layer: Optional[str] = None, random_init: bool = True) -> list:
    """UMAP panels of ``settings.points`` test images (stratified, seeded): each run's pooled
    ``layer`` features (what the probe sees), VAE runs in their latent mean μ when
    ``settings.vae_latent``, and — as the reference that shows what the architecture alone
    gives — the same backbone with random weights. The features are computed here; the UMAPs
    (seconds each, one thread) run side by side in worker processes where ``SSLAB_WORKERS`` allows."""
    from ..augment import to_float
    from ..embed import embed, stratified_sample
    from ..models import BackboneConfig, build_backbone, extract_features
    from ..parallel import default_workers, run_all
    layer = check_layer(layer or settings.resolved_layer, settings.backbone)
    test = settings.splits.test
    index = torch.from_numpy(stratified_sample(test.labels, settings.points, seed=0))
    images, labels = test.images[index], test.labels[index]
    grid = settings.eval_config().grid
    panels = []  # (name, features, space) of each panel
    for method, run in runs.items():
        task = run.load_task(settings.device)
        if settings.vae_latent and hasattr(task, "encode"):
            feats = torch.cat([task.encode(to_float(c.to(settings.device)))[0].float().cpu()
                               for c in images.split(1024)])
            space = "latent μ"
        else:
            feats = extract_features(task.backbone, images, layer, grid, settings.device,
                                     precision=settings.resolved_precision).cpu()
            space = f"{layer} ({grid}×{grid} pooled)"
        panels.append((method, feats, space))
    if random_init and runs:
        like = next(iter(runs.values()))
        torch.manual_seed(0)
        backbone = build_backbone(BackboneConfig(**like.summary["backbone"])).to(settings.device)
        feats = extract_features(backbone, images, layer, grid, settings.device,
                                 precision=settings.resolved_precision).cpu()
        panels.append(("random init", feats, f"{layer} ({grid}×{grid} pooled)"))
    return run_all([(embed, (name, feats, labels, space, test.classes, settings.score), {})
                    for name, feats, space in panels], default_workers())


def separation_sentence(panels: list) -> str:
    ranked = sorted(panels, key=lambda e: e.score, reverse=True)
    text = ", ".join(f"{e.name} ({e.score_label})" for e in ranked)
    return f"Classes separate best in {ranked[0].name}'s space: {text}."

