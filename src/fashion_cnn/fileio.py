"""Atomic file writes: a reader (or a resume) never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import SpecError, UserError


def _default_file_mode() -> int:
    """0666 less the process umask: the mode open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def describe_os_error(path: Path, exc: OSError) -> str:
    """One line saying why `path` could not be written, and what to do."""
    if exc.errno == errno.ENOSPC:
        return f"cannot write {path}: the disk is full (free some space and try again)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied (choose another directory)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot write {path}: a part of the path is a file, not a directory"
    return f"cannot write {path}: {exc.strerror or exc}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success fsync it and rename it to `path`.

    >>> with atomic_path("out/history.csv") as tmp:
    ...     tmp.write_text("epoch,loss\\n")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a finished file is as readable as any other
        os.close(fd)
    except OSError as exc:
        raise UserError(describe_os_error(path, exc)) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        fault_hook("before_rename", path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(describe_os_error(path, exc)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fault_hook(point: str, path, until: Callable[[], bool] | None = None) -> None:
    """Test hook: pause at a named point so a test can SIGKILL the process mid-write.

    Active only when FASHION_CNN_PAUSE_AT names the point and FASHION_CNN_PAUSE_PATH (if set)
    occurs in `path`; the process then writes `path` to the marker file
    FASHION_CNN_PAUSE_MARKER and sleeps (up to an hour, or until `until()` is true, so that a
    SIGTERM handler can end the pause). Never set in normal use.
    """
    if os.environ.get("FASHION_CNN_PAUSE_AT") != point:
        return
    if os.environ.get("FASHION_CNN_PAUSE_PATH", "") not in str(path):
        return
    marker = os.environ.get("FASHION_CNN_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(str(path))
    import time

    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline and not (until is not None and until()):
        time.sleep(0.05)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with a function that writes to a given temporary path."""
    with atomic_path(path) as tmp:
        writer(tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; SpecError names the file on any problem."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (invalid UTF-8)") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None


def toml_value(value: Any) -> str:
    """One value in TOML syntax (a JSON string is a valid TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))
