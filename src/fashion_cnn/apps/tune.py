"""Hyperparameter search with Optuna: a recipe, a search space declared in TOML, and the
validation split as the judge (never the test set).

A search space (zoo/searches/*.toml, or any file) names a recipe, the objective, settings fixed
for every trial, and the settings to search, in the config's own names:

    recipe = "fast"
    objective = "val_accuracy"            # of the last epoch; val_loss is minimized
    [set]
    "data.validation_split" = 0.1         # held-out images to judge by
    [params."train.lr"]
    type = "float"                        # float | int | categorical
    low = 0.05
    high = 0.8
    log = true

Each trial trains the recipe with sampled settings (Optuna's TPE sampler, seeded), reports the
objective after every epoch, and is stopped early when the median rule says it cannot win
(Optuna's MedianPruner, from the second epoch on, never in the last). After each trial the output folder gets `trials.csv` (every trial of
the study), `best.toml` (the best trial's whole config: `fashion-cnn train best.toml` retrains
it, with the recipe's own validation split set back if you wish) and `space.toml` (the search
space as run). With `storage`, a journal file, several processes (on one machine or sharing a
file system) work on one study together: start the same command in each.

>>> from fashion_cnn.apps.tune import tune
>>> result = tune("fast", trials=12)                          # doctest: +SKIP
>>> result.best_trial, round(result.best_value, 4)            # doctest: +SKIP
(2, 0.9308)
"""

from __future__ import annotations

import csv
import decimal
import io
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import fileio
from ..analysis.tensorboard import TensorBoardLogger
from ..catalog import file_in, names
from ..errors import NonFiniteLoss, SpecError, UserError, require_module
from ..fileio import read_toml, toml_value
from ..models.args import shown
from ..perf import configure_runtime
from ..training.config import to_toml
from ..training.loop import Trainer
from ..training.recipes import load_config, resolve_config, setting_key
from ..training.run import data_for, splits_for
from ..errors import first_line
from .tune_storage import open_study

OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}
PARAM_TYPES = ("float", "int", "categorical")
INSTALL_HINT = "pip install optuna (make installs it)"


@dataclass
class SearchSpace:
    name: str
    recipe: str
    objective: str = "val_accuracy"
    description: str = ""
    fixed: dict = field(default_factory=dict)   # "section.key" -> value, for every trial
    params: dict = field(default_factory=dict)  # "section.key" -> {type, low, high, ...}
    source: str = ""

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]


@dataclass
class TuneResult:
    out_dir: Path
    study_name: str
    trials: int           # finished trials of the study (complete, pruned or failed)
    best_value: float | None
    best_params: dict
    best_trial: int | None
    interrupted: bool = False


def list_searches() -> list[str]:
    """The names of the built-in search spaces (zoo/searches)."""
    return names("searches")


def search_path(name: str) -> Path:
    """A built-in search space by name, or a TOML file by path."""
    return file_in("searches", "search space", name)


def _is_number(value, kind: str) -> bool:
    """An int (for "int", of any size: the config's bounds judge it) or a finite int or float
    (for "float"); never a bool."""
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        return False
    try:
        return kind == "int" or math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


def _step_fits(spec: dict, kind: str, where: str) -> None:
    """SpecError unless high - low is a whole number of steps, as Optuna reckons it: in
    Python's integers for "int", in decimals of 28 digits (its global context) for "float",
    which otherwise lowers high with a warning, or fails inside a trial where the quotient
    has more digits."""
    low, high, step = spec["low"], spec["high"], spec["step"]
    if kind == "int":
        span, remainder = high - low, (high - low) % step
    else:
        span = decimal.Decimal(str(high)) - decimal.Decimal(str(low))
        try:
            remainder = span % decimal.Decimal(str(step))
        except decimal.DecimalException:  # a quotient of more than 28 digits
            raise SpecError(f"{where}: (high - low) / step has more digits than Optuna reckons "
                            f"with (28); use a larger step") from None
    if remainder != 0:
        raise SpecError(f"{where}: high - low ({shown(span) if kind == 'int' else span}) is not "
                        f"a multiple of step "
                        f"({shown(step)})")


def _check_param(where: str, spec) -> dict:
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: expected a table with type = float | int | categorical")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SpecError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}, "
                        f"got {shown(kind)}")
    allowed = {"float": {"type", "low", "high", "log", "step"},
               "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}[kind]
    unknown = sorted(map(str, set(spec) - allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key {shown(unknown[0])} for type {kind!r} "
                        f"(allowed: {', '.join(sorted(allowed))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{where}: choices must be a non-empty list")
        # what Optuna can store (its CategoricalDistribution) and a setting can be
        if not all(isinstance(c, (bool, int, float, str)) for c in choices):
            raise SpecError(f"{where}: choices must be numbers, strings or booleans, got "
                            f"{shown(choices)}")
        return spec
    for key in ("low", "high"):
        if not _is_number(spec.get(key), kind):
            raise SpecError(f"{where}: {key} must be "
                            f"{'an integer' if kind == 'int' else 'a finite number'}")
    if not spec["low"] <= spec["high"]:
        raise SpecError(f"{where}: low ({shown(spec['low'])}) must not exceed high "
                        f"({shown(spec['high'])})")
    if not isinstance(spec.get("log", False), bool):
        raise SpecError(f"{where}: log must be true or false")
    if spec.get("log") and spec["low"] <= 0:
        raise SpecError(f"{where}: log = true needs low > 0")
    if spec.get("log") and spec.get("step") is not None:
        raise SpecError(f"{where}: log and step cannot be combined")
    if "step" in spec:
        step = spec["step"]
        if not _is_number(step, kind) or step <= 0:
            raise SpecError(f"{where}: step must be a positive "
                            f"{'integer' if kind == 'int' else 'finite number'}, "
                            f"got {shown(step)}")
        _step_fits(spec, kind, where)
    return spec


def distributions(optuna, space: "SearchSpace") -> dict:
    """Each parameter's Optuna distribution (what its suggest_* builds), checked by Optuna, so
    that what parse_space let through fails here, in one line, and not inside a trial."""
    out = {}
    for key, spec in space.params.items():
        try:
            if spec["type"] == "categorical":
                out[key] = optuna.distributions.CategoricalDistribution(spec["choices"])
            elif spec["type"] == "int":
                out[key] = optuna.distributions.IntDistribution(
                    spec["low"], spec["high"], log=spec.get("log", False),
                    step=spec.get("step", 1))
            else:
                out[key] = optuna.distributions.FloatDistribution(
                    float(spec["low"]), float(spec["high"]), log=spec.get("log", False),
                    step=spec.get("step"))
        except (ValueError, TypeError) as exc:
            raise SpecError(f"{space.source}: [params.\"{key}\"]: {first_line(exc)}") from None
    return out


def parse_space(raw: dict, name: str, source: str) -> SearchSpace:
    """A SearchSpace from parsed TOML; every mistake is one SpecError naming `source`."""
    known = {"recipe", "objective", "description", "set", "params"}
    unknown = sorted(map(str, set(raw) - known))
    if unknown:
        raise SpecError(f"{source}: unknown key {shown(unknown[0])} "
                        f"(allowed: {', '.join(sorted(known))})")
    if not isinstance(raw.get("recipe"), str) or not raw["recipe"]:
        raise SpecError(f"{source}: recipe = \"...\" is required (the recipe or model to tune)")
    objective = raw.get("objective", "val_accuracy")
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise SpecError(f"{source}: objective must be one of {', '.join(OBJECTIVES)}, "
                        f"got {shown(objective)}")
    if not isinstance(raw.get("description", ""), str):
        raise SpecError(f"{source}: description must be a string")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SpecError(f"{source}: [params] must name at least one setting to search")
    fixed = raw.get("set", {})
    if not isinstance(fixed, dict):
        raise SpecError(f"{source}: [set] must be a table of \"section.key\" = value")
    for key in list(fixed) + list(params):
        if "." not in key:
            raise SpecError(f"{source}: {shown(key)}: name settings as \"section.key\", "
                            f"e.g. \"train.lr\"")
    both = sorted(set(fixed) & set(params))
    if both:
        raise SpecError(f"{source}: {both[0]!r} is both fixed in [set] and searched in [params]")
    checked = {key: _check_param(f"{source}: [params.\"{key}\"]", spec)
               for key, spec in params.items()}
    return SearchSpace(name, raw["recipe"], objective, raw.get("description", ""), dict(fixed),
                       checked, source)


def load_space(name_or_path: str) -> SearchSpace:
    """A built-in search space by name (zoo/searches) or a TOML file by path."""
    path = search_path(name_or_path)
    space = parse_space(read_toml(path), path.stem, str(path))
    check_space(space)
    return space


def check_space(space: SearchSpace, given=()):
    """Resolve the recipe with the fixed settings and each parameter's bounds or choices, so
    that an unknown setting or a value out of range fails before any training; the recipe's
    config with the fixed settings alone. `given`: the fixed settings that the caller's
    options set ("section.key"); an error about one of them names that setting (the CLI shows
    its flag), any other names the space's file."""
    given = {setting_key(key) for key in given}
    try:
        recipe = load_config(space.recipe)
        cfg = resolve_config(recipe, **space.fixed)
    except UserError as exc:
        if exc.setting is not None and exc.setting in given:
            raise
        raise SpecError(f"{space.source}: {exc}") from None
    for key, spec in space.params.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:
            try:
                resolve_config(recipe, **{**space.fixed, key: value})
            except UserError as exc:
                raise SpecError(f"{space.source}: {key} = {shown(value)}: {exc}") from None
    if not cfg.data.validation_split:
        raise SpecError(f"{space.source}: recipe {space.recipe!r} has no validation split, and "
                        f"tuning must not judge by the test set; add \"data.validation_split\" "
                        f"= 0.1 to [set]")
    return cfg


def suggest(trial, space: SearchSpace) -> dict:
    """The settings of one trial: Optuna's suggestion for each parameter of the space."""
    values = {}
    for key, spec in space.params.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, spec["low"], spec["high"],
                                            step=spec.get("step", 1), log=spec.get("log", False))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              step=spec.get("step"), log=spec.get("log", False))
    return values


class ReportToTrial:
    """Callback: report the objective to Optuna after each epoch; stop training when the
    pruner says the trial cannot win."""

    def __init__(self, trial, objective: str):
        self.trial, self.objective = trial, objective
        self.pruned_at: int | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs.get(self.objective)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, epoch + 1)
        last = epoch + 1 >= trainer.config.train.epochs  # finished anyway: let it complete
        if not last and self.trial.should_prune():
            self.pruned_at = epoch + 1
            trainer.stop_training = True
            trainer.stop_reason = f"pruned by Optuna after epoch {epoch + 1}"


class _Diverged(Exception):
    """A trial whose loss became non-finite: Optuna records it as failed and goes on."""


def trials_csv(study, space: SearchSpace) -> str:
    """Every trial of the study: number, state, objective, epochs, seconds, then each param."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = list(space.params)
    writer.writerow(["trial", "state", space.objective, "epochs", "seconds", *keys])
    for t in study.get_trials(deepcopy=False):
        epochs, seconds = _last_epoch(t), _seconds(t)
        value = t.value if t.value is not None else (
            t.intermediate_values[epochs] if t.intermediate_values else "")
        writer.writerow([t.number, t.state.name.lower(), value, epochs,
                         f"{seconds:.1f}" if seconds is not None else "",
                         *[t.params.get(k, "") for k in keys]])
    return out.getvalue()


def _last_epoch(trial) -> int:
    """The last epoch a trial reported (0 before its first)."""
    return max(trial.intermediate_values, default=0)


def _seconds(trial) -> float | None:
    """A finished trial's wall-clock seconds; None while it runs."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def _make_objective(optuna, space: SearchSpace, data, log_dir: Path | None):
    """Optuna's objective: train one sampled config, reporting each epoch to the pruner; the
    last epoch's objective. A diverging setting fails the trial (caught), not the search.
    With `log_dir`, each trial logs for TensorBoard into log_dir/trial-NNNN."""
    def objective(trial):
        sampled = suggest(trial, space)
        cfg = resolve_config(space.recipe, **space.fixed, **sampled)
        configure_runtime(cfg.train.threads)
        report = ReportToTrial(trial, space.objective)
        logger = (TensorBoardLogger(log_dir / f"trial-{trial.number:04d}", enabled=True)
                  if log_dir is not None else None)
        trainer = Trainer(cfg, splits_for(cfg, data),
                          callbacks=[report] + ([logger] if logger else []))
        try:
            trainer.fit()
        except NonFiniteLoss as stop:  # this setting diverges
            trial.set_user_attr("fail_reason", "non-finite loss")
            raise _Diverged(str(stop)) from None
        finally:
            if logger is not None:  # the trial's settings and how far it got, pruned or not
                history = trainer.state.history
                logger.finish(cfg, {space.objective: history[-1].get(space.objective)
                                    if history else None}, len(history))
        if report.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {report.pruned_at}")
        value = trainer.state.history[-1][space.objective]
        if not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"{space.objective} is {value}")
            raise _Diverged(f"{space.objective} is {value}")
        return value

    return objective


def _make_after_trial(space: SearchSpace, out_dir: Path, progress: bool):
    """Optuna's trial callback: rewrite best.toml and trials.csv, print the trial's line."""
    def after_trial(study, trial):
        best = _best(study)
        if best is not None:
            # the best trial may be another process's: its config follows from its params
            config = resolve_config(space.recipe, **space.fixed, **best.params)
            header = (f"# The best trial of search {space.name!r} (study {study.study_name!r}): "
                      f"trial {best.number}, {space.objective} {best.value:.4f}\n"
                      f"# Settings: {params_text(best.params)}\n")
            fileio.write_text(out_dir / "best.toml", header + to_toml(config))
        fileio.write_text(out_dir / "trials.csv", trials_csv(study, space))
        if progress:
            print(_trial_line(trial, best, space), flush=True)

    return after_trial


def tune(space: str | SearchSpace, *, trials: int | None = None, timeout: float | None = None,
         out: str | os.PathLike | None = None, storage: str | os.PathLike | None = None,
         study_name: str | None = None, seed: int | None = None, prune: bool = True, data=None,
         progress: bool = True, tensorboard: bool | str | os.PathLike = False,
         **overrides) -> TuneResult:
    """Search `space` (a built-in name, a TOML path or a SearchSpace) for `trials` trials or
    `timeout` seconds (at least one of them), judging each trial by its validation objective.

    `overrides` ("section.key" = value) apply to every trial, over the space's [set] (e.g.
    {"train.threads": 1} for one of several processes sharing a study). `seed` seeds the
    sampler; by default 0, except with a shared `storage`, where each process must sample
    differently and so draws its own. `tensorboard`: True logs each trial into
    OUT/tensorboard/trial-NNNN, a folder into FOLDER/trial-NNNN (the HParams tab then
    compares the trials by their objective).
    """
    optuna = require_module("optuna", "tune", INSTALL_HINT)
    if trials is None and timeout is None:
        raise UserError("give the number of trials or a time limit in seconds, or both",
                        setting="trials")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int)
                               or trials < 1):
        raise UserError(f"the number of trials must be an integer of at least 1, got "
                        f"{shown(trials)}", setting="trials")
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise UserError(f"the time limit must be a positive number of seconds, got "
                        f"{shown(timeout)}", setting="timeout")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**32):  # what numpy's generators take
        raise UserError(f"the sampler's seed must be an integer in [0, 2**32), got "
                        f"{shown(seed)}", setting="seed")
    if isinstance(space, str):
        space = load_space(space)
    space = replace(space, fixed={**space.fixed, **overrides})
    base = check_space(space, given=overrides)
    wanted = distributions(optuna, space)
    out_dir = Path(out) if out else Path("runs") / f"tune-{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    study = open_study(optuna, space, wanted, out_dir,
                       dict(storage=storage, study_name=study_name, seed=seed, prune=prune))
    fileio.write_text(out_dir / "space.toml", _space_toml(space))
    data = data_for(base, data)
    interrupted = False
    try:
        log_dir = (None if tensorboard is False else
                   out_dir / "tensorboard" if tensorboard is True else Path(tensorboard))
        study.optimize(_make_objective(optuna, space, data, log_dir), n_trials=trials, timeout=timeout,
                       catch=(_Diverged,), callbacks=[_make_after_trial(space, out_dir, progress)],
                       gc_after_trial=True)
    except KeyboardInterrupt:
        interrupted = True
        fileio.write_text(out_dir / "trials.csv", trials_csv(study, space))
    best = _best(study)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    return TuneResult(out_dir, study.study_name, len(done),
                      best.value if best else None, dict(best.params) if best else {},
                      best.number if best else None, interrupted)


def params_text(params: dict) -> str:
    """'train.lr=0.2415, augment.horizontal_flip=False': a trial's settings on one line."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def _trial_line(trial, best, space: SearchSpace) -> str:
    state = trial.state.name.lower()
    if state == "complete":
        what = f"{space.objective} {trial.value:.4f}"
    elif state == "pruned":
        what = f"pruned after epoch {_last_epoch(trial)}"
    else:
        what = "failed (" + str(trial.user_attrs.get("fail_reason", "non-finite loss")) + ")"
    seconds = _seconds(trial) or 0.0
    tail = f"; best {best.value:.4f} (trial {best.number})" if best is not None else ""
    return f"trial {trial.number}: {what} in {seconds:.0f} s [{params_text(trial.params)}]{tail}"


def _space_toml(space: SearchSpace) -> str:
    """The space as run (the command's overrides folded into [set]), as TOML."""
    lines = [f"# Search space {space.name!r} as run (from {space.source})",
             f"recipe = {toml_value(space.recipe)}", f"objective = {toml_value(space.objective)}"]
    if space.description:
        lines.append(f"description = {toml_value(space.description)}")
    lines += ["", "[set]"] + [f"{toml_value(k)} = {toml_value(v)}" for k, v in space.fixed.items()]
    for key, spec in space.params.items():
        lines += ["", f"[params.{toml_value(key)}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"
