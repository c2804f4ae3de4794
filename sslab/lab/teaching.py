"""The notebooks' method pages and the cells that check them.

Each notebook shows the heart of its method in a few lines of plain PyTorch on one real batch (a
"page"); the cell under it checks that the page computes what the library computes. The
functions here compute the same thing with the library — the same weights, the same batch, the
same random draws — and return one confirming line per quantity, or raise an ``AssertionError``
naming what differs unless the two agree to float tolerance. Pages and checks run on the CPU in
fp32: the library's bf16 runs round to about three digits, far coarser than the tolerance.

Also what notebook 00 ends with: its plain-PyTorch probe accuracies beside the library's.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from .params import LabSettings

# Two fp32 computations of the same formula differ by rounding alone: far below these.
RTOL, ATOL = 1e-4, 1e-5
CPU = torch.device("cpu")


# ---------------------------------------------------------------- comparing

def _tensor(value) -> torch.Tensor:
    return value.detach().cpu() if torch.is_tensor(value) else torch.as_tensor(value)


def _number(value) -> str:
    """Four decimals for the losses and shares the pages print; a learning rate keeps its digits."""
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"


def agree(what: str, page, library, rtol: float = RTOL, atol: float = ATOL) -> str:
    """One line saying the page's ``what`` equals the library's — numbers and float tensors to
    ``rtol``/``atol``, integer and boolean tensors exactly — or an ``AssertionError`` naming
    ``what``, both values and where they differ."""
    p, lib = _tensor(page), _tensor(library)
    if p.shape != lib.shape:
        raise AssertionError(f"the page's {what} has shape {tuple(p.shape)}, the library's {tuple(lib.shape)}")
    exact = not (p.is_floating_point() or lib.is_floating_point())
    if p.numel() == 1:
        if exact and p.item() != lib.item():
            raise AssertionError(f"the page's {what} {p.item()} ≠ the library's {lib.item()}")
        difference = abs(p.double().item() - lib.double().item())
        if difference > atol + rtol * abs(lib.double().item()):
            raise AssertionError(f"the page's {what} {p.item():.6g} ≠ the library's {lib.item():.6g} (they differ "
                                 f"by {difference:.2g}, more than the tolerance {atol:g} + {rtol:g} × |value|)")
        if exact:
            return f"the page's {what} {p.item()} = the library's {lib.item()}"
        return f"the page's {what} {_number(p.item())} = the library's {_number(lib.item())}"
    if exact:
        wrong = (p != lib).flatten().nonzero().squeeze(1)
        if len(wrong):
            first = int(wrong[0])
            raise AssertionError(f"the page's {what} differs from the library's in {len(wrong)} of {p.numel()} "
                                 f"places (first at {first}: page {p.flatten()[first].item()}, library "
                                 f"{lib.flatten()[first].item()})")
        summary = f"{int(p.sum())} of {p.numel()} set" if p.dtype == torch.bool else f"all {p.numel()} values"
        return f"the page's {what} = the library's ({summary})"
    difference = (p.double() - lib.double()).abs()
    allowed = atol + rtol * lib.double().abs()
    if not bool((difference <= allowed).all()):
        worst = int((difference - allowed).flatten().argmax())
        raise AssertionError(f"the page's {what} differs from the library's: at {worst} the page has "
                             f"{p.flatten()[worst].item():.6g}, the library {lib.flatten()[worst].item():.6g} "
                             f"(largest difference {difference.max().item():.2g}, tolerance {atol:g} + {rtol:g} "
                             f"× |value|)")
    return (f"the page's {what} = the library's ({p.numel()} values, largest difference "
            f"{difference.max().item():.1g})")


def agree_states(what: str, page: dict, library: dict, rtol: float = RTOL, atol: float = ATOL) -> str:
    """The page's weights (a state dict) against the library's, entry by entry in their order
    (a plain ``nn.Sequential`` names its layers 0, 1, 2 … where the library names them): the same
    shapes and values, or an ``AssertionError`` naming the library's entry that differs."""
    page, library = list(page.items()), list(library.items())
    if [tuple(v.shape) for _, v in page] != [tuple(v.shape) for _, v in library]:
        raise AssertionError(f"the page's {what} are not the library's layers: the page has "
                             f"{[(k, tuple(v.shape)) for k, v in page]}, the library "
                             f"{[(k, tuple(v.shape)) for k, v in library]}")
    largest, count = 0.0, 0
    for (_, p), (name, lib) in zip(page, library):
        agree(f"{what}: {name}", p, lib, rtol, atol)
        if p.is_floating_point() and p.numel():
            largest = max(largest, (p.double() - lib.double()).abs().max().item())
        count += p.numel()
    return f"the page's {what} = the library's ({len(page)} tensors, {count} values, largest difference {largest:.1g})"


# ---------------------------------------------------------------- 01: the pretext losses

TERMS = {"loss": "loss", "recon": "reconstruction error", "kl": "KL", "triplet": "triplet loss",
         "rot_acc": "accuracy", "contrastive_acc": "share of positives found"}


@contextlib.contextmanager
def _sampling(task):
    """A VAE draws z = μ + σ·ε only while it trains (evaluation decodes μ). Only the task's own flag
    is set, so every BatchNorm keeps its running statistics: the training form of the loss on the
    page's numbers."""
    was = task.training
    task.training = True
    try:
        yield
    finally:
        task.training = was


@torch.no_grad()
def library_pretext_loss(task, images: torch.Tensor, seed: int = 0) -> dict:
    """``task.loss(images, train=False)`` (no training augmentation, BatchNorm on its running
    statistics) with the random draws a page makes after ``torch.manual_seed(seed)``: the VAEs'
    ε, the siamese-VAE's positive views and negative offset; SimCLR draws its two views from a
    generator seeded with the library's evaluation seed. Name → value."""
    from ..pretext.simclr import EVAL_VIEW_SEED
    if task.name == "simclr" and seed != EVAL_VIEW_SEED:
        raise ValueError(f"seed={seed} is not allowed for simclr: the library's evaluation draws its two views "
                         f"from seed {EVAL_VIEW_SEED}; allowed: {EVAL_VIEW_SEED}")
    with torch.random.fork_rng(devices=[]), _sampling(task):
        torch.manual_seed(seed)
        out = task.loss(images, train=False)
    return {name: float(value) for name, value in out.items()}


def check_pretext_loss(task, images: torch.Tensor, page: dict, seed: int = 0) -> str:
    """The page's loss (and each term it computed: ``recon``, ``kl``, ``triplet``) of ``task`` on
    ``images`` (uint8, or floats in [0, 1] as the pages hand them) against
    :func:`library_pretext_loss`, one line per term."""
    library = library_pretext_loss(task, images, seed)
    unknown = sorted(set(page) - set(library))
    if unknown:
        raise ValueError(f"page terms {unknown} are not allowed for {task.name}; allowed: {', '.join(library)}")
    # the loss's parts before the loss, and the loss before the shares it scores: a failure names the term
    # that differs
    order = ("recon", "kl", "triplet", "loss")
    lines = {name: agree(f"{task.name} {TERMS.get(name, name)}", page[name], library[name])
             for name in sorted(page, key=lambda name: order.index(name) if name in order else len(order))}
    return "\n".join(lines[name] for name in page)


# ---------------------------------------------------------------- 02 and 04: the probe

def _cell(protocol: str, run, budget: int, seed: int, settings: LabSettings, head: Optional[str] = None):
    from ..evaluate.cells import open_cell
    return open_cell(protocol, run, budget, seed, head=head, config=settings.eval_config(), device=CPU,
                     out=settings.out, deterministic=settings.deterministic)


def labeled_images(run, budget: int, seed: int, settings: LabSettings) -> tuple:
    """The labeled images (uint8 N×C×H×W) and labels of ``run``'s cells at ``budget`` and ``seed``:
    what the probe, fine-tuning and FixMatch train on."""
    cell = _cell("probe", run, budget, seed, settings)
    train_idx, _ = cell.labeled_split()
    train = cell.splits.train
    return train.images[train_idx], train.labels[train_idx]


def check_probe_step(run, settings: LabSettings, budget: int, seed: int, images: torch.Tensor,
                     labels: torch.Tensor, page: dict) -> str:
    """A page's probe — the study's ``mlp`` head, whatever ``head`` the notebook's table uses —
    against the library's: its pooled features of ``images`` (``features``), its head as it starts
    (``before``: the library's probe head of this cell under the same seed,
    :func:`sslab.evaluate.probe.new_probe`), and one training step on the page's batch, standardised
    with the page's ``mean`` and ``std``: the same ``loss`` and the same weights ``after``."""
    from ..evaluate.heads import FeatureHead
    from ..evaluate.probe import head_train_config, new_probe
    from ..models import extract_features
    from ..train import lr_factor, make_optimizer, train_step
    cell = _cell("probe", run, budget, seed, settings, head="mlp")
    cfg = cell.cfg
    features = extract_features(run.load_backbone(CPU), images, cfg.layer, cfg.grid, CPU, precision="fp32")
    lines = [agree(f"{cfg.layer} features pooled to {cfg.grid}×{cfg.grid}", page["features"], features)]
    start = new_probe(cell).model.classifier.cpu().state_dict()
    lines.append(agree_states("probe head as it starts", page["before"], start))
    head = FeatureHead(features.shape[1], cell.splits.train.num_classes, "mlp", cfg.hidden, page["mean"].detach(),
                       page["std"].detach())
    head.classifier.load_state_dict(start)
    train_config = head_train_config(cfg, len(labels), seed)
    optimizer = make_optimizer([{"params": list(head.parameters()), "lr_scale": 1.0}], train_config)
    loss = train_step(head, (features, labels), torch.arange(len(labels)), optimizer,
                      train_config.lr * lr_factor(train_config, 0.0, 0.0), {})
    lines.append(agree("probe loss", page["loss"], loss))
    lines.append(agree_states("probe head after one step", page["after"], head.classifier.state_dict()))
    return "\n".join(lines)


# ---------------------------------------------------------------- 05 and 06: what a cell hands its training

@dataclass
class Handover:
    """What an evaluation cell hands :func:`sslab.train.fit`: its model as it starts, its data,
    its training settings and the optimiser's parameter groups (each with its ``lr_scale``)."""

    model: torch.nn.Module
    data: tuple
    train_config: object
    param_groups: Optional[list]


class _HandedOver(Exception):
    def __init__(self, handover: Handover):
        super().__init__("handed over")
        self.handover = handover


def handover(protocol: str, run, budget: int, seed: int, settings: LabSettings) -> Handover:
    """What the ``protocol`` cell (``finetune`` or ``fixmatch``) of ``run`` at ``budget`` and
    ``seed`` hands the training loop, on the CPU: the cell's own code runs up to its first step
    and stops there, so nothing is trained or stored (except the probe head both start from,
    trained and stored first if missing, as the cell would). The caller's random stream is kept."""
    from ..evaluate.cells import Cell
    from ..evaluate.end_to_end import compute_finetune
    from ..evaluate.fixmatch import compute_fixmatch
    computes = {"finetune": compute_finetune, "fixmatch": compute_fixmatch}
    if protocol not in computes:
        raise ValueError(f"protocol={protocol!r} is not allowed; allowed: {', '.join(computes)}")

    @dataclass
    class HandingOverCell(Cell):
        def train(self, model, data, train_config, validate=None, param_groups=None, desc=None, **options):
            raise _HandedOver(Handover(model, data, train_config, param_groups))

    cell = _cell(protocol, run, budget, seed, settings)
    stopping = HandingOverCell(**{f.name: getattr(cell, f.name) for f in fields(Cell)})
    with torch.random.fork_rng(devices=[]):
        try:
            computes[protocol](stopping)
        except _HandedOver as handed:
            return handed.handover
    raise RuntimeError(f"the {protocol} cell finished without handing anything to its training loop")


def _group_names(model: torch.nn.Module, groups: list) -> list:
    """The top-level part of ``model`` (backbone, head …) each parameter group trains."""
    part = {id(p): name for name, child in model.named_children() for p in child.parameters()}
    return [part.get(id(group["params"][0]), f"group {i}") for i, group in enumerate(groups)]


def check_finetune_step(start: Handover, images: torch.Tensor, labels: torch.Tensor, page: dict,
                        seed: int = 0) -> str:
    """A page's fine-tuning step against the library's: the learning rate of each part (``lrs``:
    part name → lr), the ``loss`` of one step on the page's batch with the augmentation drawn after
    ``torch.manual_seed(seed)``, and every weight ``after`` it. The library's step is
    :func:`sslab.train.train_step` with the optimiser and groups the fine-tuning cell hands
    :func:`~sslab.train.fit` (``start``, which it moves)."""
    from ..train import lr_factor, make_optimizer, train_step
    config = start.train_config
    optimizer = make_optimizer(start.param_groups, config)
    start.model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = train_step(start.model, (images, labels), torch.arange(len(labels)), optimizer,
                          config.lr * lr_factor(config, 0.0, 0.0), {})
    names = _group_names(start.model, optimizer.param_groups)
    if sorted(names) != sorted(page["lrs"]):
        raise AssertionError(f"the page trains the parts {sorted(page['lrs'])}, the library {sorted(names)}")
    lines = [agree(f"{name}'s learning rate", page["lrs"][name], group["lr"], rtol=1e-6, atol=0.0)
             for name, group in zip(names, optimizer.param_groups)]
    lines.append(agree("fine-tuning loss", page["loss"], loss))
    lines.append(agree_states("weights after one step", page["after"], start.model.state_dict()))
    return "\n".join(lines)


# ---------------------------------------------------------------- 06: the pool at work

@torch.no_grad()
def check_fixmatch_mask(start: Handover, weak: torch.Tensor, strong: torch.Tensor, page: dict) -> str:
    """A page's FixMatch unlabeled loss against the library's: the classifier FixMatch starts from
    (``start``, its handover) on the page's weak and strong views, the threshold the library trains
    with as it stands at the first step (a fixed τ, or FreeMatch's self-adaptive τ_t(c) after taking
    this batch), then :func:`sslab.evaluate.fixmatch.fixmatch_unlabeled_loss`: the same
    ``thresholds`` (where the page shows them), confidence ``mask`` and ``loss``."""
    import copy

    from ..evaluate.fixmatch import SelfAdaptiveThreshold, fixmatch_unlabeled_loss
    classifier = start.model.classifier.eval()
    logits_weak = classifier(weak)
    threshold = start.model.threshold
    lines = []
    if isinstance(threshold, SelfAdaptiveThreshold):
        threshold = copy.deepcopy(threshold).update(logits_weak.float().softmax(1))
        lines.append(agree("class thresholds τ(c)", page["thresholds"], threshold))
    loss, mask = fixmatch_unlabeled_loss(logits_weak, classifier(strong), threshold)
    return "\n".join(lines + [agree("confidence mask", page["mask"].bool(), mask.bool()),
                              agree("FixMatch unlabeled loss", page["loss"], loss)])


def check_propagation(nodes: torch.Tensor, labels: torch.Tensor, page_probs: torch.Tensor,
                      settings: LabSettings) -> str:
    """A page's label propagation on the k-NN graph of its ``nodes`` (L2-normalised rows; labels
    −1 where unknown) against the library's k-NN search, normalised affinity and propagation
    (:mod:`sslab.evaluate.graph`) with the notebook's ``lp_*`` settings: the same class
    distributions and the same propagated labels."""
    from ..evaluate.graph import knn_search, normalized_affinity, propagate
    cfg = settings.eval_config()
    sims, neighbours = knn_search(nodes, nodes, cfg.lp_k, skip_self=True)
    rows = torch.arange(len(nodes)).repeat_interleave(neighbours.shape[1])
    affinity = normalized_affinity(rows, neighbours.flatten(), sims.flatten(), len(nodes), cfg.lp_gamma)
    probs = propagate(affinity, labels, page_probs.shape[1], cfg.lp_alpha, cfg.lp_iterations)
    return "\n".join([agree("propagated class distributions", page_probs, probs),
                      agree("propagated labels", page_probs.argmax(1), probs.argmax(1))])


def check_selection(probs: torch.Tensor, chosen: torch.Tensor, labels: torch.Tensor, per_class: int,
                    settings: LabSettings) -> str:
    """A page's class-balanced pseudo-labels (``chosen`` rows of ``probs`` and their ``labels``)
    against self-training's :func:`~sslab.evaluate.selftrain.select_balanced` on the propagation's
    confidence, at ``per_class`` and the notebook's ``st_threshold``: the same images, the same labels."""
    from ..evaluate.selftrain import propagation_confidence, select_balanced
    rows, pseudo = select_balanced(probs, propagation_confidence(probs), per_class, settings.eval_config().st_threshold)
    page_order, library_order = chosen.argsort(), rows.argsort()
    return "\n".join([agree("chosen images", chosen[page_order], rows[library_order]),
                      agree("pseudo-labels", labels[page_order], pseudo[library_order])])


# ---------------------------------------------------------------- 07: which images to label

def selection_points(run, settings: LabSettings, images: int = 2000) -> torch.Tensor:
    """``images`` of ``run``'s pool in the space the labeled images are chosen in (the run's frozen
    features, PCA fitted on the pool, L2-normalised; :mod:`sslab.evaluate.selection`): N×d on the CPU."""
    from ..evaluate.pool import pool_graph
    graph, _ = pool_graph(run, settings.eval_config().resolved(settings.device, run.arch), settings.device)
    return graph.nodes[:images].cpu()


def check_typical(points: torch.Tensor, budget: int, seed: int, page_picks: Sequence[int]) -> str:
    """A page's TypiClust picks (one per k-means cluster, the most typical member) against
    :func:`~sslab.evaluate.selection.select_typical` on the same points, budget and seed, with the
    lab's default k-means starts: the same images (in any order)."""
    from ..evaluate.cells import EvalConfig
    from ..evaluate.selection import select_typical
    library = select_typical(points, budget, seed, starts=EvalConfig().select_starts)
    return agree("typical images", torch.tensor(sorted(page_picks)), library.sort().values)


# ---------------------------------------------------------------- 00: the page against the lab

def _spread(values: Sequence[float]) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def agreement(page: Sequence[float], library: Sequence[float]) -> dict:
    """Whether the page's accuracies (one per seed) and the library's agree within the seeds'
    spread: the difference of their means is at most the larger of their two standard deviations
    over seeds. ``agree`` is None with one seed (no spread to compare with)."""
    if len(page) != len(library) or not page:
        raise ValueError(f"page={list(page)} and library={list(library)} are not allowed; allowed: one accuracy "
                         f"per seed in each, as many in both")
    (page_mean, page_std), (library_mean, library_std) = _spread(page), _spread(library)
    spread = max(page_std, library_std) if len(page) > 1 else math.nan
    difference = page_mean - library_mean
    return {"page_mean": page_mean, "page_std": page_std, "library_mean": library_mean, "library_std": library_std,
            "difference": difference, "spread": spread,
            "agree": None if len(page) < 2 else abs(difference) <= spread}


def _percent(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def agreement_frame(page: Sequence[float], library: Sequence[float], seeds: Sequence[int]):
    """Top-1 % per seed of the page and the library, side by side, and their mean ± std."""
    import pandas as pd
    if len(seeds) != len(page):
        raise ValueError(f"seeds={list(seeds)} is not allowed; allowed: one seed per accuracy ({len(page)})")
    a = agreement(page, library)
    frame = pd.DataFrame({"this page (plain PyTorch)": [f"{100 * v:.1f}" for v in page],
                          "the lab (sslab)": [f"{100 * v:.1f}" for v in library]},
                         index=[f"seed {s}" for s in seeds])
    frame.loc["mean ± std"] = [_percent(a["page_mean"], a["page_std"]), _percent(a["library_mean"], a["library_std"])]
    frame.columns.name = "top-1 %"
    return frame


def agreement_sentence(page: Sequence[float], library: Sequence[float]) -> str:
    """One sentence: both means, their difference and whether it is within the seeds' spread
    (:func:`agreement`)."""
    a = agreement(page, library)
    text = (f"The page's probe reaches {_percent(a['page_mean'], a['page_std'])} % top-1 and the lab's "
            f"{_percent(a['library_mean'], a['library_std'])} % ({len(page)} seed{'s' if len(page) > 1 else ''}): "
            f"the means differ by {100 * abs(a['difference']):.1f} points")
    if a["agree"] is None:
        return text + ", and one seed gives no spread to compare that with."
    if a["agree"]:
        return text + f", within the seeds' spread ({100 * a['spread']:.1f} points): they agree."
    return text + (f", more than the seeds' spread ({100 * a['spread']:.1f} points): they do not agree — look for a "
                   f"setting that differs.")
