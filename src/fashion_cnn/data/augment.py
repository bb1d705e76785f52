"""Batch augmentation on tensors, with Keras ImageDataGenerator's semantics.

One affine grid for the whole batch (rotation, shift, zoom, flip), one `grid_sample` call, then
optional random erasing with a vectorised mask. All randomness comes from the given
torch.Generator, so a seed fixes it and a checkpoint of the generator resumes it exactly.

>>> cfg = AugmentConfig(enabled=True, rotation_range=2, width_shift_range=0.05)
>>> out = augment_batch(torch.zeros(8, 1, 36, 36), cfg, torch.Generator().manual_seed(0))
>>> out.shape
torch.Size([8, 1, 36, 36])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


@dataclass
class AugmentConfig:
    """The [augment] settings of a run (Keras ImageDataGenerator's names and meanings)."""

    enabled: bool = False           # augment training batches (validation/test never are)
    rotation_range: float = 0.0     # degrees, uniform in +-r
    width_shift_range: float = 0.0  # fraction of the width, uniform in +-w
    height_shift_range: float = 0.0  # fraction of the height, uniform in +-h
    zoom_range: float = 0.0         # scale uniform in [1-z, 1+z]
    horizontal_flip: bool = False   # mirror half the images (footwear all faces one way)
    fill_mode: str = "nearest"      # nearest | constant | reflect, as Keras
    cval: float = -0.5              # fill value for fill_mode = "constant"
    interpolation_order: int = 1    # 1 bilinear (Keras' default) | 0 nearest: whole-pixel shifts, no blur
    random_erasing: float = 0.0     # probability of erasing one random rectangle (Zhong et al.)
    erasing_area: list = field(default_factory=lambda: [0.02, 0.4])  # erased fraction of the image
    erasing_aspect: list = field(default_factory=lambda: [0.3, 3.3])  # height/width ratio range


_PADDING_MODE = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def resamples(cfg: AugmentConfig) -> bool:
    """True when the settings move pixels off the grid (rotation, shift, zoom): resampling
    (bilinear or nearest, per `interpolation_order`), with the vacated border filled by
    `fill_mode`. A mirror image needs neither."""
    return bool(cfg.rotation_range or cfg.width_shift_range or cfg.height_shift_range
                or cfg.zoom_range)


def has_geometry(cfg: AugmentConfig) -> bool:
    return resamples(cfg) or bool(cfg.horizontal_flip)


def affine_params(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """theta (n, 2, 3) mapping output to input coordinates, normalised to [-1, 1].

    Keras draws, per image: angle ~ U(-r, r) degrees; shifts ~ U(-w, w) x size pixels;
    zoom ~ U(1-z, 1+z) (per axis, as Keras does); flip with probability 1/2.
    """
    angle = _uniform(n, -cfg.rotation_range, cfg.rotation_range, gen) * (math.pi / 180.0)
    # A shift of s pixels on a side of S pixels is 2*s/S in normalised units; as a fraction
    # of the size, s/S = u, so the normalised shift is 2u.
    tx = _uniform(n, -cfg.width_shift_range, cfg.width_shift_range, gen) * 2.0
    ty = _uniform(n, -cfg.height_shift_range, cfg.height_shift_range, gen) * 2.0
    zx = _uniform(n, 1 - cfg.zoom_range, 1 + cfg.zoom_range, gen)
    zy = _uniform(n, 1 - cfg.zoom_range, 1 + cfg.zoom_range, gen)
    flip = torch.ones(n)
    if cfg.horizontal_flip:
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    # input = R(angle) @ diag(zoom) @ output + shift: the sampled point moves by -shift,
    # so the content moves by +shift (right/down for positive values).
    theta[:, 0, 0] = cos * zx * flip
    theta[:, 0, 1] = -sin * zy
    theta[:, 1, 0] = sin * zx * flip
    theta[:, 1, 1] = cos * zy
    theta[:, 0, 2] = -tx
    theta[:, 1, 2] = -ty
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, fill_mode: str = "nearest",
         cval: float = -0.5, interpolation_order: int = 1) -> torch.Tensor:
    """Apply per-image affine maps: x (B, C, H, W), theta (B, 2, 3) -> (B, C, H, W).

    interpolation_order 1 samples bilinearly (Keras' default): a fractional shift blurs the
    image. 0 takes the nearest pixel: a shift moves whole pixels and the image stays sharp,
    as the test images are.
    """
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    source = x - cval if fill_mode == "constant" else x  # zeros padding then fills with cval
    mode = "bilinear" if interpolation_order == 1 else "nearest"
    out = F.grid_sample(source, grid, mode=mode, padding_mode=_PADDING_MODE[fill_mode],
                        align_corners=False)
    return out + cval if fill_mode == "constant" else out


def random_erasing(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Zhong et al. 2017: with probability p, replace one rectangle per image by uniform noise.

    Area ~ U(erasing_area) of the image, aspect ratio (h/w) log-uniform in erasing_aspect;
    noise is uniform over the data's range [-0.5, 1.5) (pixels/128 - 0.5).
    """
    b, _, h, w = x.shape
    apply = torch.rand(b, generator=gen) < cfg.random_erasing
    area = _uniform(b, *cfg.erasing_area, gen) * (h * w)
    log_r = _uniform(b, math.log(cfg.erasing_aspect[0]), math.log(cfg.erasing_aspect[1]), gen)
    ratio = torch.exp(log_r)
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (torch.rand(b, generator=gen) * (h - eh + 1)).floor()
    left = (torch.rand(b, generator=gen) * (w - ew + 1)).floor()
    noise = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2.0 - 0.5
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
            & apply.view(b, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
    # drawn from the CPU generator (a checkpoint holds its state), applied where x lives
    return torch.where(mask.to(x.device), noise.to(x.device), x)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Augment a batch (B, C, H, W) on any device; returns a new tensor in channels_last memory
    format. The random draws come from `gen`, a CPU generator, whatever the batch's device."""
    if has_geometry(cfg):
        theta = affine_params(x.shape[0], cfg, gen)
        if resamples(cfg):
            x = warp(x, theta, cfg.fill_mode, cfg.cval, cfg.interpolation_order)
        else:  # flips only: an exact mirror image, from the same random draws
            mirrored = (theta[:, 0, 0] < 0).view(-1, 1, 1, 1).to(x.device)
            x = torch.where(mirrored, x.flip(-1), x)
    if cfg.random_erasing > 0:
        x = random_erasing(x, cfg, gen)
    return x.contiguous(memory_format=torch.channels_last)
