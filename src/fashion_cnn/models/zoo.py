"""The zoo's model specs by name (zoo/models/*.toml), or a spec file by path.

>>> "model1" in list_models()
True
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import file_in, looks_like_path, names
from ..errors import SpecError
from ..fileio import read_toml
from .args import shown
from .spec import ModelSpec, parse_spec


def list_models() -> list[str]:
    """The names of the built-in model specs."""
    return names("models")


def get_model_spec(name: str) -> ModelSpec:
    """A zoo model by name, or a spec file by path; SpecError lists the known names."""
    if not isinstance(name, str) or not name:
        raise SpecError(f"expected a zoo model's name or a spec file's path, got {shown(name)}")
    path = file_in("models", "model", name)
    return parse_spec(read_toml(path), name if not looks_like_path(name) else Path(name).stem)
