"""Checkpoints, exact resume and fault tolerance.

Processes are killed (SIGKILL, SIGTERM, SIGINT) at chosen points through the test hook
FASHION_CNN_PAUSE_AT / FASHION_CNN_PAUSE_PATH / FASHION_CNN_PAUSE_MARKER (fileio.fault_hook):
the process pauses there and writes the marker, the test sends the signal, resumes, and compares
the final weights tensor for tensor with an uninterrupted run of the same settings.
Runs are tiny (600 images, 15 batches per epoch) and use one thread, so results are bit-exact.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fashion_cnn.training import checkpoint, checkpoint_meta
from fashion_cnn import cli
from fashion_cnn import fileio
import fashion_cnn as fc
from fashion_cnn.training.callbacks import EarlyStopping
from fashion_cnn.errors import (CheckpointError, Interrupted, NonFiniteLoss, TrainingStopped,
                                UserError)

DATA = "/usr/share/datasets/fashion-mnist"
SMALL = {"subset": 600, "batch_size": 32, "threads": 1}
# dense, 4 epochs: val_loss improves in epochs 1-3, not in 4.
PLAIN = ["dense", "--subset", "600", "--batch-size", "32", "--threads", "1", "--epochs", "4"]
AUGMENT_SETS = {"augment.enabled": True, "augment.rotation_range": 10,
                "augment.width_shift_range": 0.1}
# model2 has Dropout: the global RNG, the augmentation RNG and the shuffle position all matter.
AUGMENTED = ["model2", "--subset", "600", "--batch-size", "32", "--threads", "1", "--epochs", "3",
             *[arg for key, value in AUGMENT_SETS.items()
               for arg in ("--set", f"{key}={str(value).lower()}")]]
QUIET = ["--quiet", "--no-plots"]
HOOK_VARS = ("FASHION_CNN_PAUSE_AT", "FASHION_CNN_PAUSE_PATH", "FASHION_CNN_PAUSE_MARKER")


@pytest.fixture(scope="module")
def references(real_data, tmp_path_factory):
    """Uninterrupted runs to compare against (in-process: same numbers as a subprocess)."""
    root = tmp_path_factory.mktemp("references")
    threads = torch.get_num_threads()
    kwargs = dict(data=real_data, progress=False, plots=False, **SMALL)
    out = {"plain": fc.train("dense", root / "plain", epochs=4, **kwargs).run_dir,
           "augmented": fc.train("model2", root / "augmented", epochs=3, **kwargs,
                                  **AUGMENT_SETS).run_dir}
    torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------ helpers

def _env(**hook) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in HOOK_VARS}
    env.update(hook)
    return env


def fashion_cnn(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_cnn", *args], capture_output=True,
                          text=True, env=env or _env(), timeout=300)


def start_paused(args: list[str], tmp_path: Path, point: str, where: str) -> subprocess.Popen:
    """Start `fashion-cnn ARGS` and return once it pauses at `point` (path containing `where`)."""
    marker = tmp_path / f"paused-{point}-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "fashion_cnn", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(FASHION_CNN_PAUSE_AT=point, FASHION_CNN_PAUSE_PATH=where,
                                     FASHION_CNN_PAUSE_MARKER=str(marker)))
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{args} ended (rc {proc.returncode}) before pausing at {point} "
                        f"{where}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{args} never paused at {point} {where}")
        time.sleep(0.05)
    assert where in marker.read_text()
    return proc


def kill_at(args: list[str], tmp_path: Path, point: str, where: str) -> None:
    proc = start_paused(args, tmp_path, point, where)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def history_rows(run_dir: Path) -> list[dict]:
    """history.csv without the wall-clock column."""
    with open(run_dir / "history.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def exact_history(directory: Path) -> list[dict]:
    """A checkpoint's history at full float precision, without the wall-clock column."""
    meta = json.loads((directory / "state.json").read_text())
    return [{k: v for k, v in h.items() if k != "seconds"} for h in meta["history"]]


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs: {path_a} vs {path_b}"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert_same_weights(run_dir / "model.safetensors", reference / "model.safetensors")
    assert history_rows(run_dir) == history_rows(reference)
    last = checkpoint.newest_intact(reference)[0].name
    assert exact_history(run_dir / "checkpoints" / last) == exact_history(reference / "checkpoints" / last)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert (ma["test_loss"], ma["test_correct"]) == (mb["test_loss"], mb["test_correct"])


def no_leftovers(run_dir: Path) -> list[str]:
    hidden = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    return hidden + [p.name for p in run_dir.glob(".*.tmp")]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("fashion-cnn: error:")]


def main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process (fast); returns (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_run(reference: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(reference, target)
    return target


# ------------------------------------------------------------------------------ SIGKILL

def test_sigint_then_sigkill_at_every_kind_of_point_then_resume_is_bit_identical(references, tmp_path):
    """One run stopped seven times in a row, each time resumed: Ctrl-C mid-epoch, then SIGKILL
    during a checkpoint write, while replacing `best`, before a checkpoint's rename, between
    epochs and after the final weights; the end result equals the uninterrupted run exactly."""
    r = tmp_path / "r"
    resume = ["resume", str(r), *QUIET]
    # SIGINT (Ctrl-C): stop at the batch boundary, checkpoint mid-epoch, say how to go on.
    proc = start_paused(["train", *PLAIN, "--data-dir", DATA, "--out", str(r), *QUIET], tmp_path,
                        "batch", "epoch=1,batch=7;")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "stopped by SIGINT at epoch 1, batch 7 of 15" in err
    assert err.rstrip().endswith(f"continue with: fashion-cnn resume {r}")
    assert [p.name for p in checkpoint.list_checkpoints(r)] == ["interrupted_e1_b7"]

    kill_at(resume, tmp_path, "mid_checkpoint", "epoch_1")   # half a checkpoint in a temporary
    names = sorted(p.name for p in (r / "checkpoints").iterdir())
    assert "epoch_1" not in names and any(n.startswith(".epoch_1.") for n in names)

    kill_at(resume, tmp_path, "checkpoint_swap", "best")     # old `best` moved aside, new not in
    names = sorted(p.name for p in (r / "checkpoints").iterdir())
    assert "best" not in names and ".best.old" in names

    kill_at(resume, tmp_path, "before_rename", "epoch_3")    # complete temporary, not renamed
    assert (r / "checkpoints" / "epoch_2").is_dir() and not (r / "checkpoints" / "epoch_3").exists()

    kill_at(resume, tmp_path, "batch", "epoch=4,batch=0;")   # between epochs 3 and 4
    assert (r / "checkpoints" / "epoch_3").is_dir()

    kill_at(resume, tmp_path, "before_rename", "metrics.json")  # training done, metrics not
    assert (r / "model.safetensors").is_file() and not (r / "metrics.json").exists()

    done = fashion_cnn(*resume)
    assert done.returncode == 0, done.stderr
    assert_same_run(r, references["plain"])
    assert no_leftovers(r) == []
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == [
        "best", "epoch_1", "epoch_2", "epoch_3", "epoch_4"]


def test_augmented_dropout_run_killed_mid_epoch_then_sigterm_resumes_bit_identical(references, tmp_path):
    r = tmp_path / "r"
    kill_at(["train", *AUGMENTED, "--data-dir", DATA, "--out", str(r), *QUIET], tmp_path,
            "batch", "epoch=2,batch=5;")
    # SIGTERM while resumed: stop at the batch boundary, checkpoint mid-epoch, say how to go on.
    proc = start_paused(["resume", str(r), *QUIET], tmp_path, "batch", "epoch=3,batch=3;")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert "stopped by SIGTERM at epoch 3, batch 3 of 15" in err
    assert err.rstrip().endswith(f"continue with: fashion-cnn resume {r}")
    interrupted = r / "checkpoints" / "interrupted_e3_b3"
    meta = checkpoint.read_checkpoint_meta(interrupted)
    assert (meta["kind"], meta["epoch"], meta["batch_in_epoch"]) == ("interrupt", 2, 3)
    assert not (r / "model.safetensors").exists()

    done = fashion_cnn("resume", str(r), *QUIET)
    assert done.returncode == 0, done.stderr
    assert_same_run(r, references["augmented"])
    assert not interrupted.exists()  # superseded by epoch_3, then removed
    assert no_leftovers(r) == []


# ------------------------------------------------------------------------------ corruption

def _resume_in_process(capsys, run_dir: Path) -> tuple[int, str]:
    for name in ("model.safetensors", "metrics.json"):
        (run_dir / name).unlink(missing_ok=True)  # make the resume produce them again
    code, _, err = main(capsys, "resume", run_dir, *QUIET)
    return code, err


@pytest.mark.parametrize("damage", ["truncate-model", "flip-state-tensors", "flip-state-json",
                                    "remove-state-json"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(references, tmp_path, capsys, damage):
    r = copy_run(references["plain"], tmp_path)
    newest = r / "checkpoints" / "epoch_4"
    if damage == "truncate-model":
        bad = newest / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[:1000])
    elif damage == "flip-state-tensors":
        bad = newest / "state.safetensors"
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif damage == "flip-state-json":  # still valid JSON: only the checksum can tell
        bad = newest / "state.json"
        text = bad.read_text()
        bad.write_text(text.replace('"step": 60', '"step": 61'))
        assert bad.read_text() != text
    else:
        bad = newest / "state.json"
        bad.unlink()
    code, err = _resume_in_process(capsys, r)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad) in warnings[0], err
    assert_same_run(r, references["plain"])
    checkpoint.read_checkpoint_meta(newest)  # rewritten intact by the resumed epoch 4


def test_resume_without_any_checkpoint_starts_over_with_a_warning(references, tmp_path, capsys):
    r = copy_run(references["plain"], tmp_path)  # as if killed in epoch 1
    shutil.rmtree(r / "checkpoints")
    (r / "history.csv").unlink()
    code, err = _resume_in_process(capsys, r)
    assert code == 0 and "no checkpoint yet; starting from epoch 1" in err
    assert_same_run(r, references["plain"])


def test_all_checkpoints_corrupt_is_an_error_not_a_silent_restart(references, tmp_path, capsys):
    r = copy_run(references["plain"], tmp_path)
    for directory in (r / "checkpoints").iterdir():
        (directory / "state.json").write_text("{")
    code, err = _resume_in_process(capsys, r)
    assert code == 2 and len(error_lines(err)) == 1
    assert "no intact checkpoint" in err


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reseal(directory: Path) -> None:
    """Recompute a checkpoint's checksums, as an attacker could: the loader itself must refuse."""
    meta = json.loads((directory / "state.json").read_text())
    meta["sha256"] = {name: fileio.sha256_file(directory / name)
                      for name in checkpoint_meta.TENSOR_FILES}
    meta["checksum"] = checkpoint_meta.meta_checksum(meta)
    (directory / "state.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("target", ["run-model", "checkpoint-model", "checkpoint-state",
                                    "checkpoint-json", "config"])
def test_pickle_payload_is_never_executed(references, tmp_path, capsys, target):
    r = copy_run(references["plain"], tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload works: it does create the marker when unpickled
    assert marker.exists()
    marker.unlink()
    for directory in (r / "checkpoints").iterdir():  # leave only the tampered checkpoint
        if directory.name != "epoch_4":
            shutil.rmtree(directory)
    ckpt = r / "checkpoints" / "epoch_4"
    if target == "run-model":
        (r / "model.safetensors").write_bytes(payload)
        commands = [("evaluate", r)]
    elif target == "config":
        (r / "config.toml").write_bytes(payload)
        commands = [("evaluate", r), ("resume", r, *QUIET)]
    else:
        name = {"checkpoint-model": "model.safetensors", "checkpoint-state": "state.safetensors",
                "checkpoint-json": "state.json"}[target]
        (ckpt / name).write_bytes(payload)
        if name != "state.json":
            _reseal(ckpt)
        commands = [("resume", r, *QUIET)]
        if name != "state.safetensors":  # evaluate reads only the weights
            commands.append(("evaluate", r, "--checkpoint", "4"))
    for command in commands:
        code, _, err = main(capsys, *command)
        assert code == 2, (command, err)
        lines = error_lines(err)
        assert len(lines) == 1, err
        assert not marker.exists(), f"{command} executed the payload"


def test_crafted_state_json_with_wrong_types_gives_a_checkpoint_error(references, tmp_path):
    r = copy_run(references["plain"], tmp_path)
    directory = r / "checkpoints" / "epoch_4"
    meta = json.loads((directory / "state.json").read_text())
    for key, value in [("sha256", ["model.safetensors"]), ("epoch", "4"), ("history", {}),
                       ("optimizer", None), ("sha256", {"../../config.toml": "0"})]:
        crafted = {**meta, key: value}
        crafted["checksum"] = checkpoint_meta.meta_checksum(crafted)
        (directory / "state.json").write_text(json.dumps(crafted))
        with pytest.raises(CheckpointError, match="invalid checkpoint"):
            checkpoint.read_checkpoint_meta(directory)


# ------------------------------------------------------------------------------ options

def test_save_best_only_writes_only_improving_epochs_with_the_seed_pattern(real_data, tmp_path, capsys):
    r = tmp_path / "r"
    # lr 0.01: val_loss improves in epochs 1-3, then gets worse in epochs 4 and 5.
    code, _, err = main(capsys, "train", "dense", "--subset", 600, "--batch-size", 32,
                        "--threads", 1, "--epochs", 5, "--lr", 0.01, "--save-best-only",
                        "--checkpoint-name", "model1_{epoch}", "--out", r, *QUIET)
    assert code == 0, err
    losses = [float(row["val_loss"]) for row in history_rows(r)]
    improving = [i + 1 for i, v in enumerate(losses) if v < min(losses[:i], default=float("inf"))]
    assert improving == [1, 2, 3]  # the test needs epochs that do not improve
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == [
        "best", "model1_1", "model1_2", "model1_3"]
    assert checkpoint.read_checkpoint_meta(r / "checkpoints" / "best")["epoch"] == 3
    assert_same_weights(r / "checkpoints" / "best" / "model.safetensors",
                        r / "checkpoints" / "model1_3" / "model.safetensors")
    code, out, err = main(capsys, "evaluate", r, "--checkpoint", 2)  # {epoch} name by number
    assert code == 0 and "Test loss" in out, err


def test_checkpoint_options_that_cannot_work_are_refused(real_data, tmp_path, capsys):
    base = ["train", "dense", "--subset", 300, "--batch-size", 32, "--threads", 1, "--epochs", 1]
    for extra, words in [(["--validation-split", 0, "--save-best-only"], "no validation split"),
                         (["--validation-split", 0, "--early-stopping", 2], "no validation split"),
                         (["--checkpoint-name", "m_{epoch}_{x}"], "only {epoch}"),
                         (["--checkpoint-name", "best", "--save-best-only"], "taken"),
                         (["--out", tmp_path / "r", "--resume", tmp_path / "other"], "different run")]:
        code, _, err = main(capsys, *base, *extra, "--out", tmp_path / "x", *QUIET)
        assert code == 2 and words in error_lines(err)[0], (extra, err)
        assert not (tmp_path / "x").exists()  # refused before anything was written
    # without a validation split, plain checkpoints still work (there is just no `best`)
    code, _, err = main(capsys, *base, "--validation-split", 0, "--out", tmp_path / "noval", *QUIET)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "noval" / "checkpoints").iterdir()) == ["epoch_1"]


def test_keep_last_keeps_the_newest_epoch_checkpoints_and_best(real_data, tmp_path, capsys):
    r = tmp_path / "r"
    code, _, err = main(capsys, "train", *PLAIN, "--keep-last", 2, "--out", r, *QUIET)
    assert code == 0, err
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["best", "epoch_3", "epoch_4"]
    assert checkpoint.read_checkpoint_meta(r / "checkpoints" / "best")["epoch"] == 3


def test_early_stopping_restores_the_best_epoch_and_a_resume_stops_there_too(real_data, tmp_path, capsys):
    r = tmp_path / "r"
    code, out, err = main(capsys, "train", "dense", "--subset", 600, "--batch-size", 32,
                          "--threads", 1, "--epochs", 10, "--lr", 0.01, "--early-stopping", 2,
                          "--restore-best", "--out", r, "--no-plots")
    assert code == 0, err
    losses = [float(row["val_loss"]) for row in history_rows(r)]
    best = losses.index(min(losses)) + 1
    assert best == 3 and len(losses) == best + 2  # stopped after `patience` epochs without gain
    assert "Early stopping" in out
    best_weights = r / "checkpoints" / "best" / "model.safetensors"
    assert_same_weights(r / "model.safetensors", best_weights)
    assert_same_weights(r / "model.safetensors", r / "checkpoints" / f"epoch_{best}" / "model.safetensors")
    last, kept = load_file(r / "checkpoints" / "epoch_5" / "model.safetensors"), load_file(best_weights)
    assert any(not torch.equal(last[name], kept[name]) for name in last)  # really restored
    # A resume (new process state: best weights only on disk) neither trains on nor loses them.
    (r / "model.safetensors").unlink()
    code, _, err = main(capsys, "resume", r, *QUIET)
    assert code == 0, err
    assert len(history_rows(r)) == 5
    assert_same_weights(r / "model.safetensors", best_weights)


def test_early_stopping_semantics_match_keras():
    class FakeTrainer:
        def __init__(self, history):
            self.state = type("S", (), {"history": history})()
            self.stop_training = False

    def stops(losses, patience, min_delta=0.0):
        trainer = FakeTrainer([])
        es = EarlyStopping(patience, "val_loss", min_delta)
        for epoch, value in enumerate(losses):
            trainer.state.history.append({"val_loss": value})
            es.on_epoch_end(trainer, epoch, {"val_loss": value})
            if trainer.stop_training:
                return epoch + 1
        return None

    assert stops([1.0, 0.9, 0.95, 0.96, 0.8], patience=2) == 4
    assert stops([1.0, 0.9, 0.95, 0.85, 0.8], patience=2) is None
    assert stops([1.0, 0.99, 0.98, 0.97], patience=2, min_delta=0.05) == 3
    assert stops([1.0, float("nan"), float("nan")], patience=2) == 3


class _RaiseLr:
    """Turns the learning rate up to 1e6 from the second epoch on."""

    def on_epoch_begin(self, trainer, epoch):
        if epoch == 1:
            trainer.config.train.lr = 1e6


def test_nan_guard_names_epoch_and_batch_and_the_last_checkpoint_stays_loadable(real_data, tmp_path, capsys):
    r = tmp_path / "r"
    with pytest.raises(NonFiniteLoss) as stop:  # a TrainingStopped, named for what happened
        fc.train("model1", r, data=real_data, progress=False, plots=False, epochs=3,
                  callbacks=[_RaiseLr()], **SMALL)
    message = str(stop.value)
    assert isinstance(stop.value, TrainingStopped) and not isinstance(stop.value, Interrupted)
    assert "non-finite loss" in message and "at epoch 2, batch " in message
    assert str(r / "checkpoints" / "epoch_1") in message
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["best", "epoch_1"]
    assert not (r / "model.safetensors").exists()  # no non-finite weights anywhere
    checkpoint.read_checkpoint_meta(r / "checkpoints" / "epoch_1")
    assert all(torch.isfinite(t).all() for t in load_file(r / "checkpoints" / "epoch_1" / "model.safetensors").values())
    code, out, err = main(capsys, "evaluate", r, "--checkpoint", 1, "--json")
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] > 0.3


def test_nan_guard_on_the_command_line(real_data, tmp_path, capsys):
    r = tmp_path / "r"
    code, _, err = main(capsys, "train", "model1", "--subset", 600, "--batch-size", 32,
                        "--threads", 1, "--epochs", 2, "--lr", 1e6, "--out", r, *QUIET)
    assert code == 3 and "Traceback" not in err
    line, = [line for line in err.splitlines() if line.startswith("fashion-cnn:")]
    assert "non-finite loss" in line and "at epoch 1, batch " in line
    assert "no checkpoint had been written yet" in line


def test_train_resume_refuses_contradicting_options_and_continues_matching_ones(references, tmp_path, capsys):
    r = copy_run(references["plain"], tmp_path)
    shutil.rmtree(r / "checkpoints" / "epoch_4")  # as if stopped after epoch 3
    (r / "model.safetensors").unlink()
    config_before = (r / "config.toml").read_text()
    code, _, err = main(capsys, "train", *PLAIN, "--lr", 0.01, "--resume", r, *QUIET)
    assert code == 2
    line, = error_lines(err)
    assert "contradict" in line and "train.lr: run 0.001, given 0.01" in line
    code, _, err = main(capsys, "train", *PLAIN[:-2], "--resume", r, *QUIET)  # epochs from the run
    assert code == 0, err
    assert_same_run(r, references["plain"])
    assert (r / "config.toml").read_text() == config_before


def test_resume_epochs_extends_a_finished_run_exactly(references, real_data, tmp_path, capsys):
    short = tmp_path / "short"
    fc.train("dense", short, data=real_data, progress=False, plots=False, epochs=3, **SMALL)
    code, _, err = main(capsys, "resume", short, "--epochs", 2, *QUIET)
    assert code == 2 and "fewer than" in error_lines(err)[0]
    code, _, err = main(capsys, "resume", short, "--epochs", 4, *QUIET)
    assert code == 0, err
    # constant learning rate: 3 epochs extended to 4 equal 4 epochs straight
    assert_same_run(short, references["plain"])
    assert "epochs = 4" in (short / "config.toml").read_text()


# ------------------------------------------------------------------------------ output problems

def test_out_below_a_regular_file_is_a_clear_error(real_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out in (blocker / "run", blocker):
        code, _, err = main(capsys, "train", "dense", "--subset", 200, "--epochs", 1,
                            "--out", out, *QUIET)
        assert code == 2
        line, = error_lines(err)
        assert str(out) in line and "file" in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_directory_is_a_clear_error(real_data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = main(capsys, "train", "dense", "--subset", 200, "--epochs", 1,
                            "--out", locked / "run", *QUIET)
    finally:
        locked.chmod(0o700)
    assert code == 2
    line, = error_lines(err)
    assert "permission denied" in line


@pytest.mark.parametrize("failing_write", [5, 9], ids=["epoch-2-checkpoint", "final-weights"])
def test_disk_full_is_a_clear_error_and_keeps_what_was_written(references, real_data, tmp_path,
                                                               monkeypatch, capsys, failing_write):
    """Each epoch writes `best` and an epoch checkpoint, two tensor files each: write 5 is
    epoch 2's first, write 9 the final model.safetensors of a 2-epoch run."""
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def save_until_full(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] >= failing_write:  # what safetensors raises on a full disk (tmpfs)
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  f"(os error {errno.ENOSPC})")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_until_full)
    r = tmp_path / "r"
    with pytest.raises(UserError, match="disk is full"):
        fc.train("dense", r, data=real_data, progress=False, plots=False, epochs=2, **SMALL)
    epochs_done = 1 if failing_write == 5 else 2
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == [
        "best", *[f"epoch_{e}" for e in range(1, epochs_done + 1)]]
    for directory in (r / "checkpoints").iterdir():
        checkpoint.read_checkpoint_meta(directory)
    assert not (r / "model.safetensors").exists() and list(r.glob(".*")) == []
    # with space again, a resume finishes the run as if nothing had happened
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    code, _, err = main(capsys, "resume", r, "--epochs", 4, *QUIET)
    assert code == 0, err
    assert_same_run(r, references["plain"])
