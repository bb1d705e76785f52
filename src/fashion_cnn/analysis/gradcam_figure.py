"""The run figure `gradcam.png`: per class, a right and a wrong test image, each beside the
heatmap of the class it predicted (Grad-CAM, or SmoothGrad for a model without a Conv2D;
explain.py computes them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..data.fashion_mnist import CLASS_NAMES
from .explain import explain_maps, overlay_heatmap
from .figures import CORRECT_COLOR, WRONG_COLOR, new_figure


def display_images(x: torch.Tensor) -> np.ndarray:
    """Model inputs (N, C, H, W) as images to look at: (N, H, W) or (N, H, W, 3) float in
    [0, 1], each stretched to its own range (the model's scaling undone up to a linear map)."""
    a = x.detach().float().cpu()
    low = a.amin(dim=(1, 2, 3), keepdim=True)
    span = a.amax(dim=(1, 2, 3), keepdim=True) - low
    a = ((a - low) / torch.where(span > 0, span, torch.ones_like(span))).numpy()
    return a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)


def _examples(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
              classes: int) -> list[tuple[int, int | None, int | None]]:
    """Per class present: (class, the first correctly classified test image, the most
    confidently misclassified one), None where there is none."""
    out = []
    for c in range(classes):
        right = np.flatnonzero((labels == c) & (predicted == c))
        wrong = np.flatnonzero((labels == c) & (predicted != c))
        if not len(right) and not len(wrong):
            continue
        worst = wrong[np.argmax(confidence[wrong])] if len(wrong) else None
        out.append((c, int(right[0]) if len(right) else None,
                    int(worst) if worst is not None else None))
    return out


UPSCALE = 4      # figure tiles: each input pixel drawn as 4 x 4, the heatmap resampled smoothly
MAX_CLASSES = 20  # classes shown in gradcam.png (two per row)


def figure_gradcam(model: nn.Module, x_test, y_test, probabilities,
                   class_names=CLASS_NAMES, layer: int | None = None) -> Figure:
    """For each class, its first correctly classified test image and its most confident
    mistake, each beside its heatmap for the predicted class: Grad-CAM of the last Conv2D
    layer (or `layer`), or SmoothGrad saliency for a model with no Conv2D.

    x_test (N, C, H, W) as the model sees it; y_test (N,); probabilities (N, classes).
    """
    y, p = np.asarray(y_test), np.asarray(probabilities)
    predicted, confidence = p.argmax(1), p.max(1)
    chosen = _examples(y, predicted, confidence, len(class_names))[:MAX_CLASSES]
    indices = [i for _, right, wrong in chosen for i in (right, wrong) if i is not None]
    x = torch.as_tensor(x_test)[torch.as_tensor(indices, dtype=torch.long)]
    maps, method = explain_maps(model, x, torch.as_tensor(predicted[indices]), layer)
    shown = display_images(x)
    tiles = {i: (shown[k], overlay_heatmap(_upscale(shown[k]), maps[k].numpy()))
             for k, i in enumerate(indices)}
    # Units: an image is 1 x 1; a pair is [image | heatmap]; two pairs (right, wrong) per class,
    # two classes per row; a title line above each pair (0.3) and a caption below (0.25).
    pair_w, block_w, cell_h, margin = 2.06, 4.5, 1.62, 0.22
    rows = max(1, math.ceil(len(chosen) / 2))
    width_units = 2 * block_w + margin
    scale = 11.0 / width_units  # inches per unit
    top, bottom = 0.8, 0.1      # inches: the title, and below the last captions
    fig = new_figure((11.0, rows * cell_h * scale + top + bottom), layout=None)
    height = fig.get_figheight()
    ax = fig.add_axes((0, bottom / height, 1, rows * cell_h * scale / height))
    ax.set_xlim(0, width_units)
    ax.set_ylim(0, rows * cell_h)
    ax.set_axis_off()
    for k, (c, right, wrong) in enumerate(chosen):
        r, side = divmod(k, 2)
        x0, y0 = margin + side * block_w, (rows - 1 - r) * cell_h + 0.32
        ax.text(x0 - 0.04, y0 + 0.5, class_names[c], rotation=90, ha="right", va="center",
                fontsize=10, fontweight="bold")
        for slot, index in enumerate((right, wrong)):
            left = x0 + slot * (pair_w + 0.1)
            if index is None:
                ax.text(left + pair_w / 2, y0 + 0.5, "no mistake" if slot else "none right",
                        ha="center", va="center", fontsize=9, color="0.4")
                continue
            image, overlay = tiles[index]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
                      interpolation="nearest", extent=(left, left + 1, y0, y0 + 1))
            ax.imshow(overlay, interpolation="bilinear",
                      extent=(left + 1.06, left + 2.06, y0, y0 + 1))
            color = CORRECT_COLOR if slot == 0 else WRONG_COLOR
            ax.text(left + pair_w / 2, y0 + 1.04,
                    f"{class_names[predicted[index]]} {confidence[index]:.0%}",
                    ha="center", va="bottom", fontsize=9.5, color=color)
            ax.text(left + pair_w / 2, y0 - 0.04,
                    f"true {class_names[int(y[index])]}, #{index}",
                    ha="center", va="top", fontsize=8, color="0.25")
    fig.suptitle(f"{method}: what each prediction looked at (red = most)\n"
                 f"per class: its first right answer (blue) and its most confident mistake (red); "
                 f"predicted class above, true class below", y=1 - 0.12 / height, va="top",
                 fontsize=10.5)
    return fig


def _upscale(image: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) repeated UPSCALE times each way (nearest): the overlay then shows the
    input's pixels sharp and the heatmap smooth."""
    return np.repeat(np.repeat(image, UPSCALE, axis=0), UPSCALE, axis=1)
