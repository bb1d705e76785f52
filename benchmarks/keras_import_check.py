"""Keras import against TensorFlow itself: the seed's model1, trained by Keras and saved by
ModelCheckpoint, imported with fashion_cnn.apps.keras_import, must give Keras' predictions.

Two sides, two processes:

1. the Keras side (this script, run by benchmarks/.venv-keras's Python with --keras-side)
   trains the seed's model1 for --epochs epochs (batch 128, validation_split 0.2, Adam, as the
   seed) with three ModelCheckpoint callbacks: `model1_{epoch}.keras` (Keras 3),
   `model1_{epoch}.h5` (Keras 3's legacy HDF5) and `model1_{epoch}.weights.h5` (weights only).
   Where tf_keras (Keras 2) is installed in that environment, it trains a second model1 with
   ModelCheckpoint(`model1_k2_{epoch}.h5`), Keras 2's format. It also saves, untrained, a
   model with every layer type the import maps, at settings other than the defaults
   (`every_layer.keras`, `.h5`). For each full-model file it loads the file back with Keras
   and saves its logits (the model without its softmax), its probabilities and
   model.evaluate's test accuracy on the 10,000 test images.
2. this project's side imports each file into a run directory (import_keras; the weights-only
   file with the zoo's model1 spec), evaluates the run (evaluate_run) and compares its logits
   with Keras': the share of images with the same predicted class, the largest logit
   difference, and the two test accuracies.

TensorFlow is never a dependency of the project: the Keras environment is vs_keras.py's
(created on first use, ~1.6 GB; `--smoke` never creates it).

    .venv/bin/python benchmarks/keras_import_check.py            # 1 epoch on the 48,000 images
    .venv/bin/python benchmarks/keras_import_check.py --smoke    # 4,096 training images
    .venv/bin/python benchmarks/keras_import_check.py --keep out/keras-files
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Pass criteria (the issue's): same class on >= 99.9 % of the test images, logits within 1e-4.
MIN_AGREEMENT = 0.999
MAX_LOGIT_DIFFERENCE = 1e-4
VALIDATION_SPLIT = 0.2  # the seed's fit(..., validation_split=0.2)


# ----------------------------------------------------------------------------- the Keras side
# Runs in the Keras environment: numpy and TensorFlow/Keras only, nothing of this project.

def seed_model1(keras):
    """The seed notebook's model1, layer for layer (93,322 parameters), compiled as there."""
    layers, relu = keras.layers, keras.activations.relu
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, (3, 3), activation=relu), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation=relu), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation=relu), layers.Flatten(),
        layers.Dense(64, activation=relu),
        layers.Dense(10, activation=keras.activations.softmax)], name="model1")
    model.compile(optimizer="adam", loss=keras.losses.sparse_categorical_crossentropy,
                  metrics=["accuracy"])
    return model


def every_layer_model(keras, seed: int):
    """A model with every layer type the import maps, at non-default settings where we have
    them (asymmetric zero padding, 'same' strided convolution, depth multiplier, BatchNorm
    without scale and after a Flatten, ...), with random weights and statistics: untrained,
    only its outputs are compared."""
    import numpy as np

    layers = keras.layers
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)), layers.ZeroPadding2D(((1, 0), (2, 1))),
        layers.Conv2D(6, (3, 3), strides=2, padding="same", activation="elu"),
        layers.SeparableConv2D(8, (3, 3), depth_multiplier=2, activation="relu"),
        layers.BatchNormalization(scale=False), layers.AveragePooling2D((2, 2), padding="same"),
        layers.LeakyReLU(negative_slope=0.2), layers.SpatialDropout2D(0.1),
        layers.Conv2D(5, (2, 2)), layers.ReLU(), layers.Activation("tanh"),
        layers.MaxPooling2D((2, 2), strides=1),
        layers.Flatten(), layers.BatchNormalization(), layers.Dense(12, activation="gelu"),
        layers.Dropout(0.3), layers.Dense(10), layers.Softmax()], name="every_layer")
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(seed)

    def draw(path: str, shape: tuple):
        if path.endswith(("variance", "gamma")):
            return rng.uniform(0.5, 2.0, shape)
        return rng.normal(0.0, 0.3 if len(shape) > 1 else 0.05, shape)  # kernels; vectors

    model.set_weights([draw(v.path, w.shape) for w, v in zip(model.get_weights(), model.weights)])
    return model


def keras_outputs(keras, path: Path, x_test, y_test) -> dict:
    """Keras' view of a saved file: test accuracy, and logits and probabilities as .npy."""
    import numpy as np

    model = keras.models.load_model(path)
    probabilities = model.predict(x_test, batch_size=1000, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    # the logits the softmax takes: the same model with a linear last layer, same weights
    config = model.get_config()
    last = config["layers"][-1]
    if last["class_name"] == "Softmax":  # a Softmax layer: the model without it
        config["layers"] = config["layers"][:-1]
    else:
        last["config"]["activation"] = "linear"
    linear = keras.Sequential.from_config(config)
    linear.set_weights(model.get_weights())
    logits = linear.predict(x_test, batch_size=1000, verbose=0)
    np.save(f"{path}.logits.npy", logits.astype("float32"), allow_pickle=False)
    np.save(f"{path}.probabilities.npy", probabilities.astype("float32"), allow_pickle=False)
    return {"test_accuracy": float(accuracy),  # model.evaluate's (a float32)
            "test_correct": int((probabilities.argmax(1) == y_test).sum())}


def keras_side(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    def load(name):
        return np.load(Path(args.data) / f"{name}.npy", allow_pickle=False)

    # the seed's preprocessing: (N, 28, 28, 1), pixels / 128 - 0.5
    x_train = (load("train_images").reshape(-1, 28, 28, 1) / 128.0 - 0.5).astype("float32")
    x_test = (load("test_images").reshape(-1, 28, 28, 1) / 128.0 - 0.5).astype("float32")
    y_train, y_test = load("train_labels").astype("int64"), load("test_labels").astype("int64")
    work = Path(args.work)
    report = {"tensorflow": tf.__version__, "keras": keras.__version__, "files": {}}

    keras.utils.set_random_seed(args.seed)
    model = seed_model1(keras)
    checkpoints = [keras.callbacks.ModelCheckpoint(str(work / "model1_{epoch}.keras")),
                   keras.callbacks.ModelCheckpoint(str(work / "model1_{epoch}.h5")),
                   keras.callbacks.ModelCheckpoint(str(work / "model1_{epoch}.weights.h5"),
                                                   save_weights_only=True)]
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=128,
                        validation_split=VALIDATION_SPLIT, verbose=0, callbacks=checkpoints)
    report["fit_seconds"] = time.perf_counter() - start
    report["history"] = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    for name in (f"model1_{args.epochs}.keras", f"model1_{args.epochs}.h5"):
        report["files"][name] = keras_outputs(keras, work / name, x_test, y_test)
    every = every_layer_model(keras, args.seed)
    for name in ("every_layer.keras", "every_layer.h5"):
        every.save(work / name)
        report["files"][name] = keras_outputs(keras, work / name, x_test, y_test)
    try:
        import tf_keras
    except ImportError:
        report["keras2"] = "tf_keras is not installed in the Keras environment"
    else:
        tf_keras.utils.set_random_seed(args.seed)
        model = seed_model1(tf_keras)
        model.fit(x_train, y_train, epochs=args.epochs, batch_size=128,
                  validation_split=VALIDATION_SPLIT, verbose=0,
                  callbacks=[tf_keras.callbacks.ModelCheckpoint(
                      str(work / "model1_k2_{epoch}.h5"))])
        report["keras2"] = tf_keras.__version__
        name = f"model1_k2_{args.epochs}.h5"
        report["files"][name] = keras_outputs(tf_keras, work / name, x_test, y_test)
    (work / "keras.json").write_text(json.dumps(report, indent=1))
    return 0


# ----------------------------------------------------------------------------- this project's side

def compare(work: Path, keras_report: dict, epochs: int, data) -> list[dict]:
    """Import each Keras file, evaluate the run, compare logits with Keras'."""
    import numpy as np
    import torch

    from fashion_cnn.apps.keras_import import import_keras
    from fashion_cnn.training.loop import evaluate
    from fashion_cnn.training.reload import evaluate_run, open_run

    files = [(name, name, False) for name in keras_report["files"]]
    # the weights-only file holds the same weights as the .keras file of its epoch
    files.append((f"model1_{epochs}.weights.h5", f"model1_{epochs}.keras", True))
    rows = []
    for name, reference, weights_only in files:
        out = work / f"run-{name.replace('.', '-')}"
        start = time.perf_counter()
        import_keras(work / name, out, weights_only=weights_only,
                     model="model1" if weights_only else None, data=data)
        import_seconds = time.perf_counter() - start
        ours = evaluate_run(out, data=data)
        cfg, model, splits = open_run(out, data=data)
        logits = evaluate(model, splits.x_test, splits.y_test, 1000)["logits"].numpy()
        probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
        keras_logits = np.load(work / f"{reference}.logits.npy")
        keras_probabilities = np.load(work / f"{reference}.probabilities.npy")
        rows.append({
            "file": name, "weights_only": weights_only,
            "images": len(logits),
            "agreement": float((logits.argmax(1) == keras_logits.argmax(1)).mean()),
            "max_logit_difference": float(np.abs(logits - keras_logits).max()),
            "max_probability_difference": float(np.abs(probabilities - keras_probabilities).max()),
            "test_accuracy_keras": keras_report["files"][reference]["test_accuracy"],
            "test_accuracy_ours": ours["test_accuracy"],
            "test_correct_keras": keras_report["files"][reference]["test_correct"],
            "test_correct_ours": ours["test_correct"],
            "import_seconds": import_seconds,
        })
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The seed's model1 trained by Keras, saved by "
                                            "ModelCheckpoint, imported here: same predictions?")
    p.add_argument("--epochs", type=int, default=1, help="Keras' training epochs (default 1)")
    p.add_argument("--subset", type=int, default=None,
                   help="Keras trains on the first N training images (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="Keras trains on 4,096 images; the comparison is the same (all 10,000 "
                        "test images); never creates the Keras environment")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the Keras files and the imported runs in this folder")
    p.add_argument("--venv", type=Path, default=None,
                   help="the Keras environment (default: vs_keras.py's, benchmarks/.venv-keras)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result (default: benchmarks/out/keras_import_check.json)")
    p.add_argument("--keras-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.subset = args.subset or 4096
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.keras_side:
        return keras_side(args)

    from common import OUT_DIR, fmt, machine_info, note, table, write_result
    from fashion_cnn.data.fashion_mnist import load_data
    from vs_keras import DEFAULT_TF, DEFAULT_VENV, ensure_keras_venv, keras_venv_ready, \
        write_npy_data

    venv = args.venv or DEFAULT_VENV
    if args.smoke and not keras_venv_ready(venv, DEFAULT_TF):
        raise SystemExit(f"keras_import_check: {venv} is not set up (python "
                         f"benchmarks/vs_keras.py --setup-only); --smoke never creates it")
    keras_python = ensure_keras_venv(venv, DEFAULT_TF)
    out = args.out or OUT_DIR / "keras_import_check.json"
    data = load_data()
    with tempfile.TemporaryDirectory(prefix="keras-import-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        npy = Path(tmp) / "npy"
        npy.mkdir()
        write_npy_data(data, args.subset, npy)
        note(f"keras_import_check: Keras trains model1 for {args.epochs} epoch(s) on "
             f"{args.subset or len(data.train_images):,} images ({VALIDATION_SPLIT:.0%} of them "
             f"held out for validation) and saves it ...")
        command = [str(keras_python), __file__, "--keras-side", "--data", str(npy), "--work",
                   str(work), "--epochs", str(args.epochs), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            raise SystemExit(f"keras_import_check: the Keras side failed (exit "
                             f"{done.returncode}):\n{done.stderr[-3000:]}")
        keras_report = json.loads((work / "keras.json").read_text())
        rows = compare(work, keras_report, args.epochs, data)

    passed = all(r["agreement"] >= MIN_AGREEMENT
                 and r["max_logit_difference"] <= MAX_LOGIT_DIFFERENCE
                 and r["test_correct_ours"] == r["test_correct_keras"] for r in rows)
    print(f"\nKeras {keras_report['keras']} (TensorFlow {keras_report['tensorflow']}; Keras 2: "
          f"{keras_report['keras2']}): model1 after {args.epochs} epoch(s), imported; "
          f"{rows[0]['images']:,} test images")
    print(table(["file", "same class", "max |d logit|", "max |d prob|", "acc keras", "acc ours",
                 "right keras", "right ours"],
                [[r["file"] + (" (+ model1 spec)" if r["weights_only"] else ""),
                  f"{100 * r['agreement']:.2f} %", f"{r['max_logit_difference']:.2e}",
                  f"{r['max_probability_difference']:.2e}", fmt(r["test_accuracy_keras"], 4),
                  fmt(r["test_accuracy_ours"], 4), r["test_correct_keras"],
                  r["test_correct_ours"]] for r in rows]))
    print(f"{'PASS' if passed else 'FAIL'}: same class on >= {100 * MIN_AGREEMENT:.1f} %, logits "
          f"within {MAX_LOGIT_DIFFERENCE:g}, the same number of test images right")
    write_result(out, {"benchmark": "keras_import_check", "machine": machine_info(),
                       "settings": {k: (str(v) if isinstance(v, Path) else v)
                                    for k, v in vars(args).items()},
                       "keras": {k: v for k, v in keras_report.items() if k != "files"},
                       "passed": passed, "files": rows})
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
