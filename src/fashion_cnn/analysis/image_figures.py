"""Figures of images: predictions with their probability bars, the most confident mistakes,
feature maps of every Conv2D layer, augmentation draws. Each `figure_*` function takes tensors
(images (N, 1, H, W), labels (N,), probabilities (N, classes)) and returns a Figure.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..data.augment import AugmentConfig, augment_batch, resamples
from ..data.fashion_mnist import CLASS_NAMES
from ..models.build import KerasSequential
from .figures import CORRECT_COLOR, WRONG_COLOR, new_figure
from .metrics import one_per_class


def _images(x: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) tensor (any memory format) -> (N, H, W) numpy; a colour (N, 3, H, W) one
    -> (N, H, W, 3) in [0, 1], each image stretched to its own range, as imshow shows RGB."""
    a = torch.as_tensor(x).detach().float().contiguous()
    if a.shape[1] == 1:
        return a[:, 0].numpy()
    a = a.permute(0, 2, 3, 1).numpy()
    low, high = a.min(axis=(1, 2, 3), keepdims=True), a.max(axis=(1, 2, 3), keepdims=True)
    return (a - low) / np.where(high > low, high - low, 1.0)


def _show(ax, image: np.ndarray, **kwargs) -> None:
    """imshow of one image: grayscale (H, W) with the seed's colour map, RGB as it is."""
    if image.ndim == 2:
        ax.imshow(image, cmap="binary", **kwargs)
    else:
        ax.imshow(image, **{k: v for k, v in kwargs.items() if k not in ("vmin", "vmax")})


def prediction_color(predicted: int, true: int) -> str:
    """The seed's rule: blue when the prediction is right, red when it is wrong."""
    return CORRECT_COLOR if int(predicted) == int(true) else WRONG_COLOR


def bar_colors(probabilities, true: int) -> list[str]:
    """Bar colours of one probability chart: grey, the predicted class red, the true class
    blue (blue wins when they are the same, so a right answer shows one blue bar)."""
    colors = ["#999999"] * len(probabilities)
    colors[int(np.argmax(probabilities))] = WRONG_COLOR
    colors[int(true)] = CORRECT_COLOR
    return colors


def _class_key(class_names, prefix: str = "", width: int = 170) -> str:
    """"prefix 0 name,  1 name, ...", wrapped to lines of `width` characters."""
    import textwrap

    text = prefix + ",  ".join(f"{i}\u00a0{name}" for i, name in enumerate(class_names))
    return textwrap.fill(text, width, break_on_hyphens=False)


def _tile_canvas(width_units: float, height_units: float, width_inches: float,
                 top_inches: float, bottom_inches: float) -> tuple[Figure, object, float]:
    """A figure holding one axes-less canvas in data units (1 unit = one image's side).

    Drawing a grid of small pictures into one canvas instead of one Axes each keeps these
    figures cheap: an Axes costs ~10 ms to create, a tile almost nothing.
    Returns (figure, axes, figure height in inches).
    """
    scale = width_inches / width_units            # inches per unit
    height = height_units * scale + top_inches + bottom_inches
    fig = new_figure((width_inches, height), layout=None)
    ax = fig.add_axes((0, bottom_inches / height, 1, height_units * scale / height))
    ax.set_xlim(0, width_units)
    ax.set_ylim(0, height_units)
    ax.set_axis_off()
    return fig, ax, height


def _image_tile(ax, image: np.ndarray, x0: float, y0: float, size: float = 1.0) -> None:
    """Draw `image` (H, W) into the square [x0, x0+size] x [y0, y0+size], with a thin frame."""
    _show(ax, image, interpolation="nearest", extent=(x0, x0 + size, y0, y0 + size))
    ax.add_patch(Rectangle((x0, y0), size, size, fill=False, edgecolor="0.75", linewidth=0.6))


def figure_predictions(images, labels, probabilities, rows: int = 5, cols: int = 3,
                       class_names=CLASS_NAMES) -> Figure:
    """The seed's plot_results: the first rows*cols images, each beside its probability bars,
    captioned "predicted confidence% (true)" in blue when right, red when wrong.

    images (N, 1, H, W); labels (N,); probabilities (N, classes).
    """
    count = min(rows * cols, len(labels))
    rows = max(1, math.ceil(count / cols))
    x, y, p = _images(images[:count]), np.asarray(labels[:count]), np.asarray(probabilities[:count])
    n_classes = p.shape[1] if p.ndim == 2 else len(class_names)
    # Units: the image is 1x1; its bars span 1.25 to its right; captions take 0.45 below.
    bars_x, bars_w, cell_w, cell_h, caption_h = 1.17, 1.25, 2.75, 1.62, 0.45
    key = _class_key(class_names, "Bars: probability of each class (red = predicted, "
                                  "blue = true).  ")
    key_lines = key.count("\n") + 1
    fig, ax, height = _tile_canvas(cols * cell_w, rows * cell_h, 11.0, 0.5, 0.25 + 0.16 * key_lines)
    pitch = bars_w / n_classes
    for i in range(count):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + 0.12, (rows - 1 - r) * cell_h + caption_h
        predicted, conf = int(p[i].argmax()), float(p[i].max())
        _image_tile(ax, x[i], x0, y0)
        ax.text(x0 + 0.5, y0 - 0.04, f"{class_names[predicted]} {conf:.0%}\n({class_names[int(y[i])]})",
                ha="center", va="top", fontsize=9.5, color=prediction_color(predicted, y[i]))
        left = x0 + bars_x
        centres = left + pitch * (np.arange(n_classes) + 0.5)
        ax.bar(centres, p[i], width=pitch * 0.8, bottom=y0, color=bar_colors(p[i], y[i]))
        # The scale: baseline at 0, faint lines at 0.5 and 1.
        ax.plot([left, left + bars_w], [y0, y0], color="0.3", linewidth=0.8)
        for level, text in ((0.5, ".5"), (1.0, "1")):
            ax.plot([left, left + bars_w], [y0 + level] * 2, color="0.85", linewidth=0.6, zorder=0)
            ax.text(left - 0.03, y0 + level, text, ha="right", va="center", fontsize=7, color="0.4")
        for k, cx in enumerate(centres):
            ax.text(cx, y0 - 0.03, str(k), ha="center", va="top", fontsize=7, color="0.3")
    fig.suptitle(f"First {count} test images: predicted class, confidence (true class); "
                 f"blue = right, red = wrong", y=1 - 0.12 / height, va="top")
    fig.text(0.5, 0.08 / height, key, ha="center", va="bottom", fontsize=8.5)
    return fig


def figure_misclassified(images, labels, probabilities, count: int = 15, cols: int = 5,
                         class_names=CLASS_NAMES) -> Figure:
    """The `count` most confident mistakes, each titled with predicted class, its
    probability and the true class."""
    y, p = np.asarray(labels), np.asarray(probabilities)
    predicted = p.argmax(1)
    wrong = np.flatnonzero(predicted != y)
    worst = wrong[np.argsort(-p[wrong].max(1), kind="stable")][:count]
    rows = max(1, math.ceil(len(worst) / cols))
    # Units: each image is 1x1, with its title (0.2) above and two caption lines (0.3) below.
    cell_w, cell_h = 1.15, 1.62
    fig, ax, height = _tile_canvas(cols * cell_w, rows * cell_h, 11.0, 0.75, 0.1)
    x = _images(images[torch.as_tensor(worst, dtype=torch.long)]) if len(worst) else None
    for k, index in enumerate(worst):
        r, c = divmod(k, cols)
        x0, y0 = c * cell_w + 0.075, (rows - 1 - r) * cell_h + 0.36
        _image_tile(ax, x[k], x0, y0)
        ax.text(x0 + 0.5, y0 + 1.03, f"{class_names[predicted[index]]} {p[index].max():.0%}",
                ha="center", va="bottom", fontsize=10.5, color=WRONG_COLOR)
        ax.text(x0 + 0.5, y0 - 0.03, f"true: {class_names[y[index]]}\ntest image {index}",
                ha="center", va="top", fontsize=9)
    if not len(worst):
        ax.text(0.5 * cols * cell_w, 0.5 * cell_h, "No mistakes on these images.",
                ha="center", va="center", fontsize=12)
    fig.suptitle(f"The {len(worst)} most confident mistakes ({len(wrong):,} wrong of "
                 f"{len(y):,} test images)\npredicted class and its probability in red, "
                 f"true class below", y=1 - 0.08 / height, va="top")
    return fig


TILE_GAP = 0.12  # gap between feature-map tiles, as a fraction of a tile


# activation modules whose output conv_activations shows in place of the convolution's just before
_ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.GELU,
                torch.nn.SiLU, torch.nn.Mish, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Hardswish)


def _module_conv_activations(model: torch.nn.Module,
                             x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """conv_activations for any module: the output of every nn.Conv2d, by qualified name, in
    the order they run; where the next module of the same nn.Sequential is an activation
    (nn.ReLU...) used only there, that activation's output instead."""
    parents = {name: module for name, module in model.named_modules()}
    uses: dict[int, int] = {}  # id(module) -> the number of places it sits in the model
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    watched = {}  # module to watch -> the Conv2d's name
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        target = module
        parent_name, _, child = name.rpartition(".")
        parent = parents.get(parent_name)
        if isinstance(parent, torch.nn.Sequential):
            children = list(parent._modules)
            index = children.index(child)
            after = parent[index + 1] if index + 1 < len(children) else None
            if isinstance(after, _ACTIVATIONS) and uses[id(after)] == 1:
                target = after
        watched.setdefault(target, name)
    outputs: list[tuple[str, torch.Tensor]] = []

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            outputs.append((watched[module], output.float().contiguous().clone()))

    handles = [module.register_forward_hook(record) for module in watched]
    try:
        model(x.contiguous(memory_format=torch.channels_last))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def conv_activations(model, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(layer name, output (N, C, h, w)) after each top-level Conv2D layer (with its activation);
    for a plain PyTorch module, after each nn.Conv2d (_module_conv_activations)."""
    outputs = []
    was_training = model.training
    if not isinstance(model, KerasSequential):
        model.eval()
        try:
            with torch.inference_mode():
                return _module_conv_activations(model, x)
        finally:
            model.train(was_training)
    model.eval()
    with torch.inference_mode():
        h = x.contiguous(memory_format=torch.channels_last)
        for spec, layer in zip(model.spec.layers, model.layers):
            h = layer(h)
            if spec.type == "Conv2D":
                shown = h
                if spec.args["activation"] == "relu" and isinstance(layer, torch.nn.Conv2d):
                    shown = torch.relu(h)  # the builder moved this ReLU after the next max pool
                outputs.append((spec.name, shown.float().contiguous()))
    model.train(was_training)
    return outputs


TILE_PIXELS = 78  # every map is resampled (nearest) to this square: 26x26 and 3x3 exactly


def _mosaic(maps: np.ndarray) -> np.ndarray:
    """maps (rows, cols, h, w) -> one image of TILE_PIXELS tiles separated by NaN gaps.

    One image per layer instead of one per map: drawing 250 small images costs far more.
    """
    rows, cols, h, w = maps.shape
    gap = round(TILE_PIXELS * TILE_GAP)
    pitch = TILE_PIXELS + gap
    # nearest-neighbour index of each output pixel in the source map
    iy = np.arange(TILE_PIXELS) * h // TILE_PIXELS
    ix = np.arange(TILE_PIXELS) * w // TILE_PIXELS
    tiles = maps[:, :, iy][:, :, :, ix]  # (rows, cols, T, T)
    out = np.full((rows * pitch - gap, cols * pitch - gap), np.nan, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r * pitch:r * pitch + TILE_PIXELS, c * pitch:c * pitch + TILE_PIXELS] = tiles[r, c]
    return out


def _draw_tiles(ax, maps: np.ndarray, cmap, vmin=None, vmax=None, frame: bool = False) -> None:
    """maps (rows, cols, h, w) drawn as a grid in data units (one unit per tile), so maps of
    any size (26x26 or 3x3) line up row by row across layers."""
    rows, cols = maps.shape[:2]
    size = 1.0 - TILE_GAP
    colormap = colormaps[cmap].with_extremes(bad="white")  # NaN gaps show white
    if vmin is None:  # one range for the whole panel
        vmin, vmax = float(np.nanmin(maps)), float(np.nanmax(maps))
    ax.imshow(_mosaic(maps), cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest",
              extent=(0, cols - TILE_GAP, rows - TILE_GAP, 0))
    if frame:  # white-background images need an edge to show their extent
        for r in range(rows):
            for c in range(cols):
                ax.add_patch(Rectangle((c, r), size, size, fill=False, edgecolor="0.75",
                                       linewidth=0.6))
    ax.set_xlim(-TILE_GAP / 2, cols - TILE_GAP / 2)
    ax.set_ylim(rows - TILE_GAP / 2, -TILE_GAP / 2)
    ax.set_aspect("equal")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)


def figure_activations(model, images, labels, channels: int = 8, class_names=CLASS_NAMES) -> Figure:
    """Feature maps of every Conv2D layer for one image per class (the seed's "DNN viewer").

    Each layer shows its `channels` most active channels (mean over the shown images); each
    channel is scaled to its maximum over those images, so rows (classes) compare directly.
    """
    rows = one_per_class(labels, len(class_names))
    x = torch.as_tensor(images)[torch.as_tensor(rows, dtype=torch.long)]
    y = np.asarray(labels)[rows]
    layers = conv_activations(model, x)
    panels = []
    for name, out in layers:
        a = out.numpy()  # (rows, C, h, w)
        order = np.argsort(-a.mean(axis=(0, 2, 3)), kind="stable")[:channels]
        chosen = a[:, order]
        low = chosen.min(axis=(0, 2, 3), keepdims=True)
        high = chosen.max(axis=(0, 2, 3), keepdims=True)
        scaled = (chosen - low) / np.where(high > low, high - low, 1.0)
        panels.append((f"{name}\n{a.shape[2]}x{a.shape[3]}x{a.shape[1]}", scaled, order.tolist()))
    widths = [1.0] + [p[1].shape[1] for p in panels]
    # Tiles are unit squares; the figure's width shares 10.8 inches among all tile columns.
    tile_inches = min(0.55, 10.8 / (sum(widths) + 0.4 * len(panels)))
    height = len(rows) * tile_inches + 1.7
    fig = new_figure((12.5, height), layout=None)
    grid = fig.add_gridspec(1, len(widths), width_ratios=widths, left=0.1, right=0.99,
                            top=1 - 0.95 / height, bottom=0.5 / height, wspace=0.08)
    ax = fig.add_subplot(grid[0, 0])
    shown = _images(x)
    if shown.ndim == 4:  # colour: the grid's frames, then one RGB tile per row in its units
        _draw_tiles(ax, np.full((len(shown), 1, 1, 1), np.nan), "binary", 0.0, 1.0, frame=True)
        limits = ax.get_xlim(), ax.get_ylim()
        for r, image in enumerate(shown):
            ax.imshow(image, interpolation="nearest", zorder=2,
                      extent=(0, 1 - TILE_GAP, r + 1 - TILE_GAP, r))
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    else:
        _draw_tiles(ax, shown[:, None], "binary", frame=True)
    ax.set_title("input", fontsize=9.5)
    ax.set_xticks([])
    ax.set_yticks([r + (1 - TILE_GAP) / 2 for r in range(len(rows))],
                  [class_names[c] for c in y], fontsize=9)
    for k, (label, scaled, channel_ids) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k + 1])
        _draw_tiles(ax, scaled, "viridis", 0.0, 1.0)
        ax.set_title(label, fontsize=9.5)
        ax.set_xticks([c + (1 - TILE_GAP) / 2 for c in range(len(channel_ids))],
                      [str(c) for c in channel_ids], fontsize=7.5)
        ax.set_yticks([])
        ax.set_xlabel("channel", fontsize=8.5, labelpad=1)
    if not layers:
        fig.text(0.6, 0.5, "This model has no Conv2D layer.", ha="center", fontsize=12)
    fig.suptitle(f"Feature maps after each Conv2D layer (with its activation), one test image per "
                 f"class:\nthe {channels} most active channels of each layer, each scaled to its "
                 f"range over these images (dark = lowest, yellow = highest)", fontsize=10.5)
    return fig


def describe_augment(cfg: AugmentConfig) -> str:
    """One line naming the settings that change an image, e.g. "rotation ±2°, shift ±5% x"."""
    parts = []
    if cfg.rotation_range:
        parts.append(f"rotation ±{cfg.rotation_range:g}°")
    if cfg.width_shift_range:
        parts.append(f"width shift ±{cfg.width_shift_range:.0%}")
    if cfg.height_shift_range:
        parts.append(f"height shift ±{cfg.height_shift_range:.0%}")
    if cfg.zoom_range:
        parts.append(f"zoom ±{cfg.zoom_range:.0%}")
    if cfg.horizontal_flip:
        parts.append("horizontal flip (p = 0.5)")
    if resamples(cfg):  # only resampling leaves a border to fill; a mirror image does not
        parts.append(f"fill {cfg.fill_mode}" + (f" ({cfg.cval:g})" if cfg.fill_mode == "constant" else ""))
        if cfg.interpolation_order == 0:
            parts.append("nearest-pixel sampling")
    if cfg.random_erasing:
        a, r = cfg.erasing_area, cfg.erasing_aspect
        parts.append(f"random erasing p = {cfg.random_erasing:g} (area {a[0]:g}-{a[1]:g}, "
                     f"aspect {r[0]:g}-{r[1]:g})")
    return ", ".join(parts) if parts else "no augmentation settings (images pass unchanged)"


def figure_augmentation(images, cfg: AugmentConfig, seed: int = 0, draws: int = 3,
                        name: str | None = None, labels=None, class_names=CLASS_NAMES) -> Figure:
    """Original images (top row, titled with their class when `labels` are given) and
    `draws` rows of random augmentations of them."""
    x = torch.as_tensor(images).float()
    gen = torch.Generator().manual_seed(seed)
    rows = [("original", _images(x))]
    rows += [(f"augmented\n(draw {d + 1})", _images(augment_batch(x.clone(), cfg, gen)))
             for d in range(draws)]
    n = x.shape[0]
    fig = new_figure((1.3 * n + 1.2, 1.35 * len(rows) + 1.0))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            # A fixed range (the data's -0.5..1.5) keeps brightness comparable across images.
            _show(ax, batch[c], vmin=-0.5, vmax=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=10, rotation=0, ha="right", va="center")
    if labels is not None:
        for c, label in enumerate(np.asarray(labels)[:n]):
            axes[0, c].set_title(class_names[int(label)], fontsize=9)
    state = "on" if cfg.enabled else "off in this recipe; shown as it would apply"
    fig.suptitle(f"Augmentation{f' of {name}' if name else ''} (augmentation {state}):\n"
                 f"{describe_augment(cfg)}", fontsize=10.5)
    return fig
