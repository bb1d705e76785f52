"""Figures: files after `train` and `plots`, and their content (counts, colours, curve points)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from fashion_cnn.data import fashion_mnist as fdata
from fashion_cnn.analysis import figures, image_figures, metrics, plots, tables
from fashion_cnn.training.progress import in_notebook
import fashion_cnn as fc
from fashion_cnn.models.build import build_model
from fashion_cnn.cli import main
from fashion_cnn import CLASS_NAMES
from fashion_cnn.data.augment import AugmentConfig
from fashion_cnn.models.zoo import get_model_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVERY_FILE = plots.RUN_FIGURES + plots.RUN_TABLES


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_all_files(folder: Path, min_png_bytes: int = 10_000) -> None:
    for name in EVERY_FILE:
        path = folder / name
        assert path.is_file(), f"missing {path}"
        if name.endswith(".png"):
            data = path.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > min_png_bytes, name


def matrix_from_csv(folder: Path) -> np.ndarray:
    rows = read_csv(folder / "confusion_matrix.csv")
    return np.array([[int(r[name]) for name in CLASS_NAMES] for r in rows])


@pytest.fixture(scope="module")
def trained_run(real_data, tmp_path_factory):
    """A real 2-epoch model1 run on 2,000 training images: every figure written by train()."""
    run_dir = tmp_path_factory.mktemp("plots") / "run"
    result = fc.train("seed-model1", run_dir, data=real_data, progress=False, subset=2000, epochs=2)
    return result


# ----------------------------------------------------------------------------- after train

def test_train_writes_every_figure_and_table(trained_run):
    assert_all_files(trained_run.run_dir / "plots")


def test_confusion_matrix_matches_metrics_json(trained_run):
    metrics = json.loads((trained_run.run_dir / "metrics.json").read_text())
    matrix = matrix_from_csv(trained_run.run_dir / "plots")
    assert matrix.shape == (10, 10)
    assert matrix.sum() == metrics["test_size"] == 10_000
    assert np.trace(matrix) == metrics["test_correct"]


def test_per_class_table_matches_the_matrix(trained_run):
    folder = trained_run.run_dir / "plots"
    matrix = matrix_from_csv(folder)
    rows = read_csv(folder / "per_class.csv")
    assert [r["class"] for r in rows] == CLASS_NAMES
    for i, row in enumerate(rows):
        assert int(row["support"]) == matrix[i].sum()
        assert float(row["recall"]) == pytest.approx(matrix[i, i] / matrix[i].sum(), abs=1e-4)
        if matrix[:, i].sum():
            assert float(row["precision"]) == pytest.approx(matrix[i, i] / matrix[:, i].sum(), abs=1e-4)
    pairs = read_csv(folder / "confused_pairs.csv")
    assert 1 <= len(pairs) <= 5
    counts = [int(p["count"]) for p in pairs]
    assert counts == sorted(counts, reverse=True)
    names = CLASS_NAMES
    top = pairs[0]
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    assert counts[0] == off.max() == matrix[names.index(top["true"]), names.index(top["predicted"])]


def test_per_class_text_round_trips_through_the_csv(trained_run):
    text = tables.read_per_class(trained_run.run_dir / "plots")
    assert text.splitlines()[0].split() == ["class", "precision", "recall", "F1", "support"]
    assert "Most confused" in text and "Ankle boot" in text


def test_metrics_png_shows_the_completed_epochs(trained_run):
    fig = figures.figure_metrics(trained_run.history, epochs=trained_run.config.train.epochs)
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.lines}
        assert len(lines["train"].get_xdata()) == len(trained_run.history) == 2
        assert len(lines["validation"].get_xdata()) == 2


# ----------------------------------------------------------------------------- fashion-cnn plots

def test_plots_command_regenerates_everything(trained_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, copy)
    shutil.rmtree(copy / "plots")
    assert main(["plots", str(copy)]) == 0
    assert_all_files(copy / "plots")
    assert "macro average" in capsys.readouterr().out
    # The same weights give the same predictions as at the end of training.
    assert (matrix_from_csv(copy / "plots") == matrix_from_csv(trained_run.run_dir / "plots")).all()



def test_plots_from_a_checkpoint(tmp_path, tiny_idx):
    """A tiny synthetic run (48 training, 20 test images): its epoch-1 checkpoint's figures."""
    tiny = fdata.load_data(tiny_idx, check_md5=False)
    result = fc.train("seed-model1", tmp_path / "run", data=tiny, progress=False, epochs=2,
                       batch_size=16, plots=False)
    folder, text = plots.plots_from_run(result.run_dir, checkpoint="1", data=tiny)
    assert folder == result.run_dir / "plots" / "model1_1"
    assert_all_files(folder, min_png_bytes=1_000)
    assert matrix_from_csv(folder).sum() == 20
    assert "macro average" in text
    history = fc.RunDir(result.run_dir).read_history()
    assert len(history) == 2  # the run's history; the checkpoint's figure shows only epoch 1
    fig = figures.figure_metrics(history[:1], epochs=2)
    assert len(fig.axes[0].lines[0].get_xdata()) == 1


def test_plots_command_errors_are_one_line(trained_run, tmp_path, capsys):
    assert main(["plots", str(trained_run.run_dir), "--checkpoint", "99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fashion-cnn: error:") and "model1_1" in err and len(err.splitlines()) == 1
    assert main(["plots", str(tmp_path / "nothing")]) == 2


def test_compare_writes_its_files(trained_run, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(trained_run.run_dir), str(trained_run.run_dir), "--out", str(out)]) == 0
    for name in ("learning_curves.png", "weights.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def test_compare_curves_one_line_per_run_and_split():
    history = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + e / 10,
                "val_loss": 1.2 / e, "val_accuracy": 0.45 + e / 10} for e in (1, 2, 3)]
    fig = figures.figure_compare_curves({"a": history, "b": history[:2]}, epochs=5)
    loss_ax = fig.axes[0]
    assert [len(line.get_xdata()) for line in loss_ax.lines] == [3, 3, 2, 2]
    assert loss_ax.get_xlim() == (0.5, 5.5)


# ----------------------------------------------------------------------------- unit content

def test_prediction_colour_follows_correctness():
    assert image_figures.prediction_color(3, 3) == figures.CORRECT_COLOR
    assert image_figures.prediction_color(3, 4) == figures.WRONG_COLOR
    assert figures.CORRECT_COLOR != figures.WRONG_COLOR
    p = np.array([0.1, 0.7, 0.2])
    assert image_figures.bar_colors(p, true=1)[1] == figures.CORRECT_COLOR          # right: one blue bar
    wrong = image_figures.bar_colors(p, true=2)
    assert wrong[1] == figures.WRONG_COLOR and wrong[2] == figures.CORRECT_COLOR


def test_prediction_grid_captions_are_coloured_by_correctness():
    images = torch.zeros(15, 1, 28, 28)
    labels = np.arange(15) % 10
    probabilities = np.full((15, 10), 0.01)
    predicted = labels.copy()
    predicted[[1, 4, 7]] = (labels[[1, 4, 7]] + 1) % 10                     # three mistakes
    probabilities[np.arange(15), predicted] = 0.91
    fig = image_figures.figure_predictions(images, labels, probabilities)
    captions = [t for t in fig.axes[0].texts if "\n(" in t.get_text()]
    assert len(captions) == 15
    for i, text in enumerate(captions):
        expected = figures.WRONG_COLOR if i in (1, 4, 7) else figures.CORRECT_COLOR
        assert mcolors.same_color(text.get_color(), expected), i
        assert text.get_text().startswith(f"{CLASS_NAMES[predicted[i]]} 91%")


def test_misclassified_shows_the_most_confident_mistakes_first():
    labels = np.zeros(6, dtype=np.int64)
    probabilities = np.full((6, 10), 0.0)
    probabilities[:, 0] = 1.0
    probabilities[2] = 0.0
    probabilities[2, 3] = 0.9
    probabilities[5] = 0.0
    probabilities[5, 4] = 0.99
    fig = image_figures.figure_misclassified(torch.zeros(6, 1, 28, 28), labels, probabilities)
    titles = [t.get_text() for t in fig.axes[0].texts if "%" in t.get_text()]
    assert titles == ["Coat 99%", "Dress 90%"]
    assert "2 most confident mistakes (2 wrong of 6" in fig.get_suptitle()


def test_confusion_matrix_counts_and_figure():
    matrix = metrics.confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    fig = figures.figure_confusion(matrix, class_names=["a", "b", "c"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Predicted class" and ax.get_ylabel() == "True class"
    assert ax.images[0].get_cmap().name == "Reds"
    assert [t.get_text() for t in ax.texts] == ["1", "1", "0", "0", "1", "0", "1", "0", "2"]
    table = metrics.per_class_table(matrix, ["a", "b", "c"])
    assert [round(r["recall"], 4) for r in table] == [0.5, 1.0, round(2 / 3, 4)]
    assert [round(r["precision"], 4) for r in table] == [0.5, 0.5, 1.0]


def test_metrics_curves_are_matched_by_key_and_span_planned_epochs():
    # Keys in an unusual order and extra ones: values must still land on the right curve.
    history = [{"val_accuracy": 0.8, "lr": 1e-3, "epoch": 1, "accuracy": 0.7, "val_loss": 0.6,
                "loss": 0.9, "seconds": 3.0},
               {"seconds": 3.0, "loss": 0.5, "epoch": 2, "val_loss": 0.55, "accuracy": 0.8,
                "val_accuracy": 0.82, "lr": 1e-3}]
    fig = figures.figure_metrics(history, epochs=25)
    loss_ax, acc_ax = fig.axes
    line = {l.get_label(): l for l in loss_ax.lines}
    assert list(line["train"].get_ydata()) == [0.9, 0.5]
    assert list(line["validation"].get_ydata()) == [0.6, 0.55]
    assert list({l.get_label(): l for l in acc_ax.lines}["validation"].get_ydata()) == [0.8, 0.82]
    assert loss_ax.get_xlim() == (0.5, 25.5)
    assert "epoch 2 of 25" in fig.get_suptitle()


class _FakeTrainer:
    def __init__(self, config):
        self.config = config
        self.state = type("State", (), {"history": []})()


def test_live_plot_rewrites_the_png_each_epoch_and_updates_a_notebook(tmp_path, monkeypatch):
    import IPython.display

    shown, updated = [], []

    class Handle:
        def update(self, obj):
            updated.append(obj)

    def fake_display(obj, display_id=False):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(IPython.display, "display", fake_display)
    trainer = _FakeTrainer(fc.resolve_config("seed-model1", **{"train.epochs": 4}))
    live = plots.LivePlot(tmp_path / "plots" / "metrics.png", notebook=True)
    live.on_train_begin(trainer)
    for epoch in range(3):
        trainer.state.history.append({"epoch": epoch + 1, "loss": 1.0 - 0.1 * epoch,
                                      "accuracy": 0.6 + 0.1 * epoch, "val_loss": 1.1 - 0.1 * epoch,
                                      "val_accuracy": 0.55 + 0.1 * epoch})
        live.on_epoch_end(trainer, epoch, trainer.state.history[-1])
        assert (tmp_path / "plots" / "metrics.png").read_bytes().startswith(PNG_MAGIC)
        train_line = [l for l in live.fig.axes[0].lines if l.get_label() == "train"][0]
        assert len(train_line.get_xdata()) == epoch + 1
        assert live.fig.axes[0].get_xlim() == (0.5, 4.5)
    assert len(shown) == 1 and len(updated) == 2
    assert not list((tmp_path / "plots").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_live_plot_outside_jupyter_does_not_display(tmp_path):
    assert in_notebook() is False
    live = plots.LivePlot(tmp_path / "m.png")
    trainer = _FakeTrainer(fc.resolve_config("seed-model1"))
    live.on_train_begin(trainer)
    trainer.state.history.append({"epoch": 1, "loss": 1.0, "accuracy": 0.5})  # no validation split
    live.on_epoch_end(trainer, 0, trainer.state.history[-1])
    assert live.notebook is False and (tmp_path / "m.png").is_file()


def test_weights_histograms_fit_each_layer_or_use_the_seed_bins():
    model = build_model(get_model_spec("model1"), seed=0)
    names = [name for name, _ in model.named_weight_layers()]
    kernels = dict(model.named_weight_layers())
    fitted = figures.figure_weights(model)
    seed_view = figures.figure_weights(model, value_range=figures.SEED_HIST_RANGE)
    assert len(fitted.axes) == len(seed_view.axes) == len(names) == 5
    for fit_ax, seed_ax, name in zip(fitted.axes, seed_view.axes, names):
        assert fit_ax.get_title().startswith(name) and seed_ax.get_title().startswith(name)
        largest = float(kernels[name].abs().max())
        # fitted: the bins span exactly this layer's values, symmetric about 0
        xs = fit_ax.patches[0].get_xy()[:, 0]  # one stepfilled polygon per histogram
        assert fit_ax.get_xlim() == pytest.approx((-largest, largest))
        assert xs.min() == pytest.approx(-largest) and xs.max() == pytest.approx(largest)
        assert len(np.unique(np.round(xs, 9))) == figures.HIST_BINS + 1
        # the seed's view: the same 40 bins on +-0.5 for every layer
        xs = seed_ax.patches[0].get_xy()[:, 0]
        assert seed_ax.get_xlim() == figures.SEED_HIST_RANGE
        assert xs.min() == pytest.approx(-0.5) and xs.max() == pytest.approx(0.5)
        assert len(np.unique(np.round(xs, 6))) == figures.HIST_BINS + 1
    # model1's 576 -> 64 Dense layer (glorot: uniform on +-0.097) fills every bin when
    # fitted, and about 8 of the 40 on +-0.5
    dense = kernels[names[3]].flatten().numpy()
    filled = lambda lo, hi: np.count_nonzero(np.histogram(dense, figures.HIST_BINS, (lo, hi))[0])
    largest = float(np.abs(dense).max())
    assert filled(-largest, largest) == figures.HIST_BINS and filled(-0.5, 0.5) <= 10


@pytest.mark.parametrize("low, high", [(0.78, 0.9), (0.885, 0.905), (0.1, 0.95), (0.9, 0.9004)])
def test_accuracy_ticks_say_what_they_mark(low, high):
    history = [{"epoch": 1, "loss": 0.5, "accuracy": low, "val_loss": 0.5, "val_accuracy": low},
               {"epoch": 2, "loss": 0.4, "accuracy": high, "val_loss": 0.4, "val_accuracy": high}]
    fig = figures.figure_metrics(history, epochs=2)
    fig.canvas.draw()
    ax = fig.axes[1]
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(ticks) >= 2 and len(labels) == len(ax.get_yticks())
    for value, label in zip(ax.get_yticks(), labels):  # the label, read back, is the tick
        assert float(label.rstrip("%")) == pytest.approx(100 * value, abs=1e-9)
    # and carries no decimal that every label has as zero ("80.0%")
    decimals = [label.rstrip("%").partition(".")[2] for label in labels]
    assert not all(d and set(d) == {"0"} for d in decimals)


def test_activations_show_every_conv_layer_for_one_image_per_class():
    model = build_model(get_model_spec("model1"), seed=0)
    labels = torch.arange(30) % 10
    fig = image_figures.figure_activations(model, torch.randn(30, 1, 28, 28), labels)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["input", "conv2d\n26x26x32", "conv2d_1\n11x11x64", "conv2d_2\n3x3x64"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == CLASS_NAMES
    mosaic = fig.axes[1].images[0].get_array()  # 10 classes x 8 channels of 78-pixel tiles
    gap = round(image_figures.TILE_PIXELS * image_figures.TILE_GAP)
    assert mosaic.shape == (10 * (image_figures.TILE_PIXELS + gap) - gap, 8 * (image_figures.TILE_PIXELS + gap) - gap)
    assert np.nanmin(mosaic) >= 0 and np.nanmax(mosaic) <= 1  # each channel scaled to [0, 1]
    dense = build_model(get_model_spec("dense"), seed=0)  # no conv layer: still a figure
    assert isinstance(image_figures.figure_activations(dense, torch.randn(10, 1, 28, 28), labels[:10]), Figure)


def test_augmentation_figure_titles_rows_and_states_settings():
    cfg = AugmentConfig(enabled=False, rotation_range=2, width_shift_range=0.05)
    fig = image_figures.figure_augmentation(torch.rand(4, 1, 36, 36) - 0.5, cfg, seed=1)
    row_labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert row_labels == ["original", "augmented\n(draw 1)", "augmented\n(draw 2)", "augmented\n(draw 3)"]
    title = fig.get_suptitle()
    assert "rotation ±2°" in title and "width shift ±5%" in title and "off in this recipe" in title
    original, augmented = fig.axes[0].images[0].get_array(), fig.axes[4].images[0].get_array()
    assert not np.allclose(original, augmented)
    plain = image_figures.figure_augmentation(torch.zeros(2, 1, 28, 28), AugmentConfig(), seed=0)
    assert "no augmentation settings" in plain.get_suptitle()
    assert "fill nearest" in title
    assert image_figures.describe_augment(AugmentConfig(horizontal_flip=True)) == "horizontal flip (p = 0.5)"


def test_augment_preview_command(real_data, tmp_path, monkeypatch, capsys):
    path = plots.augmentation_preview("seed-model4", tmp_path / "aug.png", n=4, data=real_data)
    assert path.read_bytes().startswith(PNG_MAGIC)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(real_data.source))
    assert main(["augment-preview", "seed-model1", "--out", str(tmp_path), "-n", "3"]) == 0
    assert (tmp_path / "augment_preview.png").is_file()


def test_conv_activations_include_the_relu_moved_after_pooling():
    from fashion_cnn.models.build import build_model
    from fashion_cnn.analysis.image_figures import conv_activations
    from fashion_cnn.models.zoo import get_model_spec

    model = build_model(get_model_spec("model1"), seed=0)
    maps = conv_activations(model, torch.randn(3, 1, 28, 28))
    assert [name for name, _ in maps] == ["conv2d", "conv2d_1", "conv2d_2"]
    assert all(float(m.min()) >= 0.0 for _, m in maps)  # every Conv2D of model1 has relu
