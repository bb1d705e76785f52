"""The study report: one table, the comparison figures and the findings (findings.py).

`write_report(DIR)` reads a study directory (DIR/study.toml and its run directories) and writes
DIR/report.html (self-contained: figures as base64 data URIs, inline CSS, no scripts, fonts or
network requests), DIR/report.md (for GitHub: figures in DIR/report_files/) and DIR/report.json.
"""

from __future__ import annotations

import base64
import html
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..errors import UserError
from ..training.rundir import RunDir
from .figures import new_figure, save_figure
from .findings import (COLUMNS, RunSummary, collect, epochs_text, findings, quick_study, report_data,
                       settings_line, table_rows)
from .plots import augmentation_preview, compare_runs


FILES_DIR = "report_files"


BAR_WIDTH = 0.27  # of the space between two runs' ticks


def _accuracy_panel(ax, runs: list[RunSummary], references: list[dict], quick: bool) -> None:
    """Grouped bars: our mean test accuracy (with the sd over repeats), the seed notebook's
    printed one and the seed's Keras code run here, where the study file gives them."""
    series = [("ours", [s.mean("test_accuracy") for s in runs],
               [s.std("test_accuracy") or 0.0 for s in runs], "C0"),
              ("seed notebook (printed)", [r.get("seed_test_accuracy") for r in references],
               None, "C7"),
              ("seed's Keras code on this machine",
               [r.get("keras_test_accuracy") for r in references], None, "C1")]
    shown = [v for _, values, _, _ in series for v in values if v is not None]
    for k, (label, values, errors, color) in enumerate(series):
        points = [(i + (k - 1) * BAR_WIDTH, v, (errors or [0.0] * len(runs))[i])
                  for i, v in enumerate(values) if v is not None]
        if not points:
            continue
        xs, ys, es = zip(*points)
        ax.bar(xs, ys, BAR_WIDTH, yerr=es if any(es) else None, label=label, color=color,
               capsize=3)
        for xi, yi in zip(xs, ys):  # values on the bars, vertical so neighbours never overlap
            ax.text(xi, yi + 0.003, f"{yi:.3f}", ha="center", va="bottom", fontsize=7.5,
                    rotation=90)
    # Zoomed on the bars' tops (differences are a few points); headroom for the labels.
    ax.set_ylim(max(0.0, min(shown) - 0.04), max(shown) + 0.045)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy" + (" (quick study: the full-size references are not "
                                    "comparable and left out)" if quick else ""),
                 fontsize=10 if quick else None)


def _time_panel(ax, runs: list[RunSummary], references: list[dict], quick: bool) -> None:
    """Our training minutes per run beside the seed's Keras code's, where given."""
    x = range(len(runs))
    ours = [(s.mean("train_seconds") or 0.0) / 60 for s in runs]
    keras = [r.get("keras_train_seconds") for r in references]
    ax.bar([i - BAR_WIDTH / 2 for i in x], ours, BAR_WIDTH, color="C0")
    keras_bars = [(i + BAR_WIDTH / 2, v / 60) for i, v in zip(x, keras) if v is not None]
    if keras_bars:
        ax.bar(*zip(*keras_bars), BAR_WIDTH, color="C1")
    for xi, yi in [(i - BAR_WIDTH / 2, v) for i, v in zip(x, ours)] + keras_bars:
        ax.text(xi, yi, f"{yi:.1f}", ha="center", va="bottom", fontsize=7.5)
    ax.set_ylabel("training time (min)")
    keras_total = sum(v for v in keras if v is not None) / 60
    if keras_total:  # compare like with like: only the runs that have a Keras time
        ours_matched = sum(o for o, k in zip(ours, keras) if k is not None)
        title = (f"Training time: {ours_matched:.1f} min here, {keras_total:.1f} min with Keras\n"
                 "(the runs both trained)")
    else:
        title = f"Training time: {sum(ours):.1f} min in all" + (
            "\n(quick study: no full-size reference)" if quick else "")
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.12)


def figure_references(summaries: list[RunSummary], quick: bool = False):
    """Test accuracy per model (ours, the seed's reported, Keras here) and training time per
    model (ours vs Keras here), as grouped bars with one legend below.

    A quick study (fewer epochs or images than the study declares) is not comparable with the
    full-size references: they are left out of both panels, and the titles say so.
    """
    runs = [s for s in summaries if s.finished]
    references = [{} if quick else s.reference for s in runs]
    fig = new_figure((12, 5))
    left, right = fig.subplots(1, 2, width_ratios=[1.4, 1])
    _accuracy_panel(left, runs, references, quick)
    _time_panel(right, runs, references, quick)
    for ax in (left, right):
        ax.set_xticks(range(len(runs)), [s.name for s in runs], rotation=20, ha="right",
                      rotation_mode="anchor")
        ax.grid(True, axis="y", alpha=0.3)
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
    files = study_dir / FILES_DIR
    done = [s for s in summaries if s.finished]
    quick = quick_study(study)
    sections: dict[str, list[ReportFigure]] = {}
    path = save_figure(figure_references(summaries, quick), files / "references.png")
    has_references = any(s.reference for s in done)
    sections["references"] = [ReportFigure(
        path, "Test accuracy and training time",
        "A quick study: the study file's full-size references are left out (not comparable)."
        if quick and has_references else
        "Ours beside the reference numbers of the study file." if has_references else "")]
    curves, weights = compare_runs([s.run_dirs[0] for s in done], files)
    sections["curves"] = [ReportFigure(curves, "Learning curves of all runs",
                                       "Solid: training; dashed: validation.")]
    sections["weights"] = [ReportFigure(weights, "Kernel weights of each layer",
                                        "One row per run, one column per Conv2D/Dense layer.")]
    sections["confusion"] = []
    for s in done:
        source = RunDir(s.run_dirs[0]).plot("confusion_matrix.png")
        if source.is_file():
            target = files / f"confusion_{s.name}.png"
            fileio.write_bytes(target, source.read_bytes())
            sections["confusion"].append(ReportFigure(target, s.name))
    sections["gradcam"] = []
    for s in done:
        source = RunDir(s.run_dirs[0]).plot("gradcam.png")
        if source.is_file():  # runs from before gradcam.png existed have none
            target = files / f"gradcam_{s.name}.png"
            fileio.write_bytes(target, source.read_bytes())
            sections["gradcam"].append(ReportFigure(target, s.name, s.name))
    sections["augmentation"] = []
    for s in done:
        cfg = s.configs[0]
        if cfg.augment.enabled:
            target = augmentation_preview(cfg, files / f"augmentation_{s.name}.png",
                                                n=8, seed=0, data=data)
            sections["augmentation"].append(ReportFigure(
                target, s.name, f"Training images of {s.name}: originals (top) and random "
                                f"augmentations as training sees them."))
    keep = {f.path.name for figures in sections.values() for f in figures}
    for stale in files.glob("*.png"):  # figures of runs no longer in the study
        if stale.name not in keep:
            stale.unlink()
    return sections


SECTION_TITLES = (("references", "Test accuracy and training time"), ("curves", "Learning curves"),
                  ("confusion", "Confusion matrices (test set)"),
                  ("gradcam", "What each model looked at (Grad-CAM; saliency without a Conv2D)"),
                  ("weights", "Weight histograms"), ("augmentation", "Augmentation"))

# sections whose figures are shown one per row, at full width: their tiles and captions are
# too small to read at half width
FULL_WIDTH = ("gradcam",)


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
            f"{cfg.model.name}, {epochs_text(cfg.train.epochs)}, batch {cfg.train.batch_size}"
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
        grid = len(items) > 1 and key not in FULL_WIDTH
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
