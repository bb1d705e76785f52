"""Recipes: a zoo recipe, a zoo model with default settings, or a TOML file, as a RunConfig.

>>> cfg = resolve_config("seed-model1", **{"train.epochs": 2})
>>> cfg.train.epochs, cfg.train.batch_size
(2, 128)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..catalog import ZOO, looks_like_path, names
from ..errors import SpecError
from ..fileio import read_toml
from ..models.args import shown
from ..models.spec import parse_spec
from ..models.zoo import get_model_spec, list_models
from .config import (OVERRIDES, SECTIONS, RunConfig, apply_section, config_from_data,
                     overrides_to_sections, validate)


def list_recipes() -> list[str]:
    """The names of the built-in recipes."""
    return names("recipes")


def load_config(name: str) -> RunConfig:
    """A recipe, a model (with default settings), or a TOML file (recipe, run config or spec)."""
    if not isinstance(name, str) or not name:
        raise SpecError(f"expected a model or recipe name or a .toml path, got {shown(name)}")
    if looks_like_path(name):
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


def setting_key(key: str) -> str:
    """A setting's full name: "epochs" -> "train.epochs"; a dotted name stays as it is."""
    if "." in key:
        return key
    for section, cls in SECTIONS.items():
        if key in {f.name for f in dataclasses.fields(cls)}:
            return f"{section}.{key}"
    raise SpecError(f"unknown setting {shown(key)}; name a setting as section.key (sections: "
                    f"{', '.join(SECTIONS)}) or by a key of one of them")


def resolve_config(name_or_config: str | RunConfig, **overrides) -> RunConfig:
    """A recipe/model name or TOML path, with overrides given as section.key=value (or a bare
    key of any section: epochs=2).

    >>> resolve_config("seed-model1", epochs=3).train.epochs
    3
    """
    if isinstance(name_or_config, RunConfig):  # a copy: the overrides leave the given one as it was
        cfg = dataclasses.replace(name_or_config, **{
            name: dataclasses.replace(getattr(name_or_config, name)) for name in SECTIONS})
    else:
        cfg = load_config(name_or_config)
    overrides = {setting_key(k): v for k, v in overrides.items()}
    for section, values in overrides_to_sections(overrides).items():
        apply_section(cfg, section, values, OVERRIDES)
    # an error names a setting (the CLI, its flag) only where the overrides set it
    return validate(cfg, given=set(overrides))
