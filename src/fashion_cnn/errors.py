"""Errors a user can cause. The CLI prints each as one line and exits with its code."""


class UserError(Exception):
    """A problem the user can fix (bad file, bad option, bad config). Message is one line."""

    exit_code = 2


class DataError(UserError):
    """A missing or corrupt dataset file."""


class SpecError(UserError):
    """An invalid model spec, recipe or config."""


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint or run directory."""


def require_module(name: str, command: str, install: str):
    """The module `name`, imported; a UserError naming it and how to install it where it is
    missing (the packages of the optional extras)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{command} needs the {name} package: {install}") from None


class TrainingStopped(Exception):
    """Training stopped early on purpose (signal or non-finite loss); carries the reason."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
