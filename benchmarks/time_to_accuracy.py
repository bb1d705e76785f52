"""Wall-clock training time until test accuracy first reaches 0.90, 0.926, 0.94 and 0.95.

Each recipe (default: the seed's model1..model4, and `fast` and `best` where the zoo has them)
is trained with the project's own `train()` (the same code as `fashion-cnn train`, with its
checkpoints, but no plots or progress display), once per --seeds value. After every epoch the
model is evaluated on the TEST set as the run's final evaluation would be (with the recipe's
test-time augmentation), only for this measurement: nothing in the run sees that number (no
checkpoint, schedule or early stopping), and the time it takes is taken out of the clock. The
clock runs from the start of the first epoch and counts training, the per-epoch validation pass
and checkpoint writing; data loading, model building and a torch.compile warm-up (reported
apart by the run) are outside it.

Seeds alternate over recipes (seed 0 of every recipe, then seed 1, ...), so a slow spell of a
shared machine does not fall on one recipe only. The table shows, per threshold, the mean and
spread of the seconds over the seeds that reached it, and how many did.

    python benchmarks/time_to_accuracy.py                        # every default recipe, seed 0
    python benchmarks/time_to_accuracy.py --recipes fast --seeds 0 1 2
    python benchmarks/time_to_accuracy.py --smoke                # seconds: checks the script

The accuracy-time frontier: `--frontier DIR ...` trains nothing; it reads finished runs (run
directories, or study directories holding them) and prints each recipe's test accuracy against
its training minutes (mean over seeds), the seed's Keras code beside them (the seed study's
reference numbers), which points are on the frontier (no other point of ours on the same
machine is both faster and more accurate), and draws them (--figure, a PNG). `--recorded FILE`
adds points measured earlier on another machine (benchmarks/frontier_reference.toml: the
reference machine's, where the Keras points were measured too); each point carries its machine,
and only points of one machine are compared. A measuring run draws its own.

    python benchmarks/time_to_accuracy.py --frontier studies/seed runs/fast-* --figure f.png
    python benchmarks/time_to_accuracy.py --frontier studies/seed \
        --recorded benchmarks/frontier_reference.toml --figure docs/images/frontier.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from common import OUT_DIR, fmt, machine_info, note, spread, table, write_result
from fashion_cnn.analysis.study import load_study
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.errors import UserError
from fashion_cnn.perf import configure_runtime
from fashion_cnn import train
from fashion_cnn.training.recipes import list_recipes
from fashion_cnn.training.rundir import RunDir

THRESHOLDS = [0.90, 0.926, 0.94, 0.95]  # 0.926: the seed's best test accuracy (model4)
SEED_RECIPES = ["seed-model1", "seed-model2", "seed-model3", "seed-model4"]
# where the seed study's Keras reference numbers were measured (RESULTS.md, keras_seed.py)
KERAS_MACHINE = "AVX-512 machine"


def default_recipes() -> list[str]:
    known = list_recipes()
    return [r for r in SEED_RECIPES if r in known] + [r for r in ("fast", "best") if r in known]


class TestAccuracyProbe:
    """Callback: test accuracy after every epoch, for this benchmark only.

    Evaluating on the test set during training would be wrong for choosing anything; here the
    number is only recorded, and the run never reads it. Its own time is subtracted from the
    clock so that the reported seconds are those of the run without the probe.
    """

    def __init__(self, thresholds: list[float], stop_when_done: bool = False):
        self.thresholds = sorted(thresholds)
        self.stop_when_done = stop_when_done
        self.epochs: list[dict] = []
        self.reached: dict[str, dict | None] = {f"{t:g}": None for t in self.thresholds}
        self.probe_seconds = 0.0
        self.start = None

    def on_train_begin(self, trainer):
        if self.start is None:
            self.start = time.perf_counter()

    def on_epoch_end(self, trainer, epoch, logs):
        now = time.perf_counter()
        train_seconds = now - self.start - self.probe_seconds
        # the trainer's own evaluation path (precision, batch size, evaluated weights) and the
        # recipe's test-time augmentation: the accuracy the run would report if it ended here
        accuracy = trainer.evaluate_split("test", tta=trainer.config.train.tta)["accuracy"]
        self.probe_seconds += time.perf_counter() - now
        self.epochs.append({"epoch": epoch + 1, "train_seconds": train_seconds,
                            "test_accuracy": accuracy,
                            "val_accuracy": logs.get("val_accuracy")})
        for t in self.thresholds:
            key = f"{t:g}"
            if self.reached[key] is None and accuracy >= t:
                self.reached[key] = {"seconds": train_seconds, "epoch": epoch + 1,
                                     "test_accuracy": accuracy}
        if self.stop_when_done and all(v is not None for v in self.reached.values()):
            trainer.stop_training = True


def measure(recipe: str, seed: int, args, data) -> dict:
    overrides = {"train.seed": seed}
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    if args.subset:
        overrides["data.subset"] = args.subset
    if args.threads:
        overrides["train.threads"] = args.threads
    probe = TestAccuracyProbe(args.thresholds, args.stop_when_done)
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as tmp:
        result = train(recipe, Path(tmp) / "run", data=data, progress=False, plots=False,
                       callbacks=[probe], **overrides)
    metrics = result.metrics
    return {"recipe": recipe, "seed": seed, "epochs": len(result.history),
            "precision": result.config.train.precision,
            "batch_size": result.config.train.batch_size,
            "reached": probe.reached, "per_epoch": probe.epochs,
            # the run's own training clock includes the probe; take it out
            "train_seconds": metrics["train_seconds"] - probe.probe_seconds,
            "probe_seconds": probe.probe_seconds,
            "compile_seconds": metrics.get("compile_seconds"),
            "final_test_accuracy": metrics["test_accuracy"]}


def summarize(recipe: str, runs: list[dict], thresholds: list[float]) -> dict:
    mine = [r for r in runs if r["recipe"] == recipe]
    out = {"recipe": recipe, "seeds": [r["seed"] for r in mine],
           "final_test_accuracy": spread([r["final_test_accuracy"] for r in mine]),
           "train_seconds": spread([r["train_seconds"] for r in mine]), "thresholds": {}}
    for t in thresholds:
        key = f"{t:g}"
        hits = [r["reached"][key] for r in mine]
        out["thresholds"][key] = {
            "reached": sum(h is not None for h in hits), "of": len(mine),
            "seconds": spread([h["seconds"] for h in hits if h]),
            "epoch": spread([h["epoch"] for h in hits if h])}
    return out


def cell(stats: dict, digits: int = 1) -> str:
    """'mean +- std' of the seeds that got there, with n/N when some did not."""
    if not stats["n"]:
        return "-"
    text = fmt(stats["mean"], digits)
    if stats["n"] > 1:
        text += f" +- {fmt(stats['std'], digits)}"
    return text


# ------------------------------------------------------------------------------ the frontier

def finished_runs(directories: list[Path]) -> list[RunDir]:
    """The finished runs among `directories` and their immediate subdirectories (a study)."""
    runs = []
    for directory in directories:
        if not directory.is_dir():
            raise UserError(f"{directory}: not a directory")
        candidates = [directory] + sorted(p for p in directory.iterdir() if p.is_dir())
        runs += [RunDir(c) for c in candidates if RunDir(c).is_finished()]
    if not runs:
        raise UserError(f"no finished run in {', '.join(map(str, directories))}")
    return runs


def this_machine() -> str:
    return f"this machine ({torch.backends.cpu.get_cpu_capability()})"


def points_from_runs(run_dirs: list[RunDir], machine: str) -> list[dict]:
    """One point per recipe and precision: mean test accuracy and training minutes over its
    runs (seeds), the largest peak memory; the runs were trained on `machine`."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run_dir in run_dirs:
        cfg, metrics = run_dir.read_config(), run_dir.read_metrics()
        groups.setdefault((cfg.recipe, cfg.train.precision), []).append(metrics)
    points = []
    for (recipe, precision), runs in groups.items():
        accuracy = spread([m["test_accuracy"] for m in runs])
        minutes = spread([m["train_seconds"] / 60 for m in runs])
        points.append({"label": recipe, "side": "ours", "machine": machine,
                       "precision": precision, "seeds": len(runs), "accuracy": accuracy["mean"],
                       "accuracy_sd": accuracy["std"], "minutes": minutes["mean"],
                       "peak_mib": max((m.get("peak_rss_mib") or 0) for m in runs) or None})
    return points


def points_from_summaries(summaries: list[dict], precision: dict[str, str]) -> list[dict]:
    """The points of this script's own measured runs."""
    return [{"label": s["recipe"], "side": "ours", "machine": this_machine(),
             "precision": precision.get(s["recipe"]),
             "seeds": s["train_seconds"]["n"], "accuracy": s["final_test_accuracy"]["mean"],
             "accuracy_sd": s["final_test_accuracy"]["std"],
             "minutes": s["train_seconds"]["mean"] / 60, "peak_mib": None} for s in summaries]


def keras_points() -> list[dict]:
    """The seed's Keras code on the seed study's runs (its reference numbers)."""
    study = load_study("seed")
    return [{"label": run.recipe, "side": "keras", "machine": KERAS_MACHINE,
             "precision": "fp32", "seeds": 1,
             "accuracy": run.reference["keras_test_accuracy"], "accuracy_sd": None,
             "minutes": run.reference["keras_train_seconds"] / 60, "peak_mib": None}
            for run in study.runs if "keras_test_accuracy" in run.reference]


RECORDED_KEYS = {"label": str, "precision": str, "seeds": int, "accuracy": float,
                 "train_seconds": float, "measured": str, "source": str}


def recorded_points(path: Path) -> list[dict]:
    """Points of ours measured earlier (a TOML file: `machine`, and [[point]] tables with
    RECORDED_KEYS, optional accuracy_sd and peak_mib)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read recorded points: {exc}") from None
    if not isinstance(data.get("machine"), str) or not data.get("point"):
        raise UserError(f"{path}: needs a `machine` name and [[point]] tables")
    points = []
    for number, raw in enumerate(data["point"], 1):
        for key, kind in RECORDED_KEYS.items():
            value = raw.get(key)
            if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
                raise UserError(f"{path}: point {number}: `{key}` must be a {kind.__name__}")
        points.append({"label": raw["label"], "side": "ours", "machine": data["machine"],
                       "precision": raw["precision"], "seeds": raw["seeds"],
                       "accuracy": raw["accuracy"], "accuracy_sd": raw.get("accuracy_sd"),
                       "minutes": raw["train_seconds"] / 60, "peak_mib": raw.get("peak_mib"),
                       "measured": raw["measured"], "source": raw["source"]})
    return points


def mark_frontier(points: list[dict]) -> list[dict]:
    """Sets `frontier` on each point of ours: no other point of ours on the same machine is at
    least as fast and at least as accurate, and better in one of the two."""
    ours = [p for p in points if p["side"] == "ours"]
    for p in points:
        p["frontier"] = p["side"] == "ours" and not any(
            q is not p and q["machine"] == p["machine"]
            and q["minutes"] <= p["minutes"] and q["accuracy"] >= p["accuracy"]
            and (q["minutes"] < p["minutes"] or q["accuracy"] > p["accuracy"]) for q in ours)
    return points


def frontier_table(points: list[dict]) -> str:
    rows = []
    for p in sorted(points, key=lambda p: (p["machine"], p["minutes"], p["side"])):
        acc = f"{p['accuracy']:.4f}"
        if p["seeds"] > 1 and p["accuracy_sd"] is not None:
            acc += f" +- {p['accuracy_sd']:.4f}"
        rows.append([p["label"], "Keras (seed's code)" if p["side"] == "keras" else "ours",
                     p["machine"], p["precision"] or "-", p["seeds"], fmt(p["minutes"], 2), acc,
                     fmt(p["peak_mib"], 0), "yes" if p["frontier"] else ""])
    return table(["recipe", "side", "machine", "precision", "seeds", "training min", "test acc.",
                  "peak MiB", "frontier"], rows)


def measured_on(points: list[dict]) -> str:
    """", measured 2026-11-29, 2026-11-30" for recorded points; "" for runs read now."""
    dates = sorted({p["measured"] for p in points if p.get("measured")})
    return f", measured {', '.join(dates)}" if dates else ""


MACHINE_COLOURS = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]


def draw_frontier(points: list[dict], path: Path, title: str) -> Path:
    """Accuracy against training minutes (log scale): ours in one colour per machine, with
    that machine's frontier as a step line; the seed's Keras points, each with an arrow to our
    point of the same model measured on the same machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    keras = [p for p in points if p["side"] == "keras"]
    machines = list(dict.fromkeys(p["machine"] for p in points if p["side"] == "ours"))
    colour = {m: MACHINE_COLOURS[i % len(MACHINE_COLOURS)] for i, m in enumerate(machines)}
    ours_by_machine = {m: sorted((p for p in points if p["side"] == "ours" and p["machine"] == m),
                                 key=lambda p: p["minutes"]) for m in machines}
    for machine, ours in ours_by_machine.items():
        by_label = {p["label"]: p for p in ours}
        for k in keras:  # the same model on the same machine: the seed's code to ours
            o = by_label.get(k["label"]) if k["machine"] == machine else None
            if o:
                ax.annotate("", xy=(o["minutes"], o["accuracy"]),
                            xytext=(k["minutes"], k["accuracy"]),
                            arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 1})
        front = [p for p in ours if p["frontier"]]
        ax.step([p["minutes"] for p in front], [p["accuracy"] for p in front], where="post",
                color=colour[machine], alpha=0.35, lw=1.5)
        ax.errorbar([p["minutes"] for p in ours], [p["accuracy"] for p in ours],
                    yerr=[p["accuracy_sd"] or 0 for p in ours], fmt="o", color=colour[machine],
                    capsize=3, label=f"ours, {machine}{measured_on(ours)}")
        for p in ours:
            ax.annotate(p["label"], (p["minutes"], p["accuracy"]), textcoords="offset points",
                        xytext=(6, 5), fontsize=7.5, color=colour[machine])
    if keras:
        ax.plot([p["minutes"] for p in keras], [p["accuracy"] for p in keras], "s", mfc="none",
                color="tab:orange", ms=8, label=f"the seed's Keras code, {keras[0]['machine']}")
        for p in keras:
            ax.annotate(p["label"], (p["minutes"], p["accuracy"]), textcoords="offset points",
                        xytext=(-7, 4), ha="right", fontsize=7.5, color="tab:orange")
    ax.set_xscale("log")
    ax.set_xlabel("training minutes (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8,
              title="dots: mean ± sd over seeds; lines: each machine's frontier",
              title_fontsize=7.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def frontier_main(args) -> int:
    try:
        runs = finished_runs(args.frontier)
        recorded = [p for f in args.recorded for p in recorded_points(f)]
    except UserError as exc:
        print(f"time_to_accuracy.py: error: {exc}", file=sys.stderr)
        return 2
    points = mark_frontier(points_from_runs(runs, args.machine) + recorded + keras_points())
    print(frontier_table(points))
    figure = draw_frontier(points, args.figure, args.title)
    print(f"\nwrote {figure}")
    write_result(args.out, {"benchmark": "frontier", "machine": machine_info(),
                            "runs": [str(d) for d in args.frontier],
                            "recorded": [str(f) for f in args.recorded], "points": points})
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training seconds until test accuracy first reaches each threshold, per "
                    "recipe, over several seeds.")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="recipes to train (default: seed-model1..4, fast, best where present)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="one run per seed (default: 0)")
    p.add_argument("--thresholds", nargs="+", type=float, default=THRESHOLDS,
                   help="test accuracies to time (default: 0.90 0.926 0.94 0.95)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    p.add_argument("--stop-when-done", action="store_true",
                   help="stop a run once every threshold is reached (its final accuracy is "
                        "then that epoch's)")
    p.add_argument("--subset", type=int, default=None, help="first N training images only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--test-images", type=int, default=None,
                   help="evaluate on the first N test images only (for quick checks; the "
                        "thresholds mean the full 10,000)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny setting: seed-model1, subset 512, 1 epoch, 1,000 test images")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result (default: benchmarks/out/time_to_accuracy.json, or "
                        "frontier.json with --frontier)")
    p.add_argument("--frontier", nargs="+", type=Path, metavar="DIR",
                   help="train nothing: the frontier of these finished runs (run or study "
                        "directories)")
    p.add_argument("--recorded", nargs="+", type=Path, default=[], metavar="FILE",
                   help="with --frontier: points measured earlier, on their own machine "
                        "(e.g. benchmarks/frontier_reference.toml)")
    p.add_argument("--machine", default=None,
                   help="with --frontier: the machine the runs were trained on (default: "
                        "this machine and its CPU capability)")
    p.add_argument("--figure", type=Path, default=None,
                   help="the frontier figure (default: the JSON result's path, as .png)")
    p.add_argument("--title", default="Fashion-MNIST: test accuracy against training time, "
                                      "2 CPU cores", help="the figure's title")
    args = p.parse_args(argv)
    args.out = args.out or OUT_DIR / ("frontier.json" if args.frontier else
                                      "time_to_accuracy.json")
    args.figure = args.figure or args.out.with_suffix(".png")
    args.machine = args.machine or this_machine()
    if args.smoke:
        args.recipes = args.recipes or ["seed-model1"]
        args.subset, args.epochs, args.seeds, args.test_images = 512, 1, [0], 1000
        args.threads = args.threads or 1  # a smoke run checks the code; one thread is kindest
    args.recipes = args.recipes or default_recipes()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.frontier:
        return frontier_main(args)
    configure_runtime(args.threads)
    data = load_data()
    if args.test_images:
        data = dataclasses.replace(data, test_images=data.test_images[:args.test_images],
                                   test_labels=data.test_labels[:args.test_images])
    runs = []
    for seed in args.seeds:
        for recipe in args.recipes:
            note(f"time_to_accuracy: {recipe}, seed {seed} ...")
            run = measure(recipe, seed, args, data)
            runs.append(run)
            note(f"  {run['epochs']} epochs, {run['train_seconds']:.1f} s, final test accuracy "
                 f"{run['final_test_accuracy']:.4f}")
    summaries = [summarize(recipe, runs, args.thresholds) for recipe in args.recipes]

    print(f"\nTraining seconds until test accuracy first reaches each threshold "
          f"(mean +- std over seeds {args.seeds}; n/N seeds reached it)")
    if args.test_images:
        print(f"NOTE: only the first {args.test_images} test images were used")
    headers = ["recipe", "epochs", "train s", "final acc"] + [f">= {t:g}" for t in args.thresholds]
    rows = []
    for s in summaries:
        epochs = sorted({r["epochs"] for r in runs if r["recipe"] == s["recipe"]})
        row = [s["recipe"], "/".join(map(str, epochs)), cell(s["train_seconds"]),
               cell(s["final_test_accuracy"], 4)]
        for t in args.thresholds:
            th = s["thresholds"][f"{t:g}"]
            text = cell(th["seconds"])
            if th["reached"] != th["of"]:
                text += f" ({th['reached']}/{th['of']})"
            row.append(text)
        rows.append(row)
    print(table(headers, rows))
    precision = {r["recipe"]: r["precision"] for r in runs}
    points = mark_frontier(points_from_summaries(summaries, precision) + keras_points())
    print("\nThe frontier (final test accuracy against training minutes):")
    print(frontier_table(points))
    print(f"wrote {draw_frontier(points, args.figure, args.title)}")
    write_result(args.out, {
        "benchmark": "time_to_accuracy", "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summaries": summaries, "runs": runs, "frontier": points,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
