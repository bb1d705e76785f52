"""A run directory: its layout, and every read and write of it, in one place.

    RUN_DIR/
      config.toml          the fully resolved configuration; `fashion-cnn train
                           RUN_DIR/config.toml` repeats the run
      history.csv          one row per finished epoch (HISTORY_COLUMNS)
      metrics.json         test metrics, timings and memory, written when training ends
      model.safetensors    the final weights and buffers
      checkpoints/<name>/  model.safetensors, state.safetensors, state.json (checkpoint.py)
      plots/               figures and per-class tables (analysis)

>>> run = RunDir("runs/demo")
>>> run.plot("metrics.png").as_posix()
'runs/demo/plots/metrics.png'
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from .. import fileio
from ..errors import CheckpointError, UserError
from .config import RunConfig, to_toml

CONFIG_FILE = "config.toml"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"      # also the weights inside a checkpoint directory
STATE_TENSORS_FILE = "state.safetensors"  # a checkpoint's optimizer moments, RNGs, position
STATE_FILE = "state.json"               # a checkpoint's metadata and checksums
CHECKPOINTS_DIR = "checkpoints"
PLOTS_DIR = "plots"

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "penalty", "lr", "seconds"]


def history_csv(history: list[dict]) -> str:
    """The history as CSV text: HISTORY_COLUMNS, one row per epoch, empty where unknown."""
    lines = [",".join(HISTORY_COLUMNS)]
    for logs in history:
        lines.append(",".join("" if logs.get(c) is None else (str(logs[c]) if c == "epoch"
                              else f"{logs[c]:.6g}" if c == "lr" else f"{logs[c]:.6f}")
                              for c in HISTORY_COLUMNS))
    return "\n".join(lines) + "\n"


class RunDir:
    """The files of one run, by role. Nothing outside this class spells their names.

    Paths are properties (`config_file`, `history_file`, `metrics_file`, `weights_file`,
    `checkpoints`, `plots`); `read_*` and `write_*` do the I/O, atomically for writes, with
    library errors that name the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------- paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    def plot(self, name: str) -> Path:
        """A figure or table of the run: plots/<name>."""
        return self.plots / name

    def is_run(self) -> bool:
        """Whether the directory holds a run (its config.toml)."""
        return self.config_file.is_file()

    def is_finished(self) -> bool:
        """Whether training ended and the run was evaluated (metrics.json is there)."""
        return self.metrics_file.is_file()

    # ---------------------------------------------------------------- creating
    @staticmethod
    def default_path(name: str) -> Path:
        """runs/<name>-<date>-<time>, with -2, -3, ... where that exists already."""
        base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path

    @classmethod
    def create(cls, path: str | os.PathLike | None, name: str) -> "RunDir":
        """A new, empty, writable run directory at `path` (or runs/<name>-<time>); UserError
        where it exists with files in it (nothing is ever overwritten) or cannot be written."""
        run = cls(path if path else cls.default_path(name))
        try:
            if run.path.exists() and not run.path.is_dir():
                raise UserError(f"{run}: is a file, not a directory; choose another output "
                                f"directory", setting="out")
            if run.path.exists() and any(run.path.iterdir()):
                raise UserError(f"{run}: already exists and is not empty; choose another output "
                                f"directory, or continue it with `fashion-cnn resume {run}`",
                                setting="out")
            run.path.mkdir(parents=True, exist_ok=True)
            probe = run.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(fileio.describe_os_error(run.path, exc), setting="out") from None
        return run

    # ---------------------------------------------------------------- config
    def read_config(self) -> RunConfig:
        """The run's own configuration, as saved with it."""
        from .recipes import load_config  # recipes reads zoo files; a run reads its own only

        if not self.is_run():
            raise CheckpointError(f"{self}: not a run directory (no {CONFIG_FILE})")
        return load_config(str(self.config_file))

    def write_config(self, cfg: RunConfig) -> None:
        fileio.write_text(self.config_file, to_toml(cfg))

    # ---------------------------------------------------------------- metrics and history
    def read_metrics(self) -> dict:
        try:
            return json.loads(self.metrics_file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.metrics_file}: file not found (the run has not "
                                  f"finished)") from None
        except ValueError:
            raise CheckpointError(f"{self.metrics_file}: corrupt JSON") from None

    def write_metrics(self, metrics: dict) -> None:
        fileio.write_json(self.metrics_file, metrics)

    def read_history(self) -> list[dict]:
        """history.csv as a list of dicts (numbers as float, epoch as int); [] before the first
        epoch."""
        if not self.history_file.is_file():
            return []
        rows = []
        try:
            with open(self.history_file, newline="") as f:
                for raw in csv.DictReader(f):
                    row = {k: (float(v) if v not in ("", None) else None)
                           for k, v in raw.items() if k}
                    row["epoch"] = int(row["epoch"])
                    rows.append(row)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.history_file}: unreadable history "
                                  f"({type(exc).__name__})") from None
        return rows

    def write_history(self, history: list[dict]) -> None:
        fileio.write_text(self.history_file, history_csv(history))

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, name: str) -> Path:
        """checkpoints/<name> (whether it exists or not)."""
        return self.checkpoints / name

    def checkpoint_names(self) -> list[str]:
        """The names of the checkpoint directories, sorted (hidden temporaries left out)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def find_checkpoint(self, name: str, pattern: str) -> Path:
        """A checkpoint by its name ("best", "model1_3") or by its epoch ("3", through the
        run's name `pattern`, e.g. "model1_{epoch}"); CheckpointError lists those there are."""
        candidates = [name]
        if name.isdigit():
            candidates.append(pattern.format(epoch=int(name)))
        for candidate in candidates:
            if self.checkpoint(candidate).is_dir():
                return self.checkpoint(candidate)
        raise CheckpointError(f"{self}: no checkpoint {name!r} (have: "
                              f"{', '.join(self.checkpoint_names()) or 'none'})")
