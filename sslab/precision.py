"""The arithmetic a run trains and extracts features in: ``bf16`` (bfloat16 autocast with
channels_last tensors) or ``fp32``. Master weights, optimiser state, losses and metrics stay
fp32 either way; autocast only lowers the convolutions and matrix products.

``auto`` picks bf16 where the hardware runs it natively — CUDA devices with bf16 support, and
CPUs whose instruction set has bf16 dot products (AVX-512 BF16 or AMX), where oneDNN's bf16
convolutions with channels_last ran the lab's pretraining step 2.3–2.6× faster than fp32 (see
docs/BENCHMARKS.md). Elsewhere bf16 would be emulated and slower, so ``auto`` picks fp32. The
resolved name is part of a run's config: the two give slightly different numbers.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .checks import check_choice

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX tiles), as
    torch reports it (:func:`bf16_products`), and torch's oneDNN can use them."""
    try:
        return bool(bf16_products()) and torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # an older torch without this report: assume not
        return False


def bf16_products() -> str:
    """How this CPU computes bf16 dot products, as torch reports it: ``"AMX"`` (Intel's matrix
    tiles), ``"AVX-512 BF16"`` (vector dot products), or ``""`` where neither is there (bf16 is
    then emulated). oneDNN picks other kernels for each, which sum in another order: the same
    bf16 run gives other last digits on the two kinds of processor."""
    cpu = getattr(torch, "cpu", None)
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(cpu, probe)():
                return name
        except (AttributeError, RuntimeError):  # an older torch without the report
            continue
    return ""


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's model name as the system reports it (Linux's ``cpuinfo``, else
    :func:`platform.processor`), or ``""`` where it says nothing."""
    import platform
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.split(":")[0].strip() == "model name":
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor().strip()


def processor(device) -> str:
    """What computes a run on ``device``, in words: the GPU's name on CUDA; on a CPU its model and
    how it computes bf16 products (:func:`bf16_products`), e.g. ``AMD EPYC, AVX-512 BF16``. With
    its config and thread count, the processor decides a run's last digits, so each run's summary,
    each result row and the committed notebooks name it."""
    return _processor(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _processor(device: str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    return f"{cpu_model() or 'an unnamed processor'}, {bf16_products() or 'no bf16 products'}"


def resolve_precision(precision: str, device) -> str:
    """``auto`` → ``bf16`` or ``fp32`` for ``device`` (see the module's docstring); ``fp32`` and
    ``bf16`` are kept as asked (bf16 on a CPU without native support is allowed, only slow)."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if native_bf16_cpu() else "fp32"
    return "fp32"


def autocast(device, precision: str):
    """The context every forward pass of a run executes in: bf16 autocast on ``device`` for
    ``bf16``, plain fp32 otherwise."""
    device = torch.device(device)
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(precision: str) -> torch.memory_format:
    """channels_last goes with bf16 (oneDNN's and cuDNN's fast bf16 convolutions want it)."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format
