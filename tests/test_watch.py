"""Watching training: TensorBoard event files (read back with TensorBoard's own reader), the
progress display in a terminal (a pseudo-terminal) and in a pipe, and `--help` / `--show-config`
telling what a recipe will do."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import subprocess
import sys

import pytest

import fashion_cnn as fc
from fashion_cnn.cli.parser import build_parser

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EVERYTHING = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}


@pytest.fixture(scope="module")
def small_data(real_data):
    """Fashion-MNIST with 1,000 test images (what is checked holds on any test set)."""
    return dataclasses.replace(real_data, test_images=real_data.test_images[:1000],
                               test_labels=real_data.test_labels[:1000])


def events(directory) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def scalar_steps(accumulator, tag) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def hparams_session(accumulator) -> tuple[dict, dict]:
    """(hyperparameters, metric values) of the run's HParams entry, decoded from its protobuf."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for key, value in start.hparams.items()}
    metrics = {tag: accumulator.Scalars(tag)[-1].value
               for tag in accumulator.Tags()["scalars"] if tag.startswith("hparam/")}
    return hparams, metrics


def test_tensorboard_logs_every_epoch_every_layer_images_graph_and_hparams(small_data, tmp_path):
    result = fc.train("seed-model1", tmp_path / "r", data=small_data, progress=False,
                      plots=False, subset=2000, epochs=2, tensorboard=True,
                      tensorboard_every=5)
    log_dir = tmp_path / "r" / "tensorboard"
    steps_per_epoch = -(-1600 // 128)  # 2,000 images, 20 % held out, batch 128
    train, validation, batch, root = (events(log_dir / "train"), events(log_dir / "validation"),
                                      events(log_dir / "batch"), events(log_dir))
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_penalty", "epoch_lr", "epoch_seconds"):
        assert scalar_steps(train, tag) == [1, 2], tag
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert scalar_steps(validation, tag) == [1, 2], tag
    losses = [e.value for e in train.Scalars("epoch_loss")]
    assert losses == pytest.approx([h["loss"] for h in result.history])
    assert [e.value for e in validation.Scalars("epoch_accuracy")] == pytest.approx(
        [h["val_accuracy"] for h in result.history])
    assert scalar_steps(batch, "batch_loss") == list(range(5, 2 * steps_per_epoch + 1, 5))
    # every Conv2D and Dense layer's kernel and bias, and their gradients, at both epochs
    layers = [name for name, _ in result.model.named_weight_layers()]
    assert layers == ["conv2d", "conv2d_1", "conv2d_2", "dense", "dense_1"]
    for layer in layers:
        for tag in (f"{layer}/kernel", f"{layer}/bias", f"{layer}/kernel/gradient"):
            histograms = train.Histograms(tag)
            assert [h.step for h in histograms] == [1, 2], tag
            assert histograms[-1].histogram_value.num > 0
    assert train.Tags()["graph"]
    assert set(root.Tags()["images"]) == {"confusion_matrix", "predictions"}
    image = root.Images("confusion_matrix")[-1]
    assert image.width > 200 and image.height > 200
    assert "config/text_summary" in root.Tags()["tensors"]
    hparams, metrics = hparams_session(root)
    assert hparams["train.lr"] == pytest.approx(0.001) and hparams["model"] == "model1"
    assert metrics["hparam/test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])


def test_a_search_logs_one_sub_run_per_trial_with_its_objective(tmp_path):
    pytest.importorskip("optuna")
    from conftest import make_idx_dir

    data = fc.load_data(make_idx_dir(tmp_path / "idx", n_train=200), check_md5=False)
    space = tmp_path / "space.toml"
    space.write_text('recipe = "dense"\n[set]\n"train.epochs" = 2\n'
                     '[params."train.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01\n')
    fc.tune(str(space), trials=2, out=tmp_path / "out", data=data, progress=False,
            tensorboard=True)
    runs = sorted(p.name for p in (tmp_path / "out" / "tensorboard").iterdir())
    assert runs == ["trial-0000", "trial-0001"]
    learning_rates = set()
    for run in runs:
        root = events(tmp_path / "out" / "tensorboard" / run)
        hparams, metrics = hparams_session(root)
        learning_rates.add(hparams["train.lr"])
        assert set(metrics) == {"hparam/val_accuracy"}
        assert scalar_steps(events(tmp_path / "out" / "tensorboard" / run / "validation"),
                            "epoch_accuracy") == [1, 2]
    assert len(learning_rates) == 2  # each trial its own sampled setting


def _run_in_pty(args, columns=150) -> str:
    """stdout and stderr of `python -m fashion_cnn ARGS` run on a pseudo-terminal."""
    import fcntl
    import struct
    import termios

    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fashion_cnn", *args], stdin=child,
                            stdout=child, stderr=child, close_fds=True)
    os.close(child)
    output = b""
    while True:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed its end (Linux: EIO)
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    assert proc.wait(timeout=60) == 0, output.decode(errors="replace")[-2000:]
    os.close(main)
    return output.decode()


def test_in_a_terminal_the_bar_shows_steps_ms_per_step_and_the_running_loss(real_data,
                                                                           tmp_path):
    out = _run_in_pty(["train", "seed-model1", "--subset", "6000", "--epochs", "2",
                       "--no-plots", "--out", str(tmp_path / "r")])
    redraws = [part for line in out.splitlines() for part in line.split("\r") if part.strip()]
    steps = -(-4800 // 128)
    bars = [r for r in redraws if re.match(rf"Epoch [12]/2 +\d+/{steps} \[[=.]+\] "
                                           rf"\d\d:\d\d<", r)]
    assert bars, out[-1500:]
    summaries = [r for r in redraws if re.match(rf"Epoch [12]/2 {steps}/{steps} \[=+\] "
                                                rf"[\d.]+s - [\d.]+ms/step - loss: [\d.]+ - "
                                                rf"accuracy: [\d.]+ - val_loss: [\d.]+ - "
                                                rf"val_accuracy: [\d.]+$", r)]
    assert len(summaries) == 2, redraws[-6:]
    history = json.loads((tmp_path / "r" / "metrics.json").read_text())
    if history["train_seconds"] > 2:  # redrawn every 0.5 s: mid-epoch figures were shown
        running = [b for b in bars if "ms/step - loss: " in b and " - accuracy: " in b
                   and f"{steps}/{steps}" not in b]
        assert running, bars


def test_in_a_pipe_each_epoch_is_one_plain_line(real_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "fashion_cnn", "train", "seed-model1",
                             "--subset", "1000", "--epochs", "2", "--no-plots",
                             "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout and "ms/step" not in result.stdout
    lines = result.stdout.splitlines()
    for epoch in (1, 2):
        line = [l for l in lines if l.startswith(f"Epoch {epoch}/2")]
        assert len(line) == 1
        assert re.fullmatch(rf"Epoch {epoch}/2 - [\d.]+s - loss: [\d.]+ - accuracy: [\d.]+ - "
                            r"val_loss: [\d.]+ - val_accuracy: [\d.]+", line[0]), line[0]


def test_show_config_prints_the_config_the_run_writes(real_data, tmp_path):
    options = ["--subset", "300", "--epochs", "1", "--lr", "0.003", "--tensorboard-dir",
               str(tmp_path / "tb")]
    shown = subprocess.run([sys.executable, "-m", "fashion_cnn", "train", "seed-dense", *options,
                            "--show-config"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert not (tmp_path / "tb").exists()  # nothing trained, nothing written
    trained = subprocess.run([sys.executable, "-m", "fashion_cnn", "train", "seed-dense",
                              *options, "--no-plots", "--quiet", "--out", str(tmp_path / "r")],
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    assert shown.stdout == (tmp_path / "r" / "config.toml").read_text() + "\n"
    assert 'tensorboard_dir = "' + str(tmp_path / "tb") in shown.stdout


def test_help_after_a_recipe_shows_its_values_and_every_positional_is_explained(capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["train", "fast", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    fast = fc.load_config("fast")
    assert f"held out for validation [fast: {fast.data.validation_split!r}]" in text
    assert f"passes over the training split [fast: {fast.train.epochs!r}]" in text
    assert "default 0.2" not in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    general = " ".join(capsys.readouterr().out.split())
    assert "[fast:" not in general and "default: the recipe's" in general
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings:
                assert action.help, f"{name} {action.dest}"


def test_a_resumed_run_logs_on_from_its_checkpoint_without_repeating_epochs(small_data,
                                                                           tmp_path):
    run = tmp_path / "r"
    fc.train("seed-dense", run, data=small_data, progress=False, plots=False, subset=1000,
             epochs=2, tensorboard=True, tensorboard_every=4)
    # as after a crash late in epoch 2: its events are written, its checkpoint is not
    for name in ("epoch_2", "best"):
        shutil.rmtree(run / "checkpoints" / name, ignore_errors=True)
    resumed = fc.resume(run, data=small_data, progress=False, plots=False, epochs=3)
    train = events(run / "tensorboard" / "train")
    assert scalar_steps(train, "epoch_loss") == [1, 2, 3]  # epoch 2 shown once
    assert [e.value for e in train.Scalars("epoch_loss")] == pytest.approx(
        [h["loss"] for h in resumed.history])
    steps = scalar_steps(events(run / "tensorboard" / "batch"), "batch_loss")
    assert steps == sorted(set(steps)) and steps[-1] == 3 * (-(-800 // 128)) // 4 * 4
    assert len(events(run / "tensorboard").Tensors("config/text_summary")) == 1


def test_each_redraw_of_the_bar_shows_the_running_loss_and_accuracy(small_data):
    import io

    from fashion_cnn.training.progress import ProgressBar
    from fashion_cnn.training.run import splits_for

    cfg = fc.resolve_config("seed-dense", epochs=1, subset=600)
    splits = splits_for(cfg, small_data)
    stream = io.StringIO()
    trainer = fc.Trainer(cfg, splits, callbacks=[ProgressBar(stream, mode="terminal", refresh=0)])
    trainer.fit()
    steps = trainer.steps_per_epoch
    redraws = [part for part in stream.getvalue().split("\r") if part.strip()]
    running = [r for r in redraws if re.match(rf"Epoch 1/1 +(\d+)/{steps} \[[=.]+\] .* - "
                                              rf"[\d.]+ms/step - loss: [\d.]+ - "
                                              rf"accuracy: [\d.]+\s*$", r)]
    # refresh=0: a redraw after every step but the last, whose figures the summary line shows
    assert len(running) >= steps - 1, redraws[:3]
    losses = [float(re.search(r"loss: ([\d.]+)", r).group(1)) for r in running]
    assert len(set(losses)) > 1  # the epoch's running mean, read as it goes
    summary = redraws[-1]
    assert summary.startswith(f"Epoch 1/1 {steps}/{steps} [") and "val_loss" in summary
    assert f"loss: {trainer.state.history[-1]['loss']:.4f}" in summary
