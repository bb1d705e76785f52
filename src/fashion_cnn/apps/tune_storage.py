"""Where `tune` keeps its studies (--storage): an Optuna journal file or a database URL,
each checked before Optuna opens it, so that tune never writes into a file that is not
Optuna's own (a user's notes, another program's SQLite database, a FIFO); and the study
opened there (open_study), checked against the search space.

>>> check_journal(Path("no-such-folder/study.journal"))  # a new path: free to make
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .. import fileio
from ..errors import SpecError, UserError, first_line
from ..models.args import shown


# The first record of every Optuna journal: JournalOperation.CREATE_STUDY (optuna.storages.journal).
JOURNAL_CREATE_STUDY = 0
REFUSED_STORAGE = ("--storage takes a new path or a journal file that fashion-cnn tune made; "
                   "it writes into nothing else")


def check_journal(path: Path) -> None:
    """UserError, leaving the file untouched, unless `path` is free, an empty file or an
    Optuna journal: lines of JSON objects, the first of which creates a study.

    Any existing empty file is accepted, whoever made it: Optuna creates the journal before
    writing its first line, so an empty file is what a process that was stopped at that
    moment leaves (or another process, starting the same study, is about to fill); a file
    with nothing in it holds nothing to lose."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new path (or one that cannot be made)
        return
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise UserError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc}); "
                        f"{REFUSED_STORAGE}", setting="storage") from None
    kind = fileio.special_file_kind(info.st_mode)
    if kind is not None:
        raise UserError(f"{path}: is {kind}; {REFUSED_STORAGE}", setting="storage")
    if info.st_size == 0:
        return
    with fileio.open_regular_file(path, "an Optuna journal") as handle:
        first = handle.readline(64 * 1024)  # a study's first record is a few hundred bytes
    try:
        record = json.loads(first)
    except ValueError:  # not JSON (UnicodeDecodeError is one too)
        record = None
    if not (isinstance(record, dict) and record.get("op_code") == JOURNAL_CREATE_STUDY
            and "worker_id" in record and "study_name" in record):
        raise UserError(f"{path}: is not an Optuna journal; {REFUSED_STORAGE}",
                        setting="storage")


def check_sqlite(path: Path) -> None:
    """UserError unless `path` (of a sqlite:/// URL) is free, empty, or a SQLite database
    with Optuna's tables: Optuna would add its tables to any other database."""
    import sqlite3

    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new path (or one that cannot be made)
        return
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})",
                        setting="storage") from None
    kind = fileio.special_file_kind(info.st_mode)
    if kind is not None:
        raise UserError(f"{path}: is {kind}, not a SQLite database", setting="storage")
    if info.st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro",
                                                uri=True)) as db:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        tables = set()
    if not {"studies", "trials", "version_info"} <= tables:
        raise UserError(f"{path}: is not a SQLite database of Optuna studies; --storage "
                        f"sqlite:///FILE takes a new file or one that Optuna made",
                        setting="storage")


def open_storage(optuna, storage: str | os.PathLike | None):
    """Optuna's storage for `storage`: None (in memory), an RDB URL ("sqlite:///...",
    "postgresql://..."), or a journal file's path; each checked first (check_journal,
    check_sqlite); UserError (setting "storage") where it cannot be used."""
    if storage is None:
        return None
    text = str(storage)
    if "://" in text:  # an RDB URL (sqlite:///..., postgresql://...), as Optuna takes it
        return _rdb_storage(optuna, text)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(text)
    check_journal(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(text))
    except OSError as exc:
        raise UserError(fileio.describe_os_error(path, exc), setting="storage") from None
    except ValueError as exc:  # Optuna's own reading of the journal
        raise UserError(f"{path}: not a readable Optuna journal ({first_line(exc)})",
                        setting="storage") from None


def _rdb_storage(optuna, url: str):
    """Optuna's RDBStorage for `url`; its (and SQLAlchemy's) errors as one UserError."""
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        check_sqlite(Path(url[len("sqlite:///"):].split("?", 1)[0]))
    try:
        return optuna.storages.RDBStorage(url)
    except (ImportError, ValueError, TypeError, optuna.exceptions.OptunaError,
            sqlalchemy.exc.SQLAlchemyError) as exc:
        raise UserError(f"storage {shown(url)}: {first_line(exc)}", setting="storage") from None


def check_study_fits(optuna, study, space, wanted: dict) -> None:
    """SpecError unless a study loaded from storage was run in the same direction as `space`
    (a tune.SearchSpace) and with distributions compatible with `wanted`, the space's
    (Optuna refuses the first mismatching suggestion only inside a trial)."""
    if study.direction.name.lower() != space.direction:
        raise SpecError(f"{space.source}: study {study.study_name!r} in the storage "
                        f"{study.direction.name.lower()}s its objective, this space "
                        f"{space.direction}s {space.objective}; use another --study-name")
    for trial in study.get_trials(deepcopy=False):
        for key, distribution in trial.distributions.items():
            if key not in wanted:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(distribution, wanted[key])
            except ValueError as exc:
                raise SpecError(f"{space.source}: [params.\"{key}\"] differs from the "
                                f"study {study.study_name!r} in the storage "
                                f"({first_line(exc)}); use another --study-name") from None


def _create_study(optuna, space, storage, study_name: str | None,
                  seed: int | None, prune: bool):
    """The study of `space` (a tune.SearchSpace) in `storage` (open_storage), created or,
    where one of that name is there, loaded; UserError where the storage refuses it."""
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    try:
        return optuna.create_study(
            study_name=study_name or space.name, storage=open_storage(optuna, storage),
            load_if_exists=True, direction=space.direction,
            sampler=optuna.samplers.TPESampler(seed=seed if seed is not None or storage else 0),
            # a trial is judged from its second epoch on (the first says little under a
            # warm-up), against the trials before it at the same epoch, once three have finished
            pruner=(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
                    if prune else optuna.pruners.NopPruner()))
    except (ValueError, optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError) as exc:
        # a study of that name with another direction, a storage that fails to answer
        raise UserError(f"study {study_name or space.name!r}"
                        f"{f' in {storage}' if storage else ''}: {first_line(exc)}",
                        setting="storage") from None


def _make_folder(path: Path) -> list[Path]:
    """Make the folder `path` (and its parents); the folders made, deepest first. UserError
    (setting "out") where it cannot be made."""
    made, parent = [], path.absolute()
    while not os.path.lexists(parent) and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(fileio.describe_os_error(path, exc), setting="out") from None
    return made


def open_study(optuna, space, wanted: dict, out_dir: Path, options: dict):
    """The study of `space` (_create_study with `options`), checked against it
    (check_study_fits with `wanted`), once `out_dir` is made: a folder that cannot be made
    leaves no new study in the storage, and a study that cannot be opened leaves no new
    folder."""
    made = _make_folder(out_dir)
    try:
        study = _create_study(optuna, space, **options)
        check_study_fits(optuna, study, space, wanted)
    except BaseException:
        for folder in made:  # deepest first; rmdir leaves any folder that is not empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return study
