"""Every figure of the study, as matplotlib Figures and as PNG files in RUN_DIR/plots/.

Figures are built with matplotlib's object API (Figure + the Agg canvas), never pyplot, so
nothing depends on a GUI backend and nothing leaks into a global figure list. Each
`figure_*` function returns a Figure (with `%matplotlib inline`, Jupyter shows one as a
cell's value); the writers save them atomically.

>>> fig = figure_metrics([{"epoch": 1, "loss": 0.6, "accuracy": 0.78,
...                        "val_loss": 0.45, "val_accuracy": 0.84}], epochs=10)
>>> [ax.get_title() for ax in fig.axes]
['Loss (cross-entropy)', 'Accuracy']
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from . import fileio
from .augment import resamples
from .config import AugmentConfig, RunConfig
from .data import CLASS_NAMES, NUM_CLASSES
from .errors import CheckpointError, UserError

DPI = 100            # run figures: sharp enough to read, small files (tens of KB)
LIVE_DPI = 72        # the per-epoch plot: redrawn every epoch, so cheap first
CORRECT_COLOR = "tab:blue"   # the seed's plot_results: blue when right...
WRONG_COLOR = "tab:red"      # ...red when wrong
TRAIN_COLOR, VAL_COLOR = "tab:blue", "tab:orange"
HIST_BINS, HIST_RANGE = 40, (-0.5, 0.5)  # the seed's coefficient histograms

# The metrics drawn by the live plot: one panel each, curves looked up by key (never by
# position: tensorview's PlotMetricsOnEpoch paired names and values by order).
METRIC_PANELS = (("loss", "Loss (cross-entropy)"), ("accuracy", "Accuracy"))

RUN_FIGURES = ("metrics.png", "confusion_matrix.png", "confusion_matrix_normalized.png",
               "predictions.png", "misclassified.png", "weights.png", "activations.png")
RUN_TABLES = ("per_class.csv", "confused_pairs.csv", "confusion_matrix.csv")


# ----------------------------------------------------------------------------- basics

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


def softmax(logits: torch.Tensor) -> np.ndarray:
    """Probabilities (N, classes) as float64 numpy, from logits (N, classes)."""
    return torch.softmax(torch.as_tensor(logits).double(), dim=1).numpy()


def _images(x: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) tensor (any memory format) -> (N, H, W) numpy."""
    return torch.as_tensor(x).detach().float().contiguous()[:, 0].numpy()


# ----------------------------------------------------------------------------- learning curves

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
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower right" if key == "accuracy" else "upper right", fontsize=9)


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


def figure_metrics(history: list[dict], epochs: int | None = None, name: str | None = None) -> Figure:
    """Loss and accuracy per epoch, train and validation; x axis spans the planned epochs.

    history: Trainer history (dicts with epoch, loss, accuracy, val_loss, val_accuracy).
    """
    fig = _metrics_figure()
    axes = fig.axes
    planned = _planned_epochs(history, epochs)
    _draw_metric_panels(axes, history, planned)
    fig.suptitle(_metrics_title(history, planned, name))
    return fig


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython already imported and running a kernel)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LivePlot:
    """Training callback: rewrite the learning-curve PNG after every epoch (and in Jupyter,
    update it in place in the cell output). One Figure is reused; one render per epoch serves
    both the file and the notebook.
    """

    def __init__(self, path: str | os.PathLike, dpi: int = LIVE_DPI, notebook: bool | None = None):
        self.path = Path(path)
        self.dpi = dpi
        self.notebook = notebook
        self.fig: Figure | None = None
        self._handle = None
        self.seconds = 0.0  # time spent drawing and writing, for measurements

    def on_train_begin(self, trainer):
        if self.notebook is None:
            self.notebook = _in_notebook()
        if trainer.state.history:  # a resumed run: show what it already has
            self._draw(trainer)

    def on_epoch_end(self, trainer, epoch, logs):
        self._draw(trainer)

    def _draw(self, trainer) -> None:
        start = time.perf_counter()
        cfg = trainer.config
        if self.fig is None:
            self.fig = _metrics_figure()
        history = trainer.state.history
        planned = _planned_epochs(history, cfg.train.epochs)
        _draw_metric_panels(self.fig.axes, history, planned)
        self.fig.suptitle(_metrics_title(history, planned, cfg.recipe or cfg.model.name))
        png = figure_png(self.fig, self.dpi)
        fileio.write_bytes(self.path, png)
        if self.notebook:
            self._show(png)
        self.seconds += time.perf_counter() - start

    def _show(self, png: bytes) -> None:
        from IPython.display import Image, display

        if self._handle is None:
            self._handle = display(Image(data=png), display_id=True)
        else:
            self._handle.update(Image(data=png))


# ----------------------------------------------------------------------------- confusion

def confusion_matrix(y_true, y_pred, n_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts (n_classes, n_classes) int64: row = true class, column = predicted class."""
    t = np.asarray(torch.as_tensor(y_true).cpu(), dtype=np.int64)
    p = np.asarray(torch.as_tensor(y_pred).cpu(), dtype=np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def figure_confusion(matrix: np.ndarray, class_names=CLASS_NAMES, normalize: bool = False,
                     title: str | None = None) -> Figure:
    """Heatmap of a confusion matrix (Reds, annotated), "Estimations" vs "True values" as the
    seed; `normalize` divides each row by its class's count (recall on the diagonal)."""
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
    ax.set_xlabel("Estimations")
    ax.set_ylabel("True values")
    ax.tick_params(length=0)
    ax.set_title(title or (f"{'Row-normalised c' if normalize else 'C'}onfusion matrix: "
                           f"{correct:,} of {total:,} test images right "
                           f"({correct / max(total, 1):.1%})"))
    fig.colorbar(image, cax=bar_ax,
                 label="fraction of the true class" if normalize else "test images")
    return fig


def per_class_table(matrix: np.ndarray, class_names=CLASS_NAMES) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows = true)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    out = []
    for i, name in enumerate(class_names):
        tp, predicted, support = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                    "support": int(support)})
    return out


def most_confused(matrix: np.ndarray, k: int = 5, class_names=CLASS_NAMES) -> list[dict]:
    """The k largest off-diagonal cells: true class, predicted class, count."""
    m = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(m, 0)
    order = np.argsort(-m, axis=None, kind="stable")[:k]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), m.shape[1])
        if m[i, j] > 0:
            pairs.append({"true": class_names[i], "predicted": class_names[j], "count": int(m[i, j])})
    return pairs


def format_per_class(table: list[dict], pairs: list[dict]) -> str:
    """The per-class table and the most confused pairs as aligned text."""
    lines = [f"{'class':<14}{'precision':>10}{'recall':>9}{'F1':>9}{'support':>9}"]
    for row in table:
        lines.append(f"{row['class']:<14}{row['precision']:>10.3f}{row['recall']:>9.3f}"
                     f"{row['f1']:>9.3f}{row['support']:>9}")
    if table:
        mean = {k: sum(r[k] for r in table) / len(table) for k in ("precision", "recall", "f1")}
        lines.append(f"{'macro average':<14}{mean['precision']:>10.3f}{mean['recall']:>9.3f}"
                     f"{mean['f1']:>9.3f}{sum(r['support'] for r in table):>9}")
    if pairs:
        lines.append("Most confused (true -> predicted: images):")
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in pairs]
    return "\n".join(lines)


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_per_class(out_dir: str | os.PathLike, matrix: np.ndarray, class_names=CLASS_NAMES) -> str:
    """Write per_class.csv, confused_pairs.csv and confusion_matrix.csv (counts, rows = true
    class); return the per-class table and the confused pairs as text."""
    out_dir = Path(out_dir)
    table, pairs = per_class_table(matrix, class_names), most_confused(matrix, class_names=class_names)
    counts = [{"true": name, **{col: int(v) for col, v in zip(class_names, row)}}
              for name, row in zip(class_names, np.asarray(matrix))]
    fileio.write_text(out_dir / "confusion_matrix.csv", _csv_text(counts, ["true", *class_names]))
    fileio.write_text(out_dir / "per_class.csv",
                      _csv_text(table, ["class", "precision", "recall", "f1", "support"]))
    fileio.write_text(out_dir / "confused_pairs.csv",
                      _csv_text(pairs, ["true", "predicted", "count"]))
    return format_per_class(table, pairs)


def read_per_class(out_dir: str | os.PathLike) -> str | None:
    """The text table from a plots folder's CSV files (None if they are not there)."""
    out_dir = Path(out_dir)
    try:
        with open(out_dir / "per_class.csv", newline="") as f:
            table = [{"class": r["class"], "precision": float(r["precision"]),
                      "recall": float(r["recall"]), "f1": float(r["f1"]),
                      "support": int(r["support"])} for r in csv.DictReader(f)]
        pairs = []
        if (out_dir / "confused_pairs.csv").is_file():
            with open(out_dir / "confused_pairs.csv", newline="") as f:
                pairs = [{"true": r["true"], "predicted": r["predicted"], "count": int(r["count"])}
                         for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return None
    return format_per_class(table, pairs)


# ----------------------------------------------------------------------------- predictions

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


def _class_key(class_names) -> str:
    return ",  ".join(f"{i} {name}" for i, name in enumerate(class_names))


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
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="binary", interpolation="nearest", extent=(x0, x0 + size, y0, y0 + size))
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
    fig, ax, height = _tile_canvas(cols * cell_w, rows * cell_h, 11.0, 0.5, 0.4)
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
    fig.text(0.5, 0.12 / height, "Bars: probability of each class (red = predicted, "
             "blue = true).  " + _class_key(class_names), ha="center", fontsize=8.5)
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


# ----------------------------------------------------------------------------- weights

def _layer_kind(kernel: torch.Tensor) -> str:
    shape = tuple(kernel.shape)
    if len(shape) == 4:  # PyTorch Conv2d kernel (out, in, kh, kw)
        return f"Conv2D {shape[2]}x{shape[3]}, {shape[1]}->{shape[0]}"
    return f"Dense {shape[1]}->{shape[0]}"


def _draw_histogram(ax, kernel: torch.Tensor, title: str, color: str = "tab:blue") -> None:
    values = kernel.detach().float().flatten().numpy()
    # stepfilled: one polygon instead of 40 bar patches (same bins, several times faster)
    ax.hist(values, bins=HIST_BINS, range=HIST_RANGE, density=True, color=color, alpha=0.85,
            histtype="stepfilled")
    outside = float(np.mean(np.abs(values) > HIST_RANGE[1])) if values.size else 0.0
    ax.set_title(title, fontsize=10)
    ax.text(0.98, 0.97, f"{values.size:,} weights\nstd {values.std():.3f}"
            + (f"\n{outside:.1%} outside ±0.5" if outside else ""),
            transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_xlim(*HIST_RANGE)
    ax.grid(True, alpha=0.3)


def figure_weights(model_or_layers, title: str | None = None, cols: int = 3) -> Figure:
    """A histogram of the kernel of every Conv2D and Dense layer (40 bins on ±0.5, density,
    as the seed). Accepts a model (KerasSequential) or a list of (name, kernel)."""
    layers = (model_or_layers.named_weight_layers() if hasattr(model_or_layers, "named_weight_layers")
              else list(model_or_layers))
    cols = max(1, min(cols, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    height = 3 * rows + 0.5
    fig = new_figure((4 * cols, height), layout=None)
    fig.subplots_adjust(left=0.25 / cols, right=0.99, bottom=0.55 / height, top=1 - 0.7 / height,
                        wspace=0.22, hspace=0.5)
    for k, (name, kernel) in enumerate(layers):
        ax = fig.add_subplot(rows, cols, k + 1)
        _draw_histogram(ax, kernel, f"{name} ({_layer_kind(kernel)})")
        if k % cols == 0:
            ax.set_ylabel("density")
        if k >= len(layers) - cols:
            ax.set_xlabel("weight value")
    fig.suptitle(title or "Kernel weights of each layer (biases excluded)")
    return fig


# ----------------------------------------------------------------------------- activations

TILE_GAP = 0.12  # gap between feature-map tiles, as a fraction of a tile


def one_per_class(labels, n_classes: int = NUM_CLASSES) -> list[int]:
    """Index of the first example of each class present in `labels`, in class order."""
    y = np.asarray(labels)
    return [int(np.flatnonzero(y == c)[0]) for c in range(n_classes) if (y == c).any()]


def conv_activations(model, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(layer name, output (N, C, h, w)) after each top-level Conv2D layer (with its activation)."""
    outputs = []
    was_training = model.training
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
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

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
    rows = one_per_class(labels)
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
    _draw_tiles(ax, _images(x)[:, None], "binary", frame=True)
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


# ----------------------------------------------------------------------------- augmentation

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
    from .augment import augment_batch

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
            ax.imshow(batch[c], cmap="binary", vmin=-0.5, vmax=1.5)
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


def augmentation_preview(recipe_or_config: str | RunConfig, out: str | os.PathLike,
                         n: int = 8, seed: int = 0, data=None) -> Path:
    """Write a grid of original vs augmented training images (one per class first) for a
    recipe's AugmentConfig, enabled or not. `out` is a .png path or a directory."""
    from .data import load_data, to_tensor
    from .run import resolve_config

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    cfg = resolve_config(recipe_or_config)
    data = data or load_data(cfg.data.data_dir or None)
    firsts = one_per_class(data.train_labels)
    extra = [i for i in range(len(data.train_labels)) if i not in set(firsts)][:max(0, n - len(firsts))]
    chosen = (firsts + extra)[:n]
    x = to_tensor(data.train_images[chosen], cfg.pad, cfg.data.pad_value)
    out = Path(out)
    if out.is_dir():
        out = out / "augment_preview.png"
    fig = figure_augmentation(x, cfg.augment, seed=seed, name=cfg.recipe or cfg.model.name,
                              labels=data.train_labels[chosen])
    return save_figure(fig, out)


# ----------------------------------------------------------------------------- a run's figures

def write_run_plots(run_dir: str | os.PathLike, *, model, config: RunConfig, splits, history: list[dict],
                    eval_result: dict, out_dir: str | os.PathLike | None = None,
                    dpi: int = DPI) -> str:
    """Write every figure and table of a finished run into RUN_DIR/plots/ (or `out_dir`);
    return the per-class table as text. eval_result: train.evaluate() on the test set."""
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    name = config.recipe or config.model.name
    y = splits.y_test
    probabilities = softmax(eval_result["logits"])
    matrix = confusion_matrix(y, eval_result["predictions"])
    figures = {
        "metrics.png": lambda: figure_metrics(history, config.train.epochs, name),
        "confusion_matrix.png": lambda: figure_confusion(matrix),
        "confusion_matrix_normalized.png": lambda: figure_confusion(matrix, normalize=True),
        "predictions.png": lambda: figure_predictions(splits.x_test, y, probabilities),
        "misclassified.png": lambda: figure_misclassified(splits.x_test, y, probabilities),
        "weights.png": lambda: figure_weights(model, f"{name}: kernel weights of each layer "
                                                    f"(40 bins on ±0.5, density)"),
        "activations.png": lambda: figure_activations(model, splits.x_test, y),
    }
    if config.augment.enabled and len(splits.x_train):
        figures["augment_preview.png"] = lambda: figure_augmentation(
            splits.train_batch(slice(0, 8)), config.augment, seed=config.train.seed, name=name,
            labels=splits.y_train[:8])
    for filename, make in figures.items():
        save_figure(make(), out_dir / filename, dpi)
    return write_per_class(out_dir, matrix)


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """A run's history.csv as a list of dicts (numbers as float, epoch as int)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row = {k: (float(v) if v not in ("", None) else None) for k, v in raw.items() if k}
                row["epoch"] = int(row["epoch"])
                rows.append(row)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable history ({type(exc).__name__})") from None
    return rows


def _checkpoint_dir(run_dir: Path, config: RunConfig, checkpoint: str) -> Path:
    root = run_dir / "checkpoints"
    path = root / checkpoint
    if not path.is_dir():
        path = root / config.checkpoint.filename.format(epoch=checkpoint)
    if not path.is_dir():
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []
        raise CheckpointError(f"{run_dir}: no checkpoint {checkpoint!r} (have: "
                              f"{', '.join(names) or 'none'})")
    return path


def plots_from_run(run_dir: str | os.PathLike, checkpoint: str | None = None,
                   out_dir: str | os.PathLike | None = None, data=None) -> tuple[Path, str]:
    """Regenerate every figure of a run from its saved weights (or a checkpoint's) and
    history. Writes into RUN_DIR/plots/ (a checkpoint's into RUN_DIR/plots/<checkpoint>/)
    unless `out_dir` is given; returns (folder, per-class text)."""
    from .checkpoint import read_checkpoint_meta
    from .perf import configure_runtime
    from .run import load_model, load_run_config, splits_for
    from .train import evaluate

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if checkpoint:
        directory = _checkpoint_dir(run_dir, config, str(checkpoint))
        history = list(read_checkpoint_meta(directory)["history"])
        default_out = run_dir / "plots" / directory.name
    else:
        history = read_history(run_dir)
        default_out = run_dir / "plots"
    config, model = load_model(run_dir, checkpoint and str(checkpoint))
    configure_runtime(config.train.threads)
    splits = splits_for(config, data)
    result = evaluate(model, splits.x_test, splits.y_test, config.train.eval_batch_size,
                      config.train.precision)
    out = Path(out_dir) if out_dir else default_out
    text = write_run_plots(run_dir, model=model, config=config, splits=splits, history=history,
                           eval_result=result, out_dir=out)
    return out, text


# ----------------------------------------------------------------------------- comparing runs

def _run_labels(run_dirs: list[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


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
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)),
                   fontsize=9)
    fig.suptitle("Learning curves (solid = train, dashed = validation)")
    return fig


def figure_compare_weights(layers_by_run: dict[str, list[tuple[str, torch.Tensor]]]) -> Figure:
    """Weight histograms side by side: one row per run, one column per weighted layer
    (in order), shared axes within a column (40 bins on ±0.5, density, as the seed)."""
    rows = len(layers_by_run)
    cols = max([len(v) for v in layers_by_run.values()] or [1])
    fig = new_figure((3.2 * cols + 0.8, 2.6 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey="col")
    for r, (label, layers) in enumerate(layers_by_run.items()):
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(layers):
                ax.axis("off")
                continue
            name, kernel = layers[c]
            _draw_histogram(ax, kernel, f"{name} ({_layer_kind(kernel)})", color=f"C{r % 10}")
            if r == rows - 1:
                ax.set_xlabel("weight value")
        axes[r, 0].set_ylabel(f"{label}\ndensity", fontsize=9.5)
    fig.suptitle("Kernel weights of each layer, one row per run (40 bins on ±0.5, density)")
    return fig


def compare_runs(run_dirs, out: str | os.PathLike, data=None) -> list[Path]:
    """Write learning_curves.png and weights.png comparing several runs into `out`."""
    from .run import load_model

    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 1:
        raise UserError("compare needs at least one run directory")
    labels = _run_labels(run_dirs)
    histories, weights, planned = {}, {}, 0
    for label, run_dir in zip(labels, run_dirs):
        config, model = load_model(run_dir)
        histories[label] = read_history(run_dir)
        weights[label] = model.named_weight_layers()
        planned = max(planned, config.train.epochs)
    out = Path(out)
    return [save_figure(figure_compare_curves(histories, planned), out / "learning_curves.png"),
            save_figure(figure_compare_weights(weights), out / "weights.png")]
