"""Keras import (models/keras_format.py, apps/keras_import.py). The Keras files are written here with h5py, zipfile and
json in Keras' own layouts (Keras 3's .keras and .weights.h5, Keras 2's .h5 full model and
weights file), with random weights; no TensorFlow is needed. The proof of the conversion is a
NumPy forward pass of the Keras model in channels-last order, as Keras computes it, against
our model's logits. The check against TensorFlow itself (benchmarks/keras_import_check.py) runs
only with FASHION_CNN_TEST_KERAS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fashion_cnn.apps.keras_import import import_keras
from fashion_cnn.models.keras_format import keras_to_spec, load_keras
from fashion_cnn.errors import CheckpointError, SpecError, UserError
from fashion_cnn.training.rundir import RunDir
from fashion_cnn.training.reload import evaluate_run, load_model
from fashion_cnn.training.run import resume

h5py = pytest.importorskip("h5py")

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ Keras' layouts, written here


def keras_layer(kind: str, name: str, keras3: bool = True, **config) -> dict:
    config = {"name": name, "trainable": True, "dtype": "float32", **config}
    entry = {"class_name": kind, "config": config}
    if keras3:
        entry.update(module="keras.layers", registered_name=None)
    return entry


def initializer(kind: str) -> dict:
    return {"module": "keras.initializers", "class_name": kind, "config": {"seed": None},
            "registered_name": None}


def conv(name, filters, keras3=True, **changes):
    config = dict(filters=filters, kernel_size=[3, 3], strides=[1, 1], padding="valid",
                  data_format="channels_last", dilation_rate=[1, 1], groups=1,
                  activation="relu", use_bias=True,
                  kernel_initializer=initializer("GlorotUniform"),
                  bias_initializer=initializer("Zeros"), kernel_regularizer=None,
                  bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                  bias_constraint=None)
    return keras_layer("Conv2D", name, keras3, **{**config, **changes})


def dense(name, units, activation, keras3=True):
    return keras_layer("Dense", name, keras3, units=units, activation=activation, use_bias=True,
                       kernel_initializer=initializer("GlorotUniform"),
                       bias_initializer=initializer("Zeros"), kernel_regularizer=None,
                       bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                       bias_constraint=None)


def sequential(layers: list, name: str = "model1", keras3: bool = True) -> dict:
    shape_key = "batch_shape" if keras3 else "batch_input_shape"
    first = keras_layer("InputLayer", "input_layer", keras3, **{shape_key: [None, 28, 28, 1]})
    config = {"class_name": "Sequential", "config": {"name": name, "layers": [first, *layers]}}
    if keras3:
        config["module"] = "keras"
    return config


def model1_like(keras3: bool = True, names=("conv2d", "max_pooling2d", "dropout", "flatten",
                                               "dense", "dense_1")) -> dict:
    """The brief's model1-like network: Conv2D(32, 3x3, relu), MaxPooling2D, Dropout, Flatten,
    Dense(128, relu), Dense(10, softmax)."""
    c, p, d, f, d1, d2 = names
    return sequential([
        conv(c, 32, keras3),
        keras_layer("MaxPooling2D", p, keras3, pool_size=[2, 2], padding="valid",
                    strides=[2, 2], data_format="channels_last"),
        keras_layer("Dropout", d, keras3, rate=0.25, seed=None, noise_shape=None),
        keras_layer("Flatten", f, keras3, data_format="channels_last"),
        dense(d1, 128, "relu", keras3), dense(d2, 10, "softmax", keras3)], keras3=keras3)


def model1_weights(seed: int = 0) -> list[tuple[str, list[np.ndarray]]]:
    """(class, [arrays in Keras' order]) per layer; Keras' shapes, random values."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.normal(0.0, 0.1, size=shape).astype(np.float32)

    return [("Conv2D", [r(3, 3, 1, 32), r(32)]), ("MaxPooling2D", []), ("Dropout", []),
            ("Flatten", []), ("Dense", [r(13 * 13 * 32, 128), r(128)]),
            ("Dense", [r(128, 10), r(10)])]


def keras3_keys(classes: list[str]) -> list[str]:
    """Keras 3's group names: the snake-cased class, _1, _2, ... per class, in model order."""
    snake = {"Conv2D": "conv2d", "MaxPooling2D": "max_pooling2d", "Dropout": "dropout",
             "Flatten": "flatten", "Dense": "dense", "BatchNormalization": "batch_normalization",
             "SeparableConv2D": "separable_conv2d",
             "GlobalAveragePooling2D": "global_average_pooling2d"}
    seen: dict[str, int] = {}
    keys = []
    for kind in classes:
        n = seen.get(kind, 0)
        seen[kind] = n + 1
        keys.append(snake[kind] + (f"_{n}" if n else ""))
    return keys


def write_keras3_weights(target, weights, layer_names) -> None:
    """Keras 3's model.weights.h5: layers/<key>/vars/<i>, an optimizer group, a root vars."""
    with h5py.File(target, "w") as h5:
        keys = keras3_keys([kind for kind, _ in weights])
        for key, name, (_, arrays) in zip(keys, layer_names, weights):
            group = h5.create_group(f"layers/{key}/vars")
            group.attrs["name"] = name
            for i, array in enumerate(arrays):
                group.create_dataset(str(i), data=array)
        opt = h5.create_group("optimizer/vars")
        opt.attrs["name"] = "adam"
        opt.create_dataset("0", data=np.int64(7))
        h5.create_group("vars").attrs["name"] = "model1"


def write_keras3(path: Path, config: dict, weights) -> Path:
    names = [layer["config"]["name"] for layer in config["config"]["layers"][1:]]
    buffer = path.with_suffix(".h5.tmp")
    write_keras3_weights(buffer, weights, names)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1",
                                                      "date_saved": "2026-12-03@10:00:00"}))
        archive.writestr("config.json", json.dumps(config))
        archive.write(buffer, "model.weights.h5")
    buffer.unlink()
    return path


ROLES = {"Conv2D": ["kernel", "bias"], "Dense": ["kernel", "bias"],
         "BatchNormalization": ["gamma", "beta", "moving_mean", "moving_variance"]}


def write_keras2_layers(group, weights, layer_names) -> None:
    """Keras 2's layout: layer_names, and per layer a group whose weight_names list its
    datasets, "<layer>/<role>:0" (as bytes, as Keras 2 wrote them)."""
    group.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
    for name, (kind, arrays) in zip(layer_names, weights):
        layer = group.create_group(name)
        weight_names = [f"{name}/{role}:0" for role in ROLES.get(kind, [])[:len(arrays)]]
        layer.attrs["weight_names"] = (np.array([w.encode() for w in weight_names])
                                       if weight_names else np.array([], dtype=np.float64))
        # stored in another order than listed: the names, not the order, say which is which
        for weight, array in sorted(zip(weight_names, arrays), key=lambda item: item[0]):
            layer.create_dataset(weight, data=array)


def write_keras2(path: Path, config: dict, weights, old: bool = False) -> Path:
    """A Keras 2 .h5 full model; `old`: as TF 1.14's Keras (the seed's) wrote it, with no
    InputLayer (the first layer carries batch_input_shape) and the config as bytes."""
    layers = config["config"]["layers"]
    if old:
        layers[1]["config"]["batch_input_shape"] = layers[0]["config"]["batch_input_shape"]
        del layers[0]
    names = [layer["config"]["name"] for layer in layers if layer["class_name"] != "InputLayer"]
    with h5py.File(path, "w") as h5:
        h5.attrs["backend"] = "tensorflow"
        h5.attrs["keras_version"] = "2.2.4-tf" if old else "2.15.0"
        h5.attrs["model_config"] = json.dumps(config).encode() if old else json.dumps(config)
        h5.attrs["training_config"] = json.dumps({"loss": "sparse_categorical_crossentropy"})
        write_keras2_layers(h5.create_group("model_weights"), weights, names)
        h5.create_group("optimizer_weights")
    return path


def write_keras2_weights(path: Path, weights, names) -> Path:
    with h5py.File(path, "w") as h5:
        write_keras2_layers(h5, weights, names)
    return path


# ------------------------------------------------------------------ Keras' arithmetic, in NumPy

def relu(x):
    return np.maximum(x, 0.0)


def numpy_forward(x: np.ndarray, weights) -> np.ndarray:
    """model1_like's logits (before its softmax) as Keras computes them: channels last, and
    Flatten in (H, W, C) order. x: (N, 28, 28, 1)."""
    (kernel, bias), (w1, b1), (w2, b2) = weights[0][1], weights[4][1], weights[5][1]
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # N,26,26,C,3,3
    h = relu(np.einsum("nhwcij,ijco->nhwo", patches, kernel) + bias)             # N,26,26,32
    n, rows, cols, c = h.shape
    h = h.reshape(n, rows // 2, 2, cols // 2, 2, c).max(axis=(2, 4))             # N,13,13,32
    h = h.reshape(n, -1)                                                          # (H, W, C)
    return relu(h @ w1 + b1) @ w2 + b2


def our_logits(net, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


@pytest.fixture(scope="module")
def x_images() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(6, 28, 28, 1)).astype(np.float32)


# ------------------------------------------------------------------ the tests

def test_spec_from_a_keras_config():
    spec = keras_to_spec(json.dumps(model1_like()))
    assert spec.name == "model1" and spec.input_shape == (28, 28, 1)
    assert [layer.type for layer in spec.layers] == ["Conv2D", "MaxPooling2D", "Dropout",
                                                     "Flatten", "Dense", "Dense"]
    conv_layer, dense_layer = spec.layers[0], spec.layers[-1]
    assert conv_layer.args["filters"] == 32 and conv_layer.args["kernel_size"] == (3, 3)
    assert conv_layer.args["activation"] == "relu" and spec.layers[2].args["rate"] == 0.25
    assert dense_layer.args["units"] == 10 and spec.output == "softmax"
    # Keras' parameter count: 320 + 5408 * 128 + 128 + 1,290
    assert spec.total_params == 320 + 5408 * 128 + 128 + 1290


def test_keras_options_carried_over():
    config = sequential([
        conv("c", 8, kernel_regularizer={"module": "keras.regularizers", "class_name": "L2",
                                         "config": {"l2": 0.009999999776482582},
                                         "registered_name": None}),
        keras_layer("BatchNormalization", "bn", axis=-1, momentum=0.9, epsilon=0.001,
                    center=True, scale=False),
        keras_layer("GlobalAveragePooling2D", "gap", data_format="channels_last",
                    keepdims=False),
        keras_layer("ReLU", "r", max_value=None, negative_slope=0.0, threshold=0.0),
        dense("out", 10, "softmax")])
    spec = keras_to_spec(config)
    assert str(spec.layers[0].args["kernel_regularizer"]) == "l2(0.01)"
    assert spec.layers[1].args["momentum"] == 0.9 and spec.layers[1].args["scale"] is False
    assert spec.layers[3].type == "Activation" and spec.layers[3].args["activation"] == "relu"


def test_converted_tensors_are_keras_weights_permuted(tmp_path):
    weights = model1_weights()
    net = load_keras(write_keras3(tmp_path / "model1.keras", model1_like(), weights))
    state = net.state_dict()
    (kernel, bias), (w1, b1), (w2, b2) = weights[0][1], weights[4][1], weights[5][1]
    conv_w = next(v for k, v in state.items() if k.startswith("layers.0") and k.endswith("weight"))
    assert torch.equal(conv_w, torch.from_numpy(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW
    assert torch.equal(state["layers.4.0.weight"],                               # after Flatten:
                       torch.from_numpy(w1.reshape(13, 13, 32, 128)              # (H, W, C) rows
                                    .transpose(3, 2, 0, 1).reshape(128, -1)))   # -> (C, H, W)
    assert not torch.equal(state["layers.4.0.weight"], torch.from_numpy(w1.T))
    assert torch.equal(state["layers.5.weight"], torch.from_numpy(w2.T))
    for key, value in (("layers.4.0.bias", b1), ("layers.5.bias", b2)):
        assert torch.equal(state[key], torch.from_numpy(value))
    assert any(torch.equal(v, torch.from_numpy(bias)) for k, v in state.items() if "bias" in k)
    assert not net.training  # ready for inference


@pytest.mark.parametrize("form", ["keras3", "keras2", "keras2-tf1", "keras3-weights",
                                  "keras2-weights"])
def test_logits_match_keras_arithmetic(tmp_path, x_images, form):
    weights = model1_weights(seed=2)
    # Keras 2 files are looked up by the layer names, which need not be the automatic ones
    names = ("conv2d_3", "max_pooling2d_3", "dropout_2", "flatten_1", "dense_5", "dense_6")
    if form == "keras3":
        net = load_keras(write_keras3(tmp_path / "m.keras", model1_like(names=names), weights))
    elif form == "keras2":
        net = load_keras(write_keras2(tmp_path / "m.h5", model1_like(False, names), weights))
    elif form == "keras2-tf1":  # the seed's ModelCheckpoint("model1_{epoch}"): no extension
        net = load_keras(write_keras2(tmp_path / "model1_3", model1_like(False, names), weights,
                                      old=True))
    else:
        spec = keras_to_spec(model1_like())
        path = tmp_path / "m.weights.h5"
        if form == "keras3-weights":
            write_keras3_weights(path, weights, names)
        else:
            write_keras2_weights(path, weights, names)
        net = load_keras(path, weights_only=True, model=spec)
    expected = numpy_forward(x_images, weights)
    got = our_logits(net, x_images)
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_batchnorm_between_flatten_and_dense(tmp_path, x_images):
    """A BatchNormalization on the flattened features takes its vectors in our order too."""
    config = sequential([
        conv("conv2d", 3), keras_layer("Flatten", "flatten"),
        keras_layer("BatchNormalization", "batch_normalization", axis=-1, momentum=0.99,
                    epsilon=0.001, center=True, scale=True),
        dense("dense", 10, None)])
    rng = np.random.default_rng(3)
    n = 26 * 26 * 3
    kernel, bias = rng.normal(0, 0.3, (3, 3, 1, 3)), rng.normal(0, 0.1, 3)
    gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)
    mean, var = rng.normal(0, 0.1, n), rng.uniform(0.5, 2.0, n)
    w, b = rng.normal(0, 0.05, (n, 10)), rng.normal(0, 0.1, 10)
    weights = [("Conv2D", [kernel, bias]), ("Flatten", []),
               ("BatchNormalization", [gamma, beta, mean, var]), ("Dense", [w, b])]
    weights = [(kind, [a.astype(np.float32) for a in arrays]) for kind, arrays in weights]
    net = load_keras(write_keras3(tmp_path / "bn.keras", config, weights))
    patches = np.lib.stride_tricks.sliding_window_view(x_images, (3, 3), axis=(1, 2))
    h = relu(np.einsum("nhwcij,ijco->nhwo", patches, weights[0][1][0]) + weights[0][1][1])
    h = h.reshape(len(h), -1)
    g, be, m, v = weights[2][1]
    h = (h - m) / np.sqrt(v + 1e-3) * g + be
    expected = h @ weights[3][1][0] + weights[3][1][1]
    assert np.abs(our_logits(net, x_images) - expected).max() < 1e-4


def test_separable_conv_channel_order(tmp_path, x_images):
    """SeparableConv2D: Keras' depthwise output c * multiplier + m reads input channel c."""
    config = sequential([
        keras_layer("SeparableConv2D", "separable_conv2d", filters=4, kernel_size=[3, 3],
                    strides=[1, 1], padding="valid", depth_multiplier=2, activation=None,
                    use_bias=True),
        keras_layer("GlobalAveragePooling2D", "gap"), dense("dense", 10, None)])
    rng = np.random.default_rng(5)
    x = np.concatenate([x_images, x_images[:, ::-1] * 0.5], axis=3)  # two input channels
    config["config"]["layers"][0]["config"]["batch_shape"] = [None, 28, 28, 2]
    depthwise, pointwise = rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(1, 1, 4, 4))
    bias, w, b = rng.normal(size=4), rng.normal(size=(4, 10)), rng.normal(size=10)
    weights = [("SeparableConv2D", [depthwise, pointwise, bias]), ("GlobalAveragePooling2D", []),
               ("Dense", [w, b])]
    weights = [(kind, [a.astype(np.float32) for a in arrays]) for kind, arrays in weights]
    net = load_keras(write_keras3(tmp_path / "sep.keras", config, weights))
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # N,26,26,C,3,3
    (d, p, c), (w, b) = weights[0][1], weights[2][1]
    h = np.einsum("nhwcij,ijcm->nhwcm", patches, d).reshape(len(x), 26, 26, 4)  # c * 2 + m
    expected = (h @ p[0, 0] + c).mean(axis=(1, 2)) @ w + b
    assert np.abs(our_logits(net, x.astype(np.float32)) - expected).max() < 1e-4


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_lambda_layer_refused():
    lam = keras_layer("Lambda", "lambda", function={"class_name": "__lambda__",
                                                    "config": {"code": "4wEAAAAAAAAA"}})
    config = sequential([keras_layer("Flatten", "flatten"), lam, dense("dense", 10, None)])
    with pytest.raises(SpecError) as exc:
        keras_to_spec(config, source="m.keras")
    message = one_line(exc)
    assert "'lambda' (Lambda)" in message and "code" in message and message.startswith("m.keras")


@pytest.mark.parametrize("entry,words", [
    (keras_layer("LSTM", "lstm", units=4), ["'lstm' (LSTM)", "no LSTM layer"]),
    ({"module": "my_package.layers", "class_name": "Gate", "registered_name": "Custom>Gate",
      "config": {"name": "gate"}}, ["'gate' (Gate)", "custom", "Custom>Gate"]),
    (conv("c", 4, dilation_rate=[2, 2]), ["'c' (Conv2D)", "dilation_rate = [2, 2]"]),
    (dense("d", 10, {"module": "my", "class_name": "Swoosh", "config": "swoosh",
                     "registered_name": "Swoosh"}), ["'d' (Dense)", "custom activation"]),
])
def test_layers_we_lack_are_refused_by_name(entry, words):
    with pytest.raises(SpecError) as exc:
        keras_to_spec(sequential([entry, keras_layer("Flatten", "f"), dense("o", 10, None)]))
    message = one_line(exc)
    assert all(word in message for word in words), message


def test_functional_model_refused():
    with pytest.raises(SpecError, match="Functional model; only Sequential"):
        keras_to_spec({"class_name": "Functional", "config": {"name": "f", "layers": []}})


def test_file_problems_name_the_file_and_layer(tmp_path):
    weights = model1_weights()
    weights[4] = ("Dense", [np.zeros((100, 128), np.float32), np.zeros(128, np.float32)])
    path = write_keras3(tmp_path / "bad.keras", model1_like(), weights)
    with pytest.raises(CheckpointError) as exc:
        load_keras(path)
    assert "'dense' (Dense): kernel has shape (100, 128)" in one_line(exc)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match="neither a .keras"):
        load_keras(tmp_path / "text.h5")
    weights_file = tmp_path / "w.weights.h5"
    write_keras3_weights(weights_file, model1_weights(), ["a"] * 6)
    with pytest.raises(UserError, match="weights only, no architecture"):
        load_keras(weights_file)
    with pytest.raises(UserError, match="needs the architecture"):
        load_keras(weights_file, weights_only=True)
    with pytest.raises(CheckpointError, match="'conv2d_1' .* no weights"):
        load_keras(weights_file, weights_only=True, model="model2")
    config = model1_like()
    del config["config"]["layers"][-1]  # without its last Dense: those weights are left over
    small = keras_to_spec(config)
    with pytest.raises(CheckpointError, match="fit no layer of the model"):
        load_keras(weights_file, weights_only=True, model=small)


def test_import_writes_a_run_that_evaluates_and_fine_tunes(tmp_path, tiny_idx, x_images):
    weights = model1_weights(seed=4)
    source = write_keras3(tmp_path / "model1_01.keras", model1_like(), weights)
    out = import_keras(source, tmp_path / "run", lr=1e-9, **{"data.dataset": str(tiny_idx)})
    run = RunDir(out)
    cfg = run.read_config()
    assert cfg.recipe == "keras:model1_01.keras" and cfg.train.epochs == 1
    assert run.weights_file.is_file() and run.checkpoint_names() == ["epoch_0"]
    _, model = load_model(out)  # the run's own weights, as every command reloads them
    expected = numpy_forward(x_images, weights)
    assert np.abs(our_logits(model, x_images) - expected).max() < 1e-4
    assert 0.0 <= evaluate_run(out)["test_accuracy"] <= 1.0
    # resume fine-tunes from the imported weights (at lr 1e-9 they hardly move), not from a
    # fresh initialization
    result = resume(out, progress=False)
    assert len(result.history) == 1
    assert np.abs(our_logits(result.model.eval(), x_images) - expected).max() < 1e-3
    # the epoch-0 checkpoint holds exactly the imported weights
    _, at_import = load_model(out, checkpoint="epoch_0")
    assert np.abs(our_logits(at_import, x_images) - expected).max() < 1e-4


def test_import_refuses_data_of_another_shape(tmp_path):
    from fashion_cnn.data.arrays import ImageData

    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), np.arange(20) % 5,
                     rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), np.arange(10) % 5,
                     source=tmp_path, name="five")
    source = write_keras3(tmp_path / "m.keras", model1_like(), model1_weights())
    with pytest.raises(UserError, match="10 classes; the data .* 5 classes"):
        import_keras(source, tmp_path / "run", data=data)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.environ.get("FASHION_CNN_TEST_KERAS") != "1",
                    reason="set FASHION_CNN_TEST_KERAS=1 to run TensorFlow/Keras (its own venv)")
def test_against_tensorflow(tmp_path):
    """The seed's model1 trained by Keras, saved by ModelCheckpoint, imported: the same
    classes and logits (benchmarks/keras_import_check.py on a training subset)."""
    if not (ROOT / "benchmarks" / ".venv-keras" / "bin" / "python").exists():
        pytest.skip("benchmarks/.venv-keras is not set up: python benchmarks/vs_keras.py "
                    "--setup-only")
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "keras_import_check.py"),
                           "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["files"]
    for row in result["files"]:
        assert row["agreement"] >= 0.999, row
        assert row["max_logit_difference"] <= 1e-4, row
        assert row["test_correct_ours"] == row["test_correct_keras"], row
    assert result["passed"]
