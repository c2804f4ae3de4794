"""Streaming data from host memory gives exactly the batches device-resident data gives."""
from __future__ import annotations

import pytest
import torch

from sslab.models import BackboneConfig
from sslab.pretext import build_task
from sslab.stream import StreamedData, nbytes, place
from sslab.train import TrainConfig, make_optimizer, train_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(n=103, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 10
    return images, labels


def _batches(n, batch, seed=1):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(order, max(1, round(n / batch))))


def test_place_keeps_what_fits_on_the_device_and_streams_the_rest():
    images, labels = _data()
    placed = place((images, labels), "cpu", limit_bytes=nbytes((images, labels)))
    assert isinstance(placed, tuple) and torch.equal(placed[0], images) and torch.equal(placed[1], labels)
    streamed = place((images, labels), "cpu", limit_bytes=nbytes((images, labels)) - 1)
    assert isinstance(streamed, StreamedData) and len(streamed) == len(images)


def test_chunks_hold_whole_batches_within_the_byte_limit():
    images, labels = _data()
    row = 28 * 28 + 8  # one uint8 image + one int64 label
    data = StreamedData((images, labels), "cpu", chunk_bytes=30 * row)
    batches = _batches(len(images), 8)
    plan = data.chunk_plan(batches)
    assert [i for chunk in plan for i in chunk] == list(range(len(batches)))  # every batch, in order
    assert all(sum(len(batches[i]) for i in chunk) * row <= 30 * row for chunk in plan)
    assert [len(chunk) for chunk in plan] == [3, 3, 3, 3, 1]  # 13 batches of 8 (7 last), 3 per 30 rows


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_batches_equal_the_direct_gather(device):
    images, labels = _data()
    data = StreamedData((images, labels), device, chunk_bytes=20 * (28 * 28 + 8))
    batches = _batches(len(images), 8)
    got = [(x.clone(), y.clone()) for x, y in data.batches(batches)]
    assert data.chunks_served == len(data.chunk_plan(batches)) > 2
    assert len(got) == len(batches)
    for (x, y), index in zip(got, batches):
        assert x.device.type == device
        assert torch.equal(x.cpu(), images[index]) and torch.equal(y.cpu(), labels[index])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_keeps_order_under_queued_work():
    # Many chunks and heavy work per batch: a copy that overtook the work still reading its buffer
    # would change the sums.
    images, labels = _data(n=4096)
    data = StreamedData((images, labels), "cuda", chunk_bytes=256 * (28 * 28 + 8))
    batches = _batches(len(images), 64)
    weight = torch.randn(784, 784, device="cuda")
    sums = []
    for x, _ in data.batches(batches):
        # The GPU spins before reading the batch, so the queue stays long: a copy that did not
        # wait for the reads of its buffer would land before them.
        torch.cuda._sleep(2_000_000)
        h = x.flatten(1).float()
        for _ in range(20):
            h = torch.tanh(h @ weight / 28)
        sums.append(h.sum())
    expected = []
    for index in batches:
        h = images[index].cuda().flatten(1).float()
        for _ in range(20):
            h = torch.tanh(h @ weight / 28)
        expected.append(h.sum())
    torch.testing.assert_close(torch.stack(sums), torch.stack(expected))


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_streamed_data_matches_training_on_resident_data(device):
    # How fit would use a stream: the same permutation's batches, each handed to train_step whole.
    images, _ = _data(n=48)
    batches = _batches(len(images), 12)
    cfg = TrainConfig(optimizer="sgd", lr=0.01)
    _deterministic_kernels(device)
    states = []
    precision = "bf16" if device == "cuda" else "fp32"
    for streamed in (False, True):
        torch.manual_seed(0)
        task = build_task("rotation", BackboneConfig(1, 28, 0.25)).to(device)
        optimizer = make_optimizer([{"params": list(task.parameters()), "lr_scale": 1.0}], cfg)
        sums: dict = {}
        if streamed:
            source = StreamedData((images,), device, chunk_bytes=24 * 28 * 28)
            for batch in source.batches(batches):
                train_step(task, batch, slice(None), optimizer, cfg.lr, sums, precision)
        else:
            resident = images.to(device)
            for index in batches:
                train_step(task, (resident,), index.to(device), optimizer, cfg.lr, sums, precision)
        states.append({k: v.detach().cpu().clone() for k, v in task.state_dict().items()})
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0, msg=key)


def _deterministic_kernels(device: str) -> None:
    """Bit-equal training twice on CUDA needs kernels that repeat (cuDNN may otherwise pick
    weight-gradient algorithms that sum in a varying order); conftest undoes the switch."""
    if device == "cuda":
        from sslab.train import make_deterministic
        make_deterministic()


def test_bad_arguments_name_the_parameter():
    images, labels = _data()
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        StreamedData((images,), "cpu", chunk_bytes=0)
    with pytest.raises(ValueError, match="first dimension"):
        StreamedData((images, labels[:5]), "cpu")
    with pytest.raises(ValueError, match="limit_bytes=-1"):
        place((images,), "cpu", limit_bytes=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_on_streamed_data_trains_exactly_as_on_resident_data(device, tmp_path):
    from sslab.train import fit
    images, _ = _data(n=60)
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.01, schedule="cosine", seed=3)
    _deterministic_kernels(device)
    results, states = [], []
    for streamed in (False, True):
        torch.manual_seed(0)
        task = build_task("rotation", BackboneConfig(1, 28, 0.125)).to(device)
        if streamed:
            data = StreamedData((images,), device, chunk_bytes=20 * 28 * 28)  # 20 images a chunk: several chunks
        else:
            data = (images.to(device),)
        results.append(fit(task, data, cfg, torch.device(device), progress=False,
                           checkpoint=tmp_path / f"{streamed}.pt"))
        states.append({k: v.detach().cpu().clone() for k, v in task.state_dict().items()})
    assert data.chunks_served >= 2 * 3  # each epoch went through the chunks
    assert [r["loss"] for r in results[0].history] == [r["loss"] for r in results[1].history]
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_pretrain_over_its_pool_memory_streams_and_gets_the_same_run(tmp_path, capfd):
    from sslab.pretrain import PretrainConfig, pretrain
    config = PretrainConfig(method="vae", dataset="fashion-mnist", epochs=1, limit=64, width=0.125,
                            settings={"batch_size": 16})
    try:
        resident = pretrain(config, device="cpu", out=str(tmp_path / "a"), progress=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed here")
    capfd.readouterr()
    streamed = pretrain(config, device="cpu", out=str(tmp_path / "b"), progress=False, pool_memory=0)
    assert "streaming 64 images" in capfd.readouterr().err
    assert resident.path.name == streamed.path.name  # the memory limit is not part of the config
    weights = [store_load(run) for run in (resident, streamed)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    with pytest.raises(ValueError, match=r"pool_memory=-1 is not allowed; allowed: a finite number of GB ≥ 0"):
        pretrain(config, device="cpu", out=str(tmp_path / "c"), pool_memory=-1)
    assert not (tmp_path / "c").exists()


def store_load(run):
    from sslab import store
    return store.load_torch(run.path / "model.pt")["model"]
