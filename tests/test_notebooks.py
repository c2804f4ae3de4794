"""The notebooks: documented typed parameters, checked values, the same pretraining config
in every notebook of the lab, a real run of all of them under nbval (smoke parameters, CPU) whose
tables and sentences are checked against the rows and the run store it wrote, the checks under
the method pages failing when a library loss is patched, notebook 00's plain code and its
comparison with the lab, and a papermill batch run of 02 at 4 labels per class.

The executions write under a temporary outputs folder (``SSLAB_OUTPUTS``, inherited by the
kernels), never into the repository's outputs/.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sslab import lab, store
from sslab.data import DEBIAN_FASHION_MNIST
from sslab.evaluate import EvalConfig
from sslab.lab.notebooks import OUTPUTS_NOTE
from sslab.pretrain import load_run

papermill = pytest.importorskip("papermill")
pytest.importorskip("nbval")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [ROOT / "notebooks" / f"{name}.ipynb" for name in lab.NOTEBOOKS]
SMOKE = ROOT / "params" / "smoke.yml"
COMMON = ["dataset", "methods", "epochs", "limit", "pretext_settings", "device"]
# Notebook 00 trains in plain PyTorch, on the CPU and Fashion-MNIST alone: its parameters are its own.
SCRATCH = ROOT / "notebooks" / "00_from_scratch.ipynb"
SCRATCH_PARAMETERS = {"pretrain_epochs", "pretrain_images", "labels", "seeds", "precision", "deterministic"}
LAB_NOTEBOOKS = [path for path in NOTEBOOKS if path != SCRATCH]
PROBE, SEMI = ROOT / "notebooks" / "02_probe.ipynb", ROOT / "notebooks" / "06_semi_supervised.ipynb"


def _cells(path):
    return nbformat.read(path, as_version=4).cells


def _parameters(path) -> dict:
    """name → papermill's view of each declared parameter (type, default, help)."""
    return papermill.inspect_notebook(str(path))


def _defaults(path) -> dict:
    """The parameter cell's values, by running it in a fresh namespace."""
    cell = next(c for c in _cells(path) if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_layout_and_documented_typed_parameters(path):
    cells = _cells(path)
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    assert "papermill" in cells[0].source and "make lab" in cells[0].source
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = _parameters(path)
    assert set(params) == SCRATCH_PARAMETERS if path == SCRATCH else set(COMMON) <= set(params)
    for name, p in params.items():
        assert p["inferred_type_name"] in ("str", "int", "float", "list", "bool", "dict"), name
        assert p["help"].strip(), f"{path.stem}: parameter {name} has no help comment"
    if path.stem in ("02_probe", "03_latent_umap", "04_label_curves"):
        assert params["interactive"]["default"] == "True"
    # the cell after the parameters (and its markdown) checks them all through sslab
    check = next(c for c in cells[tagged[0] + 1:] if c.cell_type == "code")
    assert check.source.startswith("settings = lab.check_notebook_params(")
    assert all(f"{name}={name}" in check.source for name in params)
    # the defaults pass the check
    lab.check_notebook_params(**_defaults(path))


# The check cells under each notebook's method pages (lab.check_…), and the notebook's variables a
# try-it prompt may name besides its parameters (01's pages draw from `seed`).
METHOD_CHECKS = {"01_pretext": 4, "02_probe": 1, "04_label_curves": 1, "05_finetune": 1, "06_semi_supervised": 3,
                 "07_selection": 1}
PAGE_VARIABLES = {"01_pretext": {"seed"}}
SKIP_MARKS = ("NBVAL_SKIP", "NBVAL_RAISES_EXCEPTION", "skip-execution", "raises-exception")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_teach_in_short_cells_with_checked_method_pages_and_try_it_prompts(path):
    cells = _cells(path)
    for cell in cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 15, (path.stem, cell.source[:80])
    checks = [i for i, c in enumerate(cells) if c.cell_type == "code" and "lab.check_" in c.source
              and "lab.check_notebook_params(" not in c.source]
    assert len(checks) == METHOD_CHECKS.get(path.stem, 0), path.stem
    for i in checks:
        check, page = cells[i], cells[i - 1]
        # a check runs under nbval like any cell, prints its confirming lines, and follows its page
        assert not any(mark in check.source or mark in check.metadata.get("tags", []) for mark in SKIP_MARKS)
        assert "print(lab.check_" in check.source and len(check.source.splitlines()) <= 2
        assert page.cell_type == "code" and "lab.check_" not in page.source
    prompts = [c.source for c in cells if c.cell_type == "markdown" and c.source.startswith("## Try it")]
    assert len(prompts) == 1 and cells[-1].source == prompts[0], path.stem
    bullets = [line for line in prompts[0].splitlines() if line.startswith("- ")]
    assert len(bullets) >= 3, path.stem
    named = set(re.findall(r"[Ss]et `(\w+)` ", prompts[0]))
    assert named and named <= set(_parameters(path)) | PAGE_VARIABLES.get(path.stem, set()), (path.stem, named)


def _scratch_cells(tag: str) -> list:
    return [c for c in _cells(SCRATCH) if tag in c.metadata.get("tags", [])]


def _code_lines(cells: list) -> int:
    """Lines of code: neither blank nor a comment."""
    return sum(1 for c in cells for line in c.source.splitlines() if line.strip() and not line.strip().startswith("#"))


def test_notebook_00_trains_in_plain_pytorch_in_the_lines_it_says():
    cells = _cells(SCRATCH)
    plain, data = _scratch_cells("plain-pytorch"), _scratch_cells("plain-data")
    check = next(i for i, c in enumerate(cells) if c.source.startswith("settings = lab.check_notebook_params("))
    compare = next(i for i, c in enumerate(cells) if "probe_cell(" in c.source)
    # every code cell between the parameters' check and the comparison with the lab is plain code
    assert [c for c in cells[check + 1:compare] if c.cell_type == "code"] == data + plain and len(plain) >= 5
    for cell in data + plain:
        code = "\n".join(line.split("#")[0] for line in cell.source.splitlines())
        assert not re.search(r"\b(sslab|lab|settings)\b", code), cell.source[:80]
    said = re.search(r"(\d+) lines of code for the network, its pretraining and the probe, and (\d+) more that read "
                     r"the dataset's files", cells[0].source)
    assert said and (int(said.group(1)), int(said.group(2))) == (_code_lines(plain), _code_lines(data))
    assert _code_lines(plain) <= 85


def test_notebook_00_has_the_labs_settings_and_network():
    import torch

    from sslab.augment import default_augment
    from sslab.models import DEFAULT_LAYER, BackboneConfig
    from sslab.pretext import RotationSettings, RotationTask
    from sslab.pretrain import DEFAULT_WIDTH
    from sslab.data import label_budget_split
    from sslab.precision import resolve_precision
    page: dict = {"precision": "auto"}
    exec("import math\nimport numpy as np\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F", page)
    for cell_id in ("settings", "network", "views"):
        exec(next(c.source for c in _cells(SCRATCH) if c.id == cell_id), page)
    # the page resolves its precision as the lab does: auto is bf16 exactly where the lab's is
    for precision in ("auto", "fp32", "bf16"):
        resolved: dict = {"precision": precision, "torch": torch}
        exec(next(c.source for c in _cells(SCRATCH) if c.id == "settings"), resolved)
        assert resolved["bf16"]["enabled"] == (resolve_precision(precision, "cpu") == "bf16"), precision
        assert resolved["bf16"]["dtype"] == torch.bfloat16 and resolved["bf16"]["device_type"] == "cpu"
    # the page's labeled and validation images are the lab's draw, image for image
    page["train_y"] = torch.from_numpy(np.random.default_rng(7).integers(0, 10, 600))
    for labels, seed in ((1, 0), (4, 2), (16, 5)):
        page["labels"] = labels
        exec(next(c.source for c in _cells(SCRATCH) if c.id == "split"), page)
        theirs = label_budget_split(page["train_y"], labels, seed, page["val_per_class"])
        assert all(torch.equal(a, b) for a, b in zip(page["label_split"](seed), theirs)), (labels, seed)
    rotation, cfg = RotationSettings(), EvalConfig()
    assert page["width"] == DEFAULT_WIDTH["cpu"] and DEFAULT_LAYER["alexnet"] == "conv4"
    assert (page["batch"], page["lr"], page["momentum"], page["weight_decay"]) == (
        rotation.batch_size, rotation.lr, rotation.momentum, rotation.weight_decay)
    assert (rotation.optimizer, rotation.nesterov, rotation.schedule, rotation.rotations) == ("sgd", True, "cosine", 4)
    assert (page["shift"], page["degrees"], page["jitter"]) == (default_augment(28).padding, rotation.degrees,
                                                                rotation.jitter)
    assert (page["grid"], page["hidden"], page["val_per_class"], page["samples_per_epoch"]) == (
        cfg.grid, cfg.hidden, cfg.val_per_class, cfg.samples_per_epoch)
    assert (page["probe_lr"], page["probe_epochs"], page["patience"], page["probe_batch"], page["weight_decay"]) == (
        cfg.probe_lr, cfg.probe_epochs, cfg.probe_patience, cfg.batch_size, cfg.weight_decay)
    # the page's network is the lab's rotation task at this width, layer for layer
    lab_task = RotationTask(BackboneConfig(1, 28, page["width"]))
    lab.agree_states("network", {k: torch.zeros_like(v) for k, v in page["rotnet"].state_dict().items()},
                     {k: torch.zeros_like(v) for k, v in lab_task.state_dict().items()})
    views = page["augment"](torch.rand(6, 1, 28, 28))
    assert views.shape == (6, 1, 28, 28) and 0 <= float(views.min()) <= float(views.max()) <= 1


def test_every_notebook_derives_the_same_pretraining_configs():
    """02–05 find the runs 01 trained only if their parameters give the same configs."""
    configs = {}
    for path in LAB_NOTEBOOKS:
        settings = lab.check_notebook_params(**{k: v for k, v in _defaults(path).items() if k in COMMON})
        configs[path.stem] = [settings.pretrain_config(m) for m in settings.methods]
    first = configs["01_pretext"]
    subsets = ("06_semi_supervised", "07_selection")  # a few of 01's methods
    assert all(c == first for name, c in configs.items() if name not in subsets), configs
    for name in subsets:
        assert configs[name] and all(c in first for c in configs[name]), name


def test_every_params_file_is_valid_for_every_notebook():
    files = sorted((ROOT / "params").glob("*.yml"))
    assert {f.name for f in files} >= {"smoke.yml", "full.yml", "simclr-cifar10.yml", "quick.yml"}, files
    declared_anywhere = set().union(*(_parameters(path) for path in NOTEBOOKS))
    for params_file in files:
        params = lab.load_params(params_file)
        assert set(params) <= declared_anywhere, (params_file.name, set(params) - declared_anywhere)
        for path in NOTEBOOKS:
            declared = set(_parameters(path))
            mine = {k: v for k, v in params.items() if k in declared}
            if mine.get("device") == "auto" or "device" not in mine:
                mine["device"] = "cpu"  # full.yml says auto; check the rest on this machine
            lab.check_notebook_params(**mine)


@pytest.mark.parametrize("params, message", [
    (dict(labels="abc"), r"parameter labels='abc' is not allowed; allowed: an integer ≥ 1"),
    (dict(labels=0), r"labels=0 .*≥ 1"),
    (dict(methods=["rotation", "jigsaw"]), r"methods=\['rotation', 'jigsaw'\].*'jigsaw' is not one"),
    (dict(methods=[]), r"methods=\[\].*non-empty"),
    (dict(budgets=[1, "x"]), r"budgets=\[1, 'x'\]"),
    (dict(budgets="1,x"), r"budgets='1,x'"),
    (dict(seeds=[-1]), r"seeds=\[-1\]"),
    (dict(layer="fc7"), r"layer='fc7'.*conv1, conv2"),
    (dict(head="svm"), r"head='svm'.*mlp, linear, knn"),
    (dict(epochs=1.5), r"epochs=1.5"),
    (dict(limit=1), r"limit=1"),
    (dict(interactive="yes"), r"interactive='yes'.*True or False"),
    (dict(dataset="imagenet"), r"dataset='imagenet'.*fashion-mnist"),
    (dict(device="tpu"), r"device='tpu'"),
    (dict(points=5), r"points=5"),
    (dict(deterministic="yes"), r"deterministic='yes'.*True or False"),
])
def test_check_notebook_params_names_parameter_value_and_what_is_allowed(params, message):
    with pytest.raises(ValueError, match=message):
        lab.check_notebook_params(**params)


def test_check_notebook_params_accepts_command_line_spellings():
    s = lab.check_notebook_params(methods="rotation,vae", budgets="16,1,4", seeds=2, limit=0, device="cpu")
    assert s.methods == ("rotation", "vae") and s.budgets == (1, 4, 16) and s.seeds == (2,)
    assert s.limit is None and str(s.device) == "cpu"
    # papermill's -p passes a list written as '[0, 1, 2]' to the notebook as that string
    s = lab.check_notebook_params(methods="['rotation', 'vae']", budgets="[16, 1, 4]", seeds="[0, 1, 2, 3, 4]")
    assert s.methods == ("rotation", "vae") and s.budgets == (1, 4, 16) and s.seeds == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"budgets='\[1, x\]'"):
        lab.check_notebook_params(budgets="[1, x]")
    with pytest.raises(TypeError, match="unknown notebook parameter"):
        lab.check_notebook_params(label=3)


def test_pretext_settings_reach_every_method_that_has_them_and_only_those():
    s = lab.check_notebook_params(methods=["rotation", "siamese-vae"], random_init=True, device="cpu",
                                  pretext_settings={"triplet_weight": 10, "lr": 0.01})
    assert s.pretrain_config("siamese-vae").settings == {"triplet_weight": 10, "lr": 0.01}
    assert s.pretrain_config("rotation").settings == {"lr": 0.01}
    assert s.pretrain_config("random-init").settings == {}
    default = lab.check_notebook_params(methods=["siamese-vae"], device="cpu").pretrain_config("siamese-vae")
    changed = s.pretrain_config("siamese-vae").resolved(s.device)
    assert changed.settings["triplet_weight"] == 10.0 and changed != default.resolved(s.device)
    # papermill's -p hands a dict over as YAML text
    s = lab.check_notebook_params(methods=["rotation"], device="cpu", pretext_settings="{rotations: 2}")
    assert s.pretrain_config("rotation").resolved(s.device).settings["rotations"] == 2


def test_lp_k_and_backbone_lr_scale_reach_the_evaluation_config():
    s = lab.check_notebook_params(device="cpu", lp_k=5, backbone_lr_scale=0.5)
    assert (s.eval_config().lp_k, s.eval_config().backbone_lr_scale) == (5, 0.5)
    assert (s.frame().loc["lp_k", "value"], s.frame().loc["backbone_lr_scale", "value"]) == ("5", "0.5")
    default = lab.check_notebook_params(device="cpu").eval_config()
    assert (default.lp_k, default.backbone_lr_scale) == (EvalConfig.lp_k, EvalConfig.backbone_lr_scale)
    with pytest.raises(ValueError, match=r"^parameter lp_k=0 is not allowed; allowed: an integer from 1 to"):
        lab.check_notebook_params(lp_k=0)
    with pytest.raises(ValueError, match=r"^parameter backbone_lr_scale=-0.1 is not allowed; allowed: a number in "
                                         r"\[0, 10\] \(the backbone's learning rate over the head's"):
        lab.check_notebook_params(backbone_lr_scale=-0.1)


def test_choice_folds_reaches_the_evaluation_config_and_a_bad_one_is_named():
    assert lab.check_notebook_params(device="cpu", choice_folds=4).eval_config().choice_folds == 4
    assert lab.check_notebook_params(device="cpu").eval_config().choice_folds == EvalConfig.choice_folds
    with pytest.raises(ValueError, match=r"^parameter choice_folds=0 is not allowed; allowed: an integer from 1 to 20"):
        lab.check_notebook_params(choice_folds=0)


def test_choice_margin_reaches_the_evaluation_config_and_a_bad_one_is_named():
    assert lab.check_notebook_params(device="cpu", choice_margin=1).eval_config().choice_margin == 1.0
    assert lab.check_notebook_params(device="cpu").eval_config().choice_margin == EvalConfig.choice_margin == 0.0
    with pytest.raises(ValueError, match=r"^parameter choice_margin=-1 is not allowed; allowed: a number in \[0, 10\]"):
        lab.check_notebook_params(choice_margin=-1)


def test_pretrain_epochs_and_images_set_the_pretraining_under_names_of_their_own():
    s = lab.check_notebook_params(device="cpu", methods=["rotation"], pretrain_epochs=2, pretrain_images=300)
    assert (s.epochs, s.limit) == (2, 300) and s.pretrain_config("rotation").epochs == 2
    shown = s.frame()["value"]
    assert (shown["pretrain_epochs"], shown["pretrain_images"]) == ("2", "300") and "epochs" not in shown
    assert lab.check_notebook_params(device="cpu", pretrain_images=None).limit is None
    with pytest.raises(ValueError, match=r"^parameter pretrain_epochs=0 is not allowed; allowed: an integer from 1"):
        lab.check_notebook_params(pretrain_epochs=0)
    with pytest.raises(ValueError, match=r"^parameter pretrain_images=1 is not allowed"):
        lab.check_notebook_params(pretrain_images=1)
    with pytest.raises(TypeError, match="notebook parameters pretrain_epochs and epochs set the same setting"):
        lab.check_notebook_params(pretrain_epochs=2, epochs=3)


@pytest.mark.parametrize("params, message", [
    (dict(pretext_settings={"rotations": 3}), r"^parameter pretext_settings: rotations=3 is not allowed; allowed: 2 "),
    (dict(pretext_settings={"nope": 1}), r"^parameter pretext_settings: nope=1 is not allowed; allowed: a setting of "
                                         r"rotation, vae, siamese-vae, simclr: optimizer, lr"),
    # a setting of a task the notebook does not pretrain
    (dict(methods=["rotation"], pretext_settings={"temperature": 0.1}),
     r"^parameter pretext_settings: temperature=0.1 is not allowed; allowed: a setting of rotation: optimizer"),
    (dict(pretext_settings=["lr", 0.1]), r"^parameter pretext_settings=\['lr', 0.1\] is not allowed; allowed: a dict"),
    (dict(epochs=10 ** 6), r"^parameter epochs=1000000 is not allowed; allowed: an integer from 1 to 10000"),
])
def test_bad_pretext_settings_name_the_setting_and_what_is_allowed(params, message):
    with pytest.raises(ValueError, match=message):
        lab.check_notebook_params(device="cpu", **params)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_rotation_examples_and_sentences_follow_the_runs_settings(tmp_path):
    from sslab.pretrain import PretrainConfig, pretrain
    settings = lab.check_notebook_params(methods=["rotation", "siamese-vae"], device="cpu", examples=3,
                                         pretext_settings={"rotations": 2, "margin": 0.25, "batch_size": 32})
    runs = {m: pretrain(PretrainConfig(**{**vars(settings.pretrain_config(m)), "epochs": 1, "limit": 64,
                                          "width": 0.125}), device="cpu", out=str(tmp_path), progress=False,
                        eval_limit=64) for m in settings.methods}
    examples = lab.rotation_predictions(runs["rotation"], settings)
    assert examples["images"].shape == (3, 2, 1, 28, 28) and examples["angles"] == [0, 180]
    assert set(examples["predicted"].ravel()) <= {0, 1}
    accuracy = lab.rotation_accuracy_by_class(runs["rotation"], settings, n=100)
    assert len(accuracy) == 10 and all(0 <= a <= 1 for a in accuracy.values())
    sentence = lab.pretext_sentence(runs)
    assert "of test rotations (chance 50%)" in sentence and ", margin 0.25)" in sentence


def test_the_deterministic_parameter_reaches_pretraining_and_the_sweep(monkeypatch):
    import torch
    for path in NOTEBOOKS:
        assert _parameters(path)["deterministic"]["default"] == "False", path.stem
        check = next(c.source for c in _cells(path) if "lab.check_notebook_params(" in c.source)
        assert "deterministic=deterministic" in check, path.stem
    calls = []
    monkeypatch.setattr("sslab.lab.runs.pretrain", lambda config, **kw: calls.append(("pretrain", kw["deterministic"])))
    monkeypatch.setattr("sslab.evaluate.label_curve", lambda runs, **kw: calls.append(("curve", kw["deterministic"])))
    settings = lab.check_notebook_params(methods=["rotation"], budgets=[1], device="cpu", deterministic=True)
    assert settings.deterministic and torch.are_deterministic_algorithms_enabled()
    lab.pretrain_runs(settings, announce=None)
    lab.evaluate_budgets({}, settings)
    assert calls == [("pretrain", True), ("curve", True)]
    assert lab.check_notebook_params(device="cpu").deterministic is False


# ---------------------------------------------------------------- executions

def _html_rows(html: str) -> list:
    """The cell texts of each <tr> of a pandas HTML table (header cells included)."""
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.rows[-1].append(self.cell.strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Rows()
    parser.feed(html)
    return [row for row in parser.rows if row]


def _kernel_env(outputs: Path) -> dict:
    """The environment the kernels inherit: outputs in a temporary folder, one thread per
    process (two spin-waiting threads on a shared 2-core machine are far slower), and no
    MPLBACKEND (it would silently drop the inline figures)."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["SSLAB_OUTPUTS"] = str(outputs)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


@pytest.fixture(scope="module")
def shared_outputs(tmp_path_factory):
    """One outputs folder for the executions below, so the papermill run of 02 reuses the
    runs the nbval run pretrained."""
    return tmp_path_factory.mktemp("notebook-outputs")


@dataclass
class NbvalRun:
    """The nbval run of every notebook: the pytest process's result, how long it took, the
    executed notebooks (this run's outputs) and the tables as the run left them."""

    result: subprocess.CompletedProcess
    seconds: float
    executed: Path
    tables: Path

    def notebook(self, name: str):
        return nbformat.read(self.executed / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="module")
def nbval_run(shared_outputs, tmp_path_factory) -> NbvalRun:
    """Every notebook run by nbval with the smoke parameters; nbval compares only the cells marked
    ``# NBVAL_CHECK_OUTPUT`` (the dataset summary) with the committed outputs, which come from a run
    at the notebooks' defaults. tests/nbval_executed.py keeps this run's outputs for the checks below."""
    root = tmp_path_factory.mktemp("nbval")
    prepared, executed = root / "prepared", root / "executed"
    prepared.mkdir()
    for path in NOTEBOOKS:
        papermill.execute_notebook(str(path), str(prepared / path.name), parameters=lab.load_params(SMOKE),
                                   prepare_only=True, progress_bar=False)
    shutil.copy(Path(__file__).with_name("nbval_executed.py"), prepared / "conftest.py")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
         "-W", "ignore::DeprecationWarning", "--rootdir", str(prepared), str(prepared)],
        cwd=prepared, env={**_kernel_env(shared_outputs), "NBVAL_EXECUTED_DIR": str(executed)},
        capture_output=True, text=True, timeout=1500)
    seconds = time.monotonic() - started
    # The papermill runs of 02 below write nb02_probe again: keep the tables as this run left them.
    if (shared_outputs / "tables").is_dir():
        shutil.copytree(shared_outputs / "tables", root / "tables")
    return NbvalRun(result, seconds, executed, root / "tables")


@pytest.fixture(scope="module")
def executed(nbval_run) -> NbvalRun:
    if nbval_run.result.returncode != 0:
        pytest.fail("the nbval run failed (test_notebooks_run_under_nbval_with_the_smoke_parameters says where)")
    return nbval_run


@pytest.mark.slow
def test_notebooks_run_under_nbval_with_the_smoke_parameters(nbval_run, shared_outputs):
    result = nbval_run.result
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    print(f"nbval run of the {len(NOTEBOOKS)} notebooks: {nbval_run.seconds:.0f} s")
    assert sorted(p.stem for p in nbval_run.executed.glob("*.ipynb")) == sorted(p.stem for p in NOTEBOOKS)
    # the kernels wrote into the temporary outputs folder: runs, figures (PNG + PDF), tables
    smoke = lab.load_params(SMOKE)
    figures = shared_outputs / "figures"
    for stem in ("01_training_curves", "01_rotation_examples", "01_vae_gallery", "01_siamese_triplets",
                 "06_fixmatch_views", "02_confusion_best",
                 f"03_umap_{smoke['layer']}", "04_label_curves", "05_finetune", "06_semi_curves",
                 "06_gain_over_random_init"):
        assert (figures / f"{stem}.png").is_file() and (figures / f"{stem}.pdf").is_file(), stem
    # every pretext task, and the random-init backbone notebook 06 evaluates next to them
    methods = {load_run(p).method for p in store.list_runs("pretrain", str(shared_outputs))}
    assert methods == {*smoke["methods"], "random-init"}
    table = json.loads((nbval_run.tables / "nb04_label_curves.json").read_text())
    assert {(r["method"], r["budget"], r["seed"]) for r in table["rows"]} == {
        (m, b, s) for m in [*smoke["methods"], "scratch"] for b in smoke["budgets"] for s in smoke["seeds"]}


# ---------------------------------------------------------------- what the executed notebooks show
#
# The committed outputs come from a run at the notebooks' defaults, so nbval can compare only
# outputs that do not depend on the parameters. The tests below check the smoke run's outputs
# against the files and the run store it wrote instead, recomputing every number from the rows.

def _cell_outputs(nb, source_start: str) -> list:
    """The outputs of the code cell whose source starts with ``source_start``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(cells) == 1, f"{len(cells)} code cells start with {source_start!r}"
    return cells[0].outputs


def _printed(nb, source_start: str) -> str:
    return "".join(o.get("text", "") for o in _cell_outputs(nb, source_start) if o.output_type == "stream")


def _shown_table(nb, source_start: str) -> tuple:
    """(header, body rows) of the HTML table a cell displayed."""
    html = next(o for o in _cell_outputs(nb, source_start) if o.output_type == "execute_result")["data"]["text/html"]
    header, *body = _html_rows(html)
    return header, body


def _csv_rows(path: Path) -> list:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["budget"], row["seed"] = int(row["budget"]), int(row["seed"])
        for metric in ("top1", "top5"):
            row[metric] = float(row[metric]) if row[metric] else None
    return rows


def _series_of(row: dict) -> str:
    return row["method"] if row["protocol"] in ("probe", "scratch") else f"{row['method']} ({row['protocol']})"


def _by_series(rows: list, metric: str) -> dict:
    """(series, budget) → the metric's values over seeds, from the table's rows."""
    values: dict = {}
    for row in rows:
        values.setdefault((_series_of(row), row["budget"]), []).append(row[metric])
    return values


def _gains(rows: list, metric: str = "top1", over: str = "scratch") -> dict:
    """(series, budget) → the paired differences to the baseline on the same budget and seed:
    scratch, the same method's probe, or random-init under the same protocol."""
    values = {(r["method"], r["protocol"], r["budget"], r["seed"]): r[metric] for r in rows}
    gains: dict = {}
    for row in rows:
        base = {"scratch": ("scratch", "scratch"), "probe": (row["method"], "probe"),
                "random-init": ("random-init", row["protocol"])}[over]
        if row["protocol"] == "scratch" or (row["method"], row["protocol"]) == base:
            continue
        reference = values.get((*base, row["budget"], row["seed"]))
        if reference is not None:
            gains.setdefault((_series_of(row), row["budget"]), []).append(row[metric] - reference)
    return gains


def _spread(values: list) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


ROUNDED = 0.05 + 1e-9  # a number shown with one decimal is within this of the value


def _check_mean_std(shown: str, values: list, where: str) -> None:
    """``shown`` is ``mean ± std`` in % of ``values`` (only the mean for a single value)."""
    mean, std = _spread(values)
    numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d", shown)]
    assert len(numbers) == (2 if len(values) > 1 else 1), (where, shown)
    assert abs(numbers[0] - 100 * mean) <= ROUNDED, (where, shown, values)
    if len(values) > 1:
        assert abs(numbers[1] - 100 * std) <= ROUNDED, (where, shown, values)


def _check_pivot(nb, source: str, rows: list, metric: str) -> None:
    """A pivot (series × budgets, ``mean ± std`` %) shows every series, in the sweep's order with
    scratch last, and the numbers of the table's rows."""
    header, body = _shown_table(nb, source)
    budgets = sorted({r["budget"] for r in rows})
    assert header[1:] == [str(b) for b in budgets], header
    values = _by_series(rows, metric)
    series = list(dict.fromkeys(_series_of(r) for r in rows if r["protocol"] != "scratch")) + ["scratch"]
    assert [line[0] for line in body] == series
    for line in body:
        for budget, shown in zip(budgets, line[1:]):
            _check_mean_std(shown, values[(line[0], budget)], (source, metric, line[0], budget))


def _check_gain_frame(nb, source: str, rows: list, over: str = "scratch") -> None:
    header, body = _shown_table(nb, source)
    budgets = sorted({r["budget"] for r in rows})
    assert header[1:] == [str(b) for b in budgets], header
    gains = _gains(rows, over=over)
    assert sorted(line[0] for line in body) == sorted({series for series, _ in gains})
    for line in body:
        for budget, shown in zip(budgets, line[1:]):
            diffs = gains[(line[0], budget)]
            _check_gain_interval(shown, diffs, (source, line[0], budget))
            assert shown.endswith(f"({sum(d > 0 for d in diffs)}/{len(diffs)})"), (line[0], budget, shown, diffs)


def _check_gain_interval(shown: str, diffs: list, where) -> None:
    """``+3.1 [+1.2, +5.0] ✓ (3/3)``: the mean paired gain in points, Student's t 95 % interval
    (scipy's quantile as the reference), ✓ exactly when the interval excludes 0."""
    stats = pytest.importorskip("scipy.stats")
    match = re.fullmatch(r"([-+]\d+\.\d)(?: \[([-+]\d+\.\d), ([-+]\d+\.\d)\]( ✓)?)? \(\d+/\d+\)", shown)
    assert match, (where, shown)
    mean = 100 * statistics.mean(diffs)
    assert float(match.group(1)) == pytest.approx(mean, abs=0.051), (where, shown)
    if len(diffs) < 2:
        assert match.group(2) is None, (where, shown)
        return
    half = 100 * stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    # shown to one decimal, from a quantile table of six significant digits (wide intervals of two
    # seeds reach hundreds of points, where the table's last digit can move the rounding)
    assert float(match.group(2)) == pytest.approx(mean - half, abs=0.051 + 1e-5 * abs(half)), (where, shown)
    assert float(match.group(3)) == pytest.approx(mean + half, abs=0.051 + 1e-5 * abs(half)), (where, shown)
    assert bool(match.group(4)) == (abs(mean) > half), (where, shown)


def _table_rows(run: NbvalRun, name: str) -> list:
    """The rows of a table a notebook wrote; they are the cells in the run store, and the CSV and
    the JSON hold the same numbers."""
    rows = _csv_rows(run.tables / f"{name}.csv")
    saved = json.loads((run.tables / f"{name}.json").read_text())["rows"]
    key = ("method", "protocol", "budget", "seed", "top1", "top5")
    assert [tuple(r[k] for k in key) for r in rows] == [tuple(r[k] for k in key) for r in saved]
    for row in saved:
        cell = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert (cell["top1"], cell["top5"], cell["confusion"]) == (row["top1"], row["top5"], row["confusion"])
    return rows


@pytest.mark.slow
def test_every_notebook_shows_the_smoke_parameters_it_was_given(executed):
    smoke = lab.load_params(SMOKE)
    for path in NOTEBOOKS:
        header, body = _shown_table(executed.notebook(path.stem), "settings = lab.check_notebook_params(")
        shown = {line[0]: line[1] for line in body}
        for name in set(smoke) & set(_parameters(path)):
            value = smoke[name]
            expected = ", ".join(map(str, sorted(value) if name in ("budgets", "seeds") else value)) \
                if isinstance(value, list) else str(value)
            assert shown[name] == expected, (path.stem, name, shown[name], expected)


@pytest.mark.slow
def test_notebook_01_reports_what_the_run_store_holds(executed, shared_outputs):
    nb = executed.notebook("01_pretext")
    smoke = lab.load_params(SMOKE)
    reported = _printed(nb, "sweep_runs = lab.sweep_configs(")  # the cell that pretrains (and the sweep's runs)
    # 01's runs: not notebook 06's untrained backbone (00's run is one of them where 00's settings are 01's)
    runs = {run.method: run for run in map(load_run, store.list_runs("pretrain", str(shared_outputs)))
            if f": {run.path.name} — " in reported}
    assert set(runs) == set(smoke["methods"])
    for method, run in runs.items():
        assert f": {run.path.name} — {method}: {smoke['limit']} images, {smoke['epochs']} epochs" in reported, method
    sentence = _printed(nb, "lab.show(plots.training_curves(")
    assert sentence.startswith(f"After {smoke['epochs']} epoch(s) on {smoke['limit']} unlabeled images: ")
    if "rotation" in runs:
        shown = float(re.search(r"rotation predicts (\d+\.\d)% of test rotations", sentence).group(1))
        assert abs(shown - 100 * runs["rotation"].summary["test_rot_acc"]) <= ROUNDED
    for method in ("vae", "siamese-vae"):
        if method in runs:
            shown = float(re.search(rf"{method} reconstructs test images with (\d+\.\d) summed", sentence).group(1))
            assert abs(shown - runs[method].summary["test_recon"]) <= ROUNDED, method


@pytest.mark.slow
def test_notebook_00_compares_its_probe_with_the_labs_for_the_same_settings(executed, shared_outputs):
    from sslab.evaluate import probe_cell
    from sslab.evaluate.cells import open_cell, stored_row
    from sslab.precision import resolve_precision
    nb = executed.notebook("00_from_scratch")
    smoke, out = lab.load_params(SMOKE), str(shared_outputs)
    page = [float(x) / 100 for x in re.findall(r"^seed \d+: (\d+\.\d)% top-1", _printed(nb, "def probe(seed):"), re.M)]
    assert len(page) == len(smoke["seeds"])
    # the lab's run: rotation with 00's pretraining, on the CPU's width, in the precision the page computes in
    precision = resolve_precision("auto", "cpu")
    [run] = [r for r in map(load_run, store.list_runs("pretrain", out))
             if r.method == "rotation" and r.config.precision == precision
             and (r.config.epochs, r.config.limit) == (smoke["pretrain_epochs"], smoke["pretrain_images"])]
    assert run.config.width == 0.25
    config = EvalConfig(precision=precision)
    assert all(stored_row(open_cell("probe", run, smoke["labels"], seed, config=config, device="cpu", out=out).key,
                          out) for seed in smoke["seeds"])  # the notebook computed them: read back, not trained
    library = [probe_cell(run, smoke["labels"], seed, config=config, device="cpu", out=out)["top1"]
               for seed in smoke["seeds"]]
    header, body = _shown_table(nb, "from sslab.evaluate import probe_cell")
    shown = {line[0]: line[1:] for line in body}
    for seed, p, q in zip(smoke["seeds"], page, library):
        assert shown[f"seed {seed}"] == [f"{100 * p:.1f}", f"{100 * q:.1f}"], (seed, shown)
    # the sentence is the one these numbers give (the page's known to the 0.1 % it prints)
    sentence, expected = _printed(nb, "print(lab.agreement_sentence(").strip(), lab.agreement_sentence(page, library)
    numbers = [[float(x) for x in re.findall(r"\d+\.\d", text)] for text in (sentence, expected)]
    assert len(numbers[0]) == len(numbers[1]) and all(abs(a - b) <= 0.11 for a, b in zip(*numbers)), (sentence,
                                                                                                   expected)
    verdict = lab.agreement(page, library)
    if abs(abs(verdict["difference"]) - verdict["spread"]) > 0.002:  # not on the edge, where rounding could tip it
        assert sentence.split(": ")[-1] == expected.split(": ")[-1], (sentence, expected)


# A library function patched in the notebook's kernel (a sitecustomize.py on its PYTHONPATH, which
# Python imports at start-up): the notebook's check under the method page must stop the run.
PATCHES = {
    "siamese-triplet": ("01_pretext", {"methods": ["siamese-vae"]}, """
import torch
import sslab.pretext.siamese_vae as patched


def triplet_loss(anchor, positive, negative, margin=0.5):  # distances where the study squares them
    return torch.relu((anchor - positive).norm(dim=1) - (anchor - negative).norm(dim=1) + margin).mean()


patched.triplet_loss = triplet_loss
""", 'if "siamese-vae" in runs:\n    print(lab.check_pretext_loss(siamese', "the page's siamese-vae triplet loss "),
    "propagation": ("06_semi_supervised", {"methods": ["rotation"], "protocols": ["probe"]}, """
import sslab.evaluate.graph as patched

propagate_as_written = patched.propagate


def propagate(affinity, labels, classes, alpha=0.99, iterations=20):  # one step short
    return propagate_as_written(affinity, labels, classes, alpha, iterations - 1)


patched.propagate = propagate
""", "print(lab.check_propagation(", "the page's propagated class distributions differs from the library's"),
}


@pytest.mark.slow
@pytest.mark.parametrize("patch", PATCHES)
def test_a_patched_library_function_stops_the_notebook_in_its_check(patch, tmp_path, monkeypatch):
    name, changed, source, cell_start, message = PATCHES[patch]
    (tmp_path / "patch").mkdir()
    (tmp_path / "patch" / "sitecustomize.py").write_text(source)
    for key, value in _kernel_env(tmp_path / "outputs").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "patch"), str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    path, out = ROOT / "notebooks" / f"{name}.ipynb", tmp_path / f"{name}.ipynb"
    params = {k: v for k, v in {**lab.load_params(SMOKE), **changed}.items() if k in _parameters(path)}
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(str(path), str(out), parameters=params, cwd=str(tmp_path), progress_bar=False,
                                   kernel_name="python3", execution_timeout=600)
    assert error.value.ename == "AssertionError" and message in error.value.evalue, error.value.evalue
    failed = [c for c in nbformat.read(out, as_version=4).cells
              if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1 and failed[0].source.startswith(cell_start), failed[0].source


@pytest.mark.slow
def test_notebook_02_table_and_sentences_are_the_probe_table(executed):
    nb = executed.notebook("02_probe")
    rows = _table_rows(executed, lab.TABLES["02_probe"])
    smoke = lab.load_params(SMOKE)
    assert {r["budget"] for r in rows} == {smoke["labels"]}
    header, body = _shown_table(nb, "table = lab.evaluate_budgets(")
    assert header[1:] == ["method", "protocol", "labels per class", "seeds", "top-1 %", "top-5 %"], header
    for line in body:
        method, protocol, budget, seeds, top1, top5 = line[1:]
        mine = [r for r in rows if (r["method"], r["protocol"]) == (method, protocol)]
        assert int(budget) == smoke["labels"] and int(seeds) == len(mine) == len(smoke["seeds"])
        _check_mean_std(top1, [r["top1"] for r in mine], (method, "top1"))
        _check_mean_std(top5, [r["top5"] for r in mine], (method, "top5"))
    assert len(body) == len({(r["method"], r["protocol"]) for r in rows})
    # the sentence names the series with the best mean top-1, and its margin over scratch
    means = {series: statistics.mean(v) for (series, _), v in _by_series(rows, "top1").items()}
    best = max(means, key=means.get)
    sentence = _printed(nb, "print(lab.probe_sentence(")
    assert sentence.startswith(f"At {smoke['labels']} labeled images per class the best is {best} with "), sentence
    assert abs(float(re.search(r"with (\d+\.\d)% top-1", sentence).group(1)) - 100 * means[best]) <= ROUNDED
    if best != "scratch":
        margin = float(re.search(r", ([-+]\d+\.\d) points over scratch", sentence).group(1))
        assert abs(margin - 100 * (means[best] - means["scratch"])) <= ROUNDED
    # the confusion sentence reads the best series' confusion matrices, summed over seeds
    saved = json.loads((executed.tables / f"{lab.TABLES['02_probe']}.json").read_text())["rows"]
    confusion = np.sum([r["confusion"] for r in saved if _series_of(r) == best], axis=0).astype(float)
    classes = saved[0]["classes"]
    rates = confusion / confusion.sum(1, keepdims=True)
    right = np.diag(rates).copy()
    np.fill_diagonal(rates, 0)
    true, taken = np.unravel_index(rates.argmax(), rates.shape)
    printed = _printed(nb, "best = lab.best_series(table)")
    assert printed.startswith(f"{best}: most often {classes[true]} is taken for {classes[taken]} "
                              f"({100 * rates[true, taken]:.0f}% of {classes[true]}); the hardest class is "
                              f"{classes[right.argmin()]} ({100 * right.min():.0f}% right)."), printed


@pytest.mark.slow
def test_notebook_03_sentence_ranks_the_separation_scores_it_lists(executed):
    sentence = _printed(executed.notebook("03_latent_umap"), "panels = lab.embeddings(")
    listed = re.findall(r"([\w-]+(?: init)?) \(5-NN acc (\d+\.\d)%\)", sentence)
    smoke = lab.load_params(SMOKE)
    assert sorted(name for name, _ in listed) == sorted([*smoke["methods"], "random init"]), sentence
    scores = [float(score) for _, score in listed]
    assert scores == sorted(scores, reverse=True), sentence
    assert sentence.startswith(f"Classes separate best in {listed[0][0]}'s space: "), sentence


@pytest.mark.slow
def test_notebook_04_tables_and_sentence_are_the_label_curve_table(executed):
    nb = executed.notebook("04_label_curves")
    rows = _table_rows(executed, lab.TABLES["04_label_curves"])
    _check_pivot(nb, 'table = lab.evaluate_budgets(runs, settings, name="nb04', rows, "top1")
    _check_pivot(nb, 'lab.pivot_frame(table, "top5")', rows, "top5")
    _check_gain_frame(nb, 'lab.gain_frame(table, "top1")', rows)
    # each method: the budgets where its mean paired gain is positive, and the largest gain
    sentence = _printed(nb, "lab.show(plots.label_curves(")
    gains = {key: statistics.mean(d) for key, d in _gains(rows).items()}
    for method in dict.fromkeys(r["method"] for r in rows if r["protocol"] == "probe"):
        mine = {budget: gain for (series, budget), gain in gains.items() if series == method}
        peak = max(mine, key=mine.get)
        wins = [b for b in sorted(mine) if mine[b] > 0]
        if wins:
            said = re.search(rf"(?:^|; ){re.escape(method)} beats scratch at ([\d, ]+) label\(s\) per class "
                             rf"\(largest gain ([-+]\d+\.\d) points at (\d+)\)", sentence)
            assert said and [int(b) for b in said.group(1).split(", ")] == wins, (method, wins, sentence)
        else:
            said = re.search(rf"(?:^|; ){re.escape(method)} never beats scratch \(closest ([-+]\d+\.\d) points "
                             rf"at (\d+)\)", sentence)
            assert said, (method, sentence)
        assert abs(float(said.group(said.lastindex - 1)) - 100 * mine[peak]) <= ROUNDED, (method, sentence)
        assert int(said.group(said.lastindex)) == peak, (method, sentence)


@pytest.mark.slow
def test_notebook_05_tables_and_sentence_are_the_finetune_table(executed):
    nb = executed.notebook("05_finetune")
    rows = _table_rows(executed, lab.TABLES["05_finetune"])
    assert {r["protocol"] for r in rows} == {"probe", "finetune", "scratch"}
    _check_pivot(nb, "table = lab.evaluate_budgets(", rows, "top1")
    _check_pivot(nb, 'lab.pivot_frame(table, "top5")', rows, "top5")
    _check_gain_frame(nb, 'lab.gain_frame(table, "top1")', rows)
    means = {key: statistics.mean(v) for key, v in _by_series(rows, "top1").items()}
    sentence = _printed(nb, "lab.show(plots.finetune_comparison(")
    for method in dict.fromkeys(r["method"] for r in rows if r["protocol"] == "finetune"):
        said = re.search(rf"(?:: |; ){re.escape(method)} ((?:[-+]\d+\.\d at \d+(?:, )?)+)", sentence)
        assert said, (method, sentence)
        shown = {int(b): float(d) for d, b in re.findall(r"([-+]\d+\.\d) at (\d+)", said.group(1))}
        budgets = sorted({r["budget"] for r in rows})
        assert sorted(shown) == budgets, (method, sentence)
        for budget, diff in shown.items():
            expected = means[(f"{method} (finetune)", budget)] - means[(method, budget)]
            assert abs(diff - 100 * expected) <= ROUNDED, (method, budget, sentence)


@pytest.mark.slow
def test_notebook_06_tables_and_sentence_are_the_semi_supervised_table(executed):
    nb = executed.notebook("06_semi_supervised")
    rows = _table_rows(executed, lab.TABLES["06_semi_supervised"])
    smoke = lab.load_params(SMOKE)
    protocols = _defaults(SEMI)["protocols"]
    fewer = smoke.get("random_init_protocols", _defaults(SEMI)["random_init_protocols"])
    assert set(fewer) < set(protocols)  # random-init runs only the cheap protocols by default
    assert {(r["method"], r["protocol"]) for r in rows} == {("scratch", "scratch")} | {
        (m, p) for m in smoke["methods"] for p in protocols if p != "scratch"} | {
        ("random-init", p) for p in fewer if p != "scratch"}
    _check_pivot(nb, "table = lab.evaluate_budgets(runs, settings, protocols=", rows, "top1")
    for over, source in (("probe", 'lab.gain_frame(table, "top1", over="probe")'),
                         ("random-init", 'lab.gain_frame(table, "top1", over="random-init")'),
                         ("scratch", 'lab.gain_frame(table, "top1")')):
        _check_gain_frame(nb, source, rows, over)
    # each budget's line names the series with the highest mean top-1, with that mean
    means = {key: statistics.mean(v) for key, v in _by_series(rows, "top1").items()}
    sentence = _printed(nb, "lab.show(plots.semi_curves(")
    for budget in sorted({r["budget"] for r in rows}):
        series, best = max(((s, m) for (s, b), m in means.items() if b == budget), key=lambda sm: sm[1])
        said = re.search(rf"^{budget} labels? per class: best (.+?) (\d+\.\d)%", sentence, re.M)
        assert said and said.group(1) == series, (budget, series, sentence)
        assert abs(float(said.group(2)) - 100 * best) <= ROUNDED, (budget, sentence)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.slow
@pytest.mark.parametrize("interactive", [True, False])
def test_papermill_batch_run_of_02_at_4_labels_per_class(tmp_path, shared_outputs, monkeypatch, interactive):
    """``papermill notebooks/02_probe.ipynb OUT -f params/smoke.yml -p labels 4`` (widgets on, the
    default) and the same with ``-p interactive False``: both finish headless (a per-cell
    timeout turns a hang into a failure), the table is for 4 labels per class (not the smoke
    file's 2), figures are embedded, and widgets appear only when asked for. Notebook 04 of the
    nbval run computed the cells of budget 4, so these runs reuse them and train nothing."""
    for key, value in _kernel_env(shared_outputs).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    out = tmp_path / "02_probe-4.ipynb"
    params = {**lab.load_params(SMOKE), "labels": 4}
    assert params["labels"] != lab.load_params(SMOKE)["labels"]
    if not interactive:
        params["interactive"] = False
    params = {k: v for k, v in params.items() if k in _parameters(PROBE)}
    papermill.execute_notebook(str(PROBE), str(out), parameters=params, cwd=str(tmp_path),
                               progress_bar=False, kernel_name="python3", execution_timeout=600)
    nb = nbformat.read(out, as_version=4)
    table_cell = next(c for c in nb.cells if "results-table" in c.metadata.get("tags", []))
    html = next(o for o in table_cell.outputs if o.output_type == "execute_result")["data"]["text/html"]
    header, *body = _html_rows(html)
    assert header[1:5] == ["method", "protocol", "labels per class", "seeds"], header
    assert [row[1] for row in body] == [*params["methods"], "scratch"]
    assert all(row[3] == "4" for row in body), body
    outputs = _outputs(nb)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(WIDGET_VIEW in o.get("data", {}) for o in outputs) == interactive
    saved = json.loads((shared_outputs / "tables" / "nb02_probe.json").read_text())
    assert {r["budget"] for r in saved["rows"]} == {4}
    # how the committed notebooks are made from such a run
    (tmp_path / "published").mkdir()
    out.rename(tmp_path / "02_probe.ipynb")
    [written] = lab.publish(tmp_path, ["02_probe"], machine="the test machine", announce=None,
                            dest=tmp_path / "published")
    clean = nbformat.read(written, as_version=4)
    assert set(clean.metadata) == {"kernelspec", "language_info"}
    assert not [c for c in clean.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(clean.cells) == len(nb.cells) - 1 and _outputs(clean) == _outputs(nb)
    assert not [c for c in clean.cells if set(c.metadata) & {"papermill", "execution"}]
    note = clean.cells[0].source.split("\n\n")[-1]
    assert note.startswith(OUTPUTS_NOTE) and "`labels` = 4" in note and "the test machine" in note
    assert clean.cells[0].source.count(OUTPUTS_NOTE) == 1


@pytest.mark.slow
def test_a_bad_parameter_stops_in_the_check_cell_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)
    out = tmp_path / "bad.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(str(PROBE), str(out), parameters={"labels": "abc"},
                                   progress_bar=False, kernel_name="python3")
    assert error.value.ename == "ValueError"
    assert "labels='abc'" in error.value.evalue and "an integer ≥ 1" in error.value.evalue
    nb = nbformat.read(out, as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1 and failed[0].source.startswith("settings = lab.check_notebook_params(")


# ---------------------------------------------------------------- tables and sentences

def _result_rows():
    from sslab.evaluate import ResultTable
    rows = []
    for budget, base in ((1, 0.50), (4, 0.60)):
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            # distinct gains per budget, so "largest" and "closest" have one answer
            for method, protocol, delta in (("rotation", "probe", 0.04),
                                            ("rotation", "finetune", 0.06 if budget == 1 else 0.05),
                                            ("vae", "probe", -0.02 if budget == 1 else -0.03),
                                            ("scratch", "scratch", 0.0)):
                top1 = base + delta + jitter
                confusion = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
                rows.append({"method": method, "protocol": protocol, "head": "mlp", "layer": "conv4",
                             "budget": budget, "seed": seed, "top1": top1, "top5": top1 + 0.2, "epochs": 3,
                             "seconds": 1.0, "per_class": [0.8, 0.9, 0.5], "confusion": confusion,
                             "classes": ["a", "b", "c"]})
    return ResultTable(rows)


def test_tables_show_mean_and_std_in_percent_in_the_sweep_order():
    table = _result_rows()
    pivot = lab.pivot_frame(table, "top1")
    assert list(pivot.index) == ["rotation", "rotation (finetune)", "vae", "scratch"]
    assert list(pivot.columns) == ["1", "4"]
    assert pivot.loc["rotation", "1"] == "54.0 ± 1.4" and pivot.loc["scratch", "4"] == "60.0 ± 1.4"
    gains = lab.gain_frame(table, "top1")
    assert gains.loc["rotation", "1"] == "+4.0 [+4.0, +4.0] ✓ (2/2)"
    assert gains.loc["vae", "4"] == "-3.0 [-3.0, -3.0] ✓ (0/2)"
    frame = lab.results_frame(table, budget=4)
    assert frame["labels per class"].tolist() == [4] * 4
    assert frame["method"].tolist() == ["rotation", "rotation", "vae", "scratch"]
    assert frame["top-1 %"].tolist()[0] == "64.0 ± 1.4"


def test_best_series_confusion_and_sentences_come_from_the_numbers():
    table = _result_rows()
    assert lab.best_series(table) == ("rotation", "finetune")
    confusion = lab.confusion_of(table, "vae", "probe", budget=1)
    assert confusion.tolist() == [[16, 4, 0], [2, 18, 0], [0, 10, 10]]  # two seeds summed
    assert lab.confusion_sentence(table, "vae", "probe") == (
        "vae: most often c is taken for b (50% of c); the hardest class is c (50% right).")
    assert lab.curve_sentence(table) == (
        "rotation beats scratch at 1, 4 label(s) per class (largest gain +4.0 points at 1); "
        "vae never beats scratch (closest -2.0 points at 1) — top-1, mean over seeds.")
    assert lab.finetune_sentence(table) == (
        "Fine-tuned minus frozen probe, top-1 percentage points by labels per class (mean over seeds): "
        "rotation +2.0 at 1, +1.0 at 4.")
    from sslab.evaluate import ResultTable
    one_budget = ResultTable([r for r in table.rows if r["budget"] == 4 and r["protocol"] != "finetune"])
    assert lab.probe_sentence(one_budget) == (
        "At 4 labeled images per class the best is rotation with 64.0% top-1, +4.0 points over scratch "
        "(mean over 2 seeds).")


def test_references_only_for_a_comparable_dataset():
    assert lab.references("fashion-mnist", [1, 4, 16, 64]) == []
    refs = lab.references("cifar10", [1, 4, 16, 64, 100])
    assert refs[0]["budgets"] == [20, 100] and refs[0]["values"] == [64.6, 75.3]
    assert "reference" in refs[0]["label"]


def test_headline_reads_the_table_notebook_04_wrote(isolated_outputs):
    table = _result_rows()
    table.save(isolated_outputs / "tables" / lab.TABLES["04_label_curves"])
    text = lab.headline()
    assert "54.0 ± 1.4" in text and "+4.0 [+4.0, +4.0] ✓ (2/2)" in text and "nb04_label_curves.csv" in text


def test_lab_command_rejects_unknown_notebooks_and_missing_params(capsys):
    assert lab.main(["--notebooks", "08"]) == 2
    assert "--notebooks='08' is not allowed" in capsys.readouterr().err
    assert lab.main(["--params", "params/nope.yml"]) == 2
    assert "params/nope.yml" in capsys.readouterr().err


def test_explorers_redraw_their_figure_and_table_when_a_control_changes():
    pytest.importorskip("ipywidgets")
    table = _result_rows()
    box = lab.budget_explorer(table)
    slider, html, image = box.children[0].children[0], box.children[1], box.children[2]
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and "54.0 ± 1.4" in html.value
    first = bytes(image.value)
    slider.value = 4
    assert "64.0 ± 1.4" in html.value and "54.0 ± 1.4" not in html.value
    assert bytes(image.value) != first
    box = lab.confusion_explorer(table)
    choice, image = box.children[0].children[0], box.children[2]
    before = bytes(image.value)
    choice.value = next(value for _, value in choice.options if value != choice.value)
    assert bytes(image.value) != before and image.value[:4] == b"\x89PNG"


def test_the_sweep_sentence_lists_each_value_in_order_and_names_the_best():
    from sslab.evaluate import ResultTable

    def row(value, seed, top1):
        return {"method": f"siamese-vae [triplet_weight={value}]", "protocol": "probe", "head": "mlp", "layer": "conv4",
                "budget": 4, "seed": seed, "top1": top1, "top5": 0.9, "epochs": 1}
    table = ResultTable([row(v, s, t) for v, tops in ((20.0, (0.60, 0.62)), (0.0, (0.61, 0.63)), (5.0, (0.64, 0.66)))
                         for s, t in enumerate(tops)])
    text = lab.sweep_sentence(table, "triplet_weight")
    assert text == ("Probe at 4 labeled images per class, top-1 % (mean ± std over seeds): siamese-vae, triplet_weight "
                    "= 0.0: 62.0 ± 1.4, 5.0: 65.0 ± 1.4, 20.0: 61.0 ± 1.4 — best siamese-vae [triplet_weight=5.0].")


def test_make_lab_says_a_line_while_a_long_cell_runs_silently():
    """The heartbeat fills silences between the runner's own lines, only while a cell runs."""
    from sslab.lab import notebooks
    said: list = []
    with notebooks._Heartbeat(said.append, time.perf_counter(), every=0.3) as heartbeat:
        time.sleep(1.2)
        assert said == []  # no cell started yet: nothing to say
        notebooks._cell_announcer(heartbeat)(nbformat.v4.new_code_cell("train()\nmore()"), 4)
        time.sleep(2.5)
    assert said[0].endswith("cell 5: train()")
    beats = said[1:]
    assert 3 <= len(beats) <= 12 and all("cell 5 still running" in line for line in beats), said
    seconds = [float(re.search(r"\((\d+) s so far\)", line).group(1)) for line in beats]
    assert seconds == sorted(seconds)
    count = len(said)
    time.sleep(1.0)
    assert len(said) == count  # stopped with the notebook


def test_make_labs_kernels_put_their_sockets_at_an_absolute_path_short_enough_for_a_socket(tmp_path, monkeypatch):
    import os
    import tempfile

    from sslab.lab import notebooks
    short = tempfile.mkdtemp(prefix="rt")  # a runtime folder of a usual length
    monkeypatch.setattr("jupyter_core.paths.jupyter_runtime_dir", lambda: short)
    km = notebooks._local_kernels()(kernel_name="python3")
    os.rmdir(short)
    assert km.transport == "ipc" and km.ip.startswith(short + "/kernel-") and km.ip.endswith("-ipc")
    deep = tmp_path / ("d" * 70)
    monkeypatch.setattr("jupyter_core.paths.jupyter_runtime_dir", lambda: str(deep))
    km = notebooks._local_kernels()(kernel_name="python3")
    assert km.ip.startswith(tempfile.gettempdir() + "/kernel-") and len(km.ip) < 100


def test_a_notebooks_kernel_is_started_ahead_with_its_first_cells_imports(tmp_path):
    """make lab starts each notebook's kernel while the one before runs, with the imports of its
    first cell done (IPython's exec_lines: no cell, no execution count), runs the notebook in it and
    stops it; a notebook that fails has its kernel stopped too, and close() stops one not taken."""
    import json

    from sslab.lab import notebooks
    (tmp_path / "stamp.py").write_text("import time\nimported_at = time.time()\n")
    first = nbformat.v4.new_code_cell("import stamp  # a module that notes when it was imported\nimport time\n"
                                      "started = time.time()")
    probe = nbformat.v4.new_code_cell("print(started - stamp.imported_at > 1.0)")
    paths = []
    for name, cells in (("a", [nbformat.v4.new_markdown_cell("# a"), first, probe]),
                        ("b", [first, nbformat.v4.new_code_cell("raise ValueError('stop here')")]),
                        ("c", [first])):
        nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                            "display_name": "Python 3"}})
        nbformat.write(nb, str(tmp_path / f"{name}.ipynb"))
        paths.append(tmp_path / f"{name}.ipynb")
    assert notebooks.first_imports(paths[0]) == ["import stamp", "import time"]
    several = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("from os import (path,\n  sep)\nimport json")])
    nbformat.write(several, str(tmp_path / "several.ipynb"))
    assert notebooks.first_imports(tmp_path / "several.ipynb") == ["import json"]  # a part of a statement is left out
    ahead = notebooks.KernelsAhead(paths, tmp_path)
    try:
        kernel = ahead.take(0)
        assert sorted(ahead.started) == [1]  # the next one is starting while this one runs
        time.sleep(3.0)  # as the notebook before it would run
        out = tmp_path / "out"
        out.mkdir()
        notebooks._execute_one("a", {}, tmp_path, out, 0, 3, lambda text: None, kernel)
        assert not kernel.has_kernel  # stopped once the notebook ended
        executed = json.load(open(out / "a.ipynb"))["cells"]
        assert "".join(executed[2]["outputs"][0]["text"]) == "True\n"  # imported seconds before the first cell ran
        assert [executed[1]["execution_count"], executed[2]["execution_count"]] == [1, 2]  # counted as without
        kernel = ahead.take(1)
        with pytest.raises(RuntimeError, match="notebook b failed in cell 2: ValueError: stop here"):
            notebooks._execute_one("b", {}, tmp_path, out, 1, 3, lambda text: None, kernel)
        assert not kernel.has_kernel
        waiting = ahead.started[2]
        assert waiting.has_kernel
    finally:
        ahead.close()
    assert not waiting.has_kernel and ahead.started == {}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_of_the_parameters_cell(path):
    """make lab passes a notebook only the parameters papermill finds in it: a line papermill cannot
    parse (such as a comment with '=' in it) would drop that parameter from every batch run."""
    import types

    from sslab.lab.notebooks import notebook_parameters
    assigned = {name for name, value in _defaults(path).items() if not isinstance(value, types.ModuleType)}
    assert notebook_parameters(path) == assigned
