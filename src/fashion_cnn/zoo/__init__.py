"""The built-in zoo: model specs, recipes and studies, all TOML files in this folder.

Names are looked up strictly: an unknown name is an error that lists what exists.

>>> "model1" in list_models()
True
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, config_from_data, read_toml
from ..errors import SpecError
from ..spec import ModelSpec, parse_spec

ZOO = Path(__file__).parent


def _names(folder: str) -> list[str]:
    return sorted(p.stem for p in (ZOO / folder).glob("*.toml"))


def list_models() -> list[str]:
    return _names("models")


def list_recipes() -> list[str]:
    return _names("recipes")


def list_studies() -> list[str]:
    return _names("studies")


def list_searches() -> list[str]:
    return _names("searches")


def _looks_like_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name


def get_model_spec(name: str) -> ModelSpec:
    """A zoo model by name, or a spec file by path."""
    if _looks_like_path(name):
        return parse_spec(read_toml(name), Path(name).stem)
    if name not in list_models():
        raise SpecError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                        f"(or give a path to a .toml spec)")
    return parse_spec(read_toml(ZOO / "models" / f"{name}.toml"), name)


def load_config(name: str) -> RunConfig:
    """A recipe, a model (with default settings), or a TOML file (recipe, run config or spec)."""
    if _looks_like_path(name):
        raw = read_toml(name)
        if "layers" in raw and "model" not in raw:  # a bare model spec
            spec = parse_spec(raw, Path(name).stem)
            return config_from_data({"model": spec.to_data(), "recipe": spec.name}, name,
                                    get_model_spec)
        raw.setdefault("recipe", Path(name).stem)
        return config_from_data(raw, name, get_model_spec)
    if name in list_recipes():
        raw = read_toml(ZOO / "recipes" / f"{name}.toml")
        raw.setdefault("recipe", name)
        return config_from_data(raw, f"recipe {name!r}", get_model_spec)
    if name in list_models():
        return config_from_data({"model": name, "recipe": name}, f"model {name!r}", get_model_spec)
    raise SpecError(f"unknown model or recipe {name!r}; models: {', '.join(list_models())}; "
                    f"recipes: {', '.join(list_recipes())} (or give a path to a .toml file)")


def _file_in(folder: str, what: str, name: str) -> Path:
    """zoo/<folder>/<name>.toml for a built-in name, or `name` itself where it is a path."""
    if _looks_like_path(name):
        return Path(name)
    if name not in _names(folder):
        raise SpecError(f"unknown {what} {name!r}; built-in {folder}: "
                        f"{', '.join(_names(folder))} (or give a path to a {what} .toml)")
    return ZOO / folder / f"{name}.toml"


def study_path(name: str) -> Path:
    """A built-in study (zoo/studies) by name, or a TOML file by path."""
    return _file_in("studies", "study", name)


def search_path(name: str) -> Path:
    """A built-in search space (zoo/searches) by name, or a TOML file by path."""
    return _file_in("searches", "search space", name)
