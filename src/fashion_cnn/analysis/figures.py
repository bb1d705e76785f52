"""Figures of numbers: learning curves, confusion matrices, weight histograms, and the same
for several runs side by side. Each `figure_*` function takes arrays or tensors and returns a
matplotlib Figure; nothing here reads or writes a run.

Figures are built with matplotlib's object API (Figure + the Agg canvas), never pyplot, so
nothing depends on a GUI backend and nothing leaks into a global figure list (with
`%matplotlib inline`, Jupyter shows a returned Figure as a cell's value).

>>> fig = figure_metrics([{"epoch": 1, "loss": 0.6, "accuracy": 0.78,
...                        "val_loss": 0.45, "val_accuracy": 0.84}], epochs=10)
>>> [ax.get_title() for ax in fig.axes]
['Loss (cross-entropy)', 'Accuracy']
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator

from .. import fileio
from ..data.fashion_mnist import CLASS_NAMES


DPI = 100            # run figures: sharp enough to read, small files (tens of KB)


LIVE_DPI = 72        # the per-epoch plot: redrawn every epoch, so cheap first


CORRECT_COLOR = "tab:blue"   # the seed's plot_results: blue when right...


WRONG_COLOR = "tab:red"      # ...red when wrong


TRAIN_COLOR, VAL_COLOR = "tab:blue", "tab:orange"


HIST_BINS = 40                 # bins of each weight histogram
SEED_HIST_RANGE = (-0.5, 0.5)  # the seed's coefficient histograms: one fixed range for every layer


# The metrics drawn by the live plot: one panel each, curves looked up by key (never by
# position: tensorview's PlotMetricsOnEpoch paired names and values by order).
METRIC_PANELS = (("loss", "Loss (cross-entropy)"), ("accuracy", "Accuracy"))


def new_figure(figsize: tuple[float, float], layout: str | None = "constrained") -> Figure:
    """A Figure on the Agg canvas (no GUI backend), sized in inches."""
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write `fig` as PNG atomically (a viewer never sees half a file)."""
    path = Path(path)
    fileio.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi,
                                                    facecolor="white"))
    return path


def _planned_epochs(history: list[dict], epochs: int | None) -> int:
    done = max((int(h["epoch"]) for h in history), default=0)
    return max(epochs or 0, done, 1)


def _draw_metric_panels(axes, history: list[dict], epochs: int) -> None:
    """Train and validation curves of each metric on its own axes; x fixed to 1..epochs."""
    x = [int(h["epoch"]) for h in history]
    penalized = any((h.get("penalty") or 0) > 0 for h in history)
    best = _best_val_epoch(history)
    for ax, (key, title) in zip(axes, METRIC_PANELS):
        ax.clear()
        for prefix, label, color in (("", "train", TRAIN_COLOR), ("val_", "validation", VAL_COLOR)):
            points = [(e, h.get(prefix + key)) for e, h in zip(x, history)]
            points = [(e, v) for e, v in points if v is not None and math.isfinite(v)]
            if points:
                ex, vy = zip(*points)
                ax.plot(ex, vy, marker="o", markersize=3.5, linewidth=1.6, color=color, label=label)
        if best is not None:
            ax.axvline(best, color="0.5", linestyle=":", linewidth=1,
                       label=f"lowest val. loss (epoch {best})")
        ax.set_title(title + (" incl. penalty" if key == "loss" and penalized else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if key == "accuracy" else "loss")
        ax.set_xlim(0.5, epochs + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        if key == "accuracy":
            _percent_axis(ax.yaxis)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower right" if key == "accuracy" else "upper right", fontsize=9)


class _PercentTicks(Formatter):
    """Fractions as percents with as many decimals as the step between ticks needs: "78%" for
    2 % steps, "89.5%" for 0.5 % steps (no "80.0%", and no label rounded off its tick)."""

    decimals = 0

    def format_ticks(self, values):
        ordered = sorted(values)
        step = min((b - a for a, b in zip(ordered, ordered[1:])), default=0.01) * 100
        self.decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
        return [self(value) for value in values]

    def __call__(self, x, pos=None):
        return f"{x * 100:.{self.decimals}f}%"


def _percent_axis(axis) -> None:
    """Accuracies (fractions) shown as percents, with ticks where the label is exact: steps
    of 1, 2 or 5 times a power of ten (no 2.5 % steps that a whole-percent label would round),
    and as many decimals as the step needs."""
    axis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10]))
    axis.set_major_formatter(_PercentTicks())


def _best_val_epoch(history: list[dict]) -> int | None:
    values = [(h.get("val_loss"), int(h["epoch"])) for h in history]
    values = [(v, e) for v, e in values if v is not None and math.isfinite(v)]
    return min(values)[1] if len(values) > 1 else None


def _metrics_title(history: list[dict], epochs: int, name: str | None) -> str:
    head = f"{name}: " if name else ""
    if not history:
        return f"{head}no epoch completed yet (of {epochs})"
    last = history[-1]
    val = last.get("val_accuracy")
    tail = f", validation accuracy {val:.1%}" if val is not None else ""
    return f"{head}epoch {int(last['epoch'])} of {epochs}{tail}"


def _metrics_figure() -> Figure:
    # Fixed margins instead of a layout engine: the live plot is redrawn every epoch and a
    # layout pass would double its cost; the labels here have known sizes.
    fig = new_figure((10, 4), layout=None)
    fig.subplots(1, len(METRIC_PANELS), gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.13,
                                                     "top": 0.86, "wspace": 0.2})
    return fig


def figure_metrics(history: list[dict], epochs: int | None = None, name: str | None = None,
                   fig: Figure | None = None) -> Figure:
    """Loss and accuracy per epoch, train and validation; x axis spans the planned epochs.

    history: Trainer history (dicts with epoch, loss, accuracy, val_loss, val_accuracy).
    fig: a Figure this function returned before, redrawn in place (the live plot reuses one).
    """
    fig = fig if fig is not None else _metrics_figure()
    planned = _planned_epochs(history, epochs)
    _draw_metric_panels(fig.axes, history, planned)
    fig.suptitle(_metrics_title(history, planned, name))
    return fig


def figure_confusion(matrix: np.ndarray, class_names=CLASS_NAMES, normalize: bool = False,
                     title: str | None = None) -> Figure:
    """Heatmap of a confusion matrix (Reds, annotated): predicted class across, true class
    down (the seed's "Estimations" / "True values"); `normalize` divides each row by its class's count (recall on the diagonal)."""
    matrix = np.asarray(matrix)
    total, correct = int(matrix.sum()), int(np.trace(matrix))
    if normalize:
        rows = matrix.sum(axis=1, keepdims=True)
        values = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    else:
        values = matrix
    # Fixed axes rectangles (fractions of the 9 x 8 in figure): room for rotated class names
    # below and a colour bar on the right, without a layout pass.
    fig = new_figure((9, 8), layout=None)
    ax = fig.add_axes((0.15, 0.16, 0.68, 0.77))
    bar_ax = fig.add_axes((0.86, 0.25, 0.025, 0.6))
    image = ax.imshow(values, cmap="Reds", vmin=0, vmax=1 if normalize else None)
    dark = (values.max() or 1) * 0.55  # above this, annotate in white for contrast
    n = len(class_names)
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            text = (f"{v:.2f}" if v >= 0.005 else "0") if normalize else f"{int(v)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if v > dark else "black")
    ax.set_xticks(range(n), class_names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.tick_params(length=0)
    ax.set_title(title or (f"{'Row-normalised c' if normalize else 'C'}onfusion matrix: "
                           f"{correct:,} of {total:,} test images right "
                           f"({correct / max(total, 1):.1%})"))
    fig.colorbar(image, cax=bar_ax,
                 label="fraction of the true class" if normalize else "test images")
    return fig


def _layer_kind(kernel: torch.Tensor) -> str:
    shape = tuple(kernel.shape)
    if len(shape) == 4:  # PyTorch Conv2d kernel (out, in, kh, kw)
        return f"Conv2D {shape[2]}x{shape[3]}, {shape[1]}->{shape[0]}"
    return f"Dense {shape[1]}->{shape[0]}"


def fitted_range(kernels) -> tuple[float, float]:
    """A histogram range symmetric about 0 that holds every value of `kernels` (tensors)."""
    largest = max((float(k.detach().abs().max()) for k in kernels if k.numel()), default=0.0)
    largest = largest or 1.0
    return (-largest, largest)


def _draw_histogram(ax, kernel: torch.Tensor, title: str, color: str = "tab:blue",
                    value_range: tuple[float, float] | None = None) -> None:
    """HIST_BINS bins on `value_range` (default: fitted to this kernel's values), density."""
    values = kernel.detach().float().flatten().cpu().numpy()
    low, high = value_range or fitted_range([kernel])
    # stepfilled: one polygon instead of 40 bar patches (same bins, several times faster)
    ax.hist(values, bins=HIST_BINS, range=(low, high), density=True, color=color, alpha=0.85,
            histtype="stepfilled")
    outside = float(np.mean((values < low) | (values > high))) if values.size else 0.0
    ax.set_title(title, fontsize=10)
    ax.text(0.98, 0.97, f"{values.size:,} weights\nstd {values.std():.3f}"
            + (f"\n{outside:.1%} outside {low:g}..{high:g}" if outside else ""),
            transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_xlim(low, high)
    ax.grid(True, alpha=0.3)


def _range_text(value_range) -> str:
    if value_range is None:
        return f"{HIST_BINS} bins over each layer's range, density"
    return f"{HIST_BINS} bins on {value_range[0]:g}..{value_range[1]:g}, density"


def named_weight_layers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, kernel) of every Conv2D and Dense layer: a spec model's own list, or for any
    other module each nn.Conv2d and nn.Linear by its qualified name, in definition order."""
    if hasattr(model, "named_weight_layers"):
        return model.named_weight_layers()
    return [(name, module.weight.detach()) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
            and isinstance(module.weight, torch.Tensor)
            and not isinstance(module.weight, torch.nn.parameter.UninitializedParameter)]


def figure_weights(model_or_layers, title: str | None = None, cols: int = 3,
                   value_range: tuple[float, float] | None = None) -> Figure:
    """A histogram of the kernel of every Conv2D and Dense layer: HIST_BINS bins over each
    layer's own range, or over `value_range` for all (the seed's view: SEED_HIST_RANGE).
    Accepts a model (a KerasSequential or any torch.nn.Module: its nn.Conv2d and nn.Linear
    modules) or a list of (name, kernel)."""
    layers = (named_weight_layers(model_or_layers)
              if isinstance(model_or_layers, torch.nn.Module) else list(model_or_layers))
    cols = max(1, min(cols, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    height = 3 * rows + 0.5
    fig = new_figure((4 * cols, height), layout=None)
    fig.subplots_adjust(left=0.25 / cols, right=0.99, bottom=0.55 / height, top=1 - 0.7 / height,
                        wspace=0.22, hspace=0.5)
    for k, (name, kernel) in enumerate(layers):
        ax = fig.add_subplot(rows, cols, k + 1)
        _draw_histogram(ax, kernel, f"{name} ({_layer_kind(kernel)})", value_range=value_range)
        if k % cols == 0:
            ax.set_ylabel("density")
        if k >= len(layers) - cols:
            ax.set_xlabel("weight value")
    if not layers:
        fig.text(0.5, 0.5, "This model has no Conv2D or Dense layer.", ha="center", fontsize=12)
    fig.suptitle(f"{title or 'Kernel weights of each layer (biases excluded)'} "
                 f"({_range_text(value_range)})")
    return fig


def figure_compare_curves(histories: dict[str, list[dict]], epochs: int | None = None) -> Figure:
    """Learning curves of several runs overlaid: one colour per run, solid = train,
    dashed = validation."""
    fig = new_figure((11, 4.5))
    axes = fig.subplots(1, len(METRIC_PANELS))
    planned = max([_planned_epochs(h, epochs) for h in histories.values()] or [1])
    colors = [f"C{i % 10}" for i in range(len(histories))]
    for ax, (key, title) in zip(axes, METRIC_PANELS):
        for color, (label, history) in zip(colors, histories.items()):
            for prefix, style, kind in (("", "-", "train"), ("val_", "--", "val.")):
                points = [(h["epoch"], h.get(prefix + key)) for h in history
                          if h.get(prefix + key) is not None]
                if points:
                    ex, vy = zip(*points)
                    ax.plot(ex, vy, style, color=color, marker="o", markersize=3,
                            linewidth=1.5, label=f"{label} ({kind})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_xlim(0.5, planned + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        if key == "accuracy":
            _percent_axis(ax.yaxis)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)),
                   fontsize=9)
    fig.suptitle("Learning curves (solid = train, dashed = validation)")
    return fig


def figure_compare_weights(layers_by_run: dict[str, list[tuple[str, torch.Tensor]]],
                           value_range: tuple[float, float] | None = None) -> Figure:
    """Weight histograms side by side: one row per run, one column per weighted layer
    (in order), shared axes within a column: HIST_BINS bins over the column's range (all its
    runs), or over `value_range` (the seed's view: SEED_HIST_RANGE)."""
    rows = len(layers_by_run)
    cols = max([len(v) for v in layers_by_run.values()] or [1])
    fig = new_figure((3.2 * cols + 0.8, 2.6 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False, sharex="col", sharey="col")
    column_ranges = [value_range or fitted_range([layers[c][1] for layers in layers_by_run.values()
                                                  if c < len(layers)]) for c in range(cols)]
    for r, (label, layers) in enumerate(layers_by_run.items()):
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(layers):
                ax.axis("off")
                continue
            name, kernel = layers[c]
            _draw_histogram(ax, kernel, f"{name} ({_layer_kind(kernel)})", color=f"C{r % 10}",
                            value_range=column_ranges[c])
            if r == rows - 1:
                ax.set_xlabel("weight value")
        axes[r, 0].set_ylabel(f"{label}\ndensity", fontsize=9.5)
    fig.suptitle(f"Kernel weights of each layer, one row per run ({_range_text(value_range)})")
    return fig
