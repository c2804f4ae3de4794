"""Heads trained together (sslab/evaluate/batched_heads.py) end as each would alone."""
from __future__ import annotations

import pytest
import torch

from sslab.evaluate import FeatureHead, predict
from sslab.evaluate.batched_heads import StackedHeads, train_heads
from sslab.train import TrainConfig, fit

D, CLASSES, HIDDEN = 32, 4, 24


def _features(n=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    feats = torch.randn(n, D, generator=generator) + 2.0 * torch.nn.functional.one_hot(labels, D).float()
    return feats, labels


def _cells(feats, labels, seeds, n_train=12, repeat=8):
    train, val = [], []
    for seed in seeds:
        index = torch.randperm(len(feats), generator=torch.Generator().manual_seed(100 + seed))
        order = index[:n_train].repeat(repeat)
        train.append((feats[order], labels[order]))
        val.append((feats[index[n_train: n_train + 40]], labels[index[n_train: n_train + 40]]))
    return train, val


def _config(seed=0, patience=3):
    return TrainConfig(epochs=10, batch_size=16, optimizer="adam", lr=2e-3, weight_decay=5e-4, schedule="cosine",
                       patience=patience, seed=seed)


def _head(kind, seed, feats):
    torch.manual_seed(seed)
    return FeatureHead(D, CLASSES, kind, HIDDEN, feats.mean(0), feats.std(0))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_heads_trained_together_match_heads_trained_alone(kind):
    feats, labels = _features()
    seeds = [0, 1, 2, 3]
    train, val = _cells(feats, labels, seeds)
    alone, alone_results = [], []
    for seed, data, (xv, yv) in zip(seeds, train, val):
        head = _head(kind, seed, feats)
        def validate(model, xv=xv, yv=yv, head=head):
            return {"val_acc": (predict(head, xv).argmax(1) == yv).float().mean().item()}
        alone_results.append(fit(head, data, _config(seed), torch.device("cpu"), validate=validate, progress=False))
        alone.append(head)
    together = [_head(kind, seed, feats) for seed in seeds]
    results = train_heads(together, train, val, _config(), seeds, torch.device("cpu"))
    for a, b, ra, rb in zip(alone, together, alone_results, results):
        assert (ra.epochs_run, ra.best_epoch) == (rb.epochs_run, rb.best_epoch)
        assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history], rel=1e-5)
        assert [r["val_acc"] for r in ra.history] == [r["val_acc"] for r in rb.history]
        assert [r["lr"] for r in ra.history] == [r["lr"] for r in rb.history]
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=1e-5, msg=key)
        assert not b.training
    # the heads stopped at different epochs, some before the last: early stopping is per head
    assert len({r.epochs_run for r in results}) > 1 and min(r.epochs_run for r in results) < _config().epochs


def test_a_stopped_head_keeps_its_best_weights_while_others_train_on():
    feats, labels = _features()
    train, val = _cells(feats, labels, [0, 1])
    heads = [_head("mlp", s, feats) for s in (0, 1)]
    results = train_heads(heads, train, val, _config(patience=1), [0, 1], torch.device("cpu"))
    for head, result, (xv, yv) in zip(heads, results, val):
        best = result.history[result.best_epoch]["val_acc"]
        assert (predict(head, xv).argmax(1) == yv).float().mean().item() == pytest.approx(best)
        assert result.epochs_run == result.best_epoch + 2  # patience 1: one epoch past the best


def test_stacking_checks_its_inputs():
    feats, labels = _features()
    train, val = _cells(feats, labels, [0, 1])
    with pytest.raises(ValueError, match="different kinds"):
        StackedHeads([_head("mlp", 0, feats), _head("linear", 1, feats)])
    with pytest.raises(ValueError, match="same number of training samples"):
        train_heads([_head("mlp", 0, feats), _head("mlp", 1, feats)], [train[0], (train[1][0][:-1], train[1][1][:-1])],
                    val, _config(), [0, 1], torch.device("cpu"))
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        cfg = TrainConfig(epochs=1, batch_size=8, optimizer="sgd")
        train_heads([_head("mlp", 0, feats)], train[:1], val[:1], cfg, [0], torch.device("cpu"))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("batch", [16, 128])
def test_a_stacked_step_computes_torchs_own_products(precision, batch, monkeypatch):
    """One training step of stacked heads, as train_heads takes it (features standardised once,
    in the type the first product reads, and the lab's product with its own backward), against
    the same step with torch's autograd of ``bmm(x, weight.transpose(1, 2))`` on features
    standardised by hand in float32: the same logits and the same gradients, bit for bit, and
    each weight's gradient in the weight's own layout. In float32 a weight's gradient is held to
    rounding only: the lab computes it as gradᵀ · x and autograd as (xᵀ · grad)ᵀ, the same products,
    which an AMD EPYC's float32 kernels summed in another order for the 10-class layer (bf16's
    were the same bits on it and on an Intel Xeon; float32's too on the Xeon)."""
    from sslab.evaluate import batched_heads
    from sslab.precision import autocast
    generator = torch.Generator().manual_seed(batch)
    dim = 96
    probes = []
    for seed in range(3):
        torch.manual_seed(seed)
        probes.append(FeatureHead(dim, CLASSES, "mlp", HIDDEN, torch.randn(dim, generator=generator),
                                  torch.rand(dim, generator=generator) + 0.5))
    features = torch.randn(3, batch, dim, generator=generator) * 3
    labels = torch.randint(0, CLASSES, (3, batch), generator=generator)

    def step(model, x, standardised):
        model.train()
        with autocast("cpu", precision):
            logits = model(x, standardised=standardised)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        return logits.detach(), {name: p.grad for name, p in model.named_parameters()}

    lab = StackedHeads(probes)
    x = lab.standardise(features)
    if precision == "bf16":
        x = x.to(torch.bfloat16)
    logits, grads = step(lab, x, True)
    with monkeypatch.context() as patched:
        patched.setattr(batched_heads._StackedProduct, "apply",
                        staticmethod(lambda x, weight: torch.bmm(x, weight.transpose(1, 2))))
        reference = StackedHeads(probes)
        means, spreads = torch.stack([p.mean for p in probes]), torch.stack([p.std for p in probes])
        by_hand = (features - means[:, None]) / spreads[:, None]
        reference_logits, reference_grads = step(reference, by_hand, True)  # float32: autocast casts in the product
    assert logits.dtype == reference_logits.dtype and torch.equal(logits, reference_logits)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        if precision == "fp32" and name.startswith("w"):
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-8, msg=name)
        else:
            assert torch.equal(grad, reference_grads[name]), name
        assert grad.stride() == getattr(lab, name).stride(), name  # no copy needed into the weight's layout
