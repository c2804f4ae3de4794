"""The checks under the notebooks' method pages (sslab/lab/teaching.py): each agrees with a page
written the way the notebooks write it, and fails — naming what differs — when the page, or the
library, computes something else. Tiny random-weight tasks and a noise dataset keep them fast."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslab import lab, store
from sslab.augment import rand_augment
from sslab.evaluate.fixmatch import weak_view
from sslab.models import BackboneConfig
from sslab.pretext import build_task

BACKBONE = BackboneConfig(in_channels=1, image_size=28, width=0.125)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator).float() / 255


def _task(method: str, **settings):
    torch.manual_seed(0)
    task = build_task(method, BACKBONE, settings).eval()
    if method == "rotation":
        with torch.no_grad():  # decided logits: with random weights every angle would score alike
            task.head.net[-1].weight.mul_(50)
    return task


# ---------------------------------------------------------------- comparing

def test_agree_says_both_values_and_names_what_differs():
    assert lab.agree("rotation loss", torch.tensor(1.23456), 1.23456) == \
        "the page's rotation loss 1.2346 = the library's 1.2346"
    assert lab.agree("mask", torch.tensor([True, False, True]), torch.tensor([True, False, True])) == \
        "the page's mask = the library's (2 of 3 set)"
    assert "largest difference" in lab.agree("features", torch.ones(4, 3), torch.ones(4, 3) + 1e-7)
    with pytest.raises(AssertionError, match=r"^the page's rotation loss 1\.3 ≠ the library's 1\.31 "):
        lab.agree("rotation loss", 1.3, 1.31)
    with pytest.raises(AssertionError, match=r"the page's mask differs from the library's in 1 of 3 places "
                                             r"\(first at 1: page True, library False\)"):
        lab.agree("mask", torch.tensor([True, True, False]), torch.tensor([True, False, False]))
    with pytest.raises(AssertionError, match=r"the page's features has shape \(4, 3\), the library's \(4, 2\)"):
        lab.agree("features", torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(AssertionError, match=r"at 5 the page has 2, the library 1"):
        lab.agree("features", torch.tensor([[1.0, 1, 1], [1, 1, 2]]), torch.ones(2, 3))


def test_agree_states_pairs_a_plain_sequential_with_the_librarys_layers_by_order():
    from sslab.models import ClassifierHead
    torch.manual_seed(0)
    library = ClassifierHead(12, 3, hidden=5)
    torch.manual_seed(0)
    page = nn.Sequential(nn.Linear(12, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
                         nn.Linear(5, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    assert "14 tensors" in lab.agree_states("head", page.state_dict(), library.state_dict())
    with torch.no_grad():
        page[3].weight[0, 0] += 1
    with pytest.raises(AssertionError, match=r"the page's head: net\.2\.0\.weight differs"):
        lab.agree_states("head", page.state_dict(), library.state_dict())
    biased = nn.Sequential(nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 5, bias=False),
                           nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(AssertionError, match="the page's head are not the library's layers"):
        lab.agree_states("head", biased.state_dict(), library.state_dict())


# ---------------------------------------------------------------- 01: the pretext losses, as the notebook writes them

@torch.no_grad()
def rotation_page(task, x, right_order: bool = True) -> dict:
    s = task.settings
    turns = [k * 4 // s.rotations for k in range(s.rotations)]
    rotated = torch.cat([torch.rot90(x, t, dims=(2, 3)) for t in turns])
    target = (torch.arange(s.rotations).repeat_interleave(len(x)) if right_order
              else torch.arange(s.rotations).repeat(len(x)))
    logits = task.head(task.backbone(rotated))
    return {"loss": F.cross_entropy(logits, target), "rot_acc": (logits.argmax(1) == target).float().mean()}


def vae_loss(vae, x, sample: bool = True, mean_over_batch: bool = True):
    h = vae.backbone(x).flatten(1)
    mu, logvar = vae.head.mu(h), vae.head.logvar(h).clamp(-30, 20)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
    rec = (vae.decoder(z) - x).pow(2).flatten(1).sum(1)
    rec = rec.mean() if mean_over_batch else rec.sum()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return mu, {"loss": rec + vae.settings.beta * kl, "recon": rec, "kl": kl}


@torch.no_grad()
def vae_page(task, x, seed: int = 0, **variant) -> dict:
    torch.manual_seed(seed)
    return vae_loss(task, x, **variant)[1]


@torch.no_grad()
def siamese_page(task, x, seed: int = 0, squared: bool = True) -> dict:
    s = task.settings
    torch.manual_seed(seed)
    mu, page = vae_loss(task, x)
    positive_mu = task.head.mu(task.backbone(task.positive_augment.apply(x)).flatten(1))
    negative_mu = positive_mu.roll(-int(torch.randint(1, len(x), (1,))), dims=0)
    power = 2 if squared else 1
    d_pos, d_neg = (mu - positive_mu).pow(2).sum(1), (mu - negative_mu).pow(2).sum(1)
    page["triplet"] = torch.relu(d_pos.pow(power / 2) - d_neg.pow(power / 2) + s.margin).mean()
    page["loss"] = page["loss"] + s.triplet_weight * page["triplet"]
    return page


@torch.no_grad()
def simclr_page(task, x, seed: int = 0, mask_self: bool = True) -> dict:
    draws = torch.Generator().manual_seed(seed)
    views = [task.augment.apply(x, draws) for _ in range(2)]
    z = F.normalize(task.project(torch.cat(views)), dim=1)
    logits = z @ z.T / task.settings.temperature
    if mask_self:
        logits.fill_diagonal_(float("-inf"))
    n = len(x)
    partner = torch.cat([torch.arange(n) + n, torch.arange(n)])
    return {"loss": F.cross_entropy(logits, partner), "contrastive_acc": (logits.argmax(1) == partner).float().mean()}


PAGES = {"rotation": rotation_page, "vae": vae_page, "siamese-vae": siamese_page, "simclr": simclr_page}


@pytest.mark.parametrize("method, settings", [("rotation", {}), ("rotation", {"rotations": 2}), ("vae", {}),
                                              ("siamese-vae", {"margin": 5.0}), ("simclr", {})])
def test_each_pretext_page_computes_the_librarys_loss(method, settings):
    task, x = _task(method, **settings), _images()
    text = lab.check_pretext_loss(task, x, PAGES[method](task, x), seed=0)
    assert text.startswith(f"the page's {method} loss ") and text.count("\n") == len(PAGES[method](task, x)) - 1


@pytest.mark.parametrize("method, wrong, term", [
    ("rotation", dict(right_order=False), "rotation loss"),  # labels 0,1,2,3,0,1,… for rotation-major copies
    ("vae", dict(sample=False), "vae reconstruction error"),  # decodes μ: the library draws z = μ + σ·ε
    ("vae", dict(mean_over_batch=False), "vae reconstruction error"),  # summed over the batch, not averaged
    ("siamese-vae", dict(squared=False), "siamese-vae triplet loss"),  # distances, not squared distances
    ("simclr", dict(mask_self=False), "simclr loss"),  # each view a candidate for itself
])
def test_a_page_that_computes_something_else_fails_naming_the_term(method, wrong, term):
    task, x = _task(method, **({"margin": 5.0} if method == "siamese-vae" else {})), _images()
    with pytest.raises(AssertionError, match=f"^the page's {term} "):
        lab.check_pretext_loss(task, x, PAGES[method](task, x, **wrong))


def test_a_patched_library_loss_fails_the_check(monkeypatch):
    import sslab.pretext.siamese_vae as siamese_vae
    task, x = _task("siamese-vae", margin=5.0), _images()
    page = siamese_page(task, x)
    lab.check_pretext_loss(task, x, page)
    monkeypatch.setattr(siamese_vae, "triplet_loss", lambda a, p, n, margin: torch.relu(
        (a - p).norm(dim=1) - (a - n).norm(dim=1) + margin).mean())
    with pytest.raises(AssertionError, match="^the page's siamese-vae triplet loss .* ≠ the library's"):
        lab.check_pretext_loss(task, x, page)


def test_the_librarys_side_draws_the_pages_random_numbers_and_leaves_the_callers_stream():
    task, x = _task("vae"), _images()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = lab.library_pretext_loss(task, x, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert lab.library_pretext_loss(task, x, seed=0) == first != lab.library_pretext_loss(task, x, seed=1)
    assert not task.training and not any(m.training for m in task.modules())
    with pytest.raises(ValueError, match=r"seed=1 is not allowed for simclr: .* from seed 0"):
        lab.library_pretext_loss(_task("simclr"), x, seed=1)
    with pytest.raises(ValueError, match=r"page terms \['triplet'\] are not allowed for vae"):
        lab.check_pretext_loss(task, x, {"triplet": 0.0})


# ---------------------------------------------------------------- 02, 04, 05, 06 on a tiny run

@pytest.fixture
def noise(tmp_path, make_noise_run):
    """A random-init run on 3 classes of 16 px noise images (14 train images each) and notebook
    settings on its dataset."""
    run = make_noise_run(tmp_path, 14)
    settings = lab.check_notebook_params(dataset=run.config.dataset, device="cpu", precision="fp32")
    settings.out = str(tmp_path / "out")
    return run, settings


def _probe_page(run, settings, images, labels, lr_scale: float = 1.0, bias: bool = False) -> dict:
    cfg, layer = settings.eval_config(), settings.resolved_layer
    with torch.no_grad():
        features = F.adaptive_avg_pool2d(run.load_backbone().features(images.float() / 255, layer), cfg.grid).flatten(1)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    torch.manual_seed(0)
    d, h = features.shape[1], cfg.hidden
    head = nn.Sequential(nn.Linear(d, h, bias=bias), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h, bias=False),
                         nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, 3))
    before = copy.deepcopy(head.state_dict())
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.probe_lr * lr_scale, weight_decay=cfg.weight_decay)
    loss = F.cross_entropy(head((features - mean) / std), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"features": features, "mean": mean, "std": std, "before": before, "loss": loss, "after": head.state_dict()}


def test_the_probe_page_is_the_librarys_probe(noise):
    run, settings = noise
    images, labels = lab.labeled_images(run, 2, 0, settings)
    assert images.shape == (6, 1, 16, 16) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    text = lab.check_probe_step(run, settings, 2, 0, images, labels, _probe_page(run, settings, images, labels))
    assert text.splitlines()[0].startswith("the page's conv4 features pooled to 4×4 = the library's")
    assert "probe loss" in text and "probe head after one step = the library's" in text
    # the page is the study's mlp head whatever head the notebook's table uses
    linear = lab.check_notebook_params(dataset=run.config.dataset, device="cpu", precision="fp32", head="linear")
    linear.out = settings.out
    assert lab.check_probe_step(run, linear, 2, 0, images, labels, _probe_page(run, settings, images, labels)) == text
    with pytest.raises(AssertionError, match="the page's probe head as it starts are not the library's layers"):
        lab.check_probe_step(run, settings, 2, 0, images, labels, _probe_page(run, settings, images, labels, bias=True))
    with pytest.raises(AssertionError, match="the page's probe head after one step: net.0.0.weight differs"):
        lab.check_probe_step(run, settings, 2, 0, images, labels,
                             _probe_page(run, settings, images, labels, lr_scale=2.0))


def _finetune_page(start, settings, images, labels, backbone_scale: float) -> dict:
    cfg = settings.eval_config()
    model = copy.deepcopy(start.model)
    optimizer = torch.optim.Adam([{"params": model.backbone.parameters(), "lr": cfg.finetune_lr * backbone_scale},
                                  {"params": model.head.parameters(), "lr": cfg.finetune_lr}],
                                 weight_decay=cfg.weight_decay)
    model.train()
    torch.manual_seed(0)
    views = model.augment.apply(images.float() / 255)
    features = F.adaptive_avg_pool2d(model.backbone.features(views, settings.resolved_layer), cfg.grid).flatten(1)
    loss = F.cross_entropy(model.head.classifier((features - model.head.mean) / model.head.std), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    lrs = {"backbone": optimizer.param_groups[0]["lr"], "head": optimizer.param_groups[1]["lr"]}
    return {"lrs": lrs, "loss": loss, "after": model.state_dict()}


def test_the_finetune_page_trains_every_weight_at_the_librarys_learning_rates(noise):
    run, settings = noise
    images, labels = lab.labeled_images(run, 2, 0, settings)
    scale = settings.eval_config().backbone_lr_scale
    page = _finetune_page(lab.handover("finetune", run, 2, 0, settings), settings, images, labels, scale)
    text = lab.check_finetune_step(lab.handover("finetune", run, 2, 0, settings), images, labels, page)
    assert text.splitlines()[0] == f"the page's backbone's learning rate {1e-4 * scale:.4g} = the library's " \
                                   f"{1e-4 * scale:.4g}"
    # the backbone as fast as the head: not what the library's fine-tuning does
    page = _finetune_page(lab.handover("finetune", run, 2, 0, settings), settings, images, labels, 1.0)
    with pytest.raises(AssertionError, match="^the page's backbone's learning rate 0.0001 ≠ the library's 1e-05"):
        lab.check_finetune_step(lab.handover("finetune", run, 2, 0, settings), images, labels, page)
    # a notebook's backbone_lr_scale reaches what the library hands its training loop
    slower = lab.check_notebook_params(dataset=run.config.dataset, device="cpu", precision="fp32",
                                       backbone_lr_scale=0.5)
    slower.out = settings.out
    start = lab.handover("finetune", run, 2, 0, slower)
    assert [g["lr_scale"] for g in start.param_groups] == [0.5, 1.0]


def test_a_handover_trains_and_stores_nothing_but_the_probe_it_starts_from(noise):
    run, settings = noise
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    start = lab.handover("fixmatch", run, 2, 0, settings)
    assert torch.equal(torch.rand(2), expected)  # the caller's random stream is left as it was
    # FixMatch hands over the threshold it trains with: FreeMatch's, at its start τ_0 = p̃_0 = 1/C
    assert float(start.model.threshold.global_threshold) == pytest.approx(1 / 3)
    assert start.train_config.optimizer == "sgd" and start.train_config.lr == settings.eval_config().fm_lr
    protocols = {store.read_json(p / "config.json")["protocol"] for p in store.list_runs("eval", settings.out)}
    assert protocols == {"probe"}
    with pytest.raises(ValueError, match=r"protocol='scratch' is not allowed; allowed: finetune, fixmatch"):
        lab.handover("scratch", run, 2, 0, settings)


def test_the_fixmatch_page_has_the_librarys_mask_and_loss():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))
    unlabeled = _images(12)[:, :, :16, :16]
    draws = torch.Generator().manual_seed(0)
    weak = weak_view(unlabeled, draws)
    strong = rand_augment(weak_view(unlabeled, draws), generator=draws)
    with torch.no_grad():  # a threshold half of the weak views reach: a mask of both values
        threshold = float(classifier(weak).softmax(1).max(1).values.sort().values[6])
    start = SimpleNamespace(model=SimpleNamespace(classifier=classifier, threshold=threshold))

    def page(threshold: float, over_confident: bool = False) -> dict:
        with torch.no_grad():
            confidence, pseudo = classifier(weak).softmax(1).max(1)
            mask = confidence >= threshold
            per_image = F.cross_entropy(classifier(strong), pseudo, reduction="none") * mask
            return {"mask": mask, "loss": per_image.sum() / mask.sum() if over_confident else per_image.mean()}

    right = page(threshold)
    assert int(right["mask"].sum()) == 6
    assert lab.check_fixmatch_mask(start, weak, strong, right).startswith(
        "the page's confidence mask = the library's (6 of 12 set)")
    with pytest.raises(AssertionError, match="the page's confidence mask differs"):
        lab.check_fixmatch_mask(start, weak, strong, page(0.0))
    with pytest.raises(AssertionError, match="the page's FixMatch unlabeled loss"):  # averaged over the confident only
        lab.check_fixmatch_mask(start, weak, strong, page(threshold, over_confident=True))

    # FreeMatch's self-adaptive threshold: the page's first step from τ_0 = p̃_0 = 1/C
    from sslab.evaluate.fixmatch import SelfAdaptiveThreshold
    adaptive = SimpleNamespace(model=SimpleNamespace(classifier=classifier, threshold=SelfAdaptiveThreshold(4, 0.5)))

    def freematch_page(momentum: float) -> dict:
        with torch.no_grad():
            q = classifier(weak).softmax(1)
            tau = momentum / 4 + (1 - momentum) * q.max(1).values.mean()
            expected = momentum / 4 + (1 - momentum) * q.mean(0)
            thresholds = expected / expected.max() * tau
            confidence, pseudo = q.max(1)
            mask = confidence >= thresholds[pseudo]
            loss = (F.cross_entropy(classifier(strong), pseudo, reduction="none") * mask).mean()
            return {"thresholds": thresholds, "mask": mask, "loss": loss}

    assert lab.check_fixmatch_mask(adaptive, weak, strong, freematch_page(0.5)).startswith(
        "the page's class thresholds τ(c) = the library's")
    assert float(adaptive.model.threshold.global_threshold) == 0.25  # the library's own state is left as it was
    with pytest.raises(AssertionError, match="the page's class thresholds τ\\(c\\) differs"):
        lab.check_fixmatch_mask(adaptive, weak, strong, freematch_page(0.9))


# ---------------------------------------------------------------- 06: propagation and selection

def _graph_page(nodes, known, classes, k, gamma, alpha, iterations, symmetric: bool = True):
    similarity = nodes @ nodes.T
    similarity.fill_diagonal_(float("-inf"))
    top, neighbours = similarity.topk(k, dim=1)
    w = torch.zeros(len(nodes), len(nodes)).scatter_(1, neighbours, top.clamp(min=0) ** gamma)
    w = w + w.T if symmetric else w
    d = w.sum(1).clamp(min=1e-12).rsqrt()
    s = d[:, None] * w * d[None, :]
    y = F.one_hot(known.clamp(min=0), classes).float() * (known >= 0)[:, None]
    y = y / y.sum(0).clamp(min=1)
    z = y.clone()
    for _ in range(iterations):
        z = alpha * s @ z + (1 - alpha) * y
    total = z.clamp(min=0).sum(1, keepdim=True)
    return torch.where(total > 0, z.clamp(min=0) / total, torch.full_like(z, 1 / classes))


def _clusters(n: int = 90, classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    truth = torch.arange(n) % classes
    points = torch.randn(classes, 16, generator=generator)[truth] + 0.8 * torch.randn(n, 16, generator=generator)
    known = torch.where(torch.arange(n) < 2 * classes, truth, torch.full_like(truth, -1))
    return F.normalize(points - points.mean(0), dim=1), known, truth


def test_the_propagation_page_is_the_librarys_graph_and_propagation():
    settings = lab.check_notebook_params(device="cpu", lp_k=7)
    cfg = settings.eval_config()
    nodes, known, truth = _clusters()
    probs = _graph_page(nodes, known, 3, cfg.lp_k, cfg.lp_gamma, cfg.lp_alpha, cfg.lp_iterations)
    assert (probs.argmax(1) == truth).float().mean() > 0.8
    assert lab.check_propagation(nodes, known, probs, settings).endswith("propagated labels = the library's (all 90 "
                                                                         "values)")
    one_way = _graph_page(nodes, known, 3, cfg.lp_k, cfg.lp_gamma, cfg.lp_alpha, cfg.lp_iterations, symmetric=False)
    with pytest.raises(AssertionError, match="the page's propagated class distributions differs"):
        lab.check_propagation(nodes, known, one_way, settings)
    # the graph follows the notebook's lp_k: a page on another k no longer agrees
    other_k = _graph_page(nodes, known, 3, 20, cfg.lp_gamma, cfg.lp_alpha, cfg.lp_iterations)
    with pytest.raises(AssertionError, match="propagated class distributions"):
        lab.check_propagation(nodes, known, other_k, settings)


def _selection_page(probs, per_class: int, threshold: float, balanced: bool = True):
    classes = probs.shape[1]
    confidence = 1 + (probs * probs.clamp(min=1e-12).log()).sum(1) / math.log(classes)
    predicted = probs.argmax(1)
    reached = probs.max(1).values - probs.min(1).values > 1e-6
    if not balanced:
        chosen = confidence.argsort(descending=True)[:per_class * classes]
        return chosen, predicted[chosen]
    chosen = []
    for c in range(classes):
        members = ((predicted == c) & (confidence >= threshold) & reached).nonzero().squeeze(1)
        chosen.append(members[confidence[members].argsort(descending=True)[:per_class]])
    chosen = torch.cat(chosen)
    return chosen, predicted[chosen]


def test_the_selection_page_keeps_the_librarys_class_balanced_pseudo_labels():
    settings = lab.check_notebook_params(device="cpu")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 4, generator=generator) * 3
    logits[:20, 0] += 4  # class 0 the most confident by far: unbalanced picks would favour it
    probs = torch.cat([logits.softmax(1), torch.full((3, 4), 0.25)])  # three rows propagation never reached
    chosen, labels = _selection_page(probs, 4, 0.0)
    assert len(chosen) == 16 and not set(chosen.tolist()) & {60, 61, 62}
    text = lab.check_selection(probs, chosen, labels, 4, settings)
    assert text.startswith("the page's chosen images = the library's")
    chosen, labels = _selection_page(probs, 4, 0.0, balanced=False)
    with pytest.raises(AssertionError, match="the page's chosen images differs"):
        lab.check_selection(probs, chosen, labels, 4, settings)


# ---------------------------------------------------------------- 00: the page against the lab

def test_agreement_is_the_difference_of_means_against_the_seeds_spread():
    close = lab.agreement([0.60, 0.62, 0.64], [0.61, 0.63, 0.66])
    assert close["agree"] and close["difference"] == pytest.approx(-0.0133333, abs=1e-6)
    assert close["spread"] == pytest.approx(0.0251661, abs=1e-6)  # the library's std, the larger one
    far = lab.agreement([0.60, 0.61, 0.62], [0.70, 0.71, 0.72])
    assert far["agree"] is False
    assert lab.agreement([0.6], [0.7])["agree"] is None
    with pytest.raises(ValueError, match=r"page=\[0.6\] and library=\[0.6, 0.7\] are not allowed"):
        lab.agreement([0.6], [0.6, 0.7])


def test_agreement_sentence_and_frame_say_what_the_numbers_give():
    assert lab.agreement_sentence([0.60, 0.62, 0.64], [0.61, 0.63, 0.66]) == (
        "The page's probe reaches 62.0 ± 2.0 % top-1 and the lab's 63.3 ± 2.5 % (3 seeds): the means differ by "
        "1.3 points, within the seeds' spread (2.5 points): they agree.")
    assert lab.agreement_sentence([0.60, 0.61, 0.62], [0.70, 0.71, 0.72]).endswith(
        "the means differ by 10.0 points, more than the seeds' spread (1.0 points): they do not agree — look for a "
        "setting that differs.")
    assert lab.agreement_sentence([0.6], [0.7]) == (
        "The page's probe reaches 60.0 % top-1 and the lab's 70.0 % (1 seed): the means differ by 10.0 points, and "
        "one seed gives no spread to compare that with.")
    frame = lab.agreement_frame([0.60, 0.62, 0.64], [0.61, 0.63, 0.66], [0, 1, 2])
    assert list(frame.index) == ["seed 0", "seed 1", "seed 2", "mean ± std"]
    assert frame.loc["seed 2"].tolist() == ["64.0", "66.0"]
    assert frame.loc["mean ± std"].tolist() == ["62.0 ± 2.0", "63.3 ± 2.5"]
