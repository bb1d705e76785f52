"""TensorBoard logging of a run, laid out as Keras' TensorBoard callback lays it out, so that
`tensorboard --logdir` over one run, a study or a search shows comparable curves:

    LOG_DIR/train/       epoch_loss, epoch_accuracy, epoch_penalty, epoch_lr, epoch_seconds
                         (step = the 1-based epoch, as in history.csv); histograms of every
                         layer's parameters and their gradients each epoch; the model graph
    LOG_DIR/validation/  epoch_loss, epoch_accuracy (overlaid on train's in the same chart)
    LOG_DIR/batch/       batch_loss and batch_accuracy every `log.tensorboard_every`
                         optimizer steps (step = the optimizer step; the epoch's running
                         means, as Keras logs them)
    LOG_DIR/             the resolved config.toml as text; once the run is evaluated, the
                         confusion matrix and the prediction grid as images and the run's
                         settings with its final metrics in the HParams tab

LOG_DIR is `log.tensorboard_dir`, or RUN_DIR/tensorboard. It is on with `log.tensorboard`
(`--tensorboard`). A study's or search's runs each write their own under one directory.
"""

from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, first_line
from ..models.cpu_pass import is_accelerated, plain
from ..training.config import to_toml
from ..training.rundir import RunDir
from ..training.run import run_name

INSTALL_HINT = "pip install 'fashion-cnn[tensorboard]'"
# Settings shown as hyperparameters (HParams tab): what tells runs of a study or search apart.
HPARAM_SKIP = {("train", "device"), ("train", "cpu_kernels"), ("train", "deterministic"),
               ("train", "threads"), ("train", "compile"), ("train", "eval_batch_size")}
HPARAM_METRICS = ("test_accuracy", "test_loss", "best_val_accuracy", "train_seconds")


def summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter; UserError naming the extra where the
    tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}",
                        setting="log.tensorboard") from None
    return SummaryWriter


def log_dir_of(config, run_dir) -> Path:
    """Where a run's event files go: log.tensorboard_dir, else RUN_DIR/tensorboard."""
    if config.log.tensorboard_dir:
        return Path(config.log.tensorboard_dir)
    if run_dir is None:
        raise UserError("TensorBoard logging without a run directory needs "
                        "log.tensorboard_dir", setting="log.tensorboard_dir")
    return RunDir(run_dir).path / "tensorboard"


def parameter_tags(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(tag, parameter) for every trainable parameter: a spec model's by its Keras layer name
    ("conv2d_1/kernel", "batch_normalization/gamma"), any other module's by its qualified name
    ("features/0/weight")."""
    names = getattr(model, "layer_names", None)
    tags = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if names is not None and parts[0] == "layers" and parts[1].isdigit():
            layer, kind = names[int(parts[1])], parts[-1]
            if layer.startswith("batch_normalization"):
                kind = {"weight": "gamma", "bias": "beta"}.get(kind, kind)
            else:
                kind = {"weight": "kernel"}.get(kind, kind)
            tags.append((f"{layer}/{kind}", param))
        else:
            tags.append(("/".join(parts), param))
    return tags


def hparams_of(config) -> dict:
    """The run's settings as flat hyperparameters (numbers, strings, booleans)."""
    out = {"recipe": config.recipe or run_name(config),
           "model": config.model.name if config.model is not None else config.module.qualname}
    for section in ("train", "augment", "data"):
        for key, value in vars(getattr(config, section)).items():
            if (section, key) in HPARAM_SKIP or isinstance(value, (list, dict)):
                continue
            if section == "data" and key not in ("validation_split", "subset", "dataset"):
                continue
            out[f"{section}.{key}"] = value
    return out


def _figure_array(fig) -> np.ndarray:
    """A matplotlib figure as an (H, W, 3) uint8 image."""
    from PIL import Image

    from .figures import figure_png

    return np.asarray(Image.open(io.BytesIO(figure_png(fig, dpi=80))).convert("RGB"))


class TensorBoardLogger:
    """Training callback writing the event files of the module docstring.

    enabled: None follows the run's `log.tensorboard`; True or False decide whatever it says.
    log_dir: where (default: the run's log.tensorboard_dir, else RUN_DIR/tensorboard).
    """

    def __init__(self, log_dir: str | Path | None = None, enabled: bool | None = None):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.enabled = enabled
        self.writers: dict[str, object] = {}

    @property
    def active(self) -> bool:
        return bool(self.writers)

    def on_train_begin(self, trainer):
        cfg = trainer.config
        wanted = cfg.log.tensorboard if self.enabled is None else self.enabled
        if trainer.rank != 0 or not wanted:
            return
        writer_class = summary_writer_class()
        root = self.log_dir or log_dir_of(cfg, trainer.run_dir)
        state = trainer.state
        # A resumed run logs on from its checkpoint: whatever was logged after it (before a
        # crash) is purged (TensorBoard drops a run's events from `purge_step` on). The step
        # axes differ (epochs, optimizer steps), so batch figures have a run of their own.
        fresh = state.step == 0 and not state.history
        epochs_from = None if fresh else len(state.history) + 1
        steps_from = None if fresh else state.step + 1
        self.writers = {
            "": writer_class(str(root), purge_step=epochs_from),
            "train": writer_class(str(root / "train"), purge_step=epochs_from),
            "validation": writer_class(str(root / "validation"), purge_step=epochs_from),
            "batch": writer_class(str(root / "batch"), purge_step=steps_from)}
        self.every = cfg.log.tensorboard_every
        if fresh:  # once per run, not again on resume
            self.writers[""].add_text("config", _code_block(to_toml(cfg)), 0)
            self._add_graph(trainer)

    def _add_graph(self, trainer) -> None:
        """The model's graph, traced on a plain CPU copy (the CPU pass's C kernels are not
        traceable, and tracing must not touch the training model or its generators)."""
        model = copy.deepcopy(trainer.model).cpu()
        if is_accelerated(model):
            plain(model)
        example = trainer.splits.x_train[:1].cpu().float()
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # add_graph traces with torch.jit.trace, which torch now marks deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                model.eval()
                self.writers["train"].add_graph(model, example)
        except Exception as exc:  # a graph is a nicety: say so and go on
            print(f"warning: TensorBoard: the model graph could not be traced "
                  f"({first_line(exc)})", file=sys.stderr)

    def on_batch_end(self, trainer, batch, steps):
        if not self.active or not self.every or trainer.state.step % self.every:
            return
        loss_sum, _, correct, seen = trainer.state.sums.tolist()  # a read every `every` steps
        if seen:
            writer = self.writers["batch"]
            writer.add_scalar("batch_loss", loss_sum / seen, trainer.state.step)
            writer.add_scalar("batch_accuracy", correct / seen, trainer.state.step)

    def on_epoch_end(self, trainer, epoch, logs):
        if not self.active:
            return
        step = epoch + 1
        train, validation = self.writers["train"], self.writers["validation"]
        for key in ("loss", "accuracy", "penalty", "lr", "seconds"):
            if key in logs:
                train.add_scalar(f"epoch_{key}", logs[key], step)
        for key in ("loss", "accuracy"):
            if f"val_{key}" in logs:
                validation.add_scalar(f"epoch_{key}", logs[f"val_{key}"], step)
        if trainer.config.log.histograms:
            for tag, param in parameter_tags(trainer.model):
                train.add_histogram(tag, param.detach().float().cpu(), step)
                if param.grad is not None:
                    train.add_histogram(f"{tag}/gradient", param.grad.detach().float().cpu(),
                                        step)
        for writer in self.writers.values():
            writer.flush()  # a live `tensorboard` sees each epoch as it ends

    def finish(self, config, metrics: dict, step: int) -> None:
        """The HParams entry of a run that is not evaluated on the test set (a search's
        trial: its validation objective), then close the files."""
        if self.active:
            self._add_hparams(config, metrics, step)
            self._close()

    def on_run_end(self, trainer, result):
        if not self.active:
            return
        from .figures import figure_confusion
        from .image_figures import figure_predictions
        from .metrics import confusion_matrix, softmax

        root, step = self.writers[""], len(result.history)
        test, names = result.test_result, result.config.class_names
        splits = trainer.splits.to("cpu")
        matrix = confusion_matrix(splits.y_test, test["predictions"], len(names))
        root.add_image("confusion_matrix", _figure_array(figure_confusion(matrix, names)),
                       step, dataformats="HWC")
        root.add_image("predictions", _figure_array(figure_predictions(
            splits.x_test, splits.y_test, softmax(test["logits"]), class_names=names)),
            step, dataformats="HWC")
        self._add_hparams(result.config, {k: result.metrics.get(k) for k in HPARAM_METRICS},
                          step)
        self._close()

    def _add_hparams(self, config, metrics: dict, step: int) -> None:
        """The run's settings and final metrics (None: left out), for the HParams tab, in this
        run's own directory (torch's add_hparams would open a sub-run of its own)."""
        from torch.utils.tensorboard.summary import hparams

        values = {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None}
        root = self.writers[""]
        for summary in hparams(hparams_of(config), values):
            root.file_writer.add_summary(summary)
        for tag, value in values.items():
            root.add_scalar(tag, value, step)

    def _close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}

    def on_interrupt(self, trainer):
        self._close()

    def on_train_end(self, trainer):
        if self.active:  # flushed now; closed once the run is evaluated (on_run_end)
            for writer in self.writers.values():
                writer.flush()


def _code_block(text: str) -> str:
    """Text shown verbatim by TensorBoard's Markdown renderer (indented as code)."""
    return "\n".join("    " + line for line in text.splitlines())
