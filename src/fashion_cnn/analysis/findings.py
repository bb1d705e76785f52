"""What a study's numbers say: a summary per run (its repeats' metrics and histories), the
results table, and findings computed from them (overfitting, early stopping, changes against
baselines, references). No figures and no HTML: report.py renders these.

>>> overfitting_start([{"epoch": 1, "loss": 0.5, "val_loss": 0.40},
...                    {"epoch": 2, "loss": 0.4, "val_loss": 0.35},
...                    {"epoch": 3, "loss": 0.3, "val_loss": 0.38}])["epoch"]
2
>>> early_stopping_pick([{"epoch": e, "val_loss": v} for e, v in
...                      enumerate([0.5, 0.4, 0.45, 0.46, 0.47, 0.3], 1)], patience=3)
(5, 2)
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..training.callbacks import best_epoch, improved, monitor_mode
from ..training.rundir import RunDir
from .study import read_study


EARLY_STOPPING_PATIENCE = 3   # the patience the findings simulate (epochs without improvement)


CLOSE_POINTS = 0.5            # "within half a point" of a reference accuracy (percentage points)


@dataclass
class RunSummary:
    """One study run and its finished repeats (seed 0 first)."""

    name: str
    change: str
    baseline: str
    reference: dict
    dir_names: list[str]
    metrics: list[dict] = field(default_factory=list)      # one per finished repeat
    histories: list[list[dict]] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)     # the finished ones
    configs: list = field(default_factory=list)            # RunConfig per finished repeat
    missing: list[str] = field(default_factory=list)       # unfinished directory names

    @property
    def finished(self) -> bool:
        return bool(self.metrics)

    def values(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics if m.get(key) is not None]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        """Sample standard deviation over repeats (None with fewer than two)."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None

    def gaps(self) -> list[float]:
        """Final train accuracy minus final validation accuracy, per repeat."""
        return [m["accuracy"] - m["val_accuracy"] for m in self.metrics
                if m.get("accuracy") is not None and m.get("val_accuracy") is not None]


def collect(study_dir: str | os.PathLike):
    """(study, [RunSummary]) from a study directory; unfinished runs are listed as missing."""
    study_dir = Path(study_dir)
    study = read_study(study_dir)
    summaries = []
    for run in study.runs:
        names = [name for _, name in study.dir_names(run)]
        summary = RunSummary(run.name, run.change, run.baseline, run.reference, names)
        for name in names:
            run_dir = RunDir(study_dir / name)
            if not run_dir.is_finished():
                summary.missing.append(name)
                continue
            summary.metrics.append(run_dir.read_metrics())
            summary.histories.append(run_dir.read_history())
            summary.configs.append(run_dir.read_config())
            summary.run_dirs.append(run_dir.path)
        summaries.append(summary)
    if not any(s.finished for s in summaries):
        raise CheckpointError(f"{study_dir}: no run of study {study.name!r} has finished yet; "
                              f"run `fashion-cnn study {study.source or study.name} --out "
                              f"{study_dir}` first")
    return study, summaries


def overfitting_start(history: list[dict]) -> dict | None:
    """Where overfitting starts: the epoch of lowest val_loss, when val_loss is higher at the
    end while the training loss kept falling. None when there is no such epoch (or no
    validation). Returns epoch, val_loss there and at the end, loss there and at the end."""
    rows = [h for h in history if h.get("val_loss") is not None and h.get("loss") is not None
            and math.isfinite(h["val_loss"]) and math.isfinite(h["loss"])]
    index, _ = best_epoch(rows, "val_loss")
    if index is None or index == len(rows) - 1:
        return None
    at, last = rows[index], rows[-1]
    if not (last["val_loss"] > at["val_loss"] and last["loss"] < at["loss"]):
        return None
    return {"epoch": int(at["epoch"]), "last_epoch": int(last["epoch"]),
            "val_loss": at["val_loss"], "last_val_loss": last["val_loss"],
            "loss": at["loss"], "last_loss": last["loss"]}


def early_stopping_pick(history: list[dict], patience: int = EARLY_STOPPING_PATIENCE,
                        monitor: str = "val_loss") -> tuple[int, int] | None:
    """(epoch it would stop after, epoch whose weights restore_best would keep), both 1-based,
    for Keras-style early stopping on this history; None if it would not stop (a stop after
    the last epoch counts: it still names the epoch restore_best would keep)."""
    mode, best, best_index = monitor_mode(monitor), None, None
    for i, logs in enumerate(history):
        if improved(logs.get(monitor), best, mode):
            best, best_index = logs[monitor], i
        waited = i - (best_index if best_index is not None else -1)
        if waited >= patience:
            kept = best_index if best_index is not None else i
            return int(history[i]["epoch"]), int(history[kept]["epoch"])
    return None


def epochs_text(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _points(delta: float) -> str:
    """A difference of accuracies in percentage points: +1.13 points."""
    return f"{delta * 100:+.2f} points"


def _acc(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def findings(study, summaries: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """Short statements computed from the runs' numbers, in groups: [(heading, [items])]."""
    done = [s for s in summaries if s.finished]
    groups = [("Overall", _overall_findings(study, done)),
              ("What each change did", _change_findings(done)),
              (f"Overfitting and early stopping (patience {EARLY_STOPPING_PATIENCE}, val_loss)",
               [line for s in done if (line := _fit_finding(s))])]
    if not quick_study(study):  # a quick study's numbers say nothing about the references
        groups.append(("Against the references", _reference_findings(done)))
    return [(title, items) for title, items in groups if items]


def _overall_findings(study, done: list[RunSummary]) -> list[str]:
    out = []
    if quick_study(study):
        what = []
        if study.epochs_scale != 1.0:
            what.append(f"epochs x {study.epochs_scale:g}")
        if study.subset:
            what.append(f"the first {study.subset:,} training images")
        out.append(f"This is a quick version of the study ({', '.join(what)}): its accuracies and "
                   f"times are not comparable with the full-size reference numbers.")
    if study.repeats > 1:
        out.append(f"Each run was repeated with {study.repeats} seeds: the table shows mean ± "
                   f"sample standard deviation; the curves and the per-run findings use the "
                   f"first seed.")
    best = max(done, key=lambda s: s.mean("test_accuracy"))
    first = done[0]
    line = f"Highest test accuracy: {best.name}, {_acc(best.mean('test_accuracy'))}"
    if best is not first:
        line += (f", {_points(best.mean('test_accuracy') - first.mean('test_accuracy'))} "
                 f"from {first.name}")
    out.append(line + ".")
    return out


def _change_findings(done: list[RunSummary]) -> list[str]:
    """Each run against its baseline: test accuracy and train-validation gap before -> after."""
    by_name = {s.name: s for s in done}
    out = []
    for s in done:
        base = by_name.get(s.baseline)
        if base is None:
            continue
        delta = s.mean("test_accuracy") - base.mean("test_accuracy")
        verdict = "helped" if delta > 0 else "changed nothing" if delta == 0 else "hurt"
        spread = ""
        if s.std("test_accuracy") is not None and base.std("test_accuracy") is not None:
            noise = math.hypot(s.std("test_accuracy"), base.std("test_accuracy"))
            spread = (f"; the seeds' spread of the difference is ±{noise * 100:.2f} points, so "
                      f"it is {'more' if abs(delta) > 2 * noise else 'less'} than twice that")
        gap_now, gap_before = s.gaps(), base.gaps()
        gap = ""
        if gap_now and gap_before:
            gap = (f"; train–validation gap {statistics.fmean(gap_before):+.4f} → "
                   f"{statistics.fmean(gap_now):+.4f}")
        change = f" ({s.change})" if s.change else ""
        out.append(f"{s.name}{change} vs {base.name}: {verdict}, test accuracy "
                   f"{_acc(base.mean('test_accuracy'))} → {_acc(s.mean('test_accuracy'))} "
                   f"({_points(delta)}){gap}{spread}.")
    return out


def _fit_finding(s: RunSummary) -> str:
    """Where the first seed's run starts to overfit and what early stopping would pick."""
    history = s.histories[0]
    if not any(h.get("val_loss") is not None for h in history):
        return ""
    parts = []
    start = overfitting_start(history)
    if start:
        parts.append(f"overfits after epoch {start['epoch']}: val_loss rises from "
                     f"{start['val_loss']:.4f} to {start['last_val_loss']:.4f} by epoch "
                     f"{start['last_epoch']} while loss falls from {start['loss']:.4f} to "
                     f"{start['last_loss']:.4f}")
    else:
        index, _ = best_epoch(history, "val_loss")
        last = index == len(history) - 1
        parts.append(f"no overfitting within {epochs_text(len(history))} (val_loss is lowest at "
                     f"epoch {int(history[index]['epoch'])}"
                     + (", the last)" if last else ", and the loss did not keep falling after it)"))
    pick = early_stopping_pick(history)
    if pick:
        stop, keep = pick
        kept = next(h for h in history if int(h["epoch"]) == keep)
        end = history[-1]
        parts.append(f"early stopping would stop after epoch {stop} of {len(history)} and keep "
                     f"epoch {keep} (val. accuracy {_acc(kept.get('val_accuracy'))}, against "
                     f"{_acc(end.get('val_accuracy'))} at epoch {int(end['epoch'])})")
    else:
        parts.append("early stopping would not stop")
    return f"{s.name}: " + "; ".join(parts) + "."


def quick_study(study) -> bool:
    """True when the study ran fewer epochs or fewer images than its recipes ask for."""
    return study.epochs_scale != 1.0 or bool(study.subset)


def _reference_findings(done: list[RunSummary]) -> list[str]:
    out = []
    compared = [s for s in done if "keras_test_accuracy" in s.reference]
    if compared:
        diffs = [(s.mean("test_accuracy") - s.reference["keras_test_accuracy"], s) for s in compared]
        close = sum(abs(d) * 100 <= CLOSE_POINTS for d, _ in diffs)
        worst, worst_run = max(diffs, key=lambda d: abs(d[0]))
        out.append(f"Against the seed's Keras code on this machine: {close} of {len(diffs)} "
                   f"models within {CLOSE_POINTS:g} points of its test accuracy (largest "
                   f"difference {_points(worst)}, {worst_run.name}).")
    timed = [s for s in done if "keras_train_seconds" in s.reference]
    if timed:
        ours = sum(s.mean("train_seconds") for s in timed)
        keras = sum(s.reference["keras_train_seconds"] for s in timed)
        out.append(f"Training time of {', '.join(s.name for s in timed)}: {ours / 60:.1f} min "
                   f"here vs {keras / 60:.1f} min for the seed's Keras code on this machine "
                   f"({ours / keras:.0%} of it).")
    seeded = [s for s in done if "seed_test_accuracy" in s.reference]
    if seeded:
        diffs = [s.mean("test_accuracy") - s.reference["seed_test_accuracy"] for s in seeded]
        out.append("Against the accuracies the seed notebook printed: "
                   + ", ".join(f"{s.name} {_points(d)}" for s, d in zip(seeded, diffs)) + ".")
    return out


COLUMNS = ("Model", "Parameters", "Epochs run", "Best epoch (val_loss)", "Final train acc.",
           "Best val. acc.", "Test loss", "Test accuracy", "Train–val. gap", "Training time",
           "Seed's test acc. (reported)", "Keras test acc. (here)", "Keras training time (here)")


def _joined(values: list) -> str:
    """1 value -> "7"; equal values -> "7"; different -> "5, 7, 9"."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return str(values[0]) if len(set(values)) == 1 else ", ".join(str(v) for v in values)


def _mean_std(s: RunSummary, key: str, digits: int = 4) -> str:
    mean, std = s.mean(key), s.std(key)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def table_rows(summaries: list[RunSummary]) -> list[list[str]]:
    """The results table as text cells, one row per run (COLUMNS order)."""
    rows = []
    for s in summaries:
        label = s.name + (f" (×{len(s.metrics)})" if len(s.metrics) > 1 else "")
        ref = s.reference
        refs = [f"{ref['seed_test_accuracy']:.3f}" if "seed_test_accuracy" in ref else "–",
                f"{ref['keras_test_accuracy']:.4f}" if "keras_test_accuracy" in ref else "–",
                f"{ref['keras_train_seconds']:.1f} s" if "keras_train_seconds" in ref else "–"]
        if not s.finished:
            rows.append([s.name, "–", "–", "–", "–", "–", "–", "not finished", "–", "–"] + refs)
            continue
        gaps = s.gaps()
        gap = "–" if not gaps else f"{statistics.fmean(gaps):+.4f}"
        seconds = s.mean("train_seconds")
        rows.append([label, f"{s.metrics[0]['params']:,}", _joined(s.values("epochs")),
                     _joined([m.get("best_epoch") for m in s.metrics]),
                     _mean_std(s, "accuracy"), _mean_std(s, "best_val_accuracy"),
                     _mean_std(s, "test_loss"), _mean_std(s, "test_accuracy"), gap,
                     "–" if seconds is None else f"{seconds:.1f} s"] + refs)
    return rows


def settings_line(study, summaries: list[RunSummary]) -> str:
    parts = [f"epochs x {study.epochs_scale:g}" if study.epochs_scale != 1.0
             else "each recipe's epochs"]
    parts.append(f"the first {study.subset:,} training images" if study.subset
                 else "each recipe's training images")
    parts.append(f"{study.repeats} seed{'s' if study.repeats > 1 else ''} per run")
    finished = sum(len(s.metrics) for s in summaries)
    total = sum(len(s.dir_names) for s in summaries)
    parts.append(f"{finished} of {total} runs finished")
    return "; ".join(parts)


def report_data(study, summaries: list[RunSummary], rows, notes) -> dict:
    """The table (text cells and the numbers behind them) and the findings, for scripts."""
    runs = []
    for s, row in zip(summaries, rows):
        numbers = {key: s.mean(key) for key in ("test_accuracy", "test_loss", "accuracy",
                                                "best_val_accuracy", "train_seconds")}
        numbers["test_accuracy_std"] = s.std("test_accuracy")
        numbers["gap"] = statistics.fmean(s.gaps()) if s.gaps() else None
        runs.append({"name": s.name, "cells": dict(zip(COLUMNS, row)), "numbers": numbers,
                     "reference": s.reference, "directories": [p.name for p in s.run_dirs],
                     "missing": s.missing})
    return {"study": study.name, "settings": study.settings(), "runs": runs,
            "findings": {title: items for title, items in notes}}
