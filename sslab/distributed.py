"""Pretraining on several processes with PyTorch's own engine: torch.distributed and
DistributedDataParallel (Li et al., "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training", VLDB 2020).

``torchrun --nproc_per_node N -m sslab pretrain ...`` (or torchrun across nodes) starts N
processes with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. When ``WORLD_SIZE`` > 1,
:func:`from_environment` joins the process group (NCCL on CUDA, gloo on CPU) and returns a
:class:`Distributed`, which :func:`sslab.train.fit` and :func:`sslab.pretrain.pretrain` consult:

- every rank draws the same seeded permutation of the unlabeled pool each epoch (it depends on
  the seed and the epoch, never on the number of processes), cuts it into ``WORLD_SIZE``
  contiguous near-equal shards and copies only its own shard to its device (``cuda:LOCAL_RANK``);
- the task is wrapped in DistributedDataParallel through :class:`LossForward`, whose
  ``forward`` is the task's ``loss``: DDP averages gradients only for what runs through
  ``forward``;
- ``batch_size`` is per process, so the global batch is batch_size × WORLD_SIZE, and the
  learning rate is multiplied by WORLD_SIZE and reached by a linear warm-up (the linear scaling
  rule with gradual warm-up, Goyal et al. 2017, "Accurate, Large Minibatch SGD");
- rank 0 alone decides whether to train, writes the run store (config, checkpoints, metrics,
  complete.json) and prints; the other ranks train beside it and stay silent;
- checkpoints hold the unwrapped task's weights and the permutation generator, so a run stopped
  under one number of processes resumes under another.

With a single process (plain ``python -m sslab``, or torchrun with one process) nothing here runs:
:func:`from_environment` returns ``None`` and training takes the plain path.
"""
from __future__ import annotations

import atexit
import gc
import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import store
from .train import TrainConfig, batches_per_epoch

# Under several processes the scaled learning rate is reached by a linear warm-up over this
# share of the run's epochs, at most MAX_WARMUP_EPOCHS (see Distributed.scale_lr).
WARMUP_SHARE = 0.2
MAX_WARMUP_EPOCHS = 5.0

HELP = """\
several processes (GPUs, nodes): start this command with torchrun, e.g.
  torchrun --nproc_per_node 8 -m sslab pretrain --method rotation ...
Each process trains on its 1/N share of every epoch's images inside DistributedDataParallel
(NCCL on GPUs, gloo on CPU). --batch-size is per process: the global batch is batch-size × N,
and the learning rate is scaled linearly with it: lr × (batch-size × N) / batch-size = lr × N,
reached by a linear warm-up over the first fifth of the epochs (at most 5). Rank 0 alone writes
the run folder and prints. A stopped run resumes under any number of processes (the run folder
does not depend on N)."""


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not allowed; allowed: an integer "
                         f"(torchrun sets it)") from None


def launched() -> bool:
    """Whether torchrun (or another launcher) started more than one process."""
    return world_size_from_env() > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes."""
    return not launched() or os.environ.get("RANK", "0") == "0"


def reports_errors() -> bool:
    """Whether this process prints the errors it meets: rank 0, and the first process on each
    other node (an error there, e.g. a dataset missing on that node, is its own)."""
    return is_main_process() or os.environ.get("LOCAL_RANK", "0") == "0"


def device_for(device, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its node: ``auto``/``cuda`` →
    ``cuda:LOCAL_RANK`` (``auto`` → CPU where there is no CUDA), ``cpu`` → CPU."""
    requested = "auto" if device in (None, "auto") else str(device)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asks for CUDA, but this machine has no usable CUDA device; "
                             f"allowed here: cpu, auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank}: this node has {count} CUDA device(s); allowed: "
                             f"torchrun --nproc_per_node ≤ {count}")
        return torch.device("cuda", local_rank)
    raise ValueError(f"device={device!r} is not allowed under torchrun; allowed: auto, cuda (process LOCAL_RANK "
                     f"takes cuda:LOCAL_RANK) or cpu")


def epoch_shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of one epoch's permutation ``order``: the ``rank``-th of
    ``world_size`` contiguous near-equal parts, so the parts cover every image exactly once."""
    return torch.tensor_split(order, world_size)[rank]


def state_sha256(module: nn.Module) -> str:
    """A hash of every weight and buffer of ``module`` (names, dtypes, values; not the memory
    layout), to check that processes hold the same model."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _augment_seed(seed: int, epoch: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sslab/{seed}/{epoch}/{rank}".encode()).digest()[:8], "little") >> 1


class LossForward(nn.Module):
    """Makes a task's ``loss`` its ``forward``: ``forward(*batch)`` → ``task.loss(*batch)``
    (a dict of named scalar tensors, ``"loss"`` among them). DistributedDataParallel hooks
    gradient averaging onto ``forward``, so this is the module it wraps."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, *batch: torch.Tensor) -> dict:
        return self.task.loss(*batch)


class TaskDDP(DistributedDataParallel):
    """DistributedDataParallel around :class:`LossForward`, with the task's interface:
    ``loss(*batch)`` runs DDP's forward, so the training loop's ``model.loss(...)`` then
    ``loss.backward()`` averages gradients across processes."""

    def loss(self, *batch: torch.Tensor) -> dict:
        return self(*batch)


@dataclass
class Distributed:
    """This process's place in a torchrun job, and the hooks training uses there."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    sync_bn: bool = False
    _announced: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ the training loop's hooks

    def scale_lr(self, cfg: TrainConfig) -> TrainConfig:
        """The linear scaling rule with its gradual warm-up (Goyal et al. 2017): ``batch_size`` is
        per process, so the global batch is ``world_size`` times larger and so is the learning
        rate, reached by a linear ramp over the first fifth of the run (at most 5 epochs, the
        paper's choice). Without the ramp the scaled rate threw training off at the start:
        rotation at lr 0.1 (2 processes) ended its first epoch at a training loss of 2.8, above
        the 1.39 of guessing (README, "What was measured")."""
        if self.world_size == 1:
            return cfg
        warmup = cfg.warmup_epochs or min(MAX_WARMUP_EPOCHS, WARMUP_SHARE * cfg.epochs)
        return replace(cfg, lr=cfg.lr * self.world_size, warmup_epochs=warmup)

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        """Steps per epoch, the same on every rank (DDP needs every rank to take each step): as
        many as the smallest shard makes batches of about ``batch_size``, so no rank's batch is
        smaller than a single process would make of that shard."""
        if n < 2 * self.world_size:
            raise ValueError(f"{n} training images cannot be shared by {self.world_size} processes (BatchNorm needs "
                             f"at least 2 per process); allowed: --limit ≥ {2 * self.world_size} or fewer processes")
        return batches_per_epoch(n // self.world_size, batch_size)

    def wrap(self, model: nn.Module) -> TaskDDP:
        """``model`` (optionally with SyncBatchNorm, which shares the BatchNorm layers' parameters
        and buffers) inside DistributedDataParallel. DDP starts every rank from rank 0's weights."""
        if self.sync_bn:
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if converted is not model:
                raise TypeError(f"sync_bn: {type(model).__name__} is itself a BatchNorm layer; allowed: a task "
                                f"whose BatchNorm layers are submodules")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return TaskDDP(LossForward(model), device_ids=device_ids)

    def load_checkpoint(self, path: Optional[Path]) -> Optional[dict]:
        """Rank 0 reads the checkpoint (if there is one) and sends it to every rank, so the other
        ranks need no access to rank 0's file system. A file rank 0 cannot read fails every rank."""
        payload = None
        if self.is_main and path is not None and Path(path).is_file():
            try:
                payload = ("state", store.load_torch(path, map_location="cpu"))
            except Exception as exc:  # noqa: BLE001 — every rank raises it below
                payload = ("error", _portable(exc))
        payload = self._broadcast(payload)
        if payload is None:
            return None
        kind, value = payload
        if kind == "error":
            raise value
        return value

    def epoch_data(self, data: tuple, order: torch.Tensor, seed: int, epoch: int):
        """This rank's share of one epoch: the rows ``epoch_shard(order, ...)`` of each tensor in
        ``data``, copied to this rank's device, and the order to walk them in (0, 1, 2, …: the
        rows are already in the permutation's order)."""
        mine = epoch_shard(order, self.rank, self.world_size)
        local = tuple(t[mine.to(t.device)].to(self.device) for t in data)
        if self.rank > 0:
            # Rank 0 keeps the random stream a single process would have; every other rank draws
            # its augmentations from its own stream, fixed by (seed, epoch, rank), so a run resumed
            # under the same number of processes repeats them.
            torch.manual_seed(_augment_seed(seed, epoch, self.rank))
        return local, torch.arange(len(mine), device=self.device)

    def average(self, sums: dict) -> dict:
        """The epoch's summed metrics averaged over the ranks (one all-reduce per epoch), so the
        logged loss is the whole batch's and every rank sees the same (finite or not) values."""
        keys = list(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device).reshape(())
                              for k in keys])
        dist.all_reduce(values)
        values /= self.world_size
        return dict(zip(keys, values))

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP sends them
        before each forward; after the epoch's last forward each rank's differ again."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    # ------------------------------------------------------------ the run store's hooks

    def state_hashes(self, model: nn.Module) -> list:
        """:func:`state_sha256` of ``model`` on every rank, in rank order (a collective)."""
        hashes = [None] * self.world_size
        dist.all_gather_object(hashes, state_sha256(model))
        return hashes

    def summary(self, batch_size: int, hashes: list) -> dict:
        """What complete.json records about the processes that finished the run."""
        return {"world_size": self.world_size, "backend": self.backend, "sync_bn": self.sync_bn,
                "batch_size_per_process": batch_size, "global_batch_size": batch_size * self.world_size,
                "lr_scale": self.world_size, "state_sha256_per_rank": hashes}

    def begin_training(self, work: Path) -> None:
        """Rank 0, about to train into ``work``: the other ranks join it (see :meth:`pretrain`)."""
        if self.is_main:
            self._broadcast(("train", str(work)))
            self._announced = True

    def pretrain(self, lead: Callable[[], object], follow: Callable[[Path], object]):
        """Rank 0 runs ``lead()`` — the single-process store logic (reuse a complete run, lock,
        ``force``), which calls :meth:`begin_training` if it trains — and then sends its result.
        The other ranks wait for rank 0's word: train beside it (``follow(work)``), then take its
        result; or raise the error rank 0 met before training."""
        if self.is_main:
            self._announced = False
            try:
                result = lead()
            except Exception as exc:
                if not self._announced:  # the others still wait for a word: give them the error
                    self._broadcast(("error", _portable(exc)))
                raise
            self._broadcast(("done", result))
            return result
        while True:
            kind, value = self._broadcast(None)
            if kind == "train":
                follow(Path(value))
            elif kind == "error":
                raise value
            else:
                return value

    def _broadcast(self, message):
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to send it to the other ranks), else a RuntimeError
    with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def from_environment(device="auto", sync_bn: bool = False) -> Optional[Distributed]:
    """``None`` for a single process. Under torchrun with ``WORLD_SIZE`` > 1: join the process
    group (once per process) on ``cuda:LOCAL_RANK`` with NCCL or on the CPU with gloo."""
    world = world_size_from_env()
    if world <= 1:
        if sync_bn:
            raise ValueError("sync_bn=True is not allowed in a single process; allowed: with several processes "
                             "started by torchrun, e.g. torchrun --nproc_per_node 4 -m sslab pretrain --sync-bn ...")
        return None
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} is set but RANK is not; allowed: processes started by torchrun, "
                         f"which sets both")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = device_for(device, local_rank)
    if sync_bn and dev.type != "cuda":
        raise ValueError(f"sync_bn=True on device {dev.type!r} is not allowed: PyTorch's SyncBatchNorm runs on "
                         f"CUDA only; allowed: --sync-bn with CUDA devices, or without it on CPU")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend)
        atexit.register(shutdown)  # also for Python scripts that never call shutdown()
    if rank != 0:
        warnings.filterwarnings("ignore")  # rank 0 shows the same warnings once
    return Distributed(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend,
                       sync_bn=sync_bn)


def shutdown() -> None:
    """Leave the process group, if this process joined one. Objects in reference cycles that
    still hold collective state are collected first, while Python runs: left to interpreter
    shutdown, a gloo rank aborted now and then ("terminate called without an active exception";
    about 1 two-process run in 8 on CPU here, none in 29 with the collection)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
