"""sslab/precision.py and the precision setting of every stage: what ``auto`` picks, that it is
part of a run's settings, that bf16 keeps fp32 master weights, and that a deterministic bf16
run on the CPU repeats bit for bit."""
from __future__ import annotations

import pytest
import torch

from sslab import precision as precision_module
from sslab import store
from sslab.evaluate import EvalConfig, probe_cell
from sslab.models import BackboneConfig
from sslab.precision import autocast, memory_format, resolve_precision
from sslab.pretext import build_task
from sslab.pretrain import PretrainConfig, describe, pretrain, run_folder
from sslab.train import TrainConfig, fit

CPU = torch.device("cpu")


def test_auto_picks_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert PretrainConfig().resolved(CPU).precision == "fp32"
    assert EvalConfig().resolved(CPU).precision == "fp32"


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16_cpu", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert PretrainConfig().resolved(CPU).precision == "bf16"


def test_auto_follows_what_the_processor_reports():
    """The flags Linux reads from the processor, an independent source from torch's own checks."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert precision_module.native_bf16_cpu() == (native and torch.backends.mkldnn.is_available())
    assert resolve_precision("auto", "cpu") == ("bf16" if precision_module.native_bf16_cpu() else "fp32")


def test_the_bf16_path_is_named_from_what_torch_reports(monkeypatch):
    cpu = torch.cpu
    for amx, avx, expected in ((True, True, "AMX"), (False, True, "AVX-512 BF16"), (False, False, "")):
        monkeypatch.setattr(cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx, raising=False)
        assert precision_module.bf16_products() == expected


def test_the_bf16_path_agrees_with_the_processors_flags():
    """Linux's flags again, independent of torch's reports: AMX where the processor has its bf16
    tiles, else AVX-512 BF16 where it has those dot products, else none."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    expected = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else ""
    assert precision_module.bf16_products() == expected


def test_the_cpu_model_is_read_from_cpuinfo_and_falls_back_to_platform(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 9R14 \nflags\t: fpu\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14\n")
    assert precision_module.cpu_model(str(info)) == "AMD EPYC 9R14"
    monkeypatch.setattr("platform.processor", lambda: "arm ")
    assert precision_module.cpu_model(str(tmp_path / "missing")) == "arm"
    info.write_text("processor\t: 0\n")  # no model name line: the platform's word
    assert precision_module.cpu_model(str(info)) == "arm"


def test_a_cpu_processor_is_its_model_and_bf16_path(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_model", lambda: "Some CPU")
    monkeypatch.setattr(precision_module, "bf16_products", lambda: "AMX")
    precision_module._processor.cache_clear()
    try:
        assert precision_module.processor("cpu") == "Some CPU, AMX"
        precision_module._processor.cache_clear()
        monkeypatch.setattr(precision_module, "bf16_products", lambda: "")
        monkeypatch.setattr(precision_module, "cpu_model", lambda: "")
        assert precision_module.processor(CPU) == "an unnamed processor, no bf16 products"
    finally:
        precision_module._processor.cache_clear()


def test_the_published_notebooks_name_the_processor(monkeypatch):
    from sslab.lab.notebooks import machine_description
    monkeypatch.setattr(precision_module, "cpu_model", lambda: "Some CPU")
    monkeypatch.setattr(precision_module, "bf16_products", lambda: "AVX-512 BF16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision_module._processor.cache_clear()
    try:
        assert machine_description().startswith("CPU: Some CPU, AVX-512 BF16 (")
    finally:
        precision_module._processor.cache_clear()


def test_explicit_precisions_are_kept_and_others_refused():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"precision='fp16' is not known; allowed: auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match=r"precision='auto' is not known; allowed: fp32, bf16"):
        fit(torch.nn.Linear(2, 2), (torch.zeros(4, 2),), TrainConfig(epochs=1), CPU, precision="auto")


def test_bf16_autocast_lowers_matrix_products_and_channels_last_goes_with_it():
    layer = torch.nn.Linear(8, 4)
    with autocast("cpu", "bf16"):
        assert layer(torch.randn(3, 8)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert layer(torch.randn(3, 8)).dtype == torch.float32
    assert memory_format("bf16") == torch.channels_last and memory_format("fp32") == torch.contiguous_format


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 6 * 6, 1))

    def loss(self, x, y):
        out = self.net(x).squeeze(1)
        assert out.dtype == torch.bfloat16  # the forward really ran in bf16
        return {"loss": torch.nn.functional.mse_loss(out.float(), y)}


def test_bf16_training_keeps_fp32_master_weights_optimizer_state_and_metrics():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randn(32)
    model = _Regression()
    result = fit(model, (x, y), TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=1e-2), CPU, progress=False,
                 precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(isinstance(row["loss"], float) for row in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """A tiny folder dataset: two classes of random grey 28 px images, 12 train and 4 test each."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy(), "L").save(root / split / name / f"{i}.png")
    return f"folder:{root}"


def _tiny(dataset, precision):
    return PretrainConfig(method="rotation", dataset=dataset, epochs=1, width=0.125, image_size=28,
                          settings={"batch_size": 8}, precision=precision)


def test_precision_is_part_of_a_runs_settings_and_recorded(tmp_path, images):
    runs = {p: pretrain(_tiny(images, p), device="cpu", out=str(tmp_path), progress=False) for p in ("bf16", "fp32")}
    assert runs["bf16"].path != runs["fp32"].path
    assert run_folder(_tiny(images, "bf16").resolved(CPU), str(tmp_path)) == runs["bf16"].path
    for name, run in runs.items():
        assert run.summary["precision"] == name and run.config.precision == name
        assert run.summary["processor"] == precision_module.processor("cpu")  # what made its last digits
        assert f"on cpu ({run.summary['processor']}) in {name}" in describe(run)
        assert store.read_json(run.path / "config.json")["precision"] == name
    cells = {p: probe_cell(runs["bf16"], 1, device="cpu", out=str(tmp_path),
                           config=EvalConfig(val_per_class=2, probe_epochs=2, precision=p)) for p in ("bf16", "fp32")}
    assert cells["bf16"]["run"] != cells["fp32"]["run"]  # a cell of each, not one reused
    assert store.read_json(f"{cells['bf16']['run']}/config.json")["precision"] == "bf16"
    assert cells["bf16"]["processor"] == cells["fp32"]["processor"] == precision_module.processor("cpu")


def test_deterministic_bf16_pretraining_and_probe_repeat_bit_for_bit(tmp_path, images):
    weights, rows = [], []
    for attempt in ("a", "b"):
        run = pretrain(_tiny(images, "bf16"), device="cpu", out=str(tmp_path / attempt), progress=False,
                       deterministic=True)
        weights.append(store.load_torch(run.path / "model.pt")["model"])
        rows.append(probe_cell(run, 2, device="cpu", out=str(tmp_path / attempt), deterministic=True,
                               config=EvalConfig(val_per_class=2, probe_epochs=3, precision="bf16")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["confusion"] == rows[1]["confusion"]
    assert [h["loss"] for h in rows[0]["history"]] == [h["loss"] for h in rows[1]["history"]]


def test_a_pretext_task_in_bf16_matches_fp32_closely():
    """bf16 changes rounding, not the computation: the same weights and batch give nearly the same loss."""
    torch.manual_seed(0)
    task = build_task("rotation", BackboneConfig(1, 28, 0.125)).eval()
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        exact = task.loss(images, train=False)["loss"]
    with torch.no_grad(), autocast("cpu", "bf16"):
        lowered = task.loss(images, train=False)["loss"]
    assert lowered.dtype == torch.float32  # the loss itself stays fp32
    assert float(lowered) == pytest.approx(float(exact), rel=2e-2)
