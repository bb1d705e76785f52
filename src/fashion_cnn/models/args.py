"""The kinds of layer arguments in a model spec (Keras' names and defaults), and the one
function that checks and converts each: activations, initializers, paddings, regularizers.

>>> coerce("pair", 3)
(3, 3)
>>> str(parse_regularizer("l2(0.001)"))
'l2(0.001)'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # an argument without a default: the spec must give it


ACTIVATIONS = {None, "linear", "relu", "softmax", "sigmoid", "tanh", "elu", "selu", "gelu",
               "silu", "swish", "leaky_relu", "relu6", "softplus"}
INITIALIZERS = {"glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
                "lecun_normal", "zeros", "ones", "random_normal", "random_uniform"}

@dataclass(frozen=True)
class Regularizer:
    """Keras l1/l2/l1_l2: penalty = l1 * sum(|w|) + l2 * sum(w**2) (no 1/2)."""

    l1: float = 0.0
    l2: float = 0.0

    def __str__(self) -> str:
        if self.l1 and self.l2:
            return f"l1_l2(l1={self.l1:g}, l2={self.l2:g})"
        return f"l1({self.l1:g})" if self.l1 else f"l2({self.l2:g})"

    def to_data(self) -> dict:
        return {"l1": self.l1, "l2": self.l2}


_REG_RE = re.compile(r"^\s*(l1|l2|l1_l2)\s*(?:\((.*)\))?\s*$")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_regularizer(value: Any) -> Regularizer | None:
    """Accepts "l2", "l2(0.001)", "l1_l2(l1=0.01, l2=0.01)", or a table {l1 = .., l2 = ..}.

    Keras' defaults: l1 = 0.01 for "l1", l2 = 0.01 for "l2", both 0.01 for "l1_l2".
    """
    if value is None or value is False or value == "none":
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"l1", "l2"}
        if unknown:
            raise ValueError(f"unknown regularizer key(s) {sorted(unknown)}; use l1 and/or l2")
        reg = Regularizer(float(value.get("l1", 0.0)), float(value.get("l2", 0.0)))
    elif isinstance(value, str):
        match = _REG_RE.match(value)
        if not match:
            raise ValueError(f"bad regularizer {value!r}; use l1(f), l2(f) or l1_l2(l1=f, l2=f)")
        kind, inner = match.group(1), (match.group(2) or "").strip()
        values = {"l1": 0.0, "l2": 0.0}
        if kind == "l1_l2":
            values = {"l1": 0.01, "l2": 0.01}
            for part in filter(None, (p.strip() for p in inner.split(","))):
                key, _, num = part.partition("=")
                if key.strip() not in values or not re.fullmatch(_NUM, num.strip()):
                    raise ValueError(f"bad regularizer {value!r}; use l1_l2(l1=f, l2=f)")
                values[key.strip()] = float(num)
        else:
            if inner and not re.fullmatch(_NUM, inner):
                raise ValueError(f"bad regularizer {value!r}; the factor must be a number")
            values[kind] = float(inner) if inner else 0.01
        reg = Regularizer(values["l1"], values["l2"])
    else:
        raise ValueError(f"bad regularizer {value!r}")
    if reg.l1 < 0 or reg.l2 < 0 or not (math.isfinite(reg.l1) and math.isfinite(reg.l2)):
        raise ValueError(f"regularizer factors must be finite and >= 0, got {reg}")
    return reg


def pair(value: Any) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError("expected an integer or a pair of integers")
    if isinstance(value, int):
        value = (value, value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected a positive integer or a pair of them, got {value!r}")


def coerce(kind: str, value: Any) -> Any:
    if kind == "posint":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"expected a positive integer, got {value!r}")
        return value
    if kind in ("rate", "posfloat"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        value = float(value)
        if kind == "rate" and not 0.0 <= value < 1.0:
            raise ValueError(f"expected a number in [0, 1), got {value!r}")
        if kind == "posfloat" and not value > 0:
            raise ValueError(f"expected a positive number, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind == "pair":
        return None if value is None else pair(value)
    if kind == "activation":
        if value == "linear":
            value = None
        if value not in ACTIVATIONS:
            raise ValueError(f"unknown activation {value!r}; known: "
                             f"{', '.join(sorted(a for a in ACTIVATIONS if a))}")
        return value
    if kind == "padding":
        if value not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {value!r}")
        return value
    if kind == "initializer":
        if value not in INITIALIZERS:
            raise ValueError(f"unknown initializer {value!r}; known: {', '.join(sorted(INITIALIZERS))}")
        return value
    if kind == "regularizer":
        return parse_regularizer(value)
    if kind == "pad2d":  # int, (sym_h, sym_w) or ((top, bottom), (left, right))
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return ((value, value), (value, value))
        if isinstance(value, (list, tuple)) and len(value) == 2:
            if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                return ((value[0], value[0]), (value[1], value[1]))
            if all(isinstance(v, (list, tuple)) and len(v) == 2 and
                   all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
                   for v in value):
                return (tuple(value[0]), tuple(value[1]))
        raise ValueError(f"padding must be an int, [h, w] or [[top, bottom], [left, right]], got {value!r}")
    if kind == "layers":
        if not isinstance(value, list) or not value:
            raise ValueError("expected a non-empty list of layers")
        return value
    raise AssertionError(kind)
