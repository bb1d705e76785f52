"""The training progress display, as Keras draws it: a bar per epoch with step/steps, elapsed
time and ETA, ms/step and the running loss and accuracy, which ends as the epoch's summary line.

Where the output goes decides how it is drawn (output_mode):
- a terminal: tqdm's bar, redrawn in place;
- a Jupyter notebook: tqdm's widget (tqdm.notebook, with ipywidgets; without it, tqdm's text
  bar), beside LivePlot's learning curves, which update in the same cell;
- anything else (CI, a pipe, a log file): one plain line per epoch, nothing in between.

The bar reads the loop's running sums (TrainState.sums, on the training device) at most every
`refresh` seconds, never per batch: on a GPU each read waits for the device.
"""

from __future__ import annotations

import sys
import time

# Seconds between two redraws of the bar (and two reads of the running sums).
REFRESH_SECONDS = 0.5
# Keras' layout: "Epoch 3/10 844/1875 [=====>....] 0:02<0:02 - 2.4ms/step - loss: 0.41 - ..."
BAR_WIDTH = 28
BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} [{bar:%d}] {elapsed}<{remaining}{metrics}" % BAR_WIDTH
# tqdm.notebook draws the bar as a widget where the format says {bar} (no width)
NOTEBOOK_FORMAT = "{desc} {n_fmt}/{total_fmt} {bar} {elapsed}<{remaining}{metrics}"
SUMMARY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython already imported and running a kernel)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def output_mode(stream) -> str:
    """"notebook" (stdout inside a Jupyter kernel), "terminal" (a tty) or "plain"."""
    if stream is sys.stdout and in_notebook():
        return "notebook"
    return "terminal" if hasattr(stream, "isatty") and stream.isatty() else "plain"


def _bar_class(mode: str):
    """A tqdm class whose format has a `{metrics}` field (the text after the bar)."""
    from tqdm import std

    base = std.tqdm
    if mode == "notebook":
        import importlib.util

        # tqdm.notebook draws with ipywidgets; without it, tqdm's text bar, which Jupyter
        # redraws in place too
        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm import notebook
            base = notebook.tqdm

    class KerasBar(base):
        metrics = ""

        @property
        def format_dict(self):
            return {**super().format_dict, "metrics": self.metrics}

    return KerasBar


def _metric_parts(values: dict) -> list[str]:
    """["loss: 0.4123", "accuracy: 0.8512", ...]: the figures of SUMMARY_KEYS that `values`
    holds, and the penalty where there is one."""
    parts = [f"{key}: {values[key]:.4f}" for key in SUMMARY_KEYS if key in values]
    if values.get("penalty"):
        parts.append(f"penalty: {values['penalty']:.4f}")
    return parts


def epoch_line(epoch: int, epochs: int, logs: dict) -> str:
    """The plain per-epoch line: "Epoch 3/10 - 2.4s - loss: 0.4123 - accuracy: ..."."""
    return " - ".join([f"Epoch {epoch + 1}/{epochs}", f"{logs['seconds']:.1f}s",
                       *_metric_parts(logs)])


def _metrics_text(ms_per_step: float | None, values: dict) -> str:
    """The text after the bar: " - 2.4ms/step - loss: 0.4123 - ..."."""
    parts = [f"{ms_per_step:.1f}ms/step"] if ms_per_step is not None else []
    return "".join(f" - {p}" for p in parts + _metric_parts(values))


class ProgressBar:
    """Training callback: the progress display of the module docstring.

    `mode` forces a display ("terminal", "notebook", "plain"); by default it follows
    output_mode(stream). `refresh`: seconds between redraws.
    """

    def __init__(self, stream=None, mode: str | None = None, refresh: float = REFRESH_SECONDS):
        self.stream = stream or sys.stdout
        self.mode = mode or output_mode(self.stream)
        self.refresh = refresh
        self._bar = None

    def on_epoch_begin(self, trainer, epoch):
        if self.mode == "plain":
            return
        state = trainer.state
        self._steps_done = state.batch_in_epoch  # a resumed epoch starts part-way
        self._start = time.perf_counter()
        self._last = self._start
        self._bar = _bar_class(self.mode)(
            total=trainer.steps_per_epoch, initial=state.batch_in_epoch,
            desc=f"Epoch {epoch + 1}/{trainer.config.train.epochs}",
            bar_format=NOTEBOOK_FORMAT if self.mode == "notebook" else BAR_FORMAT,
            file=self.stream, mininterval=0, leave=True, dynamic_ncols=True,
            ascii=".=" if self.mode == "terminal" else None)

    def on_batch_end(self, trainer, batch, steps):
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self._last < self.refresh:
            return
        self._last = now
        loss_sum, penalty_sum, correct, seen = trainer.state.sums.tolist()  # the one read
        running = ({"loss": loss_sum / seen, "accuracy": correct / seen,
                    "penalty": penalty_sum / seen} if seen else {})
        done = batch - self._steps_done
        self._bar.metrics = _metrics_text(1000 * (now - self._start) / done if done else None,
                                          running)
        self._bar.update(batch - self._bar.n)

    def on_epoch_end(self, trainer, epoch, logs):
        if self._bar is None:
            self.stream.write(epoch_line(epoch, trainer.config.train.epochs, logs) + "\n")
            self.stream.flush()
            return
        # the epoch's figures, validation included; logs["seconds"] is its training time
        # (resumed part-way: all of it, before and after), so ms/step counts training alone
        steps = trainer.steps_per_epoch
        metrics = _metrics_text(1000 * logs["seconds"] / steps, logs)
        bar, self._bar = self._bar, None
        if self.mode == "notebook":  # the widget keeps the whole line
            bar.metrics = metrics
            bar.update(steps - bar.n)
            bar.close()
            return
        # a terminal: the bar's line gives way to the summary, which may wrap but is never
        # cut to the terminal's width as a bar line is
        bar.leave = False
        bar.close()
        self.stream.write(f"{bar.desc} {steps}/{steps} [{'=' * BAR_WIDTH}] "
                          f"{logs['seconds']:.0f}s{metrics}\n")
        self.stream.flush()

    def on_interrupt(self, trainer):
        if self._bar is not None:  # end the bar's line before the stop message
            self._bar.close()
            self._bar = None

    def on_train_end(self, trainer):
        reason = getattr(trainer, "stop_reason", None)
        if reason:
            self.stream.write(reason + "\n")
            self.stream.flush()
