"""A run directory: its layout, and every read and write of it, in one place.

    RUN_DIR/
      config.toml          the fully resolved configuration; `fashion-cnn train
                           RUN_DIR/config.toml` repeats the run
      history.csv          one row per finished epoch (HISTORY_COLUMNS)
      metrics.json         test metrics, timings and memory, written when training ends
      model.safetensors    the final weights and buffers
      model.safetensors.sha256  their SHA-256, in `sha256sum` format (`sha256sum -c` checks it);
                           a run written before it existed loads unverified
      checkpoints/<name>/  model.safetensors, state.safetensors, state.json (checkpoint.py)
      plots/               figures and per-class tables (analysis)

>>> run = RunDir("runs/demo")
>>> run.plot("metrics.png").as_posix()
'runs/demo/plots/metrics.png'
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from pathlib import Path

from .. import fileio
from ..errors import CheckpointError, SpecError, UserError
from .config import RunConfig, to_toml
from .names import HISTORY_COLUMNS, check_checkpoint_pattern, checkpoint_name

CONFIG_FILE = "config.toml"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"      # also the weights inside a checkpoint directory
WEIGHTS_CHECKSUM_FILE = WEIGHTS_FILE + ".sha256"  # the final weights' SHA-256 (sha256sum format)
STATE_TENSORS_FILE = "state.safetensors"  # a checkpoint's optimizer moments, RNGs, position
STATE_FILE = "state.json"               # a checkpoint's metadata and checksums
# A checkpoint's state.json holds counts, hyper-parameters and the history (a few hundred
# bytes per epoch); a larger one is not one this package wrote.
STATE_FILE_LIMIT = 64 << 20  # bytes
# history.csv (a row of about 100 bytes per epoch) and metrics.json (a few KiB): a larger
# one is not one this package wrote, and is refused before it is read whole.
RUN_FILE_LIMIT = 64 << 20  # bytes
# Counts in a checkpoint (epochs, steps, positions) are int64 in torch; a larger one is damage.
COUNT_LIMIT = 2 ** 63
CHECKPOINTS_DIR = "checkpoints"
PLOTS_DIR = "plots"

# A checksum file is one line; anything longer is not one (and is not read whole).
CHECKSUM_FILE_LIMIT = 1024  # bytes
_CHECKSUM_LINE = re.compile(rf"([0-9a-f]{{64}}) [ *]{re.escape(WEIGHTS_FILE)}\n?")


def read_limited(path: Path, what: str, limit: int) -> bytes:
    """The content of a run's file: a regular file (opened without blocking, so a FIFO or a
    device is refused, not waited on) of at most `limit` bytes; CheckpointError, one line
    naming the file, otherwise.

    >>> read_limited(Path("runs/demo/metrics.json"), "a run's metrics", 1 << 20)  # doctest: +SKIP
    b'{...}'
    """
    with fileio.open_regular_file(path, what, CheckpointError) as handle:
        try:
            # one byte more than the file holds, at most one more than the limit: enough to
            # tell it is too large, without asking for a buffer of `limit` bytes up front
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(min(limit, size) + 1)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        raise CheckpointError(f"{path}: larger than {size}; not {what} as this package "
                              f"writes it (damaged)")
    return data


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
        self.created: list[Path] = []  # the directories `create` made, deepest first

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
    def weights_checksum_file(self) -> Path:
        return self.path / WEIGHTS_CHECKSUM_FILE

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

    def own_files(self) -> list[Path]:
        """The files this layout names (config, history, metrics, weights and their checksum):
        a command writing elsewhere (export --out) must not replace one of them."""
        return [self.config_file, self.history_file, self.metrics_file, self.weights_file,
                self.weights_checksum_file]

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
            missing, parent = [], run.path.absolute()
            while not os.path.lexists(parent) and parent != parent.parent:
                missing.append(parent)
                parent = parent.parent
            run.path.mkdir(parents=True, exist_ok=True)
            run.created = missing  # deepest first: what discard_unstarted may remove
            probe = run.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(fileio.describe_os_error(run.path, exc), setting="out") from None
        return run

    def discard_unstarted(self) -> bool:
        """Undo `create` and `write_config` for a run that failed before it wrote anything
        else (no history, checkpoint, weights or figure), so that the same output directory
        can be used again; whether it did. Only the config and empty folders are deleted, and
        only directories `create` made are removed: a directory that was there before stays,
        empty as it was. Anything else found there keeps it all."""
        folders = (self.checkpoints, self.plots)
        try:
            for entry in self.path.iterdir():
                if entry == self.config_file:
                    unexpected = entry.is_symlink() or not entry.is_file()
                else:
                    unexpected = (entry not in folders or entry.is_symlink()
                                  or not entry.is_dir() or any(entry.iterdir()))
                if unexpected:
                    return False
            self.config_file.unlink(missing_ok=True)
            for folder in folders:
                if folder.is_dir():
                    folder.rmdir()
            for directory in self.created:  # rmdir refuses a directory that is not empty
                directory.rmdir()
        except OSError:
            return False
        return True

    # ---------------------------------------------------------------- config
    def read_config(self) -> RunConfig:
        """The run's own configuration, as saved with it."""
        from .recipes import load_config  # recipes reads zoo files; a run reads its own only

        if not self.config_file.exists():
            raise CheckpointError(f"{self}: not a run directory (no {CONFIG_FILE})")
        fileio.require_regular_file(self.config_file, "a run's config", CheckpointError)
        try:
            return load_config(str(self.config_file))
        except SpecError as exc:  # a damaged or hand-edited config.toml: the run's file
            message = str(exc)
            if not message.startswith(str(self.config_file)):
                message = f"{self.config_file}: {message}"
            raise CheckpointError(message) from None

    def write_config(self, cfg: RunConfig) -> None:
        fileio.write_text(self.config_file, to_toml(cfg))

    # ---------------------------------------------------------------- metrics and history
    def read_metrics(self) -> dict:
        if not self.metrics_file.exists():
            raise CheckpointError(f"{self.metrics_file}: file not found (the run has not "
                                  f"finished)")
        data = read_limited(self.metrics_file, "a run's metrics", RUN_FILE_LIMIT)
        try:
            metrics = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{self.metrics_file}: corrupt JSON") from None
        if not isinstance(metrics, dict):
            raise CheckpointError(f"{self.metrics_file}: corrupt (not a JSON object)")
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        fileio.write_json(self.metrics_file, metrics)

    def read_history(self) -> list[dict]:
        """history.csv as a list of dicts (numbers as float, epoch as int); [] before the first
        epoch."""
        if not self.history_file.exists():
            return []
        data = read_limited(self.history_file, "a run's history", RUN_FILE_LIMIT)
        rows = []
        try:
            text = io.StringIO(data.decode("utf-8"), newline="")  # as open(newline="") reads
            for raw in csv.DictReader(text):
                row = {k: (float(v) if v not in ("", None) else None)
                       for k, v in raw.items() if k}
                row["epoch"] = int(row["epoch"])
                rows.append(row)
        except (KeyError, ValueError, TypeError, OverflowError, csv.Error) as exc:
            raise CheckpointError(f"{self.history_file}: unreadable history "
                                  f"({type(exc).__name__})") from None
        return rows

    # ---------------------------------------------------------------- the final weights' checksum
    def write_weights_checksum(self, digest: str) -> None:
        """model.safetensors.sha256, as `sha256sum model.safetensors` writes it."""
        fileio.write_text(self.weights_checksum_file, f"{digest}  {WEIGHTS_FILE}\n")

    def read_weights_checksum(self) -> str | None:
        """The recorded SHA-256 of the final weights; None for a run written before the
        checksum was (its weights load unverified). CheckpointError if the file is damaged."""
        path = self.weights_checksum_file
        if not os.path.lexists(path):
            return None
        data = read_limited(path, "a checksum file", CHECKSUM_FILE_LIMIT)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: not a SHA-256 line for {WEIGHTS_FILE} (damaged: "
                                  f"not ASCII)") from None
        found = _CHECKSUM_LINE.fullmatch(text)
        if found is None:
            raise CheckpointError(f"{path}: not a SHA-256 line for {WEIGHTS_FILE} (damaged)")
        return found.group(1)

    def remove_weights_checksum(self) -> None:
        try:
            self.weights_checksum_file.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(fileio.describe_os_error(self.weights_checksum_file, exc)) from None

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

    @staticmethod
    def checkpoint_position(directory: Path) -> tuple[str, int, int] | None:
        """(kind, epoch, step) as a checkpoint's state.json says, unverified (checkpoint.py
        verifies); None where it cannot be read or is not what a checkpoint writes."""
        path = directory / STATE_FILE
        try:
            meta = json.loads(read_limited(path, f"a checkpoint's {STATE_FILE}",
                                           STATE_FILE_LIMIT).decode("utf-8"))
            kind, epoch, step = meta["kind"], meta["epoch"], meta["step"]
        except (CheckpointError, ValueError, KeyError, TypeError, RecursionError):
            return None
        if not (isinstance(kind, str) and all(type(v) is int and 0 <= v < COUNT_LIMIT
                                              for v in (epoch, step))):
            return None
        return kind, epoch, step

    def find_checkpoint(self, name: str, pattern: str) -> Path:
        """A checkpoint by its name ("best", "model1_3") or by its epoch ("3": the end-of-epoch
        checkpoint of epoch 3, found by what its state.json says, so whatever the run's name
        `pattern` is: "model1_{epoch}", "{epoch:02d}-{val_loss:.2f}"); CheckpointError lists
        those there are."""
        if not name.startswith(".") and "/" not in name and self.checkpoint(name).is_dir():
            return self.checkpoint(name)
        if name.isascii() and name.isdigit() and len(name) <= len(str(COUNT_LIMIT)):
            epoch = int(name)
            try:  # the name the pattern gives, if the epoch alone fills it (read even if corrupt)
                if check_checkpoint_pattern(pattern) <= {"epoch"}:
                    named = self.checkpoint(checkpoint_name(pattern, epoch))
                    if named.is_dir():
                        return named
            except SpecError:
                pass
            preference = {"epoch": 0, "best": 1}  # the same state: prefer the epoch's own
            found = sorted((preference[position[0]], path.name, path)
                           for path in map(self.checkpoint, self.checkpoint_names())
                           if (position := self.checkpoint_position(path)) is not None
                           and position[0] in preference and position[1] == epoch)
            if found:
                return found[0][2]
        raise CheckpointError(f"{self}: no checkpoint {name!r} (have: "
                              f"{', '.join(self.checkpoint_names()) or 'none'})")
