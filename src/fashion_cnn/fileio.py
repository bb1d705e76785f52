"""Atomic file writes: a reader (or a resume) never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

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


def special_file_kind(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file ("a named pipe (FIFO)",
    ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _refuse_special(path: Path, mode: int, what: str, error: type[UserError]) -> None:
    kind = special_file_kind(mode)
    if kind is not None:
        raise error(f"{path}: is {kind}, not a regular file (expected {what})")


def _read_error(path: Path, exc: OSError, error: type[UserError]) -> UserError:
    if isinstance(exc, FileNotFoundError):
        return error(f"{path}: file not found")
    if isinstance(exc, PermissionError):
        return error(f"{path}: cannot read (permission denied)")
    return error(f"{path}: cannot read ({exc.strerror or exc})")


def _regular_mode(path: str | os.PathLike, what: str, error: type[UserError]) -> None:
    """Refuse `path` unless os.stat says it is a regular file (no Path built: this runs once
    per file of an image folder)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _read_error(Path(path), exc, error) from None
    except ValueError:  # the path holds a NUL character: no file has such a name
        raise error(f"{os.fspath(path)!r}: not a valid file name") from None
    if not stat.S_ISREG(mode):
        _refuse_special(Path(path), mode, what, error)


def require_regular_file(path: str | os.PathLike, what: str,
                         error: type[UserError] = UserError) -> Path:
    """`path` when it is a regular file (a symbolic link to one counts); else one line
    (`error`) saying what it is instead. Reads only the file's metadata, so a FIFO or a device
    is refused at once instead of blocking the reader that would open it.

    >>> require_regular_file("spec.toml", "a TOML file", SpecError)   # doctest: +SKIP
    PosixPath('spec.toml')
    """
    _regular_mode(path, what, error)
    return Path(path)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
    | getattr(os, "O_CLOEXEC", 0)


def open_regular_file(path: str | os.PathLike, what: str,
                      error: type[UserError] = UserError) -> BinaryIO:
    """`path` opened for binary reading when it is a regular file; else one line (`error`).
    Never blocks: the file is checked before it is opened (a device is never opened), opened
    without waiting (O_NONBLOCK, which a FIFO would otherwise need a writer for) and checked
    again on the open descriptor, so a file swapped for a FIFO in between is refused too.

    >>> with open_regular_file("train-images-idx3-ubyte.gz", "an IDX file") as handle:
    ...     head = handle.read(4)                                        # doctest: +SKIP
    """
    _regular_mode(path, what, error)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _read_error(Path(path), exc, error) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            _refuse_special(Path(path), mode, what, error)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, *, what: str = "a file",
                error: type[UserError] = UserError) -> str:
    """The SHA-256 hex digest of a regular file's bytes, read `chunk` bytes at a time. Refused
    as open_regular_file refuses (one line, `error`, saying `what` was expected): a FIFO or a
    device never blocks the reader.

    >>> sha256_file("weights.bin")                                      # doctest: +SKIP
    '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    with open_regular_file(path, what, error) as handle:
        digest = hashlib.sha256()
        try:
            while block := handle.read(chunk):
                digest.update(block)
        except OSError as exc:
            raise _read_error(Path(path), exc, error) from None
        return digest.hexdigest()


def read_toml(path: str | Path, max_bytes: int = 8 * 2**20, max_depth: int = 64) -> dict:
    """A TOML file as a dict; SpecError names the file on any problem. A special file (a FIFO,
    a device) is refused unopened, and so is a file over `max_bytes` or with tables and
    arrays nested more than `max_depth` deep: specs, recipes and configs are a few KiB and a
    few levels, and Python's TOML parser recurses once per level."""
    path = Path(path)
    try:
        with open_regular_file(path, "a TOML file", SpecError) as handle:
            text = handle.read(max_bytes + 1)
    except ValueError:  # the path holds a NUL character: no file has such a name
        raise SpecError(f"{str(path)!r}: not a valid file name") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(text) > max_bytes:
        raise SpecError(f"{path}: larger than {max_bytes // 2**20} MiB; a TOML file here is a "
                        f"spec, recipe or config of a few KiB")
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (invalid UTF-8)") from None
    except ValueError:  # tomllib's one other error: Python reads no integer of > 4300 digits
        raise SpecError(f"{path}: an integer has more digits than can be read") from None
    except RecursionError:
        raise SpecError(f"{path}: tables or arrays nested more than {max_depth} deep") from None
    pending = [(data, 1)]  # a walk without recursion: (table or array, its depth)
    while pending:
        value, depth = pending.pop()
        if depth > max_depth:
            raise SpecError(f"{path}: tables or arrays nested more than {max_depth} deep")
        children = value.values() if isinstance(value, dict) else value
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, (dict, list)))
    return data


def toml_value(value: Any) -> str:
    """One value in TOML syntax (a JSON string is a valid TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a valid TOML basic string, except for two things: JSON writes
        # characters above U+FFFF as surrogate pairs, which TOML refuses (so no ASCII
        # escaping), and TOML refuses a literal DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))
