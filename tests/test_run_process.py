"""A study run in a process of its own (analysis/run_process.py): its answer and log lines
come back, library errors come back as themselves, a killed child is a clear stop, signals are
passed on once; and a whole `fashion-cnn study` stopped with Ctrl-C (or with its parent
killed) leaves each run's checkpoint and continues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashion_cnn.analysis.run_process import run_in_process
from fashion_cnn.errors import DataError, Interrupted, TrainingStopped
from fashion_cnn.training import checkpoint

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_real_data = pytest.mark.skipif(
    not any((REAL_DIR / n).exists() for n in ("train-images-idx3-ubyte.gz",
                                              "train-images-idx3-ubyte")),
    reason="the real Fashion-MNIST files are not installed")


# Module-level: the spawned child imports them by name.
def answer_with_pid(value, log):
    log(f"working on {value}")
    return value * 2, os.getpid()


def raise_data_error(log):
    raise DataError("images.npz: no 'x_train' array", setting="data.data_dir")


def raise_interrupted(log):
    raise Interrupted("stopped by SIGTERM at epoch 2, batch 3 of 9", "SIGTERM")


def kill_myself(log):
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for_sigterm(log):
    """Waits until SIGTERM arrives; says when it is ready for it, and how many it got."""
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    log("ready")
    deadline = time.monotonic() + 60
    while not received and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a second, duplicated signal would arrive within this
    return len(received), os.getpgrp() == os.getpid()


def test_the_answer_and_the_log_lines_come_back_from_another_process():
    lines = []
    assert run_in_process(answer_with_pid, (21,), lines.append, "run r")[0] == 42
    value, pid = run_in_process(answer_with_pid, (1,), lines.append, "run r")
    assert pid != os.getpid() and value == 2
    assert lines == ["working on 21", "working on 1"]


def test_library_errors_come_back_as_the_same_class_with_their_fields():
    with pytest.raises(DataError, match="no 'x_train' array") as caught:
        run_in_process(raise_data_error, (), print, "run r")
    assert caught.value.setting == "data.data_dir"
    with pytest.raises(Interrupted) as stopped:
        run_in_process(raise_interrupted, (), print, "run r")
    assert stopped.value.signal_name == "SIGTERM"
    assert str(stopped.value) == "stopped by SIGTERM at epoch 2, batch 3 of 9"


def test_a_killed_child_is_a_stop_that_names_the_run_and_the_signal():
    with pytest.raises(TrainingStopped, match=r"run seed-model3: its process was killed by "
                                              r"SIGKILL \(out of memory\?\)"):
        run_in_process(kill_myself, (), print, "run seed-model3")


def test_sigterm_to_the_parent_reaches_the_child_once():
    def on_log(line):
        if line == "ready":
            os.kill(os.getpid(), signal.SIGTERM)  # handled by run_in_process: passed on

    before = signal.getsignal(signal.SIGTERM)
    received, own_group = run_in_process(wait_for_sigterm, (), on_log, "run r")
    assert received == 1 and own_group
    assert signal.getsignal(signal.SIGTERM) is before  # the parent's handler is put back


# ------------------------------------------------------------------------ a whole study

def _study(tmp_path: Path) -> tuple[list[str], Path]:
    (tmp_path / "s.toml").write_text("[[runs]]\nrecipe = 'seed-model1'\n")
    out = tmp_path / "out"
    return [sys.executable, "-m", "fashion_cnn", "study", str(tmp_path / "s.toml"), "--out",
            str(out), "--subset", "600", "--epochs-scale", "0.08", "--quiet"], out


def _start_paused(args: list[str], tmp_path: Path) -> subprocess.Popen:
    marker = tmp_path / "paused"
    env = dict(os.environ, FASHION_CNN_PAUSE_AT="batch", FASHION_CNN_PAUSE_PATH="epoch=1,batch=3;",
               FASHION_CNN_PAUSE_MARKER=str(marker))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the study ended before pausing: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the study never paused")
        time.sleep(0.05)
    return proc


@needs_real_data
def test_ctrl_c_stops_the_run_in_its_process_with_a_checkpoint_then_the_study_continues(tmp_path):
    args, out = _study(tmp_path)
    proc = _start_paused(args, tmp_path)
    proc.send_signal(signal.SIGINT)  # to the study's process only, as a terminal's Ctrl-C is
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT at epoch 1, batch 3" in err
    assert "continue the whole study with" in err
    assert [p.name for p in checkpoint.list_checkpoints(out / "seed-model1")] == [
        "interrupted_e1_b3"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and (out / "seed-model1" / "metrics.json").is_file()


@needs_real_data
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_study_stops_its_run_rather_than_leaving_it_training(tmp_path):
    args, out = _study(tmp_path)
    proc = _start_paused(args, tmp_path)
    proc.kill()  # SIGKILL: the parent has no say; the kernel sends the child SIGTERM
    proc.wait()
    deadline = time.monotonic() + 60
    while not checkpoint.list_checkpoints(out / "seed-model1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.name for p in checkpoint.list_checkpoints(out / "seed-model1")] == [
        "interrupted_e1_b3"]
