"""The command line: parse arguments, call the library, print. Nothing else lives here.

Library errors arrive in library terms (a setting's config key, a file); this module names the
command-line flag of the setting and picks the exit code, one line and no traceback.
"""

from __future__ import annotations

import signal
import sys

from ..errors import Interrupted, NonFiniteLoss, TrainingStopped, UserError
from .parser import build_parser

# Library settings (config keys and API arguments) -> the flags that set them.
FLAGS = {"out": "--out", "n": "-n", "train.epochs": "--epochs", "train.lr": "--lr",
         "train.compile": "--compile", "data.subset": "--subset", "data.data_dir": "--data-dir",
         "data.dataset": "--dataset", "data.strict": "--strict",
         "checkpoint.save_best_only": "--save-best-only",
         "checkpoint.early_stopping": "--early-stopping",
         "checkpoint.restore_best": "--restore-best", "trials": "--trials",
         "train.device": "--device", "device": "--device", "train.precision": "--precision"}
EXIT_USER_ERROR = 2       # a bad option, file or config
EXIT_NON_FINITE_LOSS = 3  # training diverged
EXIT_STOPPED = 1          # any other stop of training before its end


def _flag_prefix(exc: UserError) -> str:
    """"--out: " for an error about the setting that --out sets ("" where none applies)."""
    flag = FLAGS.get(exc.setting or "")
    return f"{flag}: " if flag else ""


def exit_code(exc: BaseException) -> int:
    """The process's exit status for a library outcome."""
    if isinstance(exc, Interrupted):  # the shell's convention: 128 + the signal's number
        try:
            return 128 + signal.Signals[exc.signal_name].value
        except KeyError:
            return 130
    if isinstance(exc, NonFiniteLoss):
        return EXIT_NON_FINITE_LOSS
    if isinstance(exc, UserError):
        return EXIT_USER_ERROR
    return EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    """Run `fashion-cnn` with `argv` (default: sys.argv[1:]); the exit status."""
    args = build_parser().parse_args(argv)
    from ..training.distributed import is_main, shutdown  # several processes (torchrun): process 0 speaks

    try:
        code = args.func(args)
        shutdown(succeeded=code == 0)
        return code
    except UserError as exc:
        if is_main():
            print(f"fashion-cnn: error: {_flag_prefix(exc)}{exc}", file=sys.stderr)
        return exit_code(exc)
    except TrainingStopped as exc:
        if is_main():
            print(f"fashion-cnn: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("fashion-cnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
