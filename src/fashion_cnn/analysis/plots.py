"""A run's figures as files: written at the end of training (RunFigures), redrawn every epoch
(LivePlot), regenerated from saved weights (plots_from_run), compared across runs
(compare_runs), and the augmentation preview of a recipe. This module loads runs and data and
writes files; the figures themselves come from figures.py and image_figures.py.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from .. import fileio
from ..data.fashion_mnist import to_tensor
from ..errors import UserError
from ..training.checkpoint import read_checkpoint_meta
from ..training.config import RunConfig, bind_to_data
from ..training.loop import evaluate, module_device
from ..training.progress import in_notebook
from ..training.recipes import resolve_config
from ..training.reload import load_model, open_run
from ..training.run import data_for, run_name
from ..training.rundir import RunDir
from .gradcam_figure import figure_gradcam
from .figures import (DPI, LIVE_DPI, figure_compare_curves, figure_compare_weights,
                      figure_confusion, figure_metrics, figure_png, figure_weights,
                      named_weight_layers, save_figure)
from .image_figures import (figure_activations, figure_augmentation, figure_misclassified,
                            figure_predictions)
from .metrics import confusion_matrix, one_per_class, softmax
from .tables import write_per_class

RUN_FIGURES = ("metrics.png", "confusion_matrix.png", "confusion_matrix_normalized.png",
               "predictions.png", "misclassified.png", "weights.png", "activations.png",
               "gradcam.png")
RUN_TABLES = ("per_class.csv", "confused_pairs.csv", "confusion_matrix.csv")
LIVE_FIGURE = "metrics.png"  # the figure LivePlot redraws each epoch (also in RUN_FIGURES)


class LivePlot:
    """Training callback: rewrite the learning-curve PNG after every epoch (and in Jupyter,
    update it in place in the cell output). One Figure is reused; one render per epoch serves
    both the file and the notebook. `path` defaults to the run's plots/metrics.png.
    """

    def __init__(self, path: str | os.PathLike | None = None, dpi: int = LIVE_DPI,
                 notebook: bool | None = None):
        self.path = Path(path) if path is not None else None
        self.dpi = dpi
        self.notebook = notebook
        self.fig = None
        self._handle = None
        self.seconds = 0.0  # time spent drawing and writing, for measurements

    def on_train_begin(self, trainer):
        if self.path is None:
            self.path = RunDir(trainer.run_dir).plot(LIVE_FIGURE)
        if self.notebook is None:
            self.notebook = in_notebook()
        if trainer.state.history:  # a resumed run: show what it already has
            self._draw(trainer)

    def on_epoch_end(self, trainer, epoch, logs):
        self._draw(trainer)

    def _draw(self, trainer) -> None:
        start = time.perf_counter()
        cfg = trainer.config
        self.fig = figure_metrics(trainer.state.history, cfg.train.epochs,
                                  run_name(cfg), fig=self.fig)
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


class RunFigures:
    """Training callback: once the run is evaluated, write every figure and table of it
    (write_run_plots) and put the per-class table on the result."""

    def on_run_end(self, trainer, result):
        result.per_class = write_run_plots(
            result.run_dir, model=result.model, config=result.config, splits=trainer.splits,
            history=result.history, eval_result=result.test_result)


def figure_callbacks() -> list:
    """The callbacks that draw a run's figures: LivePlot each epoch, RunFigures at the end."""
    return [LivePlot(), RunFigures()]


def augmentation_preview(recipe_or_config: str | RunConfig, out: str | os.PathLike,
                         n: int = 8, seed: int = 0, data=None) -> Path:
    """Write a grid of original vs augmented training images (one per class first) for a
    recipe's AugmentConfig, enabled or not. `out` is a .png path or a directory."""
    if n < 1:
        raise UserError(f"the number of images must be at least 1, got {n}", setting="n")
    cfg = resolve_config(recipe_or_config)
    data = data_for(cfg, data)
    bind_to_data(cfg, data)  # the model's input size, and mean/std, as a run would have them
    firsts = one_per_class(data.train_labels, len(data.class_names))
    extra = [i for i in range(len(data.train_labels)) if i not in set(firsts)][:max(0, n - len(firsts))]
    chosen = (firsts + extra)[:n]
    mean, std = cfg.stats
    x = to_tensor(data.train_images[chosen], cfg.pad, cfg.data.pad_value, mean=mean, std=std)
    out = Path(out)
    if out.is_dir():
        out = out / "augment_preview.png"
    fig = figure_augmentation(x, cfg.augment, seed=seed, name=run_name(cfg),
                              labels=data.train_labels[chosen], class_names=data.class_names)
    return save_figure(fig, out)


def write_run_plots(run_dir: str | os.PathLike, *, model, config: RunConfig, splits,
                    history: list[dict], eval_result: dict,
                    out_dir: str | os.PathLike | None = None, dpi: int = DPI) -> str:
    """Write every figure and table of a finished run into RUN_DIR/plots/ (or `out_dir`);
    return the per-class table as text. eval_result: training.evaluate() on the test set."""
    out_dir = Path(out_dir) if out_dir else RunDir(run_dir).plots
    name = run_name(config)
    # the figures draw on the CPU: a GPU run's model and splits are copied there (small)
    if module_device(model).type != "cpu":
        model = copy.deepcopy(model).cpu()
    splits = splits.to("cpu")
    y = splits.y_test
    probabilities = softmax(eval_result["logits"])
    names = config.class_names
    matrix = confusion_matrix(y, eval_result["predictions"], len(names))
    figures = {
        "metrics.png": lambda: figure_metrics(history, config.train.epochs, name),
        "confusion_matrix.png": lambda: figure_confusion(matrix, names),
        "confusion_matrix_normalized.png": lambda: figure_confusion(matrix, names, normalize=True),
        "predictions.png": lambda: figure_predictions(splits.x_test, y, probabilities,
                                                      class_names=names),
        "misclassified.png": lambda: figure_misclassified(splits.x_test, y, probabilities,
                                                          class_names=names),
        "weights.png": lambda: figure_weights(model, f"{name}: kernel weights of each layer"),
        "activations.png": lambda: figure_activations(model, splits.x_test, y,
                                                      class_names=names),
        "gradcam.png": lambda: figure_gradcam(model, splits.x_test, y, probabilities,
                                              class_names=names),
    }
    if config.augment.enabled and len(splits.x_train):
        figures["augment_preview.png"] = lambda: figure_augmentation(
            splits.train_batch(slice(0, 8)), config.augment, seed=config.train.seed, name=name,
            labels=splits.y_train[:8], class_names=names)
    for filename, make in figures.items():
        save_figure(make(), out_dir / filename, dpi)
    return write_per_class(out_dir, matrix, names)


def plots_from_run(run_dir: str | os.PathLike, checkpoint: str | None = None,
                   out_dir: str | os.PathLike | None = None, data=None, *,
                   model=None, device=None) -> tuple[Path, str]:
    """Regenerate every figure of a run from its saved weights (or a checkpoint's) and
    history. Writes into RUN_DIR/plots/ (a checkpoint's into RUN_DIR/plots/<checkpoint>/)
    unless `out_dir` is given; returns (folder, per-class text). `model`: a new instance of a
    plain PyTorch module's run's module; `device`: where to compute (training.reload.load_model)."""
    run = RunDir(run_dir)
    config = run.read_config()
    if checkpoint:
        directory = run.find_checkpoint(str(checkpoint), config.checkpoint.filename)
        history = list(read_checkpoint_meta(directory)["history"])
        default_out = run.plot(directory.name)
    else:
        history = run.read_history()
        default_out = run.plots
    config, model, splits = open_run(run.path, checkpoint and str(checkpoint), data,
                                     model=model, device=device)
    result = evaluate(model, splits.x_test, splits.y_test, config.train.eval_batch_size,
                      config.train.precision)
    out = Path(out_dir) if out_dir else default_out
    text = write_run_plots(run.path, model=model, config=config, splits=splits, history=history,
                           eval_result=result, out_dir=out)
    return out, text


def _run_labels(run_dirs: list[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def compare_runs(run_dirs, out: str | os.PathLike, data=None) -> list[Path]:
    """Write learning_curves.png and weights.png comparing several runs into `out`."""
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 1:
        raise UserError("compare needs at least one run directory")
    labels = _run_labels(run_dirs)
    histories, weights, planned = {}, {}, 0
    for label, run_dir in zip(labels, run_dirs):
        config, model = load_model(run_dir)
        histories[label] = RunDir(run_dir).read_history()
        weights[label] = named_weight_layers(model)
        planned = max(planned, config.train.epochs)
    out = Path(out)
    return [save_figure(figure_compare_curves(histories, planned), out / "learning_curves.png"),
            save_figure(figure_compare_weights(weights), out / "weights.png")]
