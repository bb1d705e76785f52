"""Training with figures: `train` and `resume` as in training.run, plus the live learning
curves every epoch and every figure and table of the run at the end (plots=False: none), and
TensorBoard's event files where the run's `log.tensorboard` asks for them (tensorboard.py).
These are the package root's fashion_cnn.train and fashion_cnn.resume.

>>> result = train("seed-model1", epochs=1, out="runs/demo")     # doctest: +SKIP
>>> sorted(p.name for p in fc.RunDir(result.run_dir).plots.glob("*.png"))[:2]  # doctest: +SKIP
['activations.png', 'confusion_matrix.png']
"""

from __future__ import annotations

import os

from ..training import run as runs
from ..training.run import RunResult
from .plots import figure_callbacks
from .tensorboard import TensorBoardLogger


def train(name_or_config=None, out: str | os.PathLike | None = None, *, plots: bool = True,
          callbacks=(), tensorboard: bool | str | os.PathLike | None = None,
          **options) -> RunResult:
    """training.run.train with the run's figures (see the module docstring). `model=` trains
    any torch.nn.Module with the recipe's settings (docs/pytorch-modules.md). `tensorboard`:
    True logs for TensorBoard into RUN_DIR/tensorboard, a folder logs there, False not at
    all, None as the recipe's [log] says (it sets log.tensorboard and log.tensorboard_dir)."""
    if tensorboard is not None:
        options["log.tensorboard"] = tensorboard is not False
        if not isinstance(tensorboard, bool):
            options["log.tensorboard_dir"] = os.fspath(tensorboard)
    return runs.train(name_or_config, out,
                      callbacks=_with_figures(plots, callbacks, TensorBoardLogger()), **options)


def resume(run_dir: str | os.PathLike, *, plots: bool = True, callbacks=(),
           tensorboard: bool | str | os.PathLike | None = None, **options) -> RunResult:
    """training.run.resume with the run's figures (see the module docstring); a run of a
    plain PyTorch module needs `model=`, a new instance of it. `tensorboard`: None logs as
    the run's [log] says; True logs there (or into RUN_DIR/tensorboard), a path logs there,
    False not at all."""
    if tensorboard is None or isinstance(tensorboard, bool):
        logger = TensorBoardLogger(enabled=tensorboard)
    else:
        logger = TensorBoardLogger(tensorboard, enabled=True)
    return runs.resume(run_dir, callbacks=_with_figures(plots, callbacks, logger), **options)


def _with_figures(plots: bool, callbacks, logger: TensorBoardLogger) -> list:
    figures = figure_callbacks() if plots else []
    return [*figures, logger, *callbacks]
