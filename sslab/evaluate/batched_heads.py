"""Many probe heads trained together as one batched model.

A label-budget sweep trains dozens of small heads on cached features (methods × budgets ×
seeds). One at a time, each is hundreds of tiny steps whose cost is launching kernels, not
arithmetic; stacked, the heads of one group share every launch: one batched matrix product per
layer for all of them (``torch.bmm``), one optimiser step for all their weights.

Each head trains exactly as :func:`sslab.train.fit` would train it alone (with fit's own
early stopping and divergence check): its own initial
weights (built by the caller with the cell's seed), its own permutation of its own labeled
images each epoch (a generator seeded with the cell's seed), its own BatchNorm batch statistics
and running averages, Adam with the same settings (Adam is elementwise, so stacking does not
mix heads), the same per-step cosine learning rate, validation every epoch, and its own early
stopping (a head that has stopped keeps its best weights while the others go on). Only the
floating-point order of the sums differs from the one-at-a-time run (bmm against mm): results
agree to rounding, not bit for bit, and Adam — which divides each step by the gradient's size —
can turn that rounding into up to one learning-rate step on weights whose gradient is about
zero (measured: weights within 1e-3, losses within 0.2 %, the same epochs and predictions).
Stacked, a head's last bits can also depend on how many heads train beside it: the same heads in
groups of 9, 18 or 3 instead of 36 ended with a last-layer bias a few 1e-9 apart in 1 to 7 of 36
heads, in groups of 4 or 12 bit for bit the same (``python -m benchmarks.stacked_heads
--groupings``).

Heads train together when their epochs have the same number of steps of the same size: the
same number of labeled samples per epoch (the same budget), the same feature size and kind.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import EarlyStopping, FitResult
from ..precision import autocast
from ..train import EpochPlan, EpochTimer, TrainConfig, check_divergence, epoch_row, fusable, step_lr, summarise

BN_MOMENTUM_DEFAULT = 0.1


class _StackedProduct(torch.autograd.Function):
    """``x @ weightᵀ`` for H stacked heads (``x`` H×B×I, ``weight`` H×O×I as nn.Linear keeps it),
    computed as ``torch.bmm(x, weight.transpose(1, 2))`` is under the ambient autocast: the same
    casts and the same products, forward and backward, so the same bits. Only the weights'
    gradient is computed differently: autograd computes xᵀ · grad, whose transpose it then copies
    twice (back to float32, then into the weights' layout for their ``.grad``); here gradᵀ · x gives
    it in the weights' layout at once and one cast makes it float32. In bf16 those are the same
    bits on an Intel Xeon and an AMD EPYC; in float32 too on the Xeon, but on the EPYC the two
    products of a 10-class layer sum in another order (last bits apart). ``tests/test_batched_heads.py``
    compares them with torch's own; ``python -m benchmarks.stacked_heads --products`` times the two
    (1.14× on one thread on the EPYC, where computing autograd's product and its transpose's
    layout in one pass instead would save nothing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        x_cast, w_cast = x.to(dtype), weight.transpose(1, 2).to(dtype)  # autocast's own casts
        ctx.save_for_backward(x_cast, w_cast)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        with torch.autocast(device, enabled=False):
            return torch.bmm(x_cast, w_cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x_cast, w_cast = ctx.saved_tensors
        grad_x = grad_w = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # bmm's backward, then the cast's
                grad_x = torch.bmm(grad, w_cast.transpose(1, 2)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # bmm's product for its second factor, in the weights' layout
                grad_w = torch.bmm(grad.transpose(1, 2), x_cast).to(ctx.w_dtype)
        return grad_x, grad_w


def _layers(probe) -> list:
    """The probe's layers in order as ("linear", nn.Linear) and ("bn", nn.BatchNorm1d) entries
    (ReLU follows every BN); raises for a head this module cannot stack."""
    head = probe.classifier
    if isinstance(head, nn.Linear):
        return [("linear", head)]
    layers = []
    for module in head.net:
        if isinstance(module, nn.Sequential):  # Linear → BatchNorm1d → ReLU
            linear, bn = module[0], module[1]
            layers += [("linear", linear), ("bn", bn)]
        elif isinstance(module, nn.Dropout):
            if module.p:
                raise ValueError(f"dropout={module.p} is not allowed in a batched probe; allowed: 0")
        elif isinstance(module, nn.Linear):
            layers.append(("linear", module))
        else:
            raise ValueError(f"a {type(module).__name__} layer cannot be batched")
    return layers


class StackedHeads(nn.Module):
    """``H`` :class:`~sslab.evaluate.heads.FeatureHead` heads of the same shape as stacked tensors.
    ``forward(x H×B×D)`` → logits H×B×classes; BatchNorm statistics are per head."""

    def __init__(self, probes: Sequence[nn.Module]):
        super().__init__()
        plans = [_layers(p) for p in probes]
        self.kinds = [kind for kind, _ in plans[0]]
        if any([kind for kind, _ in plan] != self.kinds for plan in plans):
            raise ValueError("probes of different kinds cannot be stacked")
        self.register_buffer("mean", torch.stack([p.mean for p in probes]))
        self.register_buffer("std", torch.stack([p.std for p in probes]))
        self.eps, self.momentum = [], []
        for i, kind in enumerate(self.kinds):
            modules = [plan[i][1] for plan in plans]
            self.register_parameter(f"w{i}", nn.Parameter(torch.stack([m.weight.detach() for m in modules]).clone()))
            self.register_parameter(f"b{i}", None if modules[0].bias is None else
                                    nn.Parameter(torch.stack([m.bias.detach() for m in modules]).clone()))
            if kind == "bn":
                self.register_buffer(f"running_mean{i}", torch.stack([m.running_mean for m in modules]).clone())
                self.register_buffer(f"running_var{i}", torch.stack([m.running_var for m in modules]).clone())
                self.register_buffer(f"batches{i}", torch.stack([m.num_batches_tracked for m in modules]).clone())
                self.eps.append(modules[0].eps)
                self.momentum.append(BN_MOMENTUM_DEFAULT if modules[0].momentum is None else modules[0].momentum)
            else:
                self.eps.append(None)
                self.momentum.append(None)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """Features H×B×D as each head's first layer reads them: less the head's mean, over its spread."""
        return (features.float() - self.mean[:, None]) / self.std[:, None]

    def forward(self, features: torch.Tensor, standardised: bool = False) -> torch.Tensor:
        """Logits H×B×classes of features H×B×D (given as :meth:`standardise` returns them where ``standardised``)."""
        x = features if standardised else self.standardise(features)
        for i, kind in enumerate(self.kinds):
            weight, bias = getattr(self, f"w{i}"), getattr(self, f"b{i}")
            if kind == "linear":
                x = _StackedProduct.apply(x, weight)
                if bias is not None:
                    x = x + bias[:, None]
                continue
            x = x.float()  # BatchNorm runs in fp32, as under autocast
            mean_buf, var_buf = getattr(self, f"running_mean{i}"), getattr(self, f"running_var{i}")
            if self.training:
                mean = x.mean(1)
                var = x.var(1, unbiased=False)
                with torch.no_grad():
                    m = self.momentum[i]
                    unbiased = var * (x.shape[1] / (x.shape[1] - 1))
                    mean_buf.mul_(1 - m).add_(mean.detach(), alpha=m)
                    var_buf.mul_(1 - m).add_(unbiased.detach(), alpha=m)
                    getattr(self, f"batches{i}").add_(1)
            else:
                mean, var = mean_buf, var_buf
            x = (x - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps[i]) * weight[:, None] + bias[:, None]
            x = torch.relu(x)
        return x

    def keep_heads(self, index: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Drop every head not in ``index`` from the stacked weights, BN buffers and the
        optimiser's state (Adam's moments are per element, so the kept heads go on unchanged)."""
        with torch.no_grad():
            # New Parameter objects, not resized ones: autograd remembers each leaf's shape.
            for name, param in list(self.named_parameters()):
                kept = nn.Parameter(param.detach().index_select(0, index))
                state = optimizer.state.pop(param, {})
                optimizer.state[kept] = {key: value.index_select(0, index)
                                         if torch.is_tensor(value) and value.dim() and value.shape[0] == param.shape[0]
                                         else value for key, value in state.items()}
                for group in optimizer.param_groups:
                    group["params"] = [kept if p is param else p for p in group["params"]]
                setattr(self, name, kept)
            for name, buffer in list(self.named_buffers()):
                setattr(self, name, buffer.index_select(0, index))

    def head_state(self, h: int) -> dict:
        """Head ``h``'s weights and BN buffers (detached copies)."""
        state = {}
        for i, kind in enumerate(self.kinds):
            state[f"w{i}"] = getattr(self, f"w{i}")[h].detach().clone()
            if getattr(self, f"b{i}") is not None:
                state[f"b{i}"] = getattr(self, f"b{i}")[h].detach().clone()
            if kind == "bn":
                for name in ("running_mean", "running_var", "batches"):
                    state[f"{name}{i}"] = getattr(self, f"{name}{i}")[h].clone()
        return state

    def write_back(self, probes: Sequence[nn.Module], states: Sequence[dict]) -> None:
        """Copy each head's state (from :meth:`head_state`) into its own probe module."""
        with torch.no_grad():
            for probe, state in zip(probes, states):
                for i, (kind, module) in enumerate(_layers(probe)):
                    module.weight.copy_(state[f"w{i}"])
                    if module.bias is not None:
                        module.bias.copy_(state[f"b{i}"])
                    if kind == "bn":
                        module.running_mean.copy_(state[f"running_mean{i}"])
                        module.running_var.copy_(state[f"running_var{i}"])
                        module.num_batches_tracked.copy_(state[f"batches{i}"])


def train_heads(probes: Sequence[nn.Module], train: Sequence[tuple], val: Sequence[tuple], cfg: TrainConfig,
                seeds: Sequence[int], device: torch.device, monitor: str = "val_acc", precision: str = "fp32") -> list:
    """Train ``probes`` (FeatureHead modules of one shape, on ``device``) together; afterwards each
    holds the weights :func:`sslab.train.fit` would have left it with (the best validation
    epoch's when ``cfg.patience``). ``train[h]`` = (features n×D, labels n): head h's samples of
    one epoch, the same n for every head; ``val[h]`` = (features, labels), the same size for
    every head; ``seeds[h]`` seeds head h's permutations. Returns one FitResult per head, its
    history as ``fit`` writes it (the epoch seconds are the group's). ``precision`` as in ``fit``."""
    cfg.validate()
    count = len(probes)
    if not (len(train) == len(val) == len(seeds) == count) or count == 0:
        raise ValueError("probes, train, val and seeds must be non-empty lists of the same length")
    n = train[0][0].shape[0]
    if any(x.shape[0] != n for x, _ in train) or any(x.shape[0] != val[0][0].shape[0] for x, _ in val):
        raise ValueError("every head needs the same number of training samples and of validation samples")
    if cfg.optimizer != "adam":
        raise ValueError(f"optimizer={cfg.optimizer!r} is not allowed for batched heads; allowed: adam")
    model = StackedHeads(probes).to(device)
    x_train, y_train, x_val, y_val = (torch.stack([pair[i] for pair in pairs]).to(device)
                                      for pairs, i in ((train, 0), (train, 1), (val, 0), (val, 1)))
    # The training features standardised once, in the type the first product reads them in (what
    # each step would otherwise compute again from its batch: the same values).
    x_train = model.standardise(x_train)
    kind = torch.device(device).type
    with autocast(device, precision):
        if torch.is_autocast_enabled(kind):
            x_train = x_train.to(torch.get_autocast_dtype(kind))
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 **(dict(fused=True) if fusable(params) else {}))
    plan = EpochPlan.make(train[0], cfg, None)  # fit's: the same steps per epoch and per-step schedule
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    results = [FitResult() for _ in range(count)]
    early = [EarlyStopping(cfg.patience) for _ in range(count)]
    alive = list(range(count))  # the heads still training, in the order of the stacked tensors
    for epoch in range(cfg.epochs):
        losses, accs, seconds = _train_epoch(model, optimizer, x_train, y_train, [generators[h] for h in alive],
                                             cfg, plan, epoch, device, precision)
        model.eval()
        if x_val.shape[1]:
            with torch.no_grad(), autocast(device, precision):
                val_acc = (model(x_val).argmax(2) == y_val).float().mean(1).tolist()
        else:  # no validation images: nothing to stop on, every head runs every epoch
            val_acc = [None] * len(alive)
        keep = []
        for j, h in enumerate(alive):
            row = epoch_row(cfg, plan, epoch, {"loss": losses[j], "acc": accs[j]}, seconds, len(alive))
            check_divergence(row, f"probe head {h} of this batch", epoch, cfg.lr,
                             reference=results[h].history[0]["loss"] if results[h].history else None)
            early[h].update(val_acc[j], epoch, lambda j=j: model.head_state(j))
            results[h].history.append(row if val_acc[j] is None else {**row, monitor: val_acc[j]})
            if not early[h].should_stop:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(alive):  # stopped heads leave the batch: their best weights are kept aside
            index = torch.tensor(keep, device=device)
            model.keep_heads(index, optimizer)
            x_train, y_train, x_val, y_val = (t.index_select(0, index) for t in (x_train, y_train, x_val, y_val))
            alive = [alive[j] for j in keep]
    final = [e.best_state for e in early]
    for j, h in enumerate(alive):
        if final[h] is None:  # without early stopping a head ends with its last weights
            final[h] = model.head_state(j)
    model.write_back(probes, final)
    for probe in probes:
        probe.eval()
    return [summarise(stopper, result) for stopper, result in zip(early, results)]


def _train_epoch(model: StackedHeads, optimizer, x_train, y_train, generators: list, cfg: TrainConfig,
                 plan: EpochPlan, epoch: int, device, precision: str) -> tuple:
    """One epoch of every live head: each walks its own permutation of its samples. Returns the
    heads' mean losses and accuracies over the epoch's steps, and the epoch's seconds."""
    model.train()
    live, n = x_train.shape[0], x_train.shape[1]
    heads = torch.arange(live, device=device)[:, None]
    orders = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    loss_sum = torch.zeros(live, device=device)
    acc_sum = torch.zeros(live, device=device)
    timer = EpochTimer(device)
    for step, index in enumerate(torch.tensor_split(orders, plan.steps, dim=1)):
        for group in optimizer.param_groups:
            group["lr"] = step_lr(cfg, plan, epoch, step)
        xb, yb = x_train[heads, index], y_train[heads, index]
        with autocast(device, precision):
            logits = model(xb, standardised=True)
        per_sample = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none")
        per_head = per_sample.view(live, -1).mean(1)
        optimizer.zero_grad(set_to_none=True)
        per_head.sum().backward()  # each head's weights see only their own head's mean loss
        optimizer.step()
        loss_sum += per_head.detach()
        acc_sum += (logits.detach().argmax(2) == yb).float().mean(1)
    seconds = timer.seconds()
    return (loss_sum / plan.steps).tolist(), (acc_sum / plan.steps).tolist(), seconds
