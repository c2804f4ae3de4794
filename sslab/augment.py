"""Batched augmentations that run on the tensor's own device, random per sample.

Inputs are float images in [0, 1] (N×C×H×W) unless a function says otherwise. Crops,
flips, scaling and small rotations are folded into one affine warp per sample
(:func:`random_affine`), so a whole batch costs a single ``grid_sample`` on the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [0, 1] (no-op for float input)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def _uniform(n: int, low: float, high: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def hflip(x: torch.Tensor, p: float = 0.5, generator=None) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_affine(x: torch.Tensor, scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees: float = 0.0,
                  translate: float = 0.0, flip_p: float = 0.0, shift: int = 0, generator=None) -> torch.Tensor:
    """One warp per image: random resized crop (area ``scale``, aspect ``ratio``), translation
    (fraction of the size), a whole-pixel shift in −``shift``…``shift`` per axis with zeros coming
    in at the edges (pad-and-crop), rotation in ±``degrees`` and a horizontal flip with ``flip_p``.

    Random resized crop with ``scale=(0.5, 1)`` keeps between half and all of the image area
    and resizes it back to the input size.
    """
    n = x.shape[0]
    dev = x.device
    area = _uniform(n, scale[0], scale[1], dev, generator)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), dev, generator)
    aspect = torch.exp(log_r)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    # The crop centre may move as far as the crop still fits inside the image.
    tx = (1 - sx) * _uniform(n, -1, 1, dev, generator) + translate * 2 * _uniform(n, -1, 1, dev, generator)
    ty = (1 - sy) * _uniform(n, -1, 1, dev, generator) + translate * 2 * _uniform(n, -1, 1, dev, generator)
    if shift > 0:
        # d pixels = 2d/size in grid_sample's [-1, 1] coordinates (align_corners=False).
        h, w = x.shape[-2:]
        tx = tx + torch.randint(-shift, shift + 1, (n,), device=dev, generator=generator) * (2.0 / w)
        ty = ty + torch.randint(-shift, shift + 1, (n,), device=dev, generator=generator) * (2.0 / h)
    angle = _uniform(n, -degrees, degrees, dev, generator) * (math.pi / 180.0)
    flip = torch.where(torch.rand(n, device=dev, generator=generator) < flip_p, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
        torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
    ], dim=1)
    # In fp32 even inside the training step's bf16 autocast: a bf16 grid is off by up to 0.2 px
    # at 96 px, which would blur the whole-pixel shifts and augment differently on CUDA than on CPU.
    with torch.autocast(dev.type, enabled=False):
        grid = F.affine_grid(theta.float(), list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False).to(x.dtype)


def color_jitter(x: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 generator=None) -> torch.Tensor:
    """Random brightness, contrast and (for 3-channel images) saturation factors per image."""
    n = x.shape[0]
    dev = x.device
    out = x
    if brightness > 0 or contrast > 0:
        # Brightness b, then contrast c about the brightened mean b·m, is one affine map per image,
        # (b·x − b·m)·c + b·m = b·c·x + (1 − c)·b·m: a single pass over the pixels.
        gain = _uniform(n, 1 - brightness, 1 + brightness, dev, generator) if brightness > 0 else torch.ones(n, device=dev)
        offset = torch.zeros_like(gain)
        if contrast > 0:
            factor = _uniform(n, 1 - contrast, 1 + contrast, dev, generator)
            offset = (1 - factor) * gain * x.mean(dim=(1, 2, 3))
            gain = gain * factor
        out = torch.addcmul(offset[:, None, None, None], x, gain[:, None, None, None])
    if saturation > 0 and x.shape[1] == 3:
        s = _uniform(n, 1 - saturation, 1 + saturation, dev, generator)[:, None, None, None]
        grey = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
        out = torch.addcmul(grey * (1 - s), out, s)  # (x − grey)·s + grey
    # Not in place while out is still the caller's x (every factor off, or saturation on a grey batch).
    return out.clamp(0.0, 1.0) if out is x else out.clamp_(0.0, 1.0)


def rotate4(x: torch.Tensor):
    """The four rotated copies of every image (0°, 90°, 180°, 270° counter-clockwise, as
    ``torch.rot90``) stacked rotation-major, and their labels 0-3.

    Returns ``(images 4N×C×H×W, labels 4N)``; copy ``k*N + i`` is image ``i`` rotated by ``k``·90°.
    """
    n = x.shape[0]
    rotated = torch.cat([x] + [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)])
    labels = torch.arange(4, device=x.device).repeat_interleave(n)
    return rotated, labels


@dataclass
class AugmentConfig:
    """What one training view looks like. ``crop`` is 'pad' (pad-and-crop, small images) or
    'resized' (random resized crop with ``scale``)."""

    crop: str = "pad"
    padding: int = 2
    scale: tuple = (0.6, 1.0)
    flip: bool = True
    degrees: float = 10.0
    jitter: float = 0.2

    def apply(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.crop == "pad":
            # The pad-and-crop is a whole-pixel shift: it joins the flip and small rotation in one warp.
            if self.padding > 0 or self.degrees or self.flip:
                x = random_affine(x, degrees=self.degrees, flip_p=0.5 if self.flip else 0.0,
                                  shift=max(0, self.padding), generator=generator)
        elif self.crop == "resized":
            x = random_affine(x, scale=self.scale, ratio=(3 / 4, 4 / 3), degrees=self.degrees,
                              flip_p=0.5 if self.flip else 0.0, generator=generator)
        elif self.crop == "none":
            if self.flip:
                x = hflip(x, generator=generator)
        else:
            raise ValueError(f"crop={self.crop!r} is not known; allowed: pad, resized, none")
        if self.jitter:
            x = color_jitter(x, self.jitter, self.jitter, self.jitter, generator)
        return x


def default_augment(image_size: int) -> AugmentConfig:
    """The study's augmentation (crop, flip, small colour jitter, small rotation) sized to the images."""
    return AugmentConfig(crop="pad", padding=max(2, image_size // 12), flip=True, degrees=10.0, jitter=0.2)
