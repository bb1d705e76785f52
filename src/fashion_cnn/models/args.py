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


# Every pattern here matches in one pass (no two quantifiers can share a character), so a
# long hostile string costs time in proportion to its length.
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
MAX_REGULARIZER_CHARS = 200  # "l1_l2(l1=0.01, l2=0.01)" is 23; anything far longer is a mistake
# The largest size, count or dimension a spec may give: PyTorch indexes tensors with 32-bit
# integers in many kernels. The memory estimate (spec.check_memory), where a model is built,
# refuses much smaller models.
MAX_DIMENSION = 2**31 - 1
REGULARIZER_FORMS = "use l1(f), l2(f) or l1_l2(l1=f, l2=f)"


def shown(value: Any, limit: int = 60) -> str:
    """repr(value) cut to about `limit` characters, for one-line error messages.

    >>> shown(16 ** 5000)  # more digits than Python writes (sys.get_int_max_str_digits)
    '<integer of 20001 bits>'
    """
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4300 decimal digits, alone or inside
        if isinstance(value, int):
            return f"<integer of {value.bit_length()} bits>"
        return f"<{type(value).__name__} holding an integer too long to write>"
    return text if len(text) <= limit else text[:limit] + "..."


def _factor(text: str, value: Any) -> float:
    """A regularizer's number, checked against the Keras-like form before float() reads it."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"bad regularizer {shown(value)}; the factor must be a number")
    return float(text)


def _regularizer_text(value: str) -> dict[str, float]:
    """{"l1": f, "l2": f} from "l2", "l2(0.001)", "l1_l2(l1=0.01, l2=0.01)"."""
    text = value.strip()
    if len(text) > MAX_REGULARIZER_CHARS:
        raise ValueError(f"bad regularizer ({len(text)} characters); {REGULARIZER_FORMS}")
    kind, paren, rest = text.partition("(")
    kind = kind.strip()
    if kind not in ("l1", "l2", "l1_l2") or (paren and not rest.endswith(")")):
        raise ValueError(f"bad regularizer {shown(value)}; {REGULARIZER_FORMS}")
    inner = rest[:-1].strip() if paren else ""
    if kind != "l1_l2":
        return {"l1": 0.0, "l2": 0.0, kind: _factor(inner, value) if inner else 0.01}
    values = {"l1": 0.01, "l2": 0.01}
    for part in filter(None, (p.strip() for p in inner.split(","))):
        key, _, number = part.partition("=")
        if key.strip() not in values:
            raise ValueError(f"bad regularizer {shown(value)}; use l1_l2(l1=f, l2=f)")
        values[key.strip()] = _factor(number, value)
    return values


def parse_regularizer(value: Any) -> Regularizer | None:
    """Accepts "l2", "l2(0.001)", "l1_l2(l1=0.01, l2=0.01)", or a table {l1 = .., l2 = ..}.

    Keras' defaults: l1 = 0.01 for "l1", l2 = 0.01 for "l2", both 0.01 for "l1_l2".
    """
    if value is None or value is False or value == "none":
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"l1", "l2"}
        if unknown:
            raise ValueError(f"unknown regularizer key(s) {shown(sorted(map(str, unknown)))}; "
                             f"use l1 and/or l2")
        factors = [value.get("l1", 0.0), value.get("l2", 0.0)]
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors):
            raise ValueError(f"bad regularizer {shown(value)}; l1 and l2 must be numbers")
        reg = Regularizer(_as_float(factors[0]), _as_float(factors[1]))
    elif isinstance(value, str):
        reg = Regularizer(**_regularizer_text(value))
    else:
        raise ValueError(f"bad regularizer {shown(value)}; {REGULARIZER_FORMS}")
    if reg.l1 < 0 or reg.l2 < 0 or not (math.isfinite(reg.l1) and math.isfinite(reg.l2)):
        raise ValueError(f"regularizer factors must be finite and >= 0, got {reg}")
    return reg


def _as_float(value: int | float) -> float:
    """float(value), or infinity for an integer beyond float's range (which the callers refuse
    as not finite)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _is_count(value: Any, lowest: int) -> bool:
    """An int (not a bool) in [lowest, MAX_DIMENSION]."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and lowest <= value <= MAX_DIMENSION)


def pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_count(v, 1) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected a positive integer (at most {MAX_DIMENSION}) or a pair of them, "
                     f"got {shown(value)}")


def _pad2d(value: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """int, (sym_h, sym_w) or ((top, bottom), (left, right)) as ((top, bottom), (left, right))."""
    if _is_count(value, 0):
        return ((value, value), (value, value))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(_is_count(v, 0) for v in value):
            return ((value[0], value[0]), (value[1], value[1]))
        if all(isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_count(n, 0) for n in v)
               for v in value):
            return (tuple(value[0]), tuple(value[1]))
    raise ValueError(f"padding must be an int, [h, w] or [[top, bottom], [left, right]] of "
                     f"integers in [0, {MAX_DIMENSION}], got {shown(value)}")


def _one_of(value: Any, known: set, what: str) -> Any:
    """`value` where it is one of `known` (strings, or None); else ValueError listing them."""
    if not (value is None or isinstance(value, str)) or value not in known:
        raise ValueError(f"unknown {what} {shown(value)}; known: "
                         f"{', '.join(sorted(k for k in known if k))}")
    return value


def coerce(kind: str, value: Any) -> Any:
    """`value` checked and converted for an argument of `kind`; ValueError says why not."""
    if kind == "posint":
        if not _is_count(value, 1):
            raise ValueError(f"expected a positive integer (at most {MAX_DIMENSION}), "
                             f"got {shown(value)}")
        return value
    if kind in ("rate", "posfloat"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {shown(value)}")
        value = _as_float(value)
        if kind == "rate" and not 0.0 <= value < 1.0:
            raise ValueError(f"expected a number in [0, 1), got {value!r}")
        if kind == "posfloat" and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"expected a positive finite number, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {shown(value)}")
        return value
    if kind == "pair":
        return None if value is None else pair(value)
    if kind == "activation":
        return _one_of(None if value == "linear" else value, ACTIVATIONS, "activation")
    if kind == "padding":
        if value not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {shown(value)}")
        return value
    if kind == "initializer":
        return _one_of(value, INITIALIZERS, "initializer")
    if kind == "regularizer":
        return parse_regularizer(value)
    if kind == "pad2d":
        return _pad2d(value)
    if kind == "layers":
        if not isinstance(value, list) or not value:
            raise ValueError("expected a non-empty list of layers")
        return value
    raise AssertionError(kind)
