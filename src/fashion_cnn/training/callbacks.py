"""Callbacks: plain objects that define only the hooks they need (see Trainer's docstring)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import CheckpointError, UserError
from .checkpoint import (load_weights, read_checkpoint_meta, remove_checkpoint, save_checkpoint,
                         scan_checkpoints)
from .names import check_checkpoint_pattern, checkpoint_name
from .rundir import WEIGHTS_FILE, RunDir


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


class HistoryWriter:
    """Rewrites the run's history (RunDir.write_history) atomically after every epoch."""

    def __init__(self, run_dir: str | Path | RunDir):
        self.run_dir = RunDir(run_dir)

    def on_epoch_end(self, trainer, epoch, logs):
        self.run_dir.write_history(trainer.state.history)


def check_options(cfg) -> None:
    """Refuse checkpoint settings that cannot work, before a run directory is made."""
    c = cfg.checkpoint
    validation_fields = sorted(f for f in check_checkpoint_pattern(c.filename)
                               if f.startswith("val_"))
    if validation_fields and cfg.data.validation_split == 0:
        raise UserError(f"checkpoint.filename {c.filename!r} uses {{{validation_fields[0]}}}, "
                        f"but there is no validation split (set data.validation_split above 0)",
                        setting="checkpoint.filename")
    if c.monitor.startswith("val_") and cfg.data.validation_split == 0:
        for wanted, key in ((c.save_best_only, "checkpoint.save_best_only"),
                            (c.early_stopping, "checkpoint.early_stopping"),
                            (c.restore_best, "checkpoint.restore_best")):
            if wanted:
                raise UserError(f"{key} monitors {c.monitor}, but there is no validation split "
                                f"(set data.validation_split above 0, or checkpoint.monitor = "
                                f"\"loss\")", setting=key)


def _monitor_missing(trainer, monitor: str) -> bool:
    return monitor.startswith("val_") and len(trainer.splits.x_val) == 0


def _needs_validation(trainer, monitor: str, what: str) -> None:
    if _monitor_missing(trainer, monitor):
        raise UserError(f"{what} monitors {monitor}, but there is no validation split "
                        f"(set data.validation_split above 0, or checkpoint.monitor = \"loss\")")


class ModelCheckpoint:
    """Keras' ModelCheckpoint with the full training state, and a `best` checkpoint alongside.

    Writes `checkpoints/<filename>` every `every` epochs, or only when `monitor` improves with
    save_best_only; the name is filled as Keras fills its file path ({epoch} counting from 1,
    the epoch's logs, format specs: "model1_{epoch:02d}", "{epoch:02d}-{val_loss:.2f}"; see
    names.checkpoint_name); keeps the newest `keep_last` of those (0 = all);
    maintains `checkpoints/best` when `keep_best`. On SIGINT/SIGTERM (on_interrupt) it writes
    `checkpoints/interrupted_e<epoch>_b<batch>`, removed once a later epoch checkpoint exists.
    """

    def __init__(self, run_dir: Path, every=1, filename="epoch_{epoch}", save_best_only=False,
                 monitor="val_loss", keep_last=0, min_delta=0.0, keep_best=True):
        self.root = RunDir(run_dir).checkpoints
        self.every, self.filename, self.save_best_only = every, filename, save_best_only
        self.monitor, self.mode, self.keep_last = monitor, monitor_mode(monitor), keep_last
        self.min_delta, self.keep_best = min_delta, keep_best
        check_checkpoint_pattern(filename)

    def path_for(self, epoch: int, logs: dict | None = None) -> Path:
        """The checkpoint for 1-based `epoch` and its logs: "model1_{epoch}" ->
        checkpoints/model1_3; "{epoch:02d}-{val_loss:.2f}" -> checkpoints/03-0.31."""
        return self.root / checkpoint_name(self.filename, epoch, logs)

    def on_train_begin(self, trainer):
        if self.save_best_only:
            _needs_validation(trainer, self.monitor, "checkpoint.save_best_only")
        elif _monitor_missing(trainer, self.monitor):
            self.keep_best = False  # nothing to rank epochs by: no `best` checkpoint
        # Resumed from `best` (a crash came between writing it and the epoch checkpoint, or the
        # epoch checkpoint is corrupt): write the epoch checkpoint that is due now. The state is
        # the one `best` holds, so it equals what the uninterrupted run wrote.
        s = trainer.state
        if s.epoch and s.batch_in_epoch == 0 and self._is_best_and_due(s.history)[1]:
            path = self.path_for(s.epoch, s.history[-1])
            try:
                meta = read_checkpoint_meta(path)
                intact = (meta["epoch"], meta["step"]) == (s.epoch, s.step)
            except CheckpointError:
                intact = False
            if not intact:
                trainer.last_checkpoint = save_checkpoint(trainer, path, kind="epoch")
                self._prune()

    def _is_best_and_due(self, history: list[dict]) -> tuple[bool, bool]:
        """For the last epoch of `history`: (improved on all before it, epoch checkpoint due)."""
        _, prior_best = best_epoch(history[:-1], self.monitor, self.min_delta)
        is_best = improved(history[-1].get(self.monitor), prior_best, self.mode, self.min_delta)
        if self.save_best_only:
            return is_best, is_best
        return is_best, bool(self.every) and len(history) % self.every == 0

    def on_epoch_end(self, trainer, epoch, logs):
        is_best, due = self._is_best_and_due(trainer.state.history)
        # `best` goes first: a crash before the epoch checkpoint then resumes from `best` or
        # the previous epoch, and both lead to the same files. The other order could leave a
        # `best` older than the true best behind a newer epoch checkpoint.
        if is_best and self.keep_best:
            trainer.last_checkpoint = save_checkpoint(trainer, self.root / "best", kind="best")
        if due:
            trainer.last_checkpoint = save_checkpoint(trainer, self.path_for(epoch + 1, logs),
                                                      kind="epoch")
            self._prune()

    def on_interrupt(self, trainer):
        s = trainer.state
        path = self.root / f"interrupted_e{s.epoch + 1}_b{s.batch_in_epoch}"
        save_checkpoint(trainer, path, kind="interrupt")
        trainer.interrupt_checkpoint = path

    def _prune(self):
        """Drop interrupt checkpoints older than the newest epoch checkpoint, then all but the
        newest `keep_last` epoch checkpoints. `best` and unreadable ones are left alone."""
        infos = [i for i in scan_checkpoints(self.root.parent) if i.kind in ("epoch", "interrupt")]
        epochs = [i for i in infos if i.kind == "epoch"]
        if not epochs:
            return
        newest = max(i.position for i in epochs)
        doomed = [i for i in infos if i.kind == "interrupt" and i.position < newest]
        if self.keep_last:
            doomed += sorted(epochs, key=lambda i: i.position)[:-self.keep_last]
        for info in doomed:
            remove_checkpoint(info.path)


class EarlyStopping:
    """Stop after `patience` epochs without improvement of `monitor` (Keras' semantics).

    The decision is derived from the history, so a resumed run stops where an uninterrupted
    one would have. With restore_best, the best epoch's weights are restored at the end of
    training (as Keras 3 does), from memory or, after a resume, from its checkpoint.
    """

    def __init__(self, patience: int, monitor="val_loss", min_delta=0.0, restore_best=False,
                 run_dir: Path | None = None):
        self.patience, self.monitor, self.min_delta = patience, monitor, min_delta
        self.restore_best, self.run_dir = restore_best, run_dir
        self.stopped_epoch: int | None = None
        self.restored_epoch: int | None = None
        self._best_weights = None
        self._best_index: int | None = None

    def on_train_begin(self, trainer):
        _needs_validation(trainer, self.monitor,
                          "checkpoint.early_stopping or checkpoint.restore_best")
        self._check(trainer)

    def on_epoch_end(self, trainer, epoch, logs):
        index, _ = best_epoch(trainer.state.history, self.monitor, self.min_delta)
        if self.restore_best and index == len(trainer.state.history) - 1:
            self._best_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            self._best_index = index
        self._check(trainer)

    def _check(self, trainer):
        history = trainer.state.history
        if not history:
            return
        index, _ = best_epoch(history, self.monitor, self.min_delta)
        waited = len(history) - 1 - (index if index is not None else -1)
        if waited >= self.patience:
            trainer.stop_training = True
            self.stopped_epoch = len(history)
            trainer.stop_reason = (f"Early stopping: no improvement of {self.monitor} for "
                                   f"{waited} epochs after epoch {index + 1 if index is not None else '-'}; "
                                   f"stopped after epoch {len(history)}")

    def on_train_end(self, trainer):
        if not self.restore_best:
            return
        index, _ = best_epoch(trainer.state.history, self.monitor, self.min_delta)
        if index is None:
            return
        if self._best_weights is not None and self._best_index == index:
            trainer.model.load_state_dict(self._best_weights)
        else:
            path = self._checkpoint_of(index + 1)
            if path is None:
                print(f"warning: cannot restore the weights of the best epoch ({index + 1}): no "
                      f"intact checkpoint of it is left; keeping the last epoch's", file=sys.stderr)
                return
            load_weights(trainer.model, path / WEIGHTS_FILE)
        self.restored_epoch = index + 1

    def _checkpoint_of(self, epoch: int) -> Path | None:
        """A verified end-of-epoch checkpoint of 1-based `epoch`: `best` first, then any."""
        if self.run_dir is None:
            return None
        infos = scan_checkpoints(self.run_dir)
        infos.sort(key=lambda i: i.kind != "best")
        for info in infos:
            if info.kind in ("best", "epoch") and info.epoch == epoch:
                try:
                    read_checkpoint_meta(info.path)
                except CheckpointError:
                    continue
                return info.path
        return None
