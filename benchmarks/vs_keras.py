"""The seed's model1 and model2 trained side by side with TensorFlow/Keras and with this project.

Same architecture, batch size (128 / 32), validation_split 0.2, Adam with Keras' defaults, same
data (loaded once with fashion_cnn.data and handed to Keras as .npy files), same number of
epochs. The sides alternate epoch by epoch in one run (the order rotates every epoch), so
that a busy spell of the machine hits every side alike: Keras trains one epoch in its own
process (benchmarks/keras_seed.py, which pauses inside its single fit() call between epochs),
then this project one epoch in fp32, then one in bf16, and so on.

An epoch's time is its wall-clock time including the validation pass, on both sides (Keras'
own epoch boundaries, timed by a callback; here one call of Trainer.fit per epoch). The table
shows the median over the epochs, the ratio Keras / this project, and the test accuracy of
each side after the last epoch.

TensorFlow is never a dependency of the project: the script makes its own virtual environment
(default benchmarks/.venv-keras, git-ignored) with `tensorflow-cpu` from PyPI on first use.

    python benchmarks/vs_keras.py                       # model1 and model2, 25 epochs each
    python benchmarks/vs_keras.py --models model1 --epochs 3
    python benchmarks/vs_keras.py --epochs 7 --seeds 0 1 2   # pooled over three seeds
    python benchmarks/vs_keras.py --setup-only          # only create the Keras environment
    python benchmarks/vs_keras.py --smoke               # seconds; skips Keras without its venv
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

import numpy as np

from common import BENCH_DIR, OUT_DIR, fmt, machine_info, median, note, table, write_result
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.devices import cpu_has_native_bf16
from fashion_cnn.perf import configure_runtime
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.run import peak_rss_mib, splits_for
from fashion_cnn.training.loop import Trainer, evaluate

DEFAULT_VENV = BENCH_DIR / ".venv-keras"
DEFAULT_TF = "tensorflow-cpu==2.21.0"  # the version the performance figures were first taken with
KERAS_SCRIPT = BENCH_DIR / "keras_seed.py"
INSTALLED_MARKER = ".installed-spec"  # holds the pip requirement the environment was made with


# ----------------------------------------------------------------------------- Keras environment

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def keras_venv_ready(venv: Path, spec: str) -> bool:
    marker = venv / INSTALLED_MARKER
    return (venv_python(venv).exists() and marker.is_file()
            and marker.read_text().strip() == spec)


def ensure_keras_venv(venv: Path, spec: str) -> Path:
    """Create `venv` with `spec` installed (once); the path of its Python."""
    if keras_venv_ready(venv, spec):
        return venv_python(venv)
    python = venv_python(venv)
    if not python.exists():
        note(f"vs_keras: creating {venv} ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    note(f"vs_keras: installing {spec} into {venv} (a few hundred MB, once) ...")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", spec])
    if install.returncode != 0:
        raise SystemExit(f"vs_keras: `pip install {spec}` failed in {venv}; without network "
                         f"access use --no-keras, or give another --tf-spec")
    check = subprocess.run([str(python), "-c", "import tensorflow, keras"],
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"vs_keras: TensorFlow does not import in {venv}:\n{check.stderr[-2000:]}")
    (venv / INSTALLED_MARKER).write_text(spec + "\n")
    return python


# ----------------------------------------------------------------------------- the two sides

class KerasSide:
    """keras_seed.py in the Keras environment, driven epoch by epoch over a pipe."""

    def __init__(self, python: Path, data_dir: Path, model: str, epochs: int, seed: int,
                 log_path: Path):
        self.name = "keras"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a")
        self.log.write(f"--- keras_seed.py {model}, {epochs} epochs ---\n")
        self.log.flush()
        self.process = subprocess.Popen(
            [str(python), str(KERAS_SCRIPT), "--data", str(data_dir), "--model", model,
             "--epochs", str(epochs), "--seed", str(seed), "--step"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        self.info = self._read("ready")
        self.epoch_seconds: list[float] = []
        self.history: list[dict] = []
        self.result: dict = {}

    def _read(self, expected: str) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.flush()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"vs_keras: keras_seed.py stopped (exit {self.process.returncode}) "
                             f"while a '{expected}' was expected; its stderr ({self.log_path}):"
                             f"\n{tail}")
        event = json.loads(line)
        if event.get("event") != expected:
            raise SystemExit(f"vs_keras: keras_seed.py sent {event.get('event')!r}, "
                             f"expected {expected!r}")
        return event

    def _go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def run_epoch(self) -> float:
        self._go()
        record = self._read("epoch")
        self.history.append(record)
        self.epoch_seconds.append(record["seconds"])
        return record["seconds"]

    def finish(self) -> dict:
        self._go()
        done = self._read("done")
        self.process.wait()
        self.log.close()
        self.result = {"test_accuracy": done["test_accuracy"], "test_loss": done["test_loss"],
                       "test_eval_seconds": done["test_eval_seconds"],
                       "peak_rss_mib": done["peak_rss_mib"], "tensorflow": done["tensorflow"],
                       "keras": done["keras"], "params": done["params"],
                       "batch_size": done["batch_size"], "train_images": done["train_images"]}
        return self.result


class PauseAfterEpoch:
    """Callback: ends Trainer.fit after each epoch; the next fit() call continues the run."""

    def on_epoch_end(self, trainer, epoch, logs):
        trainer.stop_training = True


class ProjectSide:
    """This project's Trainer on a seed recipe, at one precision, one epoch per fit() call."""

    def __init__(self, recipe: str, precision: str, epochs: int, seed: int, splits):
        self.name = f"ours-{precision}"
        self.precision = precision
        self.config = resolve_config(recipe, **{"train.epochs": epochs, "train.seed": seed,
                                                "train.precision": precision})
        self.splits = splits
        self.trainer = Trainer(self.config, splits, callbacks=[PauseAfterEpoch()])
        self.epoch_seconds: list[float] = []
        self.result: dict = {}

    def run_epoch(self) -> float:
        self.trainer.stop_training = False
        start = time.perf_counter()
        self.trainer.fit()  # one epoch: training and the validation pass, as Keras' epoch
        seconds = time.perf_counter() - start
        self.epoch_seconds.append(seconds)
        return seconds

    @property
    def history(self) -> list[dict]:
        return self.trainer.state.history

    def finish(self) -> dict:
        cfg = self.config.train
        start = time.perf_counter()
        result = evaluate(self.trainer.model, self.splits.x_test, self.splits.y_test,
                          cfg.eval_batch_size, self.precision)
        self.result = {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
                       "test_eval_seconds": time.perf_counter() - start,
                       "params": self.config.model.total_params, "batch_size": cfg.batch_size,
                       "train_images": len(self.splits.x_train)}
        return self.result


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def side_summary(side) -> dict:
    last = side.history[-1] if side.history else {}
    return {"median_epoch_seconds": median(side.epoch_seconds),
            "first_epoch_seconds": side.epoch_seconds[0] if side.epoch_seconds else None,
            "epoch_seconds": side.epoch_seconds,
            "final_val_accuracy": last.get("val_accuracy"),
            "final_accuracy": last.get("accuracy"),
            **side.result,
            "history": side.history}


# ----------------------------------------------------------------------------- main

def write_npy_data(data, subset: int | None, folder: Path) -> None:
    """The raw uint8 arrays for Keras; it applies the seed's scaling itself."""
    n = subset or len(data.train_images)
    arrays = {"train_images": data.train_images[:n], "train_labels": data.train_labels[:n],
              "test_images": data.test_images, "test_labels": data.test_labels}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)


def compare_model(model: str, seed: int, args, data, precisions: list[str],
                  keras_python: Path | None, npy_dir: Path) -> dict:
    recipe = f"seed-{model}"
    base = resolve_config(recipe)
    if args.subset:
        base.data.subset = args.subset
    splits = splits_for(base, data)
    sides = [ProjectSide(recipe, p, args.epochs, seed, splits) for p in precisions]
    if keras_python is not None:
        sides.insert(0, KerasSide(keras_python, npy_dir, model, args.epochs, seed,
                                  args.out.with_suffix(".keras.log")))
    # The sides must not overlap: the CPU time that the idle side used while the other trained
    # (this process during Keras' epochs, Keras' process during ours) is recorded and shown.
    idle_cpu = {"ours_during_keras": 0.0, "keras_during_ours": 0.0}
    keras_pid = sides[0].process.pid if keras_python is not None else None
    for epoch in range(args.epochs):
        shift = epoch % len(sides)  # rotate the order so no side always goes first
        for side in sides[shift:] + sides[:shift]:
            if side.name == "keras":
                before = time.process_time()
                side.run_epoch()
                idle_cpu["ours_during_keras"] += time.process_time() - before
            else:
                before = process_cpu_seconds(keras_pid) if keras_pid else 0.0
                side.run_epoch()
                if keras_pid:
                    idle_cpu["keras_during_ours"] += process_cpu_seconds(keras_pid) - before
        note(f"{model} seed {seed} epoch {epoch + 1}/{args.epochs}: " + ", ".join(
            f"{side.name} {side.epoch_seconds[-1]:.2f} s" for side in sides))
    summary = {"recipe": recipe, "seed": seed, "epochs": args.epochs,
               "batch_size": base.train.batch_size, "sides": {},
               "idle_side_cpu_seconds": idle_cpu if keras_pid else None}
    for side in sides:
        side.finish()
        summary["sides"][side.name] = side_summary(side)
    summary.update(versus_keras(summary["sides"]))
    return summary


def versus_keras(sides: dict) -> dict:
    """speedup_vs_keras (Keras' median epoch / ours) and accuracy_minus_keras per precision of
    this project's sides; both empty without a Keras side."""
    keras = sides.get("keras")
    if keras is None:
        return {"speedup_vs_keras": {}, "accuracy_minus_keras": {}}
    ours = {name.removeprefix("ours-"): side for name, side in sides.items() if name != "keras"}
    return {"speedup_vs_keras": {p: keras["median_epoch_seconds"] / side["median_epoch_seconds"]
                                 for p, side in ours.items()},
            "accuracy_minus_keras": {p: side["test_accuracy"] - keras["test_accuracy"]
                                     for p, side in ours.items()}}


def pool_seeds(runs: list[dict]) -> dict:
    """One model's runs over several seeds: each side's median epoch over all of them, and its
    test accuracy per seed, with their mean and standard deviation."""
    first = runs[0]
    pooled = {"recipe": first["recipe"], "seeds": [r["seed"] for r in runs],
              "epochs": first["epochs"], "batch_size": first["batch_size"], "sides": {}}
    for name in first["sides"]:
        accuracies = [r["sides"][name]["test_accuracy"] for r in runs]
        pooled["sides"][name] = {
            "median_epoch_seconds": median([t for r in runs
                                            for t in r["sides"][name]["epoch_seconds"]]),
            "test_accuracy": float(np.mean(accuracies)),
            "test_accuracy_sd": float(np.std(accuracies, ddof=1)) if len(runs) > 1 else 0.0,
            "test_accuracies": accuracies}
    pooled.update(versus_keras(pooled["sides"]))
    return pooled


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time per epoch and test accuracy of the seed's model1/model2: "
                    "TensorFlow/Keras against this project (fp32 and bf16), alternating.")
    p.add_argument("--models", nargs="+", choices=["model1", "model2"],
                   default=["model1", "model2"], help="seed models (default: both)")
    p.add_argument("--epochs", type=int, default=25,
                   help="epochs per side (default: the seed's 25)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="this project's precisions (default: fp32, and bf16 where native)")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides (default: 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds, one after another (overrides --seed); the table "
                        "pools them: median epoch over all, mean test accuracy +- sd")
    p.add_argument("--subset", type=int, default=None, help="first N training images only")
    p.add_argument("--threads", type=int, default=0,
                   help="this project's torch threads (0: one per core; Keras keeps its default)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help="the Keras virtual environment, created if missing "
                        "(default: benchmarks/.venv-keras)")
    p.add_argument("--tf-spec", default=DEFAULT_TF, help="pip requirement installed there "
                   "(default: %(default)s)")
    p.add_argument("--no-keras", action="store_true", help="time this project's side only")
    p.add_argument("--setup-only", action="store_true",
                   help="create the Keras environment and exit")
    p.add_argument("--smoke", action="store_true",
                   help="tiny setting: subset 512, 1 epoch, model1; Keras only if its "
                        "environment already exists (never installs)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "vs_keras.json",
                   help="JSON result (default: benchmarks/out/vs_keras.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.subset, args.epochs, args.models = 512, 1, ["model1"]
        args.threads = args.threads or 1  # a smoke run checks the code; one thread is kindest
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    args.seeds = args.seeds or [args.seed]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    keras_python, keras_note = None, None
    if args.setup_only:
        print(f"Keras environment ready: {ensure_keras_venv(args.venv, args.tf_spec)}")
        return 0
    if args.no_keras:
        keras_note = "Keras side skipped (--no-keras)"
    elif args.smoke and not keras_venv_ready(args.venv, args.tf_spec):
        keras_note = (f"Keras side skipped: smoke mode never installs TensorFlow and "
                      f"{args.venv} is not set up (run with --setup-only to create it)")
    else:
        keras_python = ensure_keras_venv(args.venv, args.tf_spec)
    if keras_note:
        note(f"vs_keras: {keras_note}")

    configure_runtime(args.threads)
    precisions = args.precisions or (["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"])
    data = load_data()
    results = []
    with tempfile.TemporaryDirectory(prefix="vs-keras-") as tmp:
        npy_dir = Path(tmp)
        if keras_python is not None:
            write_npy_data(data, args.subset, npy_dir)
        for model in args.models:
            for seed in args.seeds:
                results.append(compare_model(model, seed, args, data, precisions, keras_python,
                                             npy_dir))
    pooled = [pool_seeds([r for r in results if r["recipe"] == f"seed-{model}"])
              for model in args.models]

    print(f"\nSeconds per epoch (median over {args.epochs} epochs, training + validation pass; "
          f"sides alternate epoch by epoch)")
    if keras_note:
        print(f"NOTE: {keras_note}")
    rows = []
    for r in results:
        for name, s in r["sides"].items():
            precision = name.removeprefix("ours-")
            speedup = r["speedup_vs_keras"].get(precision)
            rows.append([r["recipe"], r["seed"], name, r["batch_size"],
                         fmt(s["median_epoch_seconds"]), fmt(s["first_epoch_seconds"]),
                         f"{speedup:.2f}x" if speedup else "-",
                         fmt(s["test_accuracy"], 4), fmt(s.get("final_val_accuracy"), 4),
                         fmt(s.get("peak_rss_mib"), 0)])
    print(table(["recipe", "seed", "side", "batch", "median s", "1st epoch s", "vs keras",
                 "test acc", "val acc", "peak RSS MiB"], rows))
    idle = [r["idle_side_cpu_seconds"] for r in results if r["idle_side_cpu_seconds"]]
    if idle:
        print(f"CPU time of the idle side, all epochs: this process during Keras' epochs "
              f"{sum(i['ours_during_keras'] for i in idle):.2f} s, Keras' process during ours "
              f"{sum(i['keras_during_ours'] for i in idle):.2f} s")
    if len(args.seeds) > 1:
        print(f"\nPooled over seeds {', '.join(map(str, args.seeds))}: median epoch over all "
              f"of them, test accuracy mean +- sd")
        rows = []
        for r in pooled:
            for name, s in r["sides"].items():
                speedup = r["speedup_vs_keras"].get(name.removeprefix("ours-"))
                rows.append([r["recipe"], name, fmt(s["median_epoch_seconds"]),
                             f"{speedup:.2f}x" if speedup else "-",
                             f"{s['test_accuracy']:.4f} +- {s['test_accuracy_sd']:.4f}",
                             " ".join(f"{a:.4f}" for a in s["test_accuracies"])])
        print(table(["recipe", "side", "median s", "vs keras", "test acc", "per seed"], rows))
    write_result(args.out, {
        "benchmark": "vs_keras", "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "keras_skipped": keras_note, "precisions": precisions,
        # this process held both precisions' trainers and the data at once
        "project_process_peak_rss_mib": peak_rss_mib(),
        "results": results,
        "pooled_over_seeds": pooled,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
