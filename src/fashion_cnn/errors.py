"""Errors a user can cause, in library terms. The CLI (cli.py) turns each into one line, names
the command-line flag of the setting it concerns, and picks the exit code.

A caller tests for an outcome by class, never by number:

>>> try:
...     raise NonFiniteLoss("non-finite loss in epoch 3")
... except TrainingStopped as stop:
...     type(stop).__name__
'NonFiniteLoss'
"""


class UserError(Exception):
    """A problem the user can fix (bad file, bad option, bad config). Message is one line.

    `setting` names the setting concerned in library terms, where there is one: a config key
    ("train.lr") or an argument of the Python API ("out"); the CLI shows its flag.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class DataError(UserError):
    """A missing or corrupt dataset file."""


class SpecError(UserError):
    """An invalid model spec, recipe or config."""


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint or run directory."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as part of one line: its first line, cut to `limit` characters,
    or the exception's class name where the message is empty (a foreign library's error,
    quoted inside a UserError).

    >>> first_line(ValueError("bad header\\n  at byte 16"))
    'bad header'
    >>> first_line(MemoryError())
    'MemoryError'
    """
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def require_module(name: str, command: str, install: str):
    """The module `name`, imported; a UserError naming it and how to install it where it is
    missing (the packages of the optional extras)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{command} needs the {name} package: {install}") from None


class TrainingStopped(Exception):
    """Training stopped before its last epoch on purpose; the message says why and what was
    kept."""

    def extended(self, more: str) -> "TrainingStopped":
        """The same outcome (same class and fields) with `more` added to its message."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)  # the outcome's fields (signal_name)
        clone.args = (f"{self}{more}",)
        return clone


class Interrupted(TrainingStopped):
    """Stopped by a signal (SIGINT, SIGTERM) at a batch boundary; `signal_name` says which."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite: the settings diverge (a lower learning rate may help)."""
