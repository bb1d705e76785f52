"""The command line: parse arguments, call the library, print. Nothing else lives here.

Library errors arrive in library terms (a setting's config key, a file); this module names the
command-line flag of the setting and picks the exit code, one line and no traceback.
"""

from __future__ import annotations

import signal
import sys

from ..errors import Interrupted, NonFiniteLoss, TrainingStopped, UserError

# Library settings (config keys and API arguments) -> the flags that set them.
FLAGS = {"out": "--out", "n": "-n", "train.epochs": "--epochs", "train.lr": "--lr",
         "train.batch_size": "--batch-size", "train.seed": "--seed",
         "train.threads": "--threads", "train.weight_decay": "--weight-decay",
         "train.label_smoothing": "--label-smoothing", "train.optimizer": "--optimizer",
         "train.compile": "--compile", "data.subset": "--subset", "data.data_dir": "--data-dir",
         "data.dataset": "--dataset", "data.strict": "--strict",
         "data.validation_split": "--validation-split",
         "checkpoint.filename": "--checkpoint-name", "checkpoint.every": "--checkpoint-every",
         "checkpoint.keep_last": "--keep-last", "checkpoint.min_delta": "--min-delta",
         "checkpoint.save_best_only": "--save-best-only",
         "checkpoint.early_stopping": "--early-stopping",
         "checkpoint.restore_best": "--restore-best", "trials": "--trials",
         "train.device": "--device", "device": "--device", "train.precision": "--precision",
         "storage": "--storage", "timeout": "--timeout", "seed": "--seed", "layer": "--layer",
         "port": "--port", "max_files": "--max-files", "max_pixels": "--max-pixels",
         "request_seconds": "--request-timeout", "max_connections": "--max-connections",
         "threads": "--threads",
         "log.tensorboard": "--tensorboard", "log.tensorboard_dir": "--tensorboard-dir"}
EXIT_USER_ERROR = 2       # a bad option, file or config
EXIT_NON_FINITE_LOSS = 3  # training diverged
EXIT_STOPPED = 1          # any other stop of training before its end
EXIT_INTERRUPTED = 130    # Ctrl-C outside training: the shell's 128 + SIGINT


def printable(text: str) -> str:
    """`text` with each character that is not printable (a newline, a tab, an escape
    sequence, a byte that was not UTF-8 in a file name) written as a Python string literal
    writes it ("\\n", "\\x1b", "\\udcff"): a file name cannot forge a line of output or a
    row of a table, nor fail to print.

    >>> printable("a\\nb.png")
    'a\\\\nb.png'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    """Run `fashion-cnn` with `argv` (default: sys.argv[1:]); the exit status.

    Everything main does, the parser and the imports of the command's modules (torch among
    them) included, runs inside the handlers: a Ctrl-C at any moment from here on ends in one
    line and EXIT_INTERRUPTED. What runs before main is not covered: the interpreter's own
    start-up and the import of the `fashion_cnn` package and of this module, which import
    nothing heavy (the package's names load on first use)."""
    try:
        from ..fileio import fault_hook

        fault_hook("start_up", "cli.main")  # test hook: a known point before the heavy imports
        return _run_command(argv)
    except KeyboardInterrupt:
        return _interrupted()


def _run_command(argv: list[str] | None) -> int:
    # several processes (torchrun): process 0 speaks
    from ..training.distributed import is_main, shutdown
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        shutdown(succeeded=code == 0)
        return code
    except UserError as exc:
        if is_main():
            print(f"fashion-cnn: error: {_flag_prefix(exc)}{printable(str(exc))}",
                  file=sys.stderr)
        return exit_code(exc)
    except TrainingStopped as exc:
        if is_main():
            print(f"fashion-cnn: {printable(str(exc))}", file=sys.stderr)
        return exit_code(exc)
    except BrokenPipeError:
        return 1


def _interrupted() -> int:
    """Say so in one line; a second Ctrl-C while saying it is ignored (in the main thread),
    so that it cannot end in a traceback instead."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are the main thread's
        previous = None
    try:
        print("fashion-cnn: interrupted", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return EXIT_INTERRUPTED
