"""The study report: one table, the comparison figures and findings computed from the numbers.

`write_report(DIR)` reads a study directory (DIR/study.toml and its run directories) and writes
DIR/report.html (self-contained: figures as base64 data URIs, inline CSS, no scripts, fonts or
network requests) and DIR/report.md (for GitHub: figures in DIR/report_files/).

>>> overfitting_start([{"epoch": 1, "loss": 0.5, "val_loss": 0.40},
...                    {"epoch": 2, "loss": 0.4, "val_loss": 0.35},
...                    {"epoch": 3, "loss": 0.3, "val_loss": 0.38}])["epoch"]
2
>>> early_stopping_pick([{"epoch": e, "val_loss": v} for e, v in
...                      enumerate([0.5, 0.4, 0.45, 0.46, 0.47, 0.3], 1)], patience=3)
(5, 2)
"""

from __future__ import annotations

import base64
import html
import math
import os
import statistics
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import fileio
from .callbacks import best_epoch, improved, monitor_mode
from .errors import CheckpointError, UserError

FILES_DIR = "report_files"
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
    from .plots import read_history
    from .run import load_run_config, read_metrics
    from .study import read_study

    study_dir = Path(study_dir)
    study = read_study(study_dir)
    summaries = []
    for run in study.runs:
        names = [name for _, name in study.dir_names(run)]
        summary = RunSummary(run.name, run.change, run.baseline, run.reference, names)
        for name in names:
            run_dir = study_dir / name
            if not (run_dir / "metrics.json").is_file():
                summary.missing.append(name)
                continue
            summary.metrics.append(read_metrics(run_dir))
            summary.histories.append(read_history(run_dir))
            summary.configs.append(load_run_config(run_dir))
            summary.run_dirs.append(run_dir)
        summaries.append(summary)
    if not any(s.finished for s in summaries):
        raise CheckpointError(f"{study_dir}: no run of study {study.name!r} has finished yet; "
                              f"run `fashion-cnn study {study.source or study.name} --out "
                              f"{study_dir}` first")
    return study, summaries


# ----------------------------------------------------------------------------- findings

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


def _epochs(n: int) -> str:
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
        parts.append(f"no overfitting within {_epochs(len(history))} (val_loss is lowest at "
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
        out.append(f"Against the accuracies the seed notebook printed: "
                   + ", ".join(f"{s.name} {_points(d)}" for s, d in zip(seeded, diffs)) + ".")
    return out


# ----------------------------------------------------------------------------- the table

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


# ----------------------------------------------------------------------------- figures

def figure_references(summaries: list[RunSummary], quick: bool = False):
    """Test accuracy per model (ours, the seed's reported, Keras here) and training time per
    model (ours vs Keras here), as grouped bars with one legend below."""
    from .plots import new_figure

    runs = [s for s in summaries if s.finished]
    fig = new_figure((12, 5))
    left, right = fig.subplots(1, 2, width_ratios=[1.4, 1])
    x = list(range(len(runs)))
    names = [s.name for s in runs]
    width = 0.27
    ours_label, seed_label, keras_label = ("ours", "seed notebook (printed)",
                                           "seed's Keras code on this machine")
    series = [(ours_label, [s.mean("test_accuracy") for s in runs],
               [s.std("test_accuracy") or 0.0 for s in runs], "C0"),
              (seed_label, [s.reference.get("seed_test_accuracy") for s in runs], None, "C7"),
              (keras_label, [s.reference.get("keras_test_accuracy") for s in runs], None, "C1")]
    shown = [v for _, values, _, _ in series for v in values if v is not None]
    for k, (label, values, errors, color) in enumerate(series):
        points = [(i + (k - 1) * width, v, (errors or [0.0] * len(runs))[i])
                  for i, v in enumerate(values) if v is not None]
        if not points:
            continue
        xs, ys, es = zip(*points)
        left.bar(xs, ys, width, yerr=es if any(es) else None, label=label, color=color,
                 capsize=3)
        for xi, yi in zip(xs, ys):  # values on the bars, vertical so neighbours never overlap
            left.text(xi, yi + 0.003, f"{yi:.3f}", ha="center", va="bottom", fontsize=7.5,
                      rotation=90)
    # Zoomed on the bars' tops (differences are a few points); headroom for the labels.
    left.set_ylim(max(0.0, min(shown) - 0.04), max(shown) + 0.045)
    left.set_xticks(x, names, rotation=20, ha="right", rotation_mode="anchor")
    left.set_ylabel("test accuracy")
    left.set_title("Test accuracy" + (" (quick study)" if quick else ""))
    left.grid(True, axis="y", alpha=0.3)
    ours = [(s.mean("train_seconds") or 0.0) / 60 for s in runs]
    keras = [s.reference.get("keras_train_seconds") for s in runs]
    right.bar([i - width / 2 for i in x], ours, width, color="C0")
    keras_bars = [(i + width / 2, v / 60) for i, v in zip(x, keras) if v is not None]
    if keras_bars:
        right.bar(*zip(*keras_bars), width, color="C1")
    for xi, yi in [(i - width / 2, v) for i, v in zip(x, ours)] + keras_bars:
        right.text(xi, yi, f"{yi:.1f}", ha="center", va="bottom", fontsize=7.5)
    right.set_xticks(x, names, rotation=20, ha="right", rotation_mode="anchor")
    right.set_ylabel("training time (min)")
    keras_total = sum(v for v in keras if v is not None) / 60
    if keras_total:  # compare like with like: only the runs that have a Keras time
        ours_matched = sum(o for o, k in zip(ours, keras) if k is not None)
        title = (f"Training time: {ours_matched:.1f} min here, {keras_total:.1f} min with Keras\n"
                 "(the runs both trained)")
    else:
        title = f"Training time: {sum(ours):.1f} min in all"
    right.set_title(title, fontsize=10)
    right.grid(True, axis="y", alpha=0.3)
    right.margins(y=0.12)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    return fig


@dataclass
class ReportFigure:
    path: Path          # the PNG inside report_files/
    title: str
    caption: str = ""


def write_figures(study_dir: Path, study, summaries: list[RunSummary], data=None) -> dict:
    """Write every figure of the report into DIR/report_files/; return them by section."""
    from . import plots

    files = study_dir / FILES_DIR
    done = [s for s in summaries if s.finished]
    quick = quick_study(study)
    sections: dict[str, list[ReportFigure]] = {}
    path = plots.save_figure(figure_references(summaries, quick), files / "references.png")
    has_references = any(s.reference for s in done)
    sections["references"] = [ReportFigure(
        path, "Test accuracy and training time",
        "Ours beside the reference numbers of the study file." if has_references else "")]
    curves, weights = plots.compare_runs([s.run_dirs[0] for s in done], files)
    sections["curves"] = [ReportFigure(curves, "Learning curves of all runs",
                                       "Solid: training; dashed: validation.")]
    sections["weights"] = [ReportFigure(weights, "Kernel weights of each layer",
                                        "One row per run, one column per Conv2D/Dense layer.")]
    sections["confusion"] = []
    for s in done:
        source = s.run_dirs[0] / "plots" / "confusion_matrix.png"
        if source.is_file():
            target = files / f"confusion_{s.name}.png"
            fileio.write_bytes(target, source.read_bytes())
            sections["confusion"].append(ReportFigure(target, s.name))
    sections["augmentation"] = []
    for s in done:
        cfg = s.configs[0]
        if cfg.augment.enabled:
            target = plots.augmentation_preview(cfg, files / f"augmentation_{s.name}.png",
                                                n=8, seed=0, data=data)
            sections["augmentation"].append(ReportFigure(
                target, s.name, f"Training images of {s.name}: originals (top) and random "
                                f"augmentations as training sees them."))
    keep = {f.path.name for figures in sections.values() for f in figures}
    for stale in files.glob("*.png"):  # figures of runs no longer in the study
        if stale.name not in keep:
            stale.unlink()
    return sections


# ----------------------------------------------------------------------------- rendering

SECTION_TITLES = (("references", "Test accuracy and training time"), ("curves", "Learning curves"),
                  ("confusion", "Confusion matrices (test set)"),
                  ("weights", "Weight histograms"), ("augmentation", "Augmentation"))

CSS = """
body{margin:0;background:#fff;color:#1f2328;font:15px/1.5 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:20px 28px 48px}
h1{font-size:1.75em;margin:.3em 0 .2em}
h2{font-size:1.3em;margin:1.8em 0 .6em;padding-bottom:.2em;border-bottom:1px solid #d0d7de}
p.meta{color:#59636e;margin:.2em 0}
.table{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums;width:100%}
th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:right}
td{white-space:nowrap}
th{background:#f6f8fa;vertical-align:bottom;font-weight:600}
th:first-child,td:first-child,table.runs th,table.runs td{text-align:left}
table.runs td{white-space:normal}
table.runs td:first-child{white-space:nowrap}
h3{font-size:1.05em;margin:1.1em 0 .3em}
tbody tr:nth-child(even){background:#f9fafb}
ul.findings li{margin:.35em 0}
figure{margin:0 0 1.2em}
figure img{display:block;max-width:100%;height:auto;border:1px solid #e5e7eb}
figcaption{color:#59636e;font-size:13px;margin-top:.3em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:16px}
.grid figcaption{font-weight:600;color:#1f2328}
code{font-size:90%;background:#f6f8fa;padding:1px 4px;border-radius:4px}
"""


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    return struct.unpack(">II", png[16:24])


def _img_html(figure: ReportFigure) -> str:
    png = figure.path.read_bytes()
    width, height = _png_size(png)
    data = base64.b64encode(png).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{html.escape(figure.title)}">')


def _runs_table(study, summaries: list[RunSummary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        cfg = s.configs[0] if s.configs else None
        detail = "–" if cfg is None else (
            f"{cfg.model.name}, {_epochs(cfg.train.epochs)}, batch {cfg.train.batch_size}"
            + (f", {cfg.data.subset:,} images" if cfg.data.subset else "")
            + (", augmented" if cfg.augment.enabled else ""))
        dirs = ", ".join(s.dir_names) + (f" (unfinished: {', '.join(s.missing)})"
                                         if s.missing else "")
        rows.append([s.name, detail, s.baseline or "–", s.change or "–", dirs])
    return rows


RUN_COLUMNS = ("Run", "Model and training", "Compared with", "Change", "Directories")


def render_html(study, summaries, rows, notes, figures, generated: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(study.name)}: fashion-cnn study report</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", "<main>",
           f"<h1>Study “{e(study.name)}”</h1>"]
    if study.description:
        out.append(f'<p class="meta">{e(study.description)}</p>')
    out.append(f'<p class="meta">{e(settings_line(study, summaries))}. Generated {e(generated)}.'
               "</p>")
    out += ["<h2>Results</h2>", '<div class="table"><table>', "<thead><tr>"]
    out += [f"<th>{e(c)}</th>" for c in COLUMNS]
    out += ["</tr></thead>", "<tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
    out += ["</tbody></table></div>", f'<p class="meta">{e(TABLE_NOTE)}</p>',
            "<h2>Findings</h2>"]
    for title, items in notes:
        out += [f"<h3>{e(title)}</h3>", '<ul class="findings">']
        out += [f"<li>{e(item)}</li>" for item in items]
        out.append("</ul>")
    for key, title in SECTION_TITLES:
        items = figures.get(key) or []
        if not items:
            continue
        out.append(f"<h2>{e(title)}</h2>")
        grid = len(items) > 1
        if grid:
            out.append('<div class="grid">')
        for figure in items:
            caption = figure.title if grid else figure.caption
            out.append(f"<figure>{_img_html(figure)}"
                       + (f"<figcaption>{e(caption)}</figcaption>" if caption else "")
                       + "</figure>")
        if grid:
            out.append("</div>")
    out += ["<h2>Runs</h2>", '<div class="table"><table class="runs">', "<thead><tr>"]
    out += [f"<th>{e(c)}</th>" for c in RUN_COLUMNS]
    out += ["</tr></thead>", "<tbody>"]
    for row in _runs_table(study, summaries):
        out.append("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
    out += ["</tbody></table></div>", "</main>", "</body>", "</html>", ""]
    return "\n".join(out)


TABLE_NOTE = ("Best epoch: lowest validation loss. Final train acc.: the last epoch's (measured "
              "during the epoch, with dropout and augmentation on). Train–val. gap: final train "
              "accuracy minus final validation accuracy. Test accuracy: mean ± sample standard "
              "deviation over seeds when a run was repeated. Training time: wall-clock seconds of "
              "training, each epoch's validation pass included (as in Keras' fit), the final "
              "test evaluation excluded.")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(study, summaries, rows, notes, figures, generated: str,
                    study_dir: Path) -> str:
    out = [f"# Study “{study.name}”", ""]
    if study.description:
        out += [study.description, ""]
    out += [f"{settings_line(study, summaries)}. Generated {generated}.", "", "## Results", ""]
    out += _md_table(COLUMNS, rows)
    out += ["", TABLE_NOTE, "", "## Findings"]
    for title, items in notes:
        out += ["", f"### {title}", ""]
        out += [f"- {item}" for item in items]
    for key, title in SECTION_TITLES:
        items = figures.get(key) or []
        if not items:
            continue
        out += ["", f"## {title}", ""]
        for figure in items:
            link = figure.path.relative_to(study_dir).as_posix()
            out.append(f"![{_md_cell(figure.title)}]({link})")
            caption = figure.title if len(items) > 1 else figure.caption
            if caption:
                out += ["", f"*{caption}*"]
            out.append("")
    out += ["", "## Runs", ""]
    out += _md_table(RUN_COLUMNS, _runs_table(study, summaries))
    return "\n".join(out).rstrip() + "\n"


def results_markdown(study_dir: str | os.PathLike) -> str:
    """The results table and the findings as Markdown, without figures (for notebooks)."""
    study, summaries = collect(study_dir)
    lines = _md_table(COLUMNS, table_rows(summaries))
    for title, items in findings(study, summaries):
        lines += ["", f"**{title}**", ""] + [f"- {item}" for item in items]
    return "\n".join(lines) + "\n"


def write_report(study_dir: str | os.PathLike, data=None) -> tuple[Path, Path]:
    """Write DIR/report.html and DIR/report.md from the study's finished runs."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"{study_dir}: no such study directory")
    study, summaries = collect(study_dir)
    rows = table_rows(summaries)
    notes = findings(study, summaries)
    figures = write_figures(study_dir, study, summaries, data)
    generated = time.strftime("%Y-%m-%d %H:%M")
    html_path, md_path = study_dir / "report.html", study_dir / "report.md"
    fileio.write_text(html_path, render_html(study, summaries, rows, notes, figures, generated))
    fileio.write_text(md_path, render_markdown(study, summaries, rows, notes, figures, generated,
                                               study_dir))
    fileio.write_json(study_dir / "report.json", report_data(study, summaries, rows, notes))
    return html_path, md_path


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
