"""The built-in zoo: a folder of TOML files (models, recipes, studies, search spaces).

Each layer of the package looks up its own kind of file here: models (models.zoo), recipes
(training.recipes), studies (analysis.study), search spaces (apps.tune). Names are looked up
strictly: an unknown name is an error that lists what exists.

>>> "model1" in names("models")
True
"""

from __future__ import annotations

from pathlib import Path

from .errors import SpecError

ZOO = Path(__file__).with_name("zoo")


def names(folder: str) -> list[str]:
    """The built-in names of one kind: the stems of zoo/<folder>/*.toml, sorted."""
    return sorted(p.stem for p in (ZOO / folder).glob("*.toml"))


def looks_like_path(name: str) -> bool:
    """Whether a name given by the user is a file path rather than a built-in name."""
    return name.endswith(".toml") or "/" in name


def file_in(folder: str, what: str, name: str) -> Path:
    """zoo/<folder>/<name>.toml for a built-in name, or `name` itself where it is a path."""
    if looks_like_path(name):
        return Path(name)
    if name not in names(folder):
        raise SpecError(f"unknown {what} {name!r}; built-in {folder}: "
                        f"{', '.join(names(folder))} (or give a path to a {what} .toml)")
    return ZOO / folder / f"{name}.toml"
