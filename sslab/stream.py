"""Training data larger than the device's memory limit: kept on the host and streamed to the
device in large chunks, the copy of the next chunk overlapping training on the current one.

:func:`place` puts a dataset's tensors on the device when they fit in a memory limit and
otherwise returns a :class:`StreamedData`. ``StreamedData.batches(batch_indices)`` yields
exactly ``tuple(t[index] for t in tensors)`` for each index tensor, on the device, in order —
the batches ``fit`` takes from device-resident data — so training on streamed data sees the
same images in the same order. Behind that: batches are grouped into chunks of at most
``chunk_bytes``; a worker thread gathers the next chunk's rows into one of two pinned host
buffers (``index_select`` releases the GIL, so the training thread keeps launching kernels);
the chunk goes to one of two device buffers with a non-blocking copy on a side CUDA stream;
the training stream waits for that copy through an event, and a buffer is refilled only after
the work that read it was queued and has run (events again).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence, Union

import torch


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pool_memory_default(device, fraction: float = 0.5) -> int:
    """Bytes of ``device`` memory a dataset may take: ``fraction`` of what is free now on CUDA;
    unlimited elsewhere (host memory is where the data already is)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is not allowed; allowed: a number in (0, 1]")
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * fraction)


class StreamedData:
    """Host tensors (sharing their first dimension) served to ``device`` batch by batch through
    double-buffered chunks of at most ``chunk_bytes``."""

    def __init__(self, tensors: Sequence[torch.Tensor], device, chunk_bytes: int = 512 << 20):
        tensors = tuple(tensors)
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("tensors must be one or more tensors sharing their first dimension")
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("StreamedData streams from host memory; allowed: CPU tensors")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes!r} is not allowed; allowed: a positive integer")
        self.tensors = tensors
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes
        self.row_bytes = sum(t[:1].numel() * t.element_size() for t in tensors)
        self.chunks_served = 0  # how many chunks went to the device, for tests and reports

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def shape(self):
        return self.tensors[0].shape

    def chunk_plan(self, batch_indices: Sequence[torch.Tensor]) -> list:
        """Consecutive batches grouped into chunks of at most ``chunk_bytes`` (a batch larger than
        that is a chunk of its own). Returns lists of batch positions."""
        plan, current, rows = [], [], 0
        for i, index in enumerate(batch_indices):
            size = len(index) * self.row_bytes
            if current and rows + size > self.chunk_bytes:
                plan.append(current)
                current, rows = [], 0
            current.append(i)
            rows += size
        if current:
            plan.append(current)
        return plan

    def batches(self, batch_indices: Sequence[torch.Tensor]) -> Iterator[tuple]:
        """For each index tensor (rows of the host tensors), the batch on the device. A batch is a
        view into a reused buffer: it stays valid until the chunk after the next one is served
        (use it in the step it is given to, or clone it)."""
        batch_indices = [torch.as_tensor(i, dtype=torch.long).cpu() for i in batch_indices]
        plan = self.chunk_plan(batch_indices)
        if not plan:
            return
        capacity = max(sum(len(batch_indices[i]) for i in chunk) for chunk in plan)
        on_cuda = self.device.type == "cuda"
        host = [self._buffers(capacity, pin=on_cuda) for _ in range(2)]
        dev = [self._buffers(capacity, device=self.device) for _ in range(2)] if on_cuda else None
        copied = [None, None]  # CUDA events: host buffer k's copy to the device has run
        consumed = [None, None]  # CUDA events: the training work that read device buffer k has run
        copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        chunk_rows = [torch.cat([batch_indices[i] for i in chunk]) for chunk in plan]

        def gather(k: int) -> int:
            slot = k % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # the previous copy out of this host buffer is done
            rows = chunk_rows[k]
            for source, target in zip(self.tensors, host[slot]):
                torch.index_select(source, 0, rows, out=target[: len(rows)])
            return len(rows)

        def to_device(k: int, count: int) -> tuple:
            slot = k % 2
            self.chunks_served += 1
            if not on_cuda:
                return tuple(t[:count] for t in host[slot])
            with torch.cuda.stream(copy_stream):
                if consumed[slot] is not None:
                    copy_stream.wait_event(consumed[slot])
                for source, target in zip(host[slot], dev[slot]):
                    target[:count].copy_(source[:count], non_blocking=True)
                copied[slot] = torch.cuda.Event()
                copied[slot].record(copy_stream)
            return tuple(t[:count] for t in dev[slot])

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sslab-stream") as pool, \
                _copies_finish_before_buffers_are_freed(copy_stream, self.device):
            pending = pool.submit(gather, 0)
            ready = None  # chunk k+1 already on its way to the device
            for k, chunk in enumerate(plan):
                on_device = ready if ready is not None else to_device(k, pending.result())
                ready = None
                if on_cuda:  # training reads the chunk only once its copy has run
                    torch.cuda.current_stream(self.device).wait_event(copied[k % 2])
                pending = pool.submit(gather, k + 1) if k + 1 < len(plan) else None
                start = 0
                for i in chunk:
                    size = len(batch_indices[i])
                    yield tuple(t[start: start + size] for t in on_device)
                    start += size
                    # Start the next chunk's copy as soon as its rows are gathered, so it overlaps
                    # the training work still queued for this chunk.
                    if on_cuda and pending is not None and ready is None and pending.done():
                        ready = to_device(k + 1, pending.result())
                if on_cuda:
                    consumed[k % 2] = torch.cuda.Event()
                    consumed[k % 2].record(torch.cuda.current_stream(self.device))

    def _buffers(self, rows: int, pin: bool = False, device=None) -> tuple:
        out = []
        for t in self.tensors:
            shape = (rows, *t.shape[1:])
            if device is not None:
                out.append(torch.empty(shape, dtype=t.dtype, device=device))
            else:
                out.append(torch.empty(shape, dtype=t.dtype, pin_memory=pin))
        return tuple(out)


@contextlib.contextmanager
def _copies_finish_before_buffers_are_freed(copy_stream, device):
    """When the consumer stops early (a break, an exception), the next chunk's copy may still be
    running on the side stream while the device buffers it writes into are freed: the caching
    allocator could then hand that memory to new work on the training stream. Making the
    training stream wait for the side stream orders every later use of the memory after it."""
    try:
        yield
    finally:
        if copy_stream is not None:
            torch.cuda.current_stream(device).wait_stream(copy_stream)


def place(tensors: Sequence[torch.Tensor], device, limit_bytes: Optional[int] = None,
          chunk_bytes: int = 512 << 20) -> Union[tuple, StreamedData]:
    """The tensors on ``device`` when they fit in ``limit_bytes`` (default: half the free device
    memory), otherwise a :class:`StreamedData` over their host copies."""
    device = torch.device(device)
    limit = pool_memory_default(device) if limit_bytes is None else limit_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit_bytes={limit_bytes!r} is not allowed; allowed: an integer ≥ 0")
    if nbytes(tensors) <= limit:
        return tuple(t.to(device) for t in tensors)
    return StreamedData([t.cpu() for t in tensors], device, chunk_bytes)
