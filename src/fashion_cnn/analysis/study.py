"""Studies: several recipes trained side by side into one directory, then one report.

A study is a TOML file (built-in ones in zoo/studies/) listing runs, each a recipe with optional
overrides, plus study-level settings. Every run is a normal run directory inside the study
directory, so a rerun skips finished runs and resumes interrupted ones; DIR/study.toml records
the resolved study so that a rerun with other options is refused instead of mixing results.

>>> study = load_study("seed")
>>> [run.name for run in study.runs][:2], study.epochs_for(25, 0.04)
(['seed-dense', 'seed-model1'], 1)
>>> result = run_study("seed", "studies/quick", epochs_scale=0.1, subset=6000)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog import file_in, looks_like_path, names
from ..errors import CheckpointError, SpecError, UserError
from ..fileio import read_toml, toml_value
from ..training.config import SECTIONS, RunConfig, apply_section, validate
from ..training.recipes import load_config

STUDY_FILE = "study.toml"
# Numbers a run may carry as reference data (beside ours in the report).
REFERENCE_KEYS = ("seed_test_accuracy", "keras_test_accuracy", "keras_train_seconds")
STUDY_KEYS = ("name", "description", "source", "epochs_scale", "subset", "repeats", "overrides",
              "reference", "runs")
RUN_KEYS = ("recipe", "name", "baseline", "change", "overrides", "reference")


def list_studies() -> list[str]:
    """The names of the built-in studies (zoo/studies)."""
    return names("studies")


def study_path(name: str) -> Path:
    """A built-in study by name, or a TOML file by path."""
    return file_in("studies", "study", name)


@dataclass
class StudyRun:
    """One entry of a study: a recipe trained once per seed."""

    name: str                   # directory name inside the study (and the label in the report)
    recipe: str                 # recipe or model name, or an absolute path to a TOML file
    baseline: str = ""          # the run this one is compared with in the findings
    change: str = ""            # what differs from the baseline, in a few words
    overrides: dict = field(default_factory=dict)   # {"train": {"lr": 0.01}, ...}
    reference: dict = field(default_factory=dict)   # REFERENCE_KEYS -> number


@dataclass
class Study:
    name: str
    runs: list[StudyRun]
    description: str = ""
    source: str = ""            # the study name or file this one was resolved from
    epochs_scale: float = 1.0   # each recipe's epochs x this, rounded, at least 1
    subset: int = 0             # first N training images for every run (0 = the recipe's own)
    repeats: int = 1            # seeds per run: the recipe's seed + 0..repeats-1
    overrides: dict = field(default_factory=dict)   # applied to every run before its own
    reference: dict = field(default_factory=dict)   # where the reference numbers come from

    @staticmethod
    def epochs_for(epochs: int, scale: float) -> int:
        """A recipe's epochs under --epochs-scale: max(1, round(epochs x scale))."""
        return max(1, round(epochs * scale))

    def run(self, name: str) -> StudyRun:
        for run in self.runs:
            if run.name == name:
                return run
        raise UserError(f"study {self.name!r} has no run {name!r}")

    def dir_names(self, run: StudyRun) -> list[tuple[int, str]]:
        """(seed offset, directory name) per repeat: `name`, or `name-seed<k>` with repeats."""
        if self.repeats == 1:
            return [(0, run.name)]
        return [(k, f"{run.name}-seed{k}") for k in range(self.repeats)]

    def settings(self) -> dict:
        """What decides the study's results besides the recipes' contents."""
        return {"epochs_scale": self.epochs_scale, "subset": self.subset,
                "repeats": self.repeats, "overrides": self.overrides}

    def config_for(self, run: StudyRun, seed_offset: int = 0) -> RunConfig:
        """The run's fully resolved configuration for one repeat."""
        cfg = load_config(run.recipe)
        where = f"study {self.name!r}, run {run.name!r}"
        for source, overrides in (("overrides", self.overrides), ("run overrides", run.overrides)):
            for section, values in overrides.items():
                apply_section(cfg, section, values, f"{where} {source}")
        cfg.train.epochs = self.epochs_for(cfg.train.epochs, self.epochs_scale)
        if self.subset:
            cfg.data.subset = self.subset
        cfg.train.seed += seed_offset
        return validate(cfg)

    def options(self) -> str:
        """The command-line options that reproduce these settings (for messages)."""
        parts = []
        if self.epochs_scale != 1.0:
            parts.append(f"--epochs-scale {self.epochs_scale:g}")
        if self.subset:
            parts.append(f"--subset {self.subset}")
        if self.repeats != 1:
            parts.append(f"--repeats {self.repeats}")
        return " ".join(parts)

    def to_toml(self) -> str:
        """The study as TOML; loading it gives the same study (DIR/study.toml)."""
        lines = [f"# fashion-cnn study {self.name!r}, resolved from {self.source or self.name!r} "
                 f"with the command line's options.",
                 "# `fashion-cnn study <this file> --out <its folder>` continues it; "
                 "`fashion-cnn report <its folder>` rewrites the report.",
                 f"name = {_toml(self.name)}",
                 f"description = {_toml(self.description)}",
                 f"source = {_toml(self.source)}",
                 f"epochs_scale = {_toml(float(self.epochs_scale))}",
                 f"subset = {self.subset}", f"repeats = {self.repeats}", "", "[overrides]"]
        lines += [f"{section} = {_toml(values)}" for section, values in self.overrides.items()]
        lines += ["", "[reference]"]
        lines += [f"{key} = {_toml(value)}" for key, value in self.reference.items()]
        for run in self.runs:
            cfg_epochs = self._epochs_note(run)
            lines += ["", "[[runs]]", f"name = {_toml(run.name)}",
                      f"recipe = {_toml(run.recipe)}",
                      f"baseline = {_toml(run.baseline)}",
                      f"change = {_toml(run.change)}",
                      f"overrides = {_toml(run.overrides)}",
                      f"reference = {_toml(run.reference)}",
                      f"# {cfg_epochs}; directories: "
                      + ", ".join(name for _, name in self.dir_names(run))]
        return "\n".join(lines) + "\n"

    def _epochs_note(self, run: StudyRun) -> str:
        try:
            cfg = self.config_for(run)
        except UserError:
            return "epochs: see the run's config.toml"
        unscaled = dataclasses.replace(self, epochs_scale=1.0).config_for(run).train.epochs
        return (f"epochs: {cfg.train.epochs} ({unscaled} x {self.epochs_scale:g})"
                if self.epochs_scale != 1.0 else f"epochs: {cfg.train.epochs}")


def _toml(value) -> str:
    """A TOML value, keeping non-ASCII text readable (config's writer escapes it)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, dict):
        inner = ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', str(k)) else _toml(str(k))}"
                          f" = {_toml(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return toml_value(value)


# ----------------------------------------------------------------------------- reading

def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a table, got {value!r}")
    return value


def _overrides(value, where: str) -> dict:
    """{"train": {"lr": 0.01}}: recipe sections and their settings (checked when applied)."""
    table = _table(value, where)
    for section, values in table.items():
        if section not in SECTIONS:
            raise SpecError(f"{where}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        _table(values, f"{where}.{section}")
    return {section: dict(values) for section, values in table.items()}


def _reference(value, where: str) -> dict:
    table = _table(value, where)
    for key, number in table.items():
        if key not in REFERENCE_KEYS:
            raise SpecError(f"{where}: unknown key {key!r}; known: {', '.join(REFERENCE_KEYS)}")
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not math.isfinite(number):
            raise SpecError(f"{where}.{key}: expected a number, got {number!r}")
    return {key: float(number) for key, number in table.items()}


def _string(raw: dict, key: str, where: str, default: str = "") -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise SpecError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _plain_name(name: str, where: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise SpecError(f"{where}: run name {name!r} must be a plain directory name")
    if name == Path(STUDY_FILE).stem or name.startswith("report"):
        raise SpecError(f"{where}: run name {name!r} is reserved for the study's own files")
    return name


def study_from_data(raw: dict, source: str, base_dir: Path | None = None) -> Study:
    """A Study from parsed TOML; recipe paths are taken relative to `base_dir`."""
    unknown = set(raw) - set(STUDY_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown key {sorted(unknown)[0]!r}; expected "
                        f"{', '.join(STUDY_KEYS)}")
    name = _string(raw, "name", source, Path(source).stem)
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise SpecError(f"{source}: no runs; add [[runs]] tables with recipe = \"...\"")
    runs = []
    for index, entry in enumerate(runs_raw, 1):
        where = f"{source}: run {index}"
        entry = _table(entry, where)
        unknown = set(entry) - set(RUN_KEYS)
        if unknown:
            raise SpecError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected "
                            f"{', '.join(RUN_KEYS)}")
        recipe = _string(entry, "recipe", where)
        if not recipe:
            raise SpecError(f"{where}: missing recipe (a recipe or model name, or a .toml path)")
        if looks_like_path(recipe) and base_dir is not None and not Path(recipe).is_absolute():
            recipe = str((base_dir / recipe).resolve())
        run_name = _plain_name(_string(entry, "name", where, Path(recipe).stem
                                       if looks_like_path(recipe) else recipe), where)
        runs.append(StudyRun(run_name, recipe, _string(entry, "baseline", where),
                             _string(entry, "change", where),
                             _overrides(entry.get("overrides", {}), f"{where} overrides"),
                             _reference(entry.get("reference", {}), f"{where} reference")))
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            raise SpecError(f"{source}: two runs are named {run.name!r}; give one a `name`")
        if run.baseline and run.baseline not in names:
            raise SpecError(f"{source}: run {run.name!r} has baseline {run.baseline!r}, which is "
                            f"not a run of the study ({', '.join(names)})")
    reference = _table(raw.get("reference", {}), f"{source}: reference")
    study = Study(name, runs, _string(raw, "description", source),
                  _string(raw, "source", source, source),
                  overrides=_overrides(raw.get("overrides", {}), f"{source}: overrides"),
                  reference={str(k): str(v) for k, v in reference.items()})
    return _with_settings(study, raw.get("epochs_scale", 1.0), raw.get("subset", 0),
                          raw.get("repeats", 1), source)


def _with_settings(study: Study, epochs_scale, subset, repeats, source: str) -> Study:
    if isinstance(epochs_scale, bool) or not isinstance(epochs_scale, (int, float)) \
            or not math.isfinite(epochs_scale) or epochs_scale <= 0:
        raise UserError(f"{source}: epochs_scale must be a positive number, got {epochs_scale!r}")
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 0 or subset == 1:
        raise UserError(f"{source}: subset must be 0 (the recipes' own) or at least 2, "
                        f"got {subset!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"{source}: repeats must be at least 1, got {repeats!r}")
    return dataclasses.replace(study, epochs_scale=float(epochs_scale), subset=subset,
                               repeats=repeats)


def load_study(name_or_path: str, *, epochs_scale: float | None = None,
               subset: int | None = None, repeats: int | None = None,
               dataset: str | None = None) -> Study:
    """A built-in study by name or a study TOML file; given options replace its settings
    (`dataset` becomes an override of every run: [overrides] data = {dataset = ...})."""
    path = study_path(str(name_or_path))
    is_file = looks_like_path(str(name_or_path))
    source = str(name_or_path)
    raw = read_toml(path)
    study = study_from_data(raw, source, path.parent if is_file else None)
    if not is_file or not raw.get("source"):
        study.source = source
    if dataset:
        study.overrides = {**study.overrides,
                           "data": {**study.overrides.get("data", {}), "dataset": dataset}}
    return _with_settings(study,
                          study.epochs_scale if epochs_scale is None else epochs_scale,
                          study.subset if subset is None else subset,
                          study.repeats if repeats is None else repeats,
                          "command line")


def read_study(study_dir: str | os.PathLike) -> Study:
    """The resolved study recorded in DIR/study.toml."""
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise CheckpointError(f"{study_dir}: not a study directory (no {STUDY_FILE}); "
                              f"run `fashion-cnn study NAME --out {study_dir}` first")
    return study_from_data(read_toml(path), str(path))


# ----------------------------------------------------------------------------- running
