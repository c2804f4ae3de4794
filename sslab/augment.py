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
        gain = (_uniform(n, 1 - brightness, 1 + brightness, dev, generator) if brightness > 0
                else torch.ones(n, device=dev))
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
    return rotate_copies(x, 4)


def rotate_copies(x: torch.Tensor, rotations: int = 4):
    """Every image at ``rotations`` evenly spaced angles, counter-clockwise as ``torch.rot90``:
    4 → 0/90/180/270°, 2 → 0/180°. Stacked rotation-major with labels 0 … rotations−1.

    Returns ``(images rotations·N×C×H×W, labels rotations·N)``; copy ``k*N + i`` is image ``i``
    rotated by ``k``·360/rotations degrees (label ``k``).
    """
    if rotations not in (2, 4):
        raise ValueError(f"rotations={rotations!r} is not allowed; allowed: 2 (0/180°) or 4 (0/90/180/270°)")
    n = x.shape[0]
    step = 4 // rotations  # quarter turns between neighbouring angles
    rotated = torch.cat([x] + [torch.rot90(x, k * step, dims=(-2, -1)) for k in range(1, rotations)])
    labels = torch.arange(rotations, device=x.device).repeat_interleave(n)
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


# ---------------------------------------------------------------- SimCLR's two views

# ITU-R BT.601 luma as torchvision's rgb_to_grayscale writes it (0.2989 for red).
_LUMA = (0.2989, 0.587, 0.114)
# RGB → YIQ (NTSC): Y is the luma, I and Q the two chroma axes; a hue shift rotates (I, Q).
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator=None) -> torch.Tensor:
    """Each 3-channel image replaced by its luma (0.2989 R + 0.587 G + 0.114 B) in all three
    channels with probability ``p``. Grey (1-channel) images come back as they are."""
    if x.shape[1] != 3 or p <= 0:
        return x
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype)
    grey = (x * weights[None, :, None, None]).sum(1, keepdim=True).expand_as(x)
    return torch.where(mask[:, None, None, None], grey, x)


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each 3-channel image by ``turns[i]`` of a full turn (N values in
    [−0.5, 0.5]): a rotation of its chroma (I, Q) in YIQ space, one 3×3 colour matrix per image.
    It approximates torchvision's HSV hue shift, which has no batched form; luma is kept exactly.
    Output clamped to [0, 1]."""
    yiq = torch.tensor(_RGB_TO_YIQ, device=x.device, dtype=torch.float32)
    angle = turns.float() * (2 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([torch.stack([one, zero, zero], 1),
                            torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)  # N×3×3
    matrix = torch.linalg.inv(yiq) @ rotation @ yiq
    out = torch.einsum("nij,njhw->nihw", matrix, x.float())
    return out.clamp_(0.0, 1.0).to(x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur image i with a Gaussian of standard deviation ``sigma[i]`` pixels (N values), a
    separable ``kernel_size``×``kernel_size`` kernel (odd) with reflected borders. A sigma of 0
    leaves that image exactly as it is (its kernel is a single 1), so a random subset of the batch
    is blurred in the same two grouped convolutions, without a host sync."""
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size!r} is not allowed; allowed: an odd integer ≥ 3")
    n, c, h, w = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    # A tiny floor instead of 0: exp(−t²/2σ²) then underflows to exactly 0 off-centre.
    s = sigma.float().clamp(min=1e-3)[:, None]
    kernel = torch.exp(-offsets[None] ** 2 / (2 * s ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N·C)×K
    with torch.autocast(x.device.type, enabled=False):
        flat = F.pad(x.float().reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
        flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
        flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w).to(x.dtype)


@dataclass
class SimCLRAugment:
    """One SimCLR view (Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020, appendix A): random resized crop (area ``scale``, aspect
    ``ratio``) resized back to the input size, horizontal flip, colour jitter with probability
    ``jitter_p`` (brightness, contrast, saturation, hue, in that order), random greyscale with
    ``grayscale_p`` and a Gaussian blur with ``blur_p`` (sigma uniform in ``blur_sigma`` pixels,
    ``blur_kernel`` px; 0 = no blur). Saturation, hue and greyscale act on 3-channel images only.
    ``apply(x)``: float N×C×H×W in [0, 1] → the same shape, dtype and device. See
    :func:`simclr_augment` for the settings by image size."""

    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = 0

    def apply(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        x = random_affine(x, scale=self.scale, ratio=self.ratio, flip_p=0.5 if self.flip else 0.0,
                          generator=generator)
        if self.jitter_p > 0:
            colour = x.shape[1] == 3
            jittered = color_jitter(x, self.brightness, self.contrast, self.saturation if colour else 0.0, generator)
            if colour and self.hue > 0:
                jittered = hue_shift(jittered, _uniform(n, -self.hue, self.hue, dev, generator))
            mask = torch.rand(n, device=dev, generator=generator) < self.jitter_p
            x = torch.where(mask[:, None, None, None], jittered, x)
        x = random_grayscale(x, self.grayscale_p, generator)
        if self.blur_p > 0 and self.blur_kernel:
            sigma = _uniform(n, self.blur_sigma[0], self.blur_sigma[1], dev, generator)
            blurred = torch.rand(n, device=dev, generator=generator) < self.blur_p
            x = gaussian_blur(x, torch.where(blurred, sigma, torch.zeros_like(sigma)), self.blur_kernel)
        return x


def simclr_jitter_strength(image_size: int, channels: int) -> float:
    """SimCLR's colour-jitter strength s for these images: 1.0 for colour images from 64 px (the
    paper's ImageNet setting), 0.5 below (its CIFAR-10 one) and for grey images (brightness and
    contrast 0.8·s = 0.4)."""
    return 1.0 if channels == 3 and image_size >= 64 else 0.5


def simclr_blur_p(image_size: int) -> float:
    """SimCLR's blur probability for these images: 0.5 from 64 px, none below (the paper leaves it
    out on 32 px CIFAR-10, where it hurt)."""
    return 0.5 if image_size >= 64 else 0.0


def simclr_augment(image_size: int, channels: int, strength: Optional[float] = None, crop_scale: float = 0.08,
                   jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: Optional[float] = None,
                   flip: bool = True) -> SimCLRAugment:
    """SimCLR's view settings for images of ``image_size`` px and ``channels`` channels.

    Colour jitter of strength s (``strength``; default :func:`simclr_jitter_strength`):
    brightness, contrast, saturation 0.8·s, hue 0.2·s, with probability ``jitter_p`` 0.8; greyscale
    with ``grayscale_p`` 0.2. Saturation, hue and greyscale apply to colour images only. Blur with
    probability ``blur_p`` (default :func:`simclr_blur_p`: 0.5 from 64 px, none below), sigma
    0.1-2 px, a kernel of about a tenth of the image. Crops keep ``crop_scale``–100 % of the area
    (8 %, as in the paper)."""
    colour = channels == 3
    strength = simclr_jitter_strength(image_size, channels) if strength is None else strength
    blur_p = simclr_blur_p(image_size) if blur_p is None else blur_p
    jitter = 0.8 * strength
    return SimCLRAugment(scale=(crop_scale, 1.0), flip=flip, jitter_p=jitter_p, brightness=jitter, contrast=jitter,
                         saturation=jitter if colour else 0.0, hue=0.2 * strength if colour else 0.0,
                         grayscale_p=grayscale_p if colour else 0.0, blur_p=blur_p,
                         blur_kernel=2 * round(0.05 * image_size) + 1 if blur_p > 0 else 0)


# ---------------------------------------------------------------- FixMatch's strong view (RandAugment + Cutout)

# The operations of FixMatch's RandAugment (Sohn et al., NeurIPS 2020, table 12), each batched.
STRONG_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
              "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
_GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _per_image(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or N values → an N×1×1×1 float tensor on x's device (one value per image)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return value.expand(x.shape[0]).reshape(-1, 1, 1, 1) if value.dim() == 0 else value.reshape(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R BT.601, as PIL's convert('L')) of 3-channel images, N×1×H×W; grey images as they are."""
    if x.shape[1] != 3:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channels to span [0, 1]: (x − min)/(max − min) per image and channel
    (PIL's ``ImageOps.autocontrast`` with no cut-off). A flat channel is left as it is."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp(min=1e-12), x)


def equalize(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram equalisation per image and channel, all images in one ``bincount``: values are
    binned to ``bins`` levels and each level v maps to (cdf(v) − cdf(v_min)) / (pixels − cdf(v_min)),
    so the darkest level stays 0, the brightest becomes 1 and the levels between spread by how
    many pixels they hold (like PIL's ``ImageOps.equalize``). A flat channel is left as it is."""
    n, c, h, w = x.shape
    levels = (x.float().clamp(0, 1) * (bins - 1)).round().long().reshape(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device)[:, None] * bins
    hist = torch.bincount((levels + offsets).flatten(), minlength=n * c * bins).reshape(n * c, bins).float()
    cdf = hist.cumsum(1)
    lowest = cdf.gather(1, levels.amin(1, keepdim=True))  # pixels at the darkest level
    span = h * w - lowest
    lut = ((cdf - lowest) / span.clamp(min=1)).clamp(0, 1)
    out = lut.gather(1, levels).reshape(n, c, h, w)
    return torch.where((span > 0).reshape(n, c, 1, 1), out, x.float()).to(x.dtype)


def solarize(x: torch.Tensor, threshold) -> torch.Tensor:
    """Invert every value at or above ``threshold`` (a scalar or N values): x ≥ t → 1 − x."""
    return torch.where(x >= _per_image(threshold, x), 1.0 - x, x)


def posterize(x: torch.Tensor, bits) -> torch.Tensor:
    """Keep the top ``bits`` (1-8; a scalar or N values) of each 8-bit value: v = round(255·x),
    v − v mod 2^(8−bits), back to [0, 1]."""
    step = torch.pow(2.0, 8.0 - _per_image(bits, x).round())
    value = (x.float() * 255).round()
    return (torch.div(value, step, rounding_mode="floor") * step / 255).to(x.dtype)


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with black (PIL ``ImageEnhance.Brightness``): x·f, clamped to [0, 1]."""
    return (x * _per_image(factor, x)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the image's mean grey level m (PIL ``ImageEnhance.Contrast``): m + f·(x − m), clamped."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return (mean + _per_image(factor, x) * (x - mean)).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the image's own greyscale (PIL ``ImageEnhance.Color``): g + f·(x − g), clamped.
    Grey (1-channel) images have no colour to change and come back as they are."""
    if x.shape[1] != 3:
        return x
    grey = _grey(x)
    return (grey + _per_image(factor, x) * (x - grey)).clamp(0, 1)


def adjust_sharpness(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with a smoothed copy (PIL ``ImageEnhance.Sharpness``: the 3×3 kernel
    [[1,1,1],[1,5,1],[1,1,1]]/13, border pixels kept): s + f·(x − s), clamped. f < 1 blurs,
    f > 1 sharpens."""
    n, c, h, w = x.shape
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    with torch.autocast(x.device.type, enabled=False):
        smooth = F.conv2d(x.float(), kernel, padding=1, groups=c)
    border = torch.ones(h, w, dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    smooth = torch.where(border, x.float(), smooth)
    return (smooth + _per_image(factor, x) * (x.float() - smooth)).clamp(0, 1).to(x.dtype)


def affine_warp(x: torch.Tensor, theta: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Warp image i by the 2×3 matrix ``theta[i]`` (N×2×3, ``F.affine_grid``'s normalised [−1, 1]
    coordinates: output point p samples the input at theta·(p, 1)), bilinear, with ``fill``
    coming in from outside the image."""
    with torch.autocast(x.device.type, enabled=False):
        grid = F.affine_grid(theta.float(), list(x.shape), align_corners=False)
        out = F.grid_sample(x.float() - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + fill).to(x.dtype)


def geometric_theta(op: str, amount: torch.Tensor) -> torch.Tensor:
    """N×2×3 matrices for one geometric op: rotate (``amount`` in degrees), shear_x/y (shear
    factor), translate_x/y (fraction of the image size; a shift of d·size pixels is 2d in
    normalised units)."""
    n = amount.shape[0]
    theta = torch.zeros(n, 2, 3, device=amount.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if op == "rotate":
        angle = amount * (math.pi / 180.0)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif op == "shear_x":
        theta[:, 0, 1] = amount
    elif op == "shear_y":
        theta[:, 1, 0] = amount
    elif op == "translate_x":
        theta[:, 0, 2] = 2 * amount
    elif op == "translate_y":
        theta[:, 1, 2] = 2 * amount
    else:
        raise ValueError(f"op={op!r} is not geometric; allowed: {', '.join(_GEOMETRIC_OPS)}")
    return theta


def cutout(x: torch.Tensor, size, centre_y: torch.Tensor, centre_x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Set a ``size``×``size`` pixel square (a scalar or N sizes) centred at (centre_y[i], centre_x[i])
    (integer pixel coordinates, N each) to ``fill`` in image i, clipped where it leaves the image
    (DeVries & Taylor 2017)."""
    h, w = x.shape[-2:]
    side = _per_image(size, x).reshape(-1, 1)
    top = centre_y.reshape(-1, 1).float() - torch.div(side, 2, rounding_mode="floor")
    left = centre_x.reshape(-1, 1).float() - torch.div(side, 2, rounding_mode="floor")
    rows = torch.arange(h, device=x.device)[None].float()
    cols = torch.arange(w, device=x.device)[None].float()
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return torch.where(hole, torch.full_like(x, fill), x)


def _strong_op(op: str, x: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One colour op of :func:`rand_augment` on the images that drew it, magnitudes in [0, 1] mapped
    to FixMatch's ranges (table 12): enhance factors 0.05-0.95, solarize threshold 1 → 0,
    posterize 8 → 4 bits."""
    factor = 0.05 + 0.9 * magnitude
    if op == "identity":
        return x
    if op == "autocontrast":
        return autocontrast(x)
    if op == "equalize":
        return equalize(x)
    if op == "solarize":
        return solarize(x, 1.0 - magnitude)
    if op == "posterize":
        return posterize(x, 8 - (4 * magnitude).round())
    if op == "color":
        return adjust_saturation(x, factor)
    if op == "contrast":
        return adjust_contrast(x, factor)
    if op == "brightness":
        return adjust_brightness(x, factor)
    if op == "sharpness":
        return adjust_sharpness(x, factor)
    raise ValueError(f"op={op!r} is not known; allowed: {', '.join(STRONG_OPS)}")


def rand_augment(x: torch.Tensor, ops_per_image: int = 2, cutout_fraction: float = 0.5,
                 ops: tuple = STRONG_OPS, fill: float = 0.0, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
    """FixMatch's strong augmentation (Sohn et al., NeurIPS 2020, §2.3 and table 12: RandAugment,
    Cubuk et al. 2020, with a random magnitude per image, then Cutout), batched on x's device.

    Each image draws ``ops_per_image`` operations from ``ops`` (uniformly, with replacement), each
    with its own magnitude uniform in [0, 1] and (for rotate, shear, translate) a random sign:
    rotate ±30°, shear ±0.3, translate ±0.3 of the size, the colour ops as in :func:`_strong_op`.
    Then a square of a random side in [0, ``cutout_fraction``·size] at a random centre is set to
    ``fill``. Every random number is drawn up front from ``generator`` (on x's device) in a fixed
    order, so one seed gives one result whichever ops are drawn. x: float N×C×H×W in [0, 1] →
    the same shape, dtype and device.
    """
    unknown = [op for op in ops if op not in STRONG_OPS]
    if unknown or not ops:
        raise ValueError(f"ops={ops!r} is not allowed; allowed: a non-empty subset of {', '.join(STRONG_OPS)}")
    n, dev = x.shape[0], x.device
    h, w = x.shape[-2:]
    choice = torch.randint(len(ops), (ops_per_image, n), device=dev, generator=generator)
    magnitude = torch.rand(ops_per_image, n, device=dev, generator=generator)
    sign = torch.where(torch.rand(ops_per_image, n, device=dev, generator=generator) < 0.5, -1.0, 1.0)
    side = (torch.rand(n, device=dev, generator=generator) * cutout_fraction * min(h, w)).round()
    centre_y = torch.randint(h, (n,), device=dev, generator=generator)
    centre_x = torch.randint(w, (n,), device=dev, generator=generator)
    out = x.float()
    scale = {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.3, "translate_y": 0.3}
    for slot in range(ops_per_image):
        out = out.clone()
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        warped = torch.zeros(n, dtype=torch.bool, device=dev)
        for index, op in enumerate(ops):
            picked = choice[slot] == index
            if op in _GEOMETRIC_OPS:
                amount = scale[op] * magnitude[slot] * sign[slot]
                theta = torch.where(picked[:, None, None], geometric_theta(op, amount), theta)
                warped |= picked
            elif op != "identity":
                rows = picked.nonzero().squeeze(1)
                if rows.numel():
                    out[rows] = _strong_op(op, out[rows], magnitude[slot, rows], sign[slot, rows])
        rows = warped.nonzero().squeeze(1)
        if rows.numel():
            # All geometric ops of this slot in one warp, on the images that drew one.
            out[rows] = affine_warp(out[rows], theta[rows], fill)
    if cutout_fraction > 0:
        out = cutout(out, side, centre_y, centre_x, fill)
    return out.to(x.dtype)
