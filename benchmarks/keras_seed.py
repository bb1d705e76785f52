"""The seed notebook's model1 / model2, trained with TensorFlow/Keras exactly as the seed does.

Runs inside the benchmark's own virtual environment (benchmarks/.venv-keras, made by
vs_keras.py), never in the project's: it imports only numpy and TensorFlow/Keras. Data comes
as .npy files of the raw uint8 arrays (written by vs_keras.py from fashion_cnn.data), scaled
here exactly as the seed scales them (x / 128 - 0.5, shape (N, 28, 28, 1)).

Output: one JSON object per line on stdout (events "ready", "epoch", "done"); the last line
holds the whole result. With --step the script waits for a line "go" on stdin before the first
epoch, after every epoch and before the test evaluation, so that a driver can alternate its
epochs with another framework's in one run. Anything TensorFlow prints goes to stderr.

    python keras_seed.py --data DIR --model model1 --epochs 25
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter short


def private_stdout():
    """A stream on the original stdout for our JSON; fd 1 itself then points at stderr, so
    that nothing a library prints can corrupt the JSON lines."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return stream


OUT = private_stdout()
VALIDATION_SPLIT = 0.2  # the seed's fit(..., validation_split=0.2)


def emit(event: str, **fields) -> None:
    OUT.write(json.dumps({"event": event, **fields}) + "\n")
    OUT.flush()


def wait_for_go(step: bool) -> None:
    if not step:
        return
    line = sys.stdin.readline()
    if line.strip() != "go":
        sys.exit(0)  # the driver closed the pipe or asked to stop


def peak_rss_mib() -> float:
    """Peak resident memory of this process since its exec, MiB. /proc's VmHWM, because
    Linux carries a parent's RSS over fork + exec into the child's getrusage ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(name: str, keras):
    """The seed's Sequential models, layer for layer (93,322 and 67,786 parameters)."""
    layers, relu = keras.layers, keras.activations.relu
    if name == "model1":
        body = [layers.Conv2D(32, (3, 3), activation=relu), layers.MaxPooling2D((2, 2)),
                layers.Conv2D(64, (3, 3), activation=relu), layers.MaxPooling2D((2, 2)),
                layers.Conv2D(64, (3, 3), activation=relu), layers.Flatten(),
                layers.Dense(64, activation=relu)]
    elif name == "model2":
        body = [layers.Conv2D(32, (3, 3), activation=relu), layers.MaxPooling2D((2, 2)),
                layers.Dropout(0.2),
                layers.Conv2D(64, (3, 3), activation=relu), layers.MaxPooling2D((2, 2)),
                layers.Dropout(0.2),
                layers.Conv2D(48, (3, 3), activation=relu), layers.Flatten(),
                layers.Dense(48, activation=relu)]
    else:
        raise SystemExit(f"keras_seed: unknown model {name!r} (model1 or model2)")
    model = keras.Sequential([keras.Input(shape=(28, 28, 1)), *body,
                              layers.Dense(10, activation=keras.activations.softmax)], name=name)
    model.compile(optimizer="adam", loss=keras.losses.sparse_categorical_crossentropy,
                  metrics=["accuracy"])
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of train_images.npy, train_labels.npy, "
                                                  "test_images.npy, test_labels.npy (uint8)")
    p.add_argument("--model", choices=["model1", "model2"], required=True)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the seed's (128 for model1; Keras' default 32 for model2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", action="store_true", help="wait for 'go' on stdin between epochs")
    args = p.parse_args()

    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    keras.utils.set_random_seed(args.seed)

    def load(name):
        return np.load(os.path.join(args.data, f"{name}.npy"), allow_pickle=False)

    # The seed's preprocessing: reshape to (N, 28, 28, 1), then / 128.0 - 0.5 (float32 here,
    # as Keras casts its inputs to float32 anyway).
    x_train = (load("train_images").reshape(-1, 28, 28, 1) / 128.0 - 0.5).astype("float32")
    x_test = (load("test_images").reshape(-1, 28, 28, 1) / 128.0 - 0.5).astype("float32")
    y_train, y_test = load("train_labels").astype("int64"), load("test_labels").astype("int64")
    model = build(args.model, keras)
    fit_kwargs = {"batch_size": args.batch_size} if args.batch_size else {}
    if args.model == "model1" and not args.batch_size:
        fit_kwargs = {"batch_size": 128}  # the seed passes batch_size=128 to model1's fit only

    epochs: list[dict] = []

    class EpochTimer(keras.callbacks.Callback):
        """Times each epoch from its start to its end (validation included, as Keras reports
        it); the wait for the driver's 'go' comes after the clock stopped."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            record = {"epoch": epoch + 1, "seconds": seconds,
                      **{k: float(v) for k, v in (logs or {}).items()}}
            epochs.append(record)
            emit("epoch", **record)
            wait_for_go(args.step)

    info = {"tensorflow": tf.__version__, "keras": keras.__version__, "model": args.model,
            "params": int(model.count_params()),
            # Keras trains on the first int(n * (1 - validation_split)) images
            "train_images": int(len(x_train) * (1 - VALIDATION_SPLIT)),
            "batch_size": fit_kwargs.get("batch_size", 32)}
    emit("ready", **info)
    wait_for_go(args.step)
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, validation_split=VALIDATION_SPLIT, verbose=0,
              callbacks=[EpochTimer()], **fit_kwargs)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    eval_seconds = time.perf_counter() - start
    emit("done", **info, epochs=epochs, test_loss=float(test_loss),
         test_accuracy=float(test_accuracy), test_eval_seconds=eval_seconds,
         fit_seconds=fit_seconds, stepped=args.step,
         peak_rss_mib=peak_rss_mib())
    return 0


if __name__ == "__main__":
    sys.exit(main())
