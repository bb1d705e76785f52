"""Runs, predict, checkpoints and the command line under hostile inputs: every bad file or
setting ends in one line and exit status 2 (130 for Ctrl-C), never a traceback, and nothing
already written is lost (docs/limits.md).

Runs are small (seed-model1 on 300 images, 2 epochs, one thread); the property-based tests run
under the Hypothesis profile that tests/conftest.py loads ("ci", or HYPOTHESIS_PROFILE=long by
hand).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import fashion_cnn as fc
from fashion_cnn import cli, fileio
from fashion_cnn.cli import printable
from fashion_cnn.errors import CheckpointError, SpecError, UserError
from fashion_cnn.training import run as run_module
from fashion_cnn.training import rundir as rundir_module
from fashion_cnn.training.callbacks import check_options
from fashion_cnn.training.checkpoint import load_checkpoint, read_checkpoint_meta
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.names import check_checkpoint_pattern, checkpoint_name
from fashion_cnn.training.rundir import RunDir

SMALL = {"subset": 300, "threads": 1}
PATTERN = "{epoch:02d}-{val_loss:.2f}"  # Keras' own example pattern
QUIET = ["--quiet", "--no-plots"]
TRAIN = ["train", "seed-model1", "--subset", "300", "--epochs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def small_data(real_data):
    """Fashion-MNIST with its first 2,000 test images: what these tests check holds on any."""
    return dataclasses.replace(real_data, test_images=real_data.test_images[:2000],
                               test_labels=real_data.test_labels[:2000])


@pytest.fixture(scope="module")
def pattern_run(small_data, tmp_path_factory) -> Path:
    """seed-model1, 2 epochs, checkpoints named by Keras' pattern "{epoch:02d}-{val_loss:.2f}"."""
    threads = torch.get_num_threads()
    result = fc.train("seed-model1", tmp_path_factory.mktemp("hostile") / "run", data=small_data,
                      progress=False, plots=False, epochs=2, **SMALL,
                      **{"checkpoint.filename": PATTERN})
    torch.set_num_threads(threads)
    return result.run_dir


def copy_run(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / name))


def main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process; (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def message_lines(stderr: str) -> list[str]:
    """The CLI's own lines on stderr; never a traceback."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("fashion-cnn:")]


def one_error(code: int, stderr: str, *fragments: str) -> str:
    """Exit status 2 and one error line holding each fragment; that line."""
    lines = message_lines(stderr)
    assert code == 2 and len(lines) == 1, (code, stderr)
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    return lines[0]


def garment(size=(28, 28)) -> np.ndarray:
    """A light shape on black (Fashion-MNIST's look), (height, width) uint8."""
    image = np.zeros(size[::-1], dtype=np.uint8)
    image[size[1] // 5: -size[1] // 5, size[0] // 4: -size[0] // 4] = 200
    return image


# ------------------------------------------------------------------------------ predict

def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(usable, unusable) image files: Pillow's unusual modes that convert, and files that
    cannot be used for different reasons (a mode Pillow cannot convert, text, truncated, a
    FIFO)."""
    folder.mkdir()
    gray = Image.fromarray(garment())
    photo = Image.fromarray(255 - garment((60, 90))).convert("RGB")
    usable = {
        "good.png": gray,
        "cmyk.jpg": photo.convert("CMYK"),
        "sixteen-bit.tif": Image.frombytes("I;16B", (28, 28),
                                           (garment().astype(">u2") * 257).tobytes()),
        "palette-transparent.png": photo.convert("P"),
        "gray-alpha.png": photo.convert("LA"),
        "one-bit.png": photo.convert("1"),
        "evil\nshirt.png   Coat  0.999": gray,  # a newline in a name must not forge a row
        "escape\x1b[2J.png": gray,
        "good2.jpg": photo,
    }
    for name, image in usable.items():
        extra = {"transparency": 0} if name.startswith("palette") else {}
        image.save(folder / name, format="PNG" if ".png" in name else None, **extra)
    bad = {"lab.tif": None, "bad.txt": b"this is text, not pixels", "truncated.png": None,
           "fifo.png": None}
    Image.fromarray(np.dstack([garment()] * 3)).convert("LAB").save(folder / "lab.tif")
    (folder / "bad.txt").write_bytes(bad["bad.txt"])
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.png")
    (folder / "truncated.png").write_bytes((folder / "truncated.png").read_bytes()[:2000])
    os.mkfifo(folder / "fifo.png")
    return [folder / n for n in usable], [folder / n for n in bad]


def test_predict_reports_each_file_whatever_fails_and_escapes_names(pattern_run, tmp_path,
                                                                    capsys):
    usable, unusable = _image_files(tmp_path / "images")
    assert [Image.open(path).mode for path in usable[:6]] == ["L", "CMYK", "I;16B", "P", "LA",
                                                              "1"]
    order = [usable[0], unusable[0], *usable[1:5], unusable[1], unusable[2], *usable[5:],
             unusable[3]]
    code, out, err = main(capsys, "predict", pattern_run, *order)
    assert code == 2
    header, *rows = out.splitlines()
    assert header.split() == ["image", "prediction", "prob.", "next"]
    assert len(rows) == len(usable)  # every usable image has its row, in order
    for row, path in zip(rows, [p for p in order if p in usable]):
        assert row.startswith(printable(str(path)) + " "), row
    assert any("evil\\nshirt.png" in row for row in rows)
    assert not any(line.lstrip().startswith("shirt.png") for line in out.splitlines())
    assert "\x1b" not in out and "\\x1b[2J" in out
    errors = message_lines(err)
    assert len(errors) == len(unusable)
    for line, path in zip(errors, unusable):
        assert line.startswith(f"fashion-cnn: error: {path}: "), line
    assert "LAB" in errors[0] and "not an image file" in errors[1]
    assert "cannot decode" in errors[2] and "FIFO" in errors[3]
    # the same through the library: one Prediction per file, errors where they failed
    results = fc.predict_files(pattern_run, order)
    assert [r.error is None for r in results] == [p in usable for p in order]
    # JSON escapes names as JSON does
    code, out, _ = main(capsys, "predict", pattern_run, usable[6], "--json")
    assert code == 0 and json.loads(out)[0]["path"] == str(usable[6])


def test_cli_predict_good_odd_bad_good_done_when(pattern_run, tmp_path):
    """The issue's check, as a user runs it: `fashion-cnn predict RUN good.png odd-mode-image
    bad.txt good2.png` prints both good images' results and one line for each bad one."""
    usable, unusable = _image_files(tmp_path / "images")
    good, good2, odd, bad = usable[0], usable[-1], unusable[0], unusable[1]
    result = subprocess.run([sys.executable, "-m", "fashion_cnn", "predict", str(pattern_run),
                             str(good), str(odd), str(bad), str(good2)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    rows = result.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [str(good), str(good2)]
    errors = message_lines(result.stderr)
    assert [line.split(": ")[2] for line in errors] == [str(odd), str(bad)], result.stderr


# ------------------------------------------------------------------------------ integrity

def _reseal_weights(run: Path) -> None:
    """Record the current weights' checksum, as `sha256sum` would: the weights load as if the
    run itself had written them."""
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    (run / "model.safetensors.sha256").write_text(f"{digest}  model.safetensors\n")


def test_final_weights_have_a_checksum_that_sha256sum_accepts(pattern_run):
    text = (pattern_run / "model.safetensors.sha256").read_text()
    digest = hashlib.sha256((pattern_run / "model.safetensors").read_bytes()).hexdigest()
    assert text == f"{digest}  model.safetensors\n"
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "model.safetensors.sha256"],
                               cwd=pattern_run, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_non_finite_weights_are_refused_by_evaluate_predict_and_export(pattern_run, tmp_path,
                                                                      capsys):
    image = tmp_path / "shirt.png"
    Image.fromarray(garment()).save(image)
    for value in (float("nan"), float("inf")):
        run = copy_run(pattern_run, tmp_path, f"run-{value}")
        tensors = load_file(run / "model.safetensors")
        name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
        tensors[name].view(-1)[3] = value
        save_file(tensors, run / "model.safetensors")
        _reseal_weights(run)  # the run's own weights, diverged: the checksum matches
        onnx = tmp_path / "model.onnx"
        for command in (["evaluate", run], ["predict", run, image],
                        ["export", run, "--out", onnx, "--no-check"]):
            code, out, err = main(capsys, *command)
            one_error(code, err, str(run / "model.safetensors"), name, "non-finite")
            assert "accuracy" not in out
        assert not onnx.exists()


def test_corrupt_final_weights_are_refused_and_old_runs_still_load(pattern_run, tmp_path,
                                                                   capsys):
    run = copy_run(pattern_run, tmp_path)
    weights = run / "model.safetensors"
    original = weights.read_bytes()
    damaged = bytearray(original)
    damaged[-7] ^= 0x01  # one bit of one weight: still a valid, finite safetensors file
    weights.write_bytes(bytes(damaged))
    for command in (["evaluate", run], ["predict", run, tmp_path / "none.png"]):
        code, _, err = main(capsys, *command)
        one_error(code, err, str(weights), "checksum mismatch")
    (run / "model.safetensors.sha256").write_text("not a checksum\n")
    code, _, err = main(capsys, "evaluate", run)
    one_error(code, err, "model.safetensors.sha256")
    # a run written before final weights had a checksum: loaded, unverified
    weights.write_bytes(original)
    (run / "model.safetensors.sha256").unlink()
    config, model = fc.load_model(run)
    assert config.checkpoint.filename == PATTERN
    # export refuses to replace one of the run's own files
    code, _, err = main(capsys, "export", run, "--out", run / "config.toml", "--no-check")
    one_error(code, err, "run's own files")
    assert (run / "config.toml").read_text().startswith(("#", "recipe", "["))


# ------------------------------------------------------------------------------ checkpoint names

def test_keras_format_specs_name_checkpoints_and_select_them_by_epoch(pattern_run, small_data,
                                                                      tmp_path):
    run = RunDir(pattern_run)
    names = run.checkpoint_names()
    assert "best" in names and len(names) == 3
    for epoch in (1, 2):
        path = run.find_checkpoint(str(epoch), PATTERN)
        meta = read_checkpoint_meta(path)
        assert (meta["kind"], meta["epoch"]) == ("epoch", epoch)
        assert path.name == checkpoint_name(PATTERN, epoch, meta["history"][-1])
        assert path.name.startswith(f"0{epoch}-")
    result = fc.evaluate_run(pattern_run, small_data, checkpoint="1")
    assert 0 <= result["test_accuracy"] <= 1
    with pytest.raises(CheckpointError, match="no checkpoint '3'"):
        run.find_checkpoint("3", PATTERN)
    # resume continues under the pattern, and names epoch 3 by its own logs
    copy = copy_run(pattern_run, tmp_path)
    resumed = fc.resume(copy, epochs=3, data=small_data, progress=False, plots=False)
    third = RunDir(copy).find_checkpoint("3", PATTERN)
    assert third.name == checkpoint_name(PATTERN, 3, resumed.history[-1])
    # the seed's pattern with a format spec, as the CLI's --checkpoint-name gives it
    cfg = resolve_config("seed-model1", **{"checkpoint.filename": "model1_{epoch:02d}"})
    check_options(cfg)
    assert checkpoint_name(cfg.checkpoint.filename, 3) == "model1_03"


@pytest.mark.parametrize("pattern,words", [
    ("{epoch:02d}-{loss:d}", "Unknown format code 'd'"),
    ("m_{epoch}_{x}", "only {epoch}"),
    ("{epoch.real}", "only {epoch}"),
    ("{epoch:0999999999d}", "width or precision"),
    ("{epoch:/>3}", "fill character"),
    ("{epoch:02d}-{val_loss:.2f}", "no validation split"),
])
def test_checkpoint_patterns_that_cannot_work_are_refused_before_anything_is_written(
        tmp_path, capsys, pattern, words):
    out = tmp_path / "run"
    code, _, err = main(capsys, *TRAIN, "--validation-split", 0, "--checkpoint-name", pattern,
                        "--out", out, *QUIET)
    one_error(code, err, "--checkpoint-name: ", "filename")  # the config's rules may come first
    assert not out.exists()
    cfg = resolve_config("seed-model1", **{"data.validation_split": 0})
    cfg.checkpoint.filename = pattern  # past the config's own rules: the pattern's
    with pytest.raises(UserError, match=re.escape(words)) as caught:
        check_options(cfg)
    assert caught.value.setting == "checkpoint.filename"


# ------------------------------------------------------------------------------ failed runs

def test_a_run_that_fails_before_its_first_epoch_leaves_no_directory(small_data, tmp_path,
                                                                     monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(run_module, "Trainer", out_of_memory)
    options = dict(data=small_data, progress=False, epochs=1, **SMALL)
    with pytest.raises(MemoryError):
        run_module.train("seed-model1", tmp_path / "new" / "deeper" / "run", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # its parents went too
    existing = tmp_path / "empty"  # there before: it stays, as empty as it was
    existing.mkdir()
    with pytest.raises(MemoryError):
        run_module.train("seed-model1", existing, **options)
    assert existing.is_dir() and list(existing.iterdir()) == []
    RunDir.create(existing, "again")  # the same --out can be used again

    monkeypatch.setattr(run_module, "Trainer", _interrupt)
    _assert_interrupted_train_leaves_nothing(capsys, tmp_path / "interrupted")


def _interrupt(*args, **kwargs):
    """A stand-in for a step of start-up that a Ctrl-C interrupts."""
    raise KeyboardInterrupt


def _assert_interrupted_train_leaves_nothing(capsys, out) -> None:
    """`train ... --out OUT` interrupted: exit 130, one line, and no OUT left behind."""
    code, _, err = main(capsys, *TRAIN, "--out", out, *QUIET)
    assert code == 130 and message_lines(err) == ["fashion-cnn: interrupted"]
    assert not out.exists()


def test_a_run_whose_loss_diverges_at_once_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = main(capsys, *TRAIN, "--lr", "1e30", "--out", out, *QUIET)
    lines = message_lines(err)
    assert code == 3 and len(lines) == 1 and "non-finite loss" in lines[0], err
    assert f"removed {out}" in lines[0] and not out.exists()


def test_a_run_that_fails_after_an_epoch_keeps_everything(small_data, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise UserError("cannot write model.safetensors: the disk is full")

    monkeypatch.setattr(run_module, "save_run_weights", disk_full)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="disk is full"):
        run_module.train("seed-model1", out, data=small_data, progress=False, epochs=1, **SMALL)
    assert RunDir(out).is_run() and len(RunDir(out).read_history()) == 1
    assert RunDir(out).checkpoint_names()


# ------------------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_at_any_point_of_start_up_exits_130_with_one_line(monkeypatch, capsys):
    from fashion_cnn.cli import commands, parser

    handler = signal.getsignal(signal.SIGINT)
    for module, name, argv in [(parser, "build_parser", ["env"]),  # building the parser
                               (commands, "cmd_evaluate", ["evaluate", "somewhere"])]:
        monkeypatch.setattr(module, name, _interrupt)
        code, _, err = main(capsys, *argv)
        monkeypatch.undo()
        assert code == 130 and message_lines(err) == ["fashion-cnn: interrupted"], err
        assert signal.getsignal(signal.SIGINT) is handler  # put back after saying so


def test_ctrl_c_while_loading_data_exits_130_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run_module, "splits_for", _interrupt)
    _assert_interrupted_train_leaves_nothing(capsys, tmp_path / "run")


def test_nothing_heavy_is_imported_before_the_cli_handles_ctrl_c():
    """`python -m fashion_cnn` imports the package and fashion_cnn.cli before cli.main runs;
    neither imports torch (the package's names load on first use), so torch's import, the
    longest part of start-up, happens inside main's Ctrl-C handler."""
    check = ("import sys, fashion_cnn, fashion_cnn.cli; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'PIL'}))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_sigint_during_start_up_of_a_real_process(pattern_run, tmp_path):
    """A real SIGINT as `fashion-cnn evaluate` starts, sent at a known point rather than
    after a guessed delay: the test hook (fileio.fault_hook, point "start_up") holds the
    process where cli.main has begun and torch is not imported yet, and writes a marker file;
    the signal goes once the marker is there."""
    marker = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_CNN_PAUSE_")}
    env.update(FASHION_CNN_PAUSE_AT="start_up", FASHION_CNN_PAUSE_MARKER=str(marker))
    # a Ctrl-C as on a terminal: a background job (make test run with `&`, CI) inherits
    # SIGINT ignored, and Python then never turns it into KeyboardInterrupt
    process = subprocess.Popen([sys.executable, "-m", "fashion_cnn", "evaluate", str(pattern_run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240  # a bail-out for a broken hook, not a measurement
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"never reached the start-up hook (exit status {process.poll()})"
        assert marker.read_text() == "cli.main"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, (process.returncode, err)
    assert message_lines(err) == ["fashion-cnn: interrupted"] and err.count("\n") == 1, err
    assert out == ""


# ------------------------------------------------------------------------------ damaged runs

def _meta_checksum(meta: dict) -> str:
    """state.json's own checksum, as docs/checkpoints.md defines it: SHA-256 of its content
    without the checksum, as sorted JSON. An attacker can recompute it; the loader must still
    refuse what it cannot use."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_meta(directory: Path, meta: dict) -> None:
    meta = {**meta, "checksum": _meta_checksum(meta)}
    (directory / "state.json").write_text(json.dumps(meta))


def _only_newest_checkpoint(run: Path) -> Path:
    """Leave the run with its epoch 2 checkpoint alone (resume would otherwise skip a
    damaged one for an older one, rightly)."""
    keep = RunDir(run).find_checkpoint("2", PATTERN)
    for path in (run / "checkpoints").iterdir():
        if path != keep:
            shutil.rmtree(path)
    return keep


@pytest.mark.parametrize("key,value", [
    ("epoch_seconds", "soon"), ("epoch", 2 ** 70), ("step", 2 ** 64), ("step", -1),
    ("history", [{"loss": "low"}, {"loss": 0.5}]), ("processes", True), ("device_type", 5),
    ("grad_scaler", {"scale": "huge"}), ("optimizer", {"param_groups": [{"params": [0, 0]}],
                                                       "scalars": {}}),
    ("optimizer", {"param_groups": [{"params": [0], "lr": {"nested": 1}}], "scalars": {}}),
    ("optimizer", {"param_groups": [], "scalars": {"x": 1}}),
])
def test_hand_edited_state_json_with_wrong_types_is_one_line(pattern_run, tmp_path, key, value):
    directory = RunDir(copy_run(pattern_run, tmp_path)).find_checkpoint("2", PATTERN)
    meta = json.loads((directory / "state.json").read_text())
    _write_meta(directory, {**meta, key: value})
    with pytest.raises(CheckpointError, match="invalid checkpoint") as caught:
        read_checkpoint_meta(directory)
    assert "\n" not in str(caught.value)


def test_resume_refuses_optimizer_state_that_does_not_fit_in_one_line(pattern_run, tmp_path,
                                                                     capsys):
    run = copy_run(pattern_run, tmp_path)
    directory = _only_newest_checkpoint(run)
    original = json.loads((directory / "state.json").read_text())
    # a hyper-parameter of another kind than the optimizer's own (a list for a number)
    meta = json.loads(json.dumps(original))
    group = meta["optimizer"]["param_groups"][0]
    group["lr"] = [1, 2]
    _write_meta(directory, meta)
    code, _, err = main(capsys, "resume", run, "--epochs", 3, *QUIET)
    one_error(code, err, "state.json", "lr")
    # a moment tensor of the wrong shape, with every checksum recomputed
    tensors = load_file(directory / "state.safetensors")
    name = next(k for k, v in tensors.items() if k.startswith("optimizer.") and v.dim() > 1)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, directory / "state.safetensors")
    meta = json.loads(json.dumps(original))
    meta["sha256"]["state.safetensors"] = fileio.sha256_file(directory / "state.safetensors")
    _write_meta(directory, meta)
    code, _, err = main(capsys, "resume", run, "--epochs", 3, *QUIET)
    one_error(code, err, "state.safetensors", "shape")
    # through evaluate, by its name: the checkpoint's weights alone, with an invalid count
    _write_meta(directory, {**original, "step": 2 ** 80})
    code, _, err = main(capsys, "evaluate", run, "--checkpoint", directory.name)
    one_error(code, err, "state.json", "step")


def test_damaged_run_files_are_one_line(pattern_run, tmp_path, capsys):
    run = copy_run(pattern_run, tmp_path)
    config = (run / "config.toml").read_text()
    # a seed beyond 64 bits, hand-written into the run's config.toml
    edited = re.sub(r"^seed = 0\b", f"seed = {2 ** 70}", config, count=1, flags=re.M)
    assert edited != config
    (run / "config.toml").write_text(edited)
    for command in (["evaluate", run], ["resume", run, *QUIET]):
        code, _, err = main(capsys, *command)
        one_error(code, err, "config.toml", "seed")
    # a FIFO where config.toml belongs: refused at once, not read
    (run / "config.toml").unlink()
    os.mkfifo(run / "config.toml")
    code, _, err = main(capsys, "evaluate", run)
    one_error(code, err, "config.toml", "FIFO")
    rundir = RunDir(run)
    (run / "history.csv").write_text("epoch,loss\ninf,0.5\n")
    with pytest.raises(CheckpointError, match="history.csv"):
        rundir.read_history()
    (run / "history.csv").write_text("epoch,loss\n1,0.5\x00\n")
    with pytest.raises(CheckpointError, match="history.csv"):
        rundir.read_history()
    for text in ("[" * 100_000, "[1, 2]", "\xff"):
        (run / "metrics.json").write_text(text, encoding="latin-1")
        with pytest.raises(CheckpointError, match="metrics.json"):
            rundir.read_metrics()


def test_run_files_that_are_special_or_too_large_are_one_line(pattern_run, tmp_path,
                                                             monkeypatch):
    """A run's files are opened as regular files only (a FIFO in their place is refused, never
    waited on) and read up to their size limit (docs/limits.md), never whole beyond it."""
    run = copy_run(pattern_run, tmp_path)
    rundir, checkpoint = RunDir(run), RunDir(run).find_checkpoint("2", PATTERN)
    reads = {"metrics.json": rundir.read_metrics, "history.csv": rundir.read_history,
             "model.safetensors.sha256": rundir.read_weights_checksum}
    for name, read in reads.items():
        (run / name).unlink()
        os.mkfifo(run / name)
        with pytest.raises(CheckpointError, match=re.escape(f"{run / name}: is a named pipe")):
            read()
    for name in ("state.json", "state.safetensors"):
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).unlink()
        os.mkfifo(checkpoint / name)
        with pytest.raises(CheckpointError, match=re.escape(f"{checkpoint / name}: is a named")):
            read_checkpoint_meta(checkpoint)
        assert RunDir.checkpoint_position(checkpoint) is None or name != "state.json"
        (checkpoint / name).unlink()
        (checkpoint / name).write_bytes(original)
    read_checkpoint_meta(checkpoint)  # put back whole
    # past its limit (lowered here, so that the test writes a few bytes, not 64 MiB)
    monkeypatch.setattr(rundir_module, "RUN_FILE_LIMIT", 100)
    (run / "metrics.json").unlink()
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5, "pad": "x" * 100}))
    (run / "history.csv").unlink()
    (run / "history.csv").write_text(rundir_module.history_csv([{"epoch": 1, "loss": 0.5}] * 5))
    for name in ("metrics.json", "history.csv"):
        with pytest.raises(CheckpointError, match=re.escape(f"{run / name}: larger than 100 "
                                                            f"bytes")):
            reads[name]()
    (run / "model.safetensors.sha256").unlink()
    (run / "model.safetensors.sha256").write_text("0" * 2000)
    with pytest.raises(CheckpointError, match="larger than 1024 bytes"):
        rundir.read_weights_checksum()


# ------------------------------------------------------------------------------ properties

FRAGMENTS = ["{epoch", "{val_loss", "{loss", "{lr", "{x", "}", "{", ":", "02d", ".2f", "d",
             "!r", "/", ".", "_", ">", "0", "9", "e", "%", "c", "best", "interrupted_", "\n",
             "{epoch:02d}", "{val_loss:.2f}", "{}", "[0]", ".real"]


@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=8).map("".join),
       st.integers(1, 10 ** 6), st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False))
def test_a_checkpoint_pattern_is_refused_in_one_line_or_gives_plain_names(pattern, epoch, value):
    try:
        check_checkpoint_pattern(pattern)
    except SpecError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("[checkpoint] filename")
        return
    name = checkpoint_name(pattern, epoch, {"loss": value, "val_loss": abs(value), "lr": 1e-3})
    assert name and name.isprintable() and "/" not in name and "\x00" not in name
    assert name != "best" and not name.startswith((".", "interrupted_"))


@given(st.text())
def test_printable_text_is_one_line_and_unchanged_when_already_printable(text):
    shown = printable(text)
    assert shown.isprintable() and "\n" not in shown
    assert (shown == text) == text.isprintable()


JSON_VALUES = st.recursive(
    # no subnormal floats: training sets flush-to-zero (perf.configure_runtime), and Hypothesis
    # refuses to draw them while it is on
    st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)


def same_kind(value) -> st.SearchStrategy:
    """Values of `value`'s JSON type (a number for a number, a list of such for a list...):
    mutations that read_checkpoint_meta's type checks let through more often, so that
    load_checkpoint sees them."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(0, 2 ** 63 - 1) | st.sampled_from([0, 1, value + 1, max(value - 1, 0)])
    if isinstance(value, float):
        return st.floats(allow_subnormal=False) | st.sampled_from([0.0, 1.0, -value, value * 2])
    if isinstance(value, str):
        return st.text(max_size=8) | st.just(value)
    if isinstance(value, list):
        return st.lists(same_kind(value[0]) if value else JSON_VALUES, max_size=len(value) + 1)
    return JSON_VALUES


@pytest.fixture(scope="module")
def mutable_checkpoint(pattern_run, small_data, tmp_path_factory):
    """(checkpoint directory, its state.json, the run's config, its splits): what a Trainer
    of the same run, which the checkpoint loads into, is made of."""
    run = copy_run(pattern_run, tmp_path_factory.mktemp("mutations"))
    directory = RunDir(run).find_checkpoint("2", PATTERN)
    config = RunDir(run).read_config()
    splits = run_module.splits_for(config, small_data)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # the unmutated checkpoint loads: the baseline
        assert load_checkpoint(fc.Trainer(config, splits), directory)["epoch"] == 2
    torch.set_num_threads(threads)
    return directory, json.loads((directory / "state.json").read_text()), config, splits


@given(data=st.data())
def test_any_mutation_of_state_json_is_accepted_or_a_checkpoint_error(mutable_checkpoint, data):
    """read_checkpoint_meta, then load_checkpoint into a Trainer of the same run (what resume
    does): each succeeds or raises one-line CheckpointError, never another exception."""
    directory, original, config, splits = mutable_checkpoint
    meta = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 3))):
        target = meta
        path = data.draw(st.sampled_from([[], ["optimizer"], ["history", 0], ["grad_scaler"],
                                          ["optimizer", "param_groups", 0],
                                          ["optimizer", "scalars"]]))
        for step in path:
            if isinstance(target, dict) and step in target or (
                    isinstance(target, list) and isinstance(step, int) and step < len(target)):
                target = target[step]
        if isinstance(target, dict):
            key = data.draw(st.sampled_from(sorted(target) + ["extra"]) if target
                            else st.just("extra"))
            target[key] = data.draw(JSON_VALUES | same_kind(target.get(key)))
    _write_meta(directory, meta)
    try:
        read_checkpoint_meta(directory)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        event("refused by read_checkpoint_meta")
        return
    trainer = fc.Trainer(config, splits)
    with torch.random.fork_rng(devices=[]):  # load_checkpoint sets torch's global generator
        try:
            load_checkpoint(trainer, directory)
            event("loaded")
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            event("refused by load_checkpoint")
