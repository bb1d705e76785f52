"""Callbacks: plain objects that define only the hooks they need (see Trainer's docstring)."""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

from . import fileio
from .checkpoint import list_checkpoints, save_checkpoint

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "penalty", "lr", "seconds"]


def monitor_mode(monitor: str) -> str:
    """'max' for accuracies, 'min' for losses (Keras' mode='auto')."""
    return "max" if "acc" in monitor else "min"


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Keras' MonitorCallback test: better than `best` by more than `min_delta`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def best_epoch(history: list[dict], monitor: str, min_delta: float = 0.0) -> tuple[int | None, float | None]:
    """(index, value) of the best epoch so far by `monitor`; derived from history, not stored."""
    mode, best, index = monitor_mode(monitor), None, None
    for i, logs in enumerate(history):
        if improved(logs.get(monitor), best, mode, min_delta):
            best, index = logs[monitor], i
    return index, best


def history_csv(history: list[dict]) -> str:
    lines = [",".join(HISTORY_COLUMNS)]
    for logs in history:
        lines.append(",".join("" if logs.get(c) is None else (str(logs[c]) if c == "epoch"
                              else f"{logs[c]:.6g}" if c == "lr" else f"{logs[c]:.6f}")
                              for c in HISTORY_COLUMNS))
    return "\n".join(lines) + "\n"


class HistoryWriter:
    """Rewrites RUN_DIR/history.csv atomically after every epoch."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "history.csv"

    def on_epoch_end(self, trainer, epoch, logs):
        fileio.write_text(self.path, history_csv(trainer.state.history))


class ProgressBar:
    """A bar with ETA on a terminal; one plain line per epoch otherwise (CI, log files)."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self._last = 0.0

    def on_epoch_begin(self, trainer, epoch):
        self._start = time.perf_counter()

    def on_batch_end(self, trainer, batch, steps):
        now = time.perf_counter()
        if not self.tty or (now - self._last < 0.2 and batch < steps):
            return
        self._last = now
        done = int(self.width * batch / steps)
        eta = (now - self._start) / batch * (steps - batch)
        self.stream.write(f"\rEpoch {trainer.state.epoch + 1}/{trainer.config.train.epochs} "
                          f"[{'=' * done}{'.' * (self.width - done)}] {batch}/{steps} "
                          f"ETA {eta:4.0f}s ")
        self.stream.flush()

    def on_epoch_end(self, trainer, epoch, logs):
        parts = [f"Epoch {epoch + 1}/{trainer.config.train.epochs}", f"{logs['seconds']:.1f}s"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if key in logs:
                parts.append(f"{key}: {logs[key]:.4f}")
        if logs.get("penalty"):
            parts.append(f"penalty: {logs['penalty']:.4f}")
        self.stream.write(("\r" if self.tty else "") + " - ".join(parts).ljust(self.width + 40) + "\n")
        self.stream.flush()


class ModelCheckpoint:
    """Keras' ModelCheckpoint with full training state, `best` kept alongside.

    Writes `checkpoints/<filename with {epoch}>` every `every` epochs (or only on improvement
    with save_best_only), keeps the newest `keep_last`, and maintains `checkpoints/best`
    (the epoch with the best `monitor`). On interrupt it writes a mid-epoch checkpoint.
    """

    def __init__(self, run_dir: Path, every=1, filename="epoch_{epoch}", save_best_only=False,
                 monitor="val_loss", keep_last=0, min_delta=0.0):
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.filename, self.save_best_only = every, filename, save_best_only
        self.monitor, self.mode, self.keep_last = monitor, monitor_mode(monitor), keep_last
        self.min_delta = min_delta

    def path_for(self, epoch: int) -> Path:
        return self.root / self.filename.format(epoch=epoch)

    def on_epoch_end(self, trainer, epoch, logs):
        history = trainer.state.history
        prior_index, prior_best = best_epoch(history[:-1], self.monitor)
        is_best = improved(logs.get(self.monitor), prior_best, self.mode)
        if is_best:
            save_checkpoint(trainer, self.root / "best")
        if self.save_best_only:
            if is_best:
                save_checkpoint(trainer, self.path_for(epoch + 1))
        elif self.every and (epoch + 1) % self.every == 0:
            save_checkpoint(trainer, self.path_for(epoch + 1))
        self._prune()

    def on_interrupt(self, trainer):
        s = trainer.state
        save_checkpoint(trainer, self.root / f"interrupted_e{s.epoch + 1}_b{s.batch_in_epoch}")

    def _prune(self):
        if not self.keep_last:
            return
        for path in list_checkpoints(self.root.parent)[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


class EarlyStopping:
    """Stop after `patience` epochs without improvement of `monitor` (Keras' semantics).

    With restore_best, the weights of the best epoch are restored at the end of training,
    from the run's `best` checkpoint (so this survives a resume too).
    """

    def __init__(self, patience: int, monitor="val_loss", min_delta=0.0, restore_best=False,
                 run_dir: Path | None = None):
        self.patience, self.monitor, self.min_delta = patience, monitor, min_delta
        self.restore_best, self.run_dir = restore_best, run_dir
        self.stopped_epoch: int | None = None
        self._best_weights = None

    def on_epoch_end(self, trainer, epoch, logs):
        index, _ = best_epoch(trainer.state.history, self.monitor, self.min_delta)
        if self.restore_best and index == len(trainer.state.history) - 1:
            self._best_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        waited = len(trainer.state.history) - 1 - (index if index is not None else -1)
        if waited >= self.patience:
            trainer.stop_training = True
            self.stopped_epoch = epoch + 1

    def on_train_end(self, trainer):
        if not self.restore_best:
            return
        if self._best_weights is not None:
            trainer.model.load_state_dict(self._best_weights)
        elif self.run_dir is not None and (Path(self.run_dir) / "checkpoints" / "best").is_dir():
            from .checkpoint import load_weights
            load_weights(trainer.model, Path(self.run_dir) / "checkpoints" / "best" / "model.safetensors")
