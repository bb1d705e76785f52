"""Training speed of the seed's models against this machine's arithmetic limit.

For each recipe (default: the seed's dense, model1..model4 with their own batch sizes) and each
precision (fp32, and bf16 where the CPU has it natively), time a fixed number of training steps
of the project's own training loop after a short warm-up, and scale to an epoch of the
48,000-image training split. The configurations alternate in rounds (round 1: every config,
round 2: every config, ...) so that a slow spell of a shared machine hits all of them alike;
the table shows the median of --repeats rounds.

Next to it: the machine's matrix-product peak, measured here with large torch.mm products
(fp32 and bf16, best of a few), and the "FLOP floor": the time an epoch would take if every
training FLOP (forward + backward, counted from the model spec) ran at that peak.

    python benchmarks/train_speed.py                 # the full measurement (a few minutes)
    python benchmarks/train_speed.py --full-epoch    # time whole epochs instead of a sample
    python benchmarks/train_speed.py --memory        # also peak RSS of each recipe's full run
    python benchmarks/train_speed.py --smoke         # seconds: checks that the script works
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (OUT_DIR, TRAIN_SPLIT_IMAGES, fmt, machine_info, median, note, table,
                    write_result)
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.devices import cpu_has_native_bf16
from fashion_cnn.perf import configure_runtime
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.run import splits_for
from fashion_cnn.training.rundir import RunDir
from fashion_cnn.models.spec import train_flops_per_image
from fashion_cnn.training.loop import Trainer, evaluate

DEFAULT_RECIPES = ["seed-dense", "seed-model1", "seed-model2", "seed-model3", "seed-model4"]


# ----------------------------------------------------------------------------- matmul peak

def matmul_peak(size: int, repeats: int, dtype: torch.dtype) -> float:
    """Best GFLOP/s of a (size x size) @ (size x size) product: 2 * size**3 FLOPs each."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool start, oneDNN kernel selection
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def measure_peaks(precisions: list[str], size: int, repeats: int) -> dict:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {p: matmul_peak(size, repeats, dtypes[p]) for p in precisions}


# ----------------------------------------------------------------------------- timed training

class Bench:
    """One (recipe, precision): its trainer, FLOP count and the timings of every round."""

    def __init__(self, recipe: str, precision: str, splits, threads: int, eval_images: int,
                 augment: bool | None = None):
        self.recipe, self.precision = recipe, precision
        overrides = {"train.precision": precision}
        if threads:
            overrides["train.threads"] = threads
        if augment is not None:  # --augment-ablation: the same recipe without its augmentation
            overrides["augment.enabled"] = augment
        self.config = resolve_config(recipe, **overrides)
        self.trainer = Trainer(self.config, splits)
        self.batch_size = self.config.train.batch_size
        # the arithmetic done (on the rows and columns the model reads), and that of the model
        # as declared (Keras computes the whole input): see ModelSpec.read_extent
        self.flops_per_image = train_flops_per_image(self.config.model)
        self.declared_flops_per_image = train_flops_per_image(self.config.model,
                                                              whole_input=True)
        self.n_train = len(splits.x_train)
        self.x_eval, self.y_eval = splits.x_test[:eval_images], splits.y_test[:eval_images]
        self.epoch_seconds: list[float] = []  # per round, scaled to 48,000 images
        self.eval_seconds: list[float] = []   # per round, inference on the test images

    def run_steps(self, steps: int) -> tuple[float, int]:
        """Train `steps` steps from a fresh shuffle; (seconds, images seen)."""
        trainer = self.trainer
        trainer.steps_per_epoch = steps
        trainer.state.perm = None  # start a new permutation: every batch is a full one
        trainer.state.cursor = 0
        start = time.perf_counter()
        trainer.train_one_epoch()
        return time.perf_counter() - start, min(steps * self.batch_size, self.n_train)

    def round(self, steps: int, warmup_steps: int, full_epoch: bool) -> None:
        if warmup_steps:  # after other configs ran, caches and buffers belong to them
            self.run_steps(min(warmup_steps, self.trainer.full_steps))
        full = self.trainer.full_steps
        seconds, images = self.run_steps(full if full_epoch else min(steps, full))
        # a whole epoch is scaled too where a --subset made the split smaller than 48,000
        self.epoch_seconds.append(seconds * TRAIN_SPLIT_IMAGES / images)
        start = time.perf_counter()
        evaluate(self.trainer.model, self.x_eval, self.y_eval, self.config.train.eval_batch_size,
                 self.precision)
        self.eval_seconds.append(time.perf_counter() - start)

    def summary(self, peaks: dict) -> dict:
        seconds = median(self.epoch_seconds)
        flops_epoch = self.flops_per_image * TRAIN_SPLIT_IMAGES
        peak = peaks.get(self.precision)
        floor = flops_epoch / (peak * 1e9) if peak else None
        declared_floor = (self.declared_flops_per_image * TRAIN_SPLIT_IMAGES / (peak * 1e9)
                          if peak else None)
        gflops = flops_epoch / seconds / 1e9
        return {
            "recipe": self.recipe, "model": self.config.model.name, "precision": self.precision,
            "batch_size": self.batch_size, "augment": self.config.augment.enabled,
            "input": list(self.config.model.input_shape),
            "train_flops_per_image": self.flops_per_image,
            "declared_train_flops_per_image": self.declared_flops_per_image,
            "seconds_per_epoch": seconds, "seconds_per_epoch_runs": self.epoch_seconds,
            "images_per_second": TRAIN_SPLIT_IMAGES / seconds,
            "gflops_per_second": gflops,
            "fraction_of_peak": gflops / peak if peak else None,
            "floor_seconds_per_epoch": floor,
            "ratio_to_floor": seconds / floor if floor else None,
            "declared_floor_seconds_per_epoch": declared_floor,
            "ratio_to_declared_floor": seconds / declared_floor if declared_floor else None,
            "test_eval_images": len(self.y_eval),
            "test_eval_seconds": median(self.eval_seconds),
            "test_eval_seconds_runs": self.eval_seconds,
        }


# ----------------------------------------------------------------------------- peak memory



def peak_memory_of_run(recipe: str, epochs: int | None, subset: int | None,
                       threads: int) -> dict:
    """Run `fashion-cnn train RECIPE` in a child process; its peak RSS (MiB) and wall time."""
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        # The run's metrics.json records the child's peak RSS (VmHWM, which unlike getrusage
        # does not inherit this large parent's size across fork + exec).
        command = [sys.executable, "-m", "fashion_cnn", "train", recipe, "--quiet",
                   "--no-plots", "--out", str(Path(tmp) / "run")]
        if epochs:
            command += ["--epochs", str(epochs)]
        if subset:
            command += ["--subset", str(subset)]
        if threads:
            command += ["--threads", str(threads)]
        start = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if child.returncode != 0:
            raise SystemExit(f"train_speed: training {recipe} in a child process failed "
                             f"(exit {child.returncode}):\n{child.stderr[-3000:]}")
        peak = RunDir(Path(tmp) / "run").read_metrics()["peak_rss_mib"]
    return {"recipe": recipe, "epochs": epochs, "subset": subset,
            "peak_rss_mib": peak, "wall_seconds": wall}


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds per epoch, images/s and GFLOP/s of the training loop, next to "
                    "the machine's measured matrix-product peak and the FLOP floor.")
    p.add_argument("--augment-ablation", action="store_true",
                   help="also time each augmented recipe with its augmentation off, in the "
                        "same rounds (the cost of augmentation)")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help="recipes (or models) to time, each with its own batch size "
                        "(default: the seed's dense and model1..model4)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, and bf16 when the CPU supports it natively")
    p.add_argument("--images", type=int, default=9600,
                   help="training images per timed sample (steps = images / batch size), "
                        "scaled to an epoch of 48,000 (default: %(default)s)")
    p.add_argument("--full-epoch", action="store_true",
                   help="time whole epochs of the training split instead of a sample")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="untimed steps before each timed sample (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="rounds over all configurations; "
                   "the table shows medians (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: one per core; 1 with --smoke)")
    p.add_argument("--eval-images", type=int, default=10_000,
                   help="test images in the timed inference pass (evaluate) of each round "
                        "(default: %(default)s)")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matrices "
                   "(default: %(default)s)")
    p.add_argument("--matmul-repeats", type=int, default=5, help="products timed; the best counts "
                   "(default: %(default)s)")
    p.add_argument("--subset", type=int, default=None, help="first N training images only")
    p.add_argument("--memory", action="store_true",
                   help="also run `fashion-cnn train` per recipe in a child process and report "
                        "its peak RSS (full runs take the recipes' whole training time)")
    p.add_argument("--memory-recipes", nargs="+", default=None,
                   help="recipes of those runs (default: --recipes)")
    p.add_argument("--memory-epochs", type=int, default=None,
                   help="epochs of those runs (default: the recipe's own)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny setting to check the script: subset 512, a few steps, 1 round")
    p.add_argument("--out", type=Path, default=OUT_DIR / "train_speed.json",
                   help="JSON result (default: benchmarks/out/train_speed.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.subset, args.images, args.warmup_steps, args.repeats = 512, 256, 1, 1
        args.matmul_size, args.matmul_repeats = 256, 2
        args.memory_epochs, args.eval_images = 1, 512
        # a smoke run only checks the code: one thread suffers least on a busy machine
        args.threads = 1 if args.threads is None else args.threads
    args.threads = args.threads or 0
    for name in ("images", "repeats", "matmul_size", "matmul_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_runtime(args.threads)
    precisions = args.precisions or (["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"])
    if args.precisions is None and "bf16" not in precisions:
        note("train_speed: this CPU has no native bf16; timing fp32 only "
             "(pass --precisions fp32 bf16 to time emulated bf16 anyway)")
    data = load_data()
    splits_by_key, benches = {}, []
    for recipe in args.recipes:
        for precision in precisions:
            cfg = resolve_config(recipe)
            key = (cfg.pad, cfg.data.pad_value, cfg.data.validation_split)
            if key not in splits_by_key:
                if args.subset:
                    cfg.data.subset = args.subset
                splits_by_key[key] = splits_for(cfg, data)
            benches.append(Bench(recipe, precision, splits_by_key[key], args.threads,
                                 args.eval_images))
            if args.augment_ablation and cfg.augment.enabled:
                benches.append(Bench(recipe, precision, splits_by_key[key], args.threads,
                                     args.eval_images, augment=False))

    peaks_before = measure_peaks(precisions, args.matmul_size, args.matmul_repeats)
    for round_index in range(args.repeats):
        for bench in benches:
            steps = max(1, math.ceil(args.images / bench.batch_size))
            bench.round(steps, args.warmup_steps, args.full_epoch)
        note(f"round {round_index + 1}/{args.repeats} done")
    peaks_after = measure_peaks(precisions, args.matmul_size, args.matmul_repeats)
    # the best of both measurements: the machine can do at least that much
    peaks = {p: max(peaks_before[p], peaks_after[p]) for p in precisions}

    results = [bench.summary(peaks) for bench in benches]
    memory = []
    if args.memory:
        for recipe in args.memory_recipes or args.recipes:
            note(f"peak memory: training {recipe} in a child process ...")
            memory.append(peak_memory_of_run(recipe, args.memory_epochs, args.subset,
                                             args.threads))

    print(f"\nMatrix-product peak (torch.mm {args.matmul_size}x{args.matmul_size}, best of "
          f"{args.matmul_repeats}, before/after): "
          + "; ".join(f"{p} {peaks[p]:.0f} GFLOP/s ({peaks_before[p]:.0f}/{peaks_after[p]:.0f})"
                      for p in precisions))
    sample = ("whole epochs" if args.full_epoch else
              f"{args.images} images per sample, scaled to {TRAIN_SPLIT_IMAGES:,}")
    print(f"Seconds per epoch: median of {args.repeats} rounds ({sample}); "
          f"floor = training FLOPs done / peak; declared: of the model as declared, whose "
          f"whole input Keras computes\n")
    rows = [[r["recipe"], r["precision"], r["batch_size"], "yes" if r["augment"] else "",
             fmt(r["seconds_per_epoch"]), fmt(r["images_per_second"], 0),
             fmt(r["gflops_per_second"], 1), fmt(100 * r["fraction_of_peak"], 0),
             fmt(r["floor_seconds_per_epoch"]), fmt(r["ratio_to_floor"]),
             fmt(r["ratio_to_declared_floor"]),
             fmt(r["test_eval_seconds"], 3)] for r in results]
    print(table(["recipe", "prec", "batch", "aug", "s/epoch", "img/s", "GFLOP/s", "% peak",
                 "floor s", "x floor", "x declared", f"eval {args.eval_images:,} s"], rows))
    if memory:
        print()
        print(table(["recipe", "epochs", "peak RSS MiB", "wall s"],
                    [[m["recipe"], m["epochs"] or "recipe", fmt(m["peak_rss_mib"], 0),
                      fmt(m["wall_seconds"], 1)] for m in memory]))
    write_result(args.out, {
        "benchmark": "train_speed", "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "epoch_images": TRAIN_SPLIT_IMAGES,
        "matmul_peak_gflops": peaks, "matmul_peak_gflops_before": peaks_before,
        "matmul_peak_gflops_after": peaks_after,
        "results": results, "memory": memory,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
