"""Running a study: each run trained, resumed or skipped as its directory says, then the
report written. A study directory is continued, never overwritten (check_compatible).

>>> result = run_study("seed", out="studies/seed")      # doctest: +SKIP
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import fileio
from ..errors import CheckpointError, SpecError, TrainingStopped, UserError
from ..training.config import RunConfig, bind_to_data
from ..training.run import config_differences, data_for
from ..training.progress import in_notebook
from ..training.rundir import RunDir
from .plots import plots_from_run
from .report import write_report
from .run_process import run_in_process
from .runs import resume, train
from .study import STUDY_FILE, Study, load_study, read_study


@dataclass
class StudyResult:
    study_dir: Path
    study: Study
    done: dict[str, str]        # run directory name -> "trained" | "resumed" | "skipped"
    report: tuple[Path, Path] | None = None   # (report.html, report.md)


def _describe_differences(old: Study, new: Study) -> str:
    a, b = old.settings(), new.settings()
    return "; ".join(f"{key} {a[key]!r} there, {b[key]!r} now" for key in a if a[key] != b[key])


def study_command(study: Study, study_dir: Path) -> str:
    """The command that continues this study in `study_dir`, with its options."""
    words = ["fashion-cnn", "study", study.source or study.name, "--out", str(study_dir)]
    options = study.options()
    return " ".join(shlex.quote(w) for w in words) + (f" {options}" if options else "")


def check_compatible(study_dir: Path, study: Study) -> None:
    """Refuse a study whose settings or runs contradict the one already in `study_dir`."""
    try:
        old = read_study(study_dir)
    except SpecError as exc:
        raise CheckpointError(f"{study_dir / STUDY_FILE}: unreadable ({exc}); "
                              f"choose another output directory", setting="out") from None
    if old.name != study.name:
        raise UserError(f"{study_dir} holds study {old.name!r}, not {study.name!r}; "
                        f"choose another output directory", setting="out")
    if old.settings() != study.settings():
        raise UserError(f"{study_dir} holds study {old.name!r} run with other settings "
                        f"({_describe_differences(old, study)}); continue it with "
                        f"`{study_command(old, study_dir)}`, or choose another output "
                        f"directory", setting="out")
    for run in study.runs:
        previous = next((r for r in old.runs if r.name == run.name), None)
        if previous and (previous.recipe, previous.overrides) != (run.recipe, run.overrides):
            raise UserError(f"{study_dir}: run {run.name!r} was made from {previous.recipe!r} "
                            f"with overrides {previous.overrides}, now {run.recipe!r} with "
                            f"{run.overrides}; continue it with `{study_command(old, study_dir)}`"
                            f", or choose another output directory", setting="out")


def _check_run_config(run_dir: RunDir, expected: RunConfig) -> None:
    saved = run_dir.read_config()
    if saved.fingerprint() != expected.fingerprint() or saved.train.epochs != expected.train.epochs:
        diff = config_differences(saved, expected)
        if saved.train.epochs != expected.train.epochs:
            diff = f"train.epochs: run {saved.train.epochs}, study {expected.train.epochs}"
        raise UserError(f"{run_dir}: its configuration no longer matches the study ({diff}); "
                        f"the recipe changed since it ran: move the run away to retrain it, "
                        f"or choose another output directory", setting="out")


def _open_study_dir(study: Study, out) -> Path:
    """The study's directory: new, empty, or holding this same study (to continue)."""
    study_dir = Path(out) if out else Path("studies") / study.name
    if study_dir.exists() and not study_dir.is_dir():
        raise UserError(f"{study_dir}: is a file, not a directory; choose another output "
                        f"directory", setting="out")
    if (study_dir / STUDY_FILE).exists():
        check_compatible(study_dir, study)
    elif study_dir.is_dir() and any(study_dir.iterdir()):
        raise UserError(f"{study_dir}: already exists, is not empty and holds no {STUDY_FILE}; "
                        f"choose another output directory", setting="out")
    return study_dir


def _complete(run_dir: RunDir) -> bool:
    """Whether the run is finished and has its figures: a study only checks and skips it."""
    return run_dir.is_finished() and run_dir.plot("confusion_matrix.png").is_file()


def _run_one(run_dir: RunDir, cfg: RunConfig, data, progress: bool, log) -> str:
    """Train, resume or skip one run of a study as its directory says; what was done."""
    bind_to_data(cfg, data)  # as the run's own config.toml was: comparable with it
    epochs = f"{cfg.train.epochs} epoch{'s' if cfg.train.epochs > 1 else ''}"
    if run_dir.is_finished():
        _check_run_config(run_dir, cfg)
        if not _complete(run_dir):
            log("finished; writing its missing figures")
            plots_from_run(run_dir.path, data=data)
            return "figures"
        log("finished already, skipped")
        return "skipped"
    if run_dir.is_run():
        _check_run_config(run_dir, cfg)
        log(f"resuming ({epochs} in all)")
        log_to = (cfg.log.tensorboard_dir or True) if cfg.log.tensorboard else None
        resume(run_dir.path, data=data, progress=progress, expect=cfg, tensorboard=log_to)
        return "resumed"
    log(f"training {cfg.recipe or cfg.model.name}, {epochs}, seed {cfg.train.seed}")
    train(cfg, run_dir.path, data=data, progress=progress)
    return "trained"


def _run_one_loading(run_dir: RunDir, cfg: RunConfig, data, progress: bool, log) -> str:
    """_run_one in a run's own process: the data loaded there (from the cache) unless the
    caller gave it."""
    return _run_one(run_dir, cfg, data_for(cfg, data), progress, log)


def _plan(study: Study, tensorboard) -> list[tuple[str, RunConfig]]:
    """(run directory name, config) of every run, in order, logging as `tensorboard` says."""
    plan = [(dir_name, study.config_for(run, offset))
            for run in study.runs for offset, dir_name in study.dir_names(run)]
    if tensorboard is not False:
        for dir_name, cfg in plan:
            cfg.log.tensorboard = True
            if tensorboard is not True:
                cfg.log.tensorboard_dir = str(Path(tensorboard) / dir_name)
    return plan


def _record_study(study: Study, study_dir: Path) -> bool:
    """Write the resolved study.toml where it changed; whether it did (the report is then
    stale: the study's description or reference data changed, or a run did)."""
    resolved = study.to_toml()
    recorded = study_dir / STUDY_FILE
    changed = not recorded.is_file() or recorded.read_text() != resolved
    if changed:
        fileio.write_text(recorded, resolved)
    return changed


def run_study(name_or_path: str, out: str | os.PathLike | None = None, *,
              epochs_scale: float | None = None, subset: int | None = None,
              repeats: int | None = None, dataset: str | None = None, progress: bool = True,
              report: bool = True, data=None, log=print,
              tensorboard: bool | str | os.PathLike = False,
              isolate: bool | None = None) -> StudyResult:
    """Train every run of a study into `out` (default studies/<name>), skipping finished runs
    and resuming interrupted ones; then write the report (report.html, report.md).

    isolate: each run trains in a process of its own (run_process.py: its own memory peak, a
    crash ends only that run); the default, except in a notebook, where the progress display
    needs the kernel's own process. False trains every run in this process.

    tensorboard: True logs each run into its RUN_DIR/tensorboard (`tensorboard --logdir
    STUDY_DIR` shows them all); a folder logs each into FOLDER/<run directory's name>."""
    study = load_study(name_or_path, epochs_scale=epochs_scale, subset=subset, repeats=repeats,
                       dataset=dataset)
    study_dir = _open_study_dir(study, out)
    plan = _plan(study, tensorboard)
    report_stale = _record_study(study, study_dir)
    loaded = {}  # how a dataset is loaded -> ImageData, each decoded once for the whole study

    def cached_data(cfg: RunConfig):
        d = cfg.data
        key = (d.dataset, d.data_dir, d.image_size, d.channels, d.fit, d.order, d.test_fraction,
               d.split_seed, d.strict)
        if key not in loaded:
            loaded[key] = data_for(cfg, data)
        return loaded[key]

    if isolate is None:
        isolate = not in_notebook()
    done = {}
    for index, (dir_name, cfg) in enumerate(plan, 1):
        head = f"[{index}/{len(plan)}] {dir_name}"
        run_log = lambda text, head=head: log(f"{head}: {text}")  # noqa: E731
        run_dir = RunDir(study_dir / dir_name)
        try:
            # A complete run is only checked and skipped, here: a process of its own would
            # cost seconds (a fresh interpreter importing torch) to do nothing.
            if isolate and not _complete(run_dir):
                loaded.clear()  # this process holds no dataset while a run trains
                status = run_in_process(_run_one_loading, (run_dir, cfg, data, progress),
                                        run_log, f"run {dir_name}")
            else:
                status = _run_one(run_dir, cfg, cached_data(cfg), progress, run_log)
        except TrainingStopped as stop:
            raise stop.extended(f"; or continue the whole study with: "
                                f"{study_command(study, study_dir)}") from None
        report_stale |= status != "skipped"  # new figures count: the report shows them
        done[dir_name] = "skipped" if status == "figures" else status
    result = StudyResult(study_dir, study, done)
    paths = (study_dir / "report.html", study_dir / "report.md")
    if report and not report_stale and all(p.is_file() for p in paths):
        log("Every run was finished already; the report is up to date "
            "(`fashion-cnn report` rewrites it)")
        result.report = paths
    elif report:
        result.report = write_report(study_dir, data=cached_data(plan[0][1]))
    return result


def print_study_result(result: StudyResult, stream=None) -> None:
    """What happened to each run, its test accuracy, and where the report is."""
    stream = stream or sys.stdout
    for name, status in result.done.items():
        line = f"  {name:<24}{status:<9}"
        try:
            metrics = RunDir(result.study_dir / name).read_metrics()
            line += (f"test accuracy {metrics['test_accuracy']:.4f}, "
                     f"{metrics['train_seconds']:.1f} s of training")
        except (CheckpointError, KeyError):
            pass
        stream.write(line.rstrip() + "\n")
    counts = {status: list(result.done.values()).count(status)
              for status in ("trained", "resumed", "skipped")}
    stream.write(f"Study {result.study.name!r} in {result.study_dir}: "
                 + ", ".join(f"{n} {status}" for status, n in counts.items()) + "\n")
    if result.report:
        stream.write(f"Report: {result.report[0]} and {result.report[1]}\n")
