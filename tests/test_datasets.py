"""Datasets other than Fashion-MNIST: image folders (PNG, JPEG, colour, unreadable files),
IDX folders, .npz files; a model adapted to them; every command on a colour folder."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fashion_cnn as fc
from dataset_files import COLOUR_NAMES, folder_names, tinted, write_folder, write_idx_folder
from fashion_cnn.cli import main
from fashion_cnn.data.sources import open_dataset
from fashion_cnn.errors import DataError, SpecError
from fashion_cnn.models.spec import adapt_spec, summary
from fashion_cnn.models.zoo import get_model_spec
from fashion_cnn.training import reload, run

FP32 = {"train.precision": "fp32", "train.threads": 1}


def weights_equal(a, b) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def fashion_files(real_data, tmp_path_factory):
    """The first 2,000 training and 500 test images as an IDX folder, a PNG folder and a JPEG
    folder (train/ and test/, files numbered in the IDX order)."""
    root = tmp_path_factory.mktemp("fashion-files")
    n_train, n_test = 2000, 500
    x, y = real_data.train_images[:n_train], real_data.train_labels[:n_train]
    xt, yt = real_data.test_images[:n_test], real_data.test_labels[:n_test]
    names = folder_names(real_data.class_names)
    write_idx_folder(root / "idx", x, y, xt, yt, real_data.class_names)
    for fmt in ("png", "jpg"):
        write_folder(root / fmt, x, y, names, fmt=fmt, split="train")
        write_folder(root / fmt, xt, yt, names, fmt=fmt, split="test")
    return root


FOLDER_RUN = dict(progress=False, **FP32, **{"train.epochs": 2, "train.batch_size": 64,
                                              "data.class_names": folder_names(fc.CLASS_NAMES)})


@pytest.fixture(scope="module")
def png_run(fashion_files, tmp_path_factory):
    """seed-model1 for 2 epochs on the PNG folder, files in their stored (IDX) order; the
    class_names setting numbers the folders in Fashion-MNIST's order (else sorted, as Keras)."""
    out = tmp_path_factory.mktemp("png-run") / "png"
    run.train("seed-model1", out, **FOLDER_RUN,
              **{"data.dataset": str(fashion_files / "png"), "data.order": "stored"})
    return out


def test_a_png_folder_trains_to_the_same_weights_as_its_idx_source(fashion_files, png_run,
                                                                    tmp_path):
    options = {**FOLDER_RUN, "data.class_names": []}
    idx = run.train("seed-model1", tmp_path / "idx", **options,
                    **{"data.dataset": str(fashion_files / "idx")})
    assert weights_equal(tmp_path / "idx", png_run)
    png = fc.RunDir(png_run)
    def curves(history):
        return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]
    assert curves(fc.RunDir(tmp_path / "idx").read_history()) == curves(png.read_history())
    assert idx.metrics["test_accuracy"] == png.read_metrics()["test_accuracy"]
    assert png.read_config().data.class_names == folder_names(fc.CLASS_NAMES)
    # the folder's default order shuffles the files (Keras' image_dataset_from_directory)
    shuffled = open_dataset(str(fashion_files / "png"))
    stored = open_dataset(str(fashion_files / "png"), order="stored")
    assert not np.array_equal(shuffled.train_labels, stored.train_labels)
    assert sorted(shuffled.train_labels.tolist()) == sorted(stored.train_labels.tolist())


def test_a_jpeg_folder_trains_within_a_point_of_the_png_folder(fashion_files, png_run, tmp_path):
    jpg = run.train("seed-model1", tmp_path / "jpg", **FOLDER_RUN,
                    **{"data.dataset": str(fashion_files / "jpg"), "data.order": "stored"})
    png_accuracy = fc.RunDir(png_run).read_metrics()["test_accuracy"]
    # within one point inclusive (5 of the 500 test images); 1e-9 absorbs float rounding
    # (0.73 - 0.72 is 0.010000000000000009)
    assert abs(png_accuracy - jpg.metrics["test_accuracy"]) <= 0.01 + 1e-9


@pytest.fixture(scope="module")
def colour_folder(real_data, tmp_path_factory):
    """1,500 Fashion-MNIST garments tinted by class at 32x32x3, no test/ folder."""
    root = tmp_path_factory.mktemp("colour") / "tinted"
    x, y = real_data.train_images[:1500], real_data.train_labels[:1500]
    return write_folder(root, tinted(x, y), y, COLOUR_NAMES)


SMALL_SPEC = """name = "small-colour"
input_shape = [32, 32, 3]

[[layers]]
type = "Conv2D"
filters = 16
kernel_size = 3
activation = "relu"

[[layers]]
type = "MaxPooling2D"

[[layers]]
type = "Flatten"

[[layers]]
type = "Dense"
units = 10
activation = "softmax"
"""


def test_every_command_runs_on_a_colour_folder(colour_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.toml").write_text(SMALL_SPEC)
    common = ["--dataset", str(colour_folder), "--quiet", "--threads", "1", "--precision", "fp32"]
    assert main(["train", "seed-model1", "--epochs", "1", "--out", "zoo", *common]) == 0
    assert main(["train", "small.toml", "--epochs", "1", "--out", "spec", *common,
                 "--set", "data.normalize=\"mean_std\""]) == 0
    config = fc.load_config("zoo/config.toml")
    assert config.data.class_names == sorted(COLOUR_NAMES)
    assert (config.data.image_size, config.data.channels) == (32, 3)
    assert config.model.input_shape == (32, 32, 3)
    assert config.model.total_params != get_model_spec("model1").total_params
    # the test set: 20 % of each class held out with a fixed seed, recorded in config.toml
    assert (config.data.test_fraction, config.data.split_seed) == (0.2, 0)
    # class names flow into the tables and figures
    with open("zoo/plots/per_class.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)][:10] == sorted(COLOUR_NAMES)
    assert (tmp_path / "zoo" / "plots" / "predictions.png").stat().st_size > 10_000
    spec_cfg = fc.load_config("spec/config.toml")
    assert spec_cfg.data.normalize == "mean_std" and len(spec_cfg.data.mean) == 3
    capsys.readouterr()

    assert main(["resume", "zoo", "--epochs", "2", "--quiet", "--no-plots"]) == 0
    assert len(fc.RunDir("zoo").read_history()) == 2
    capsys.readouterr()
    assert main(["evaluate", "spec", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert set(evaluated["per_class_accuracy"]) == set(COLOUR_NAMES)
    assert main(["plots", "zoo"]) == 0
    image = next((colour_folder / "teal-bag").iterdir())
    assert main(["predict", "spec", str(image), "--json"]) == 0
    capsys.readouterr()
    # predict applies the run's mean/std: it agrees with evaluation on the same test images
    cfg, model, splits = reload.open_run("spec")
    data = run.data_for(cfg)
    from fashion_cnn.apps.predict import predict_arrays
    probabilities = predict_arrays(model, cfg, data.test_images[:64])
    from fashion_cnn.training.loop import evaluate
    reference = evaluate(model, splits.x_test[:64], splits.y_test[:64])
    assert np.array_equal(probabilities.argmax(1), reference["predictions"].numpy())

    for name in ("zoo", "spec"):
        assert main(["export", name]) == 0
    out = capsys.readouterr().out
    assert "uint8 (N, 32, 32, 3)" in out and "(N, 10)" in out
    import onnx
    meta = {p.key: p.value for p in onnx.load("spec/model.onnx").metadata_props}
    assert json.loads(meta["class_names"]) == sorted(COLOUR_NAMES)

    assert main(["tune", "fast", "--dataset", str(colour_folder), "--trials", "2", "--quiet",
                 "--subset", "600", "--set", "train.epochs=1", "--set", "train.precision=\"fp32\"",
                 "--out", "tune"]) == 0
    best = fc.load_config("tune/best.toml")
    assert best.data.dataset == str(colour_folder)
    (tmp_path / "study.toml").write_text(
        'name = "pair"\n[[runs]]\nname = "model1"\nrecipe = "seed-model1"\n'
        '[[runs]]\nname = "small"\nrecipe = "small.toml"\nbaseline = "model1"\n'
        '[overrides]\ntrain = {precision = "fp32", threads = 1}\n')
    assert main(["study", "study.toml", "--dataset", str(colour_folder), "--epochs-scale", "0.1",
                 "--out", "study", "--quiet"]) == 0
    report = (tmp_path / "study" / "report.html").read_text()
    assert "small" in report and "model1" in report
    with open("study/small/plots/confusion_matrix.csv") as f:
        assert next(csv.reader(f))[1:] == sorted(COLOUR_NAMES)


def test_npz_and_idx_datasets_train(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    images = (rng.integers(0, 40, (300, 20, 20)) + labels[:, None, None] * 70).astype(np.uint8)
    np.savez(tmp_path / "three.npz", x_train=images[:240], y_train=labels[:240],
             x_test=images[240:], y_test=labels[240:], class_names=np.array(["a", "b", "c"]))
    write_idx_folder(tmp_path / "idx", images[:240], labels[:240], images[240:], labels[240:])
    for dataset in ("three.npz", "idx"):
        result = run.train("seed-model1", tmp_path / f"run-{dataset}", progress=False, **FP32,
                           **{"train.epochs": 8, "train.batch_size": 16,
                              "data.dataset": str(tmp_path / dataset)})
        assert result.config.model.input_shape == (28, 28, 1)  # 20x20 padded up to model1's
        assert result.config.pad == 4
        assert result.config.model.layers[-1].output_shape == (3,)
        assert result.metrics["test_accuracy"] > 0.9  # three classes told apart by brightness
    assert result.config.data.class_names == ["0", "1", "2"]  # an IDX folder without classes.txt
    assert fc.load_config(str(tmp_path / "run-three.npz" / "config.toml")).data.class_names == ["a", "b", "c"]


def test_unreadable_images_are_skipped_with_a_warning_or_refused_when_strict(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 30), (i * 40, 100, 200 if cls == "cat" else 0)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"this is not a PNG")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[:len(good) // 2])
    (root / "cat" / "notes.txt").write_text("not an image: not even looked at")
    data = open_dataset(str(root), image_size=16)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image file(s)" in err
    assert "broken.png" in err and "truncated.png" in err
    assert len(data.train_labels) + len(data.test_labels) == 12
    assert data.train_images.shape[1:] == (16, 16, 3)
    with pytest.raises(DataError, match="cannot read as an image.*--strict"):
        open_dataset(str(root), image_size=16, strict=True)
    assert main(["data", "--dataset", str(root), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fashion-cnn: error:") and len(err.splitlines()) == 1
    # different sizes and no image_size: one line asking for it
    with pytest.raises(DataError, match="image_size"):
        Image.new("RGB", (20, 20)).save(root / "dog" / "small.png")
        open_dataset(str(root))


def test_the_cache_notices_a_changed_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "shapes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (12, 12), 50 * i).save(root / cls / f"{i}.png")
    first = open_dataset(str(root))
    again = open_dataset(str(root))
    assert again.from_cache and not first.from_cache
    Image.new("L", (12, 12), 255).save(root / "b" / "new.png")
    changed = open_dataset(str(root))
    assert not changed.from_cache
    assert len(changed.train_labels) + len(changed.test_labels) == 11


def test_the_holdout_is_stratified_and_fixed():
    from fashion_cnn.data.arrays import stratified_holdout

    labels = np.repeat(np.arange(4), [10, 20, 30, 5])
    mask = stratified_holdout(labels, 0.2, seed=0)
    assert np.bincount(labels[mask]).tolist() == [2, 4, 6, 1]
    assert np.array_equal(mask, stratified_holdout(labels, 0.2, seed=0))
    assert not np.array_equal(mask, stratified_holdout(labels, 0.2, seed=1))


def test_zoo_models_adapt_to_the_data_or_name_the_layer_that_cannot():
    model1 = get_model_spec("model1")
    colour = adapt_spec(model1, 32, 3, 5)
    assert colour.input_shape == (32, 32, 3) and colour.layers[-1].output_shape == (5,)
    assert colour.total_params != model1.total_params
    assert "Total params: " + f"{colour.total_params:,}" in summary(colour)
    assert adapt_spec(model1, 28, 1, 10) is model1  # nothing to change
    assert adapt_spec(model1, 20, 1, 10) is model1  # smaller images are padded up to it
    with pytest.raises(SpecError) as info:  # [data] pad = 0: the model takes 6x6 images
        adapt_spec(get_model_spec("model2"), 6, 1, 10, exact=True)
    message = str(info.value)
    assert "layer" in message and len(message.splitlines()) == 1


def test_a_warm_folder_load_hashes_only_the_files_that_changed(tmp_path, monkeypatch):
    import os
    import time

    from PIL import Image

    from fashion_cnn import fileio
    from fashion_cnn.data import arrays

    monkeypatch.setattr(arrays, "SETTLE_NS", 0)  # stamp files at once, however new they are
    hashed, real = [], fileio.sha256_file
    monkeypatch.setattr(fileio, "sha256_file",
                        lambda path, *a, **k: hashed.append(os.path.basename(path))
                        or real(path, *a, **k))
    root = tmp_path / "shapes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 12), 40 * i + 1).save(root / cls / f"{i}.bmp")
    first = open_dataset(str(root))
    assert len(hashed) == 6 and not first.from_cache  # cold: every file hashed once
    hashed.clear()
    assert open_dataset(str(root)).from_cache and hashed == []  # warm: no image file read
    time.sleep(0.05)  # past the file system's timestamp tick: the write below moves ctime
    path = root / "b" / "2.bmp"
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # a pixel, in place: same size, modification time restored
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = open_dataset(str(root))
    assert hashed == ["2.bmp"] and not again.from_cache
