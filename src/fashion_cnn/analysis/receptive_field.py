"""Where each cell of a layer's feature map lies in the input: the centres of its receptive
fields (map_centres), found by probing the model, and a map drawn at the input's size with
each cell at its centre (resample_to_input). Grad-CAM (explain.py) places its maps with them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..training.loop import module_device


class _Reached(Exception):
    """Raised by the geometry probe's hook: the layer's output is all the probe needs."""


MAX_PROBES = 64  # probed rows (and columns) of the input, at most: every k-th of a large one


def layer_output(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`module`'s output for input `x` (no gradient; the forward pass stops there), or None
    where it does not run or gives no image (N, K, h, w)."""
    found: list[torch.Tensor] = []

    def stop(mod, inputs, out):
        found.append(out)
        raise _Reached

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            model(x.contiguous(memory_format=torch.channels_last))
    except _Reached:
        pass
    finally:
        handle.remove()
    image = found[0] if found and isinstance(found[0], torch.Tensor) else None
    return image if image is not None and image.dim() == 4 else None


def map_centres(model: nn.Module, module: nn.Module,
                shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The input row and column (pixel indices) at the centre of the receptive field of each
    row and each column of `module`'s output, for inputs of `shape` (N, C, H, W); None where
    that is not a regular grid (a layer that mixes all positions). `model`: in eval mode and
    not accelerated (gradcam passes its plain copy), `module` one of its layers.

    Found by probing with NaN, which every layer passes on to each output that reads it
    (convolution, pooling, ReLU, BatchNorm in eval mode): input k has row k set to NaN, and
    the rows of the layer's output that turn NaN are those whose receptive field holds row k.
    model1's last Conv2D (3 x 3) reads input rows 0-17, 4-21 and 8-25 of 28: centres 8.5,
    12.5 and 16.5, not the 4.2, 13.5 and 22.8 that resizing 3 to 28 would put them at
    (its pools drop the last row of odd-sized maps).
    """
    _, channels, height, width = shape
    device = module_device(model)
    centres = []
    for axis, size in ((2, height), (3, width)):
        step = max(1, math.ceil(size / MAX_PROBES))
        probes = list(range(0, size, step))
        x = torch.zeros((len(probes), channels, height, width), device=device)
        for k, p in enumerate(probes):
            x[k].select(axis - 1, p).fill_(float("nan"))
        out = layer_output(model, module, x)
        if out is None:
            return None
        other = 3 if axis == 2 else 2
        reached = out.isnan().any(dim=1).any(dim=other - 1).cpu().numpy()  # (probes, h)
        where = [np.flatnonzero(reached[:, u]) for u in range(reached.shape[1])]
        if any(not len(rows) for rows in where):
            return None
        # each output row's receptive field, first to last input row (a probe stands for
        # the `step` rows up to the next one)
        first = np.array([probes[r[0]] for r in where], dtype=np.float64)
        last = np.array([probes[r[-1]] + step - 1 for r in where], dtype=np.float64)
        # 'same' padding clips the fields at the border, which would pull the outer
        # centres inward: the grid is fitted to the fields that lie inside the image
        inside = np.flatnonzero((first > 0) & (last < size - 1))
        if len(inside) < 2:
            return None  # fields that span the image: the plain resize is the geometry
        u0, u1 = inside[0], inside[-1]
        c0, c1 = (first[u0] + last[u0]) / 2, (first[u1] + last[u1]) / 2
        pitch = (c1 - c0) / (u1 - u0)
        if pitch <= 0:
            return None
        centre = c0 + pitch * (np.arange(len(where)) - u0)
        centres.append(centre)
    return centres[0], centres[1]


def resample_to_input(cam: torch.Tensor, centres, size: tuple[int, int]) -> torch.Tensor:
    """A layer's map cam (n, 1, h, w) -> (n, 1, H, W), bilinear. With `centres`
    (map_centres), each map position is placed at its receptive field's centre and the values
    beyond the outermost centres are held; without, the plain resize (the map stretched over
    the whole input)."""
    if centres is None:
        return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    h, w = cam.shape[2:]
    coords = []
    for centre, n, length in ((centres[0], h, size[0]), (centres[1], w, size[1])):
        # the map coordinate of each input pixel, clamped to the outermost centres
        u = np.interp(np.arange(length), centre, np.arange(n)) if n > 1 else np.zeros(length)
        coords.append(torch.as_tensor(2 * u / max(n - 1, 1) - 1, dtype=torch.float32))
    gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).to(cam.device).expand(len(cam), -1, -1, -1)
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="border", align_corners=True)
