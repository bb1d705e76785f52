"""One study run in a process of its own: its memory peak is its own (not the largest of the
runs before it, as in one shared process), and a crash or an out-of-memory kill ends that
run, not the study's bookkeeping.

The child is started with multiprocessing's "spawn" (a fresh interpreter: no copy of the
parent's memory, no threads forked mid-flight) in a process group of its own, so that a Ctrl-C
at the terminal reaches the parent alone, which passes SIGINT and SIGTERM on to the child once:
the child stops at a batch boundary and writes its checkpoint, as a run in the foreground
does. Where the system can (Linux), the child gets SIGTERM if the parent dies, so it never
trains on unattended. The child's log lines and its outcome (a status, or a library error
with its fields) come back over a pipe; library errors are raised again in the parent as the
same class with the same message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import traceback

from .. import errors
from ..errors import TrainingStopped

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies


def _die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent exits (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child(connection, function, args: tuple) -> None:
    """The child's entry: run `function(*args, log)` and send its outcome."""
    try:
        os.setpgid(0, 0)  # a group of its own: the terminal's Ctrl-C goes to the parent only
    except OSError:
        pass
    _die_with_parent()

    def log(text: str) -> None:
        connection.send(("log", text))

    try:
        connection.send(("done", function(*args, log)))
    except (errors.UserError, TrainingStopped) as exc:
        connection.send(("error", type(exc).__name__, str(exc), dict(exc.__dict__)))
    except BaseException as exc:  # a bug or a foreign failure: its traceback is the report
        traceback.print_exc()
        connection.send(("crash", errors.first_line(exc)))
    finally:
        connection.close()


def _rebuilt(name: str, message: str, fields: dict) -> BaseException:
    """The library error `name` from fashion_cnn.errors with `message` and `fields`."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, (errors.UserError, TrainingStopped))):
        return RuntimeError(message)
    rebuilt = cls.__new__(cls)
    rebuilt.args = (message,)
    rebuilt.__dict__.update(fields)
    return rebuilt


def run_in_process(function, args: tuple, log, what: str):
    """`function(*args, log)` in a spawned child; its return value (something picklable).

    `function` must be importable by name (a module-level function) and `args` picklable.
    A library error in the child is raised here again; a child killed by a signal, or one
    that ended without a word, is a TrainingStopped naming `what` (its checkpoints are kept)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, function, args), daemon=False)
    forwarded = {}

    def forward(signum, frame):
        if child.pid is not None:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            forwarded[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: signals reach only the main thread anyway
        pass
    outcome = None
    try:
        child.start()
        sender.close()  # the child's end; EOF here once the child has gone
        while True:
            try:
                message = receiver.recv()
            except EOFError:
                break
            if message[0] == "log":
                log(message[1])
            else:
                outcome = message
        child.join()
    finally:
        for sig, previous in forwarded.items():
            signal.signal(sig, previous)
        receiver.close()
    if outcome is not None and outcome[0] == "done":
        return outcome[1]
    if outcome is not None and outcome[0] == "error":
        raise _rebuilt(*outcome[1:])
    if outcome is not None:  # "crash": the child printed its traceback
        raise RuntimeError(f"{what}: its process failed: {outcome[1]}")
    code = child.exitcode
    how = f"exited with status {code}"
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # a signal number this Python has no name for
            how = f"was killed by signal {-code}"
    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
    raise TrainingStopped(f"{what}: its process {how}{hint} before finishing; what it "
                          f"had written is kept")
