"""Model specs: a list of Keras-named layers, validated, with shapes inferred and a Keras summary.

A spec is data (a TOML file or a dict), never code:

    name = "model1"
    input_shape = [28, 28, 1]          # (height, width, channels), Keras order
    [[layers]]
    type = "Conv2D"
    filters = 32
    kernel_size = 3
    activation = "relu"

>>> spec = parse_spec({"name": "tiny", "input_shape": [28, 28, 1],
...                    "layers": [{"type": "Flatten"}, {"type": "Dense", "units": 10}]})
>>> spec.total_params
7850
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError

ACTIVATIONS = {None, "linear", "relu", "softmax", "sigmoid", "tanh", "elu", "selu", "gelu",
               "silu", "swish", "leaky_relu", "relu6", "softplus"}
INITIALIZERS = {"glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
                "lecun_normal", "zeros", "ones", "random_normal", "random_uniform"}

# Argument kinds: "int", "posint", "float", "rate", "bool", "pair", "activation", "padding",
# "regularizer", "initializer", "pad2d", "layers". (default, kind); REQUIRED marks no default.
REQUIRED = object()
_CONV = {
    "filters": (REQUIRED, "posint"), "kernel_size": (REQUIRED, "pair"), "strides": (1, "pair"),
    "padding": ("valid", "padding"), "activation": (None, "activation"), "use_bias": (True, "bool"),
    "kernel_initializer": ("glorot_uniform", "initializer"),
    "bias_initializer": ("zeros", "initializer"),
    "kernel_regularizer": (None, "regularizer"), "bias_regularizer": (None, "regularizer"),
}
_POOL = {"pool_size": (2, "pair"), "strides": (None, "pair"), "padding": ("valid", "padding")}
LAYER_ARGS: dict[str, dict[str, tuple[Any, str]]] = {
    "Conv2D": _CONV,
    "Dense": {
        "units": (REQUIRED, "posint"), "activation": (None, "activation"),
        "use_bias": (True, "bool"), "kernel_initializer": ("glorot_uniform", "initializer"),
        "bias_initializer": ("zeros", "initializer"),
        "kernel_regularizer": (None, "regularizer"), "bias_regularizer": (None, "regularizer"),
    },
    "MaxPooling2D": _POOL,
    "AveragePooling2D": _POOL,
    "Dropout": {"rate": (REQUIRED, "rate")},
    "SpatialDropout2D": {"rate": (REQUIRED, "rate")},
    "Flatten": {},
    "BatchNormalization": {"momentum": (0.99, "rate"), "epsilon": (1e-3, "posfloat"),
                           "center": (True, "bool"), "scale": (True, "bool")},
    "GlobalAveragePooling2D": {},
    "GlobalMaxPooling2D": {},
    "ZeroPadding2D": {"padding": (1, "pad2d")},
    "Activation": {"activation": (REQUIRED, "activation")},
    # A residual block: out = activation(layers(x) + shortcut(x)); the shortcut is the identity,
    # or a 1x1 Conv2D (+ BatchNormalization) when the shape changes (He et al. 2016, option B).
    "Residual": {"layers": (REQUIRED, "layers"), "activation": ("relu", "activation")},
}
SPATIAL_ONLY = {"Conv2D", "MaxPooling2D", "AveragePooling2D", "SpatialDropout2D",
                "GlobalAveragePooling2D", "GlobalMaxPooling2D", "ZeroPadding2D", "Residual"}
# Keras' automatic layer names: conv2d, conv2d_1, max_pooling2d, ...
SNAKE = {"Conv2D": "conv2d", "Dense": "dense", "MaxPooling2D": "max_pooling2d",
         "AveragePooling2D": "average_pooling2d", "Dropout": "dropout",
         "SpatialDropout2D": "spatial_dropout2d", "Flatten": "flatten",
         "BatchNormalization": "batch_normalization",
         "GlobalAveragePooling2D": "global_average_pooling2d",
         "GlobalMaxPooling2D": "global_max_pooling2d", "ZeroPadding2D": "zero_padding2d",
         "Activation": "activation", "Residual": "residual"}


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


@dataclass
class LayerSpec:
    type: str
    args: dict[str, Any]
    name: str = ""
    input_shape: tuple = ()
    output_shape: tuple = ()
    params: int = 0
    trainable_params: int = 0
    flops: int = 0  # forward pass, multiply and add counted separately, for one image
    children: list["LayerSpec"] = field(default_factory=list)
    shortcut: list["LayerSpec"] = field(default_factory=list)


@dataclass
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]  # (H, W, C)
    layers: list[LayerSpec]
    description: str = ""
    output: str = "logits"  # "softmax" when the last layer declares it; the loss fuses it

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def trainable_params(self) -> int:
        return sum(layer.trainable_params for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def num_classes(self) -> int:
        return self.layers[-1].output_shape[-1]

    @property
    def read_extent(self) -> tuple[int, int]:
        """(rows, columns) at the top left of the input that the model's output depends on.

        Valid convolutions and pools with floor rounding drop the trailing rows and columns
        that do not fill a whole window: model1 turns 26 rows into 13 and 11 into 5, so the
        last row of each never counts, and the image's rows 26 and 27 reach nothing but those.
        From the output back, each leading layer that works on windows (valid Conv2D and
        pools; Dropout and Activation per position) needs (n - 1) * stride + kernel input rows
        for n output rows; the first other layer (Flatten, Dense, BatchNormalization, whose
        statistics span all positions, padding, 'same' layers) needs all of its input.
        """
        windows = []
        for layer in self.layers:
            window = _window(layer)
            if window is None:
                break
            windows.append(window)
        # the first layer that needs all of its input (an image: windows keep images); there
        # is one, as the last layer outputs class scores
        rows, cols = self.layers[len(windows)].input_shape[:2]
        for (kh, kw), (sh, sw) in reversed(windows):
            rows, cols = (rows - 1) * sh + kh, (cols - 1) * sw + kw
        return rows, cols

    @property
    def input_crop(self) -> tuple[int, int] | None:
        """read_extent where it is smaller than the input (the model may crop its input to
        it), else None."""
        extent = self.read_extent
        return None if extent == tuple(self.input_shape[:2]) else extent

    @property
    def read_flops(self) -> int:
        """`flops` of the layers applied to the rows and columns the model reads
        (read_extent): the arithmetic that the output depends on."""
        crop = self.input_crop
        if crop is None:
            return self.flops
        layers = copy.deepcopy(self.layers)
        _infer_all(layers, (*crop, self.input_shape[2]), f"model {self.name!r}")
        return sum(layer.flops for layer in layers)

    def to_data(self) -> dict:
        """The spec as plain data (TOML-ready), with every default filled in."""
        return {"name": self.name, "description": self.description,
                "input_shape": list(self.input_shape),
                "layers": [_layer_to_data(layer) for layer in self.layers]}


def _layer_to_data(layer: LayerSpec) -> dict:
    out: dict[str, Any] = {"type": layer.type}
    for key, value in layer.args.items():
        if value is None:
            continue
        if isinstance(value, Regularizer):
            value = str(value)
        elif key == "layers":
            value = [_layer_to_data(child) for child in layer.children]
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[key] = value
    return out


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError("expected an integer or a pair of integers")
    if isinstance(value, int):
        value = (value, value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected a positive integer or a pair of them, got {value!r}")


def _coerce(kind: str, value: Any) -> Any:
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
        return None if value is None else _pair(value)
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


def _window(layer: LayerSpec) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((kernel rows, columns), (stride rows, columns)) of a layer whose output position
    (i, j) reads input rows i*stride .. i*stride + kernel - 1 (and columns alike); None for
    any other layer."""
    t, a = layer.type, layer.args
    if len(layer.input_shape) != 3:
        return None
    if t == "Conv2D" and a["padding"] == "valid":
        return a["kernel_size"], a["strides"]
    if t in ("MaxPooling2D", "AveragePooling2D") and a["padding"] == "valid":
        return a["pool_size"], a["strides"] or a["pool_size"]
    if t in ("Dropout", "SpatialDropout2D", "Activation"):
        return (1, 1), (1, 1)
    return None


def _conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel) // stride + 1


def _infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    """Fill in output shape, params and FLOPs; return the output shape. Shapes are Keras order."""
    a, t = layer.args, layer.type
    if t in SPATIAL_ONLY and len(shape) != 3:
        raise SpecError(f"{where}: {t} needs an image input (H, W, C) but gets {_fmt(shape)}; "
                        f"remove the Flatten before it")
    if t == "Conv2D":
        (kh, kw), (sh, sw), (h, w, c) = a["kernel_size"], a["strides"], shape
        oh, ow = _conv_out(h, kh, sh, a["padding"]), _conv_out(w, kw, sw, a["padding"])
        if oh <= 0 or ow <= 0:
            raise SpecError(f"{where}: Conv2D kernel {kh}x{kw} does not fit its {h}x{w} input "
                            f"(use padding = \"same\" or a smaller kernel)")
        f = a["filters"]
        layer.params = layer.trainable_params = kh * kw * c * f + (f if a["use_bias"] else 0)
        layer.flops = 2 * oh * ow * f * kh * kw * c
        return (oh, ow, f)
    if t in ("MaxPooling2D", "AveragePooling2D"):
        (ph, pw), (h, w, c) = a["pool_size"], shape
        sh, sw = a["strides"] or a["pool_size"]
        oh, ow = _conv_out(h, ph, sh, a["padding"]), _conv_out(w, pw, sw, a["padding"])
        if oh <= 0 or ow <= 0:
            raise SpecError(f"{where}: {t} pool {ph}x{pw} does not fit its {h}x{w} input")
        layer.flops = oh * ow * c * ph * pw
        return (oh, ow, c)
    if t == "Dense":
        if len(shape) != 1:
            raise SpecError(f"{where}: Dense needs a flat input but gets {_fmt(shape)}; "
                            f"add a Flatten or GlobalAveragePooling2D before it")
        n_in, units = shape[0], a["units"]
        layer.params = layer.trainable_params = n_in * units + (units if a["use_bias"] else 0)
        layer.flops = 2 * n_in * units
        return (units,)
    if t in ("Dropout", "SpatialDropout2D", "Activation"):
        return shape
    if t == "Flatten":
        return (math.prod(shape),)
    if t in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return (shape[2],)
    if t == "BatchNormalization":
        channels = shape[-1]
        trainable = channels * (int(a["center"]) + int(a["scale"]))
        layer.trainable_params = trainable
        layer.params = trainable + 2 * channels  # + moving mean and variance (non-trainable)
        layer.flops = 2 * math.prod(shape)
        return shape
    if t == "ZeroPadding2D":
        (top, bottom), (left, right) = a["padding"]
        return (shape[0] + top + bottom, shape[1] + left + right, shape[2])
    if t == "Residual":
        main = _infer_all(layer.children, shape, f"{where} (inside)")
        layer.shortcut = []
        if main != shape:
            if len(main) != 3:
                raise SpecError(f"{where}: the layers of a Residual block must keep an image shape")
            stride_h, stride_w = math.ceil(shape[0] / main[0]), math.ceil(shape[1] / main[1])
            layer.shortcut = [_make_layer({"type": "Conv2D", "filters": main[2], "kernel_size": 1,
                                           "strides": [stride_h, stride_w], "use_bias": False},
                                          f"{where} shortcut"),
                              _make_layer({"type": "BatchNormalization"}, f"{where} shortcut")]
            if _infer_all(layer.shortcut, shape, f"{where} shortcut") != main:
                raise SpecError(f"{where}: the shortcut cannot match the block's output "
                                f"{_fmt(main)} from {_fmt(shape)}")
        inner = layer.children + layer.shortcut
        layer.params = sum(child.params for child in inner)
        layer.trainable_params = sum(child.trainable_params for child in inner)
        layer.flops = sum(child.flops for child in inner) + math.prod(main)
        return main
    raise AssertionError(t)


def _infer_all(layers: list[LayerSpec], shape: tuple, where: str) -> tuple:
    for index, layer in enumerate(layers):
        layer.input_shape = shape
        shape = _infer(layer, shape, f"{where} layer {index} ({layer.type})")
        layer.output_shape = shape
    return shape


def _fmt(shape: tuple) -> str:
    return "(None, " + ", ".join(str(s) for s in shape) + ")"


def _make_layer(raw: Any, where: str) -> LayerSpec:
    if not isinstance(raw, dict) or "type" not in raw:
        raise SpecError(f"{where}: each layer needs a 'type', e.g. type = \"Conv2D\"")
    kind = raw["type"]
    if kind not in LAYER_ARGS:
        raise SpecError(f"{where}: unknown layer type {kind!r}; known: {', '.join(LAYER_ARGS)}")
    schema = LAYER_ARGS[kind]
    unknown = [key for key in raw if key not in schema and key not in ("type", "name")]
    if unknown:
        raise SpecError(f"{where} ({kind}): unknown argument {unknown[0]!r}; "
                        f"{kind} takes {', '.join(schema) or 'no arguments'}")
    args = {}
    for key, (default, kind_of_arg) in schema.items():
        if key not in raw:
            if default is REQUIRED:
                raise SpecError(f"{where} ({kind}): missing required argument {key!r}")
            args[key] = _coerce(kind_of_arg, default) if kind_of_arg in ("pair", "pad2d") else default
            continue
        try:
            args[key] = _coerce(kind_of_arg, raw[key])
        except ValueError as exc:
            raise SpecError(f"{where} ({kind}): argument {key!r}: {exc}") from None
    layer = LayerSpec(type=kind, args=args, name=str(raw.get("name", "")))
    if kind == "Residual":
        layer.children = [_make_layer(child, f"{where} inner layer {i}")
                          for i, child in enumerate(args["layers"])]
    return layer


def parse_spec(raw: dict, default_name: str = "model") -> ModelSpec:
    """Validate a spec given as data and infer every shape; SpecError names the layer and why."""
    if not isinstance(raw, dict):
        raise SpecError("a model spec must be a table with 'input_shape' and 'layers'")
    unknown = set(raw) - {"name", "description", "input_shape", "layers"}
    if unknown:
        raise SpecError(f"model spec: unknown key {sorted(unknown)[0]!r}; "
                        f"expected name, description, input_shape, layers")
    name = str(raw.get("name", default_name))
    shape = raw.get("input_shape", [28, 28, 1])
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise SpecError(f"model {name!r}: input_shape must be [height, width, channels], got {shape!r}")
    layers_raw = raw.get("layers")
    if not isinstance(layers_raw, list) or not layers_raw:
        raise SpecError(f"model {name!r}: 'layers' must be a non-empty list ([[layers]] tables)")
    layers = [_make_layer(item, f"model {name!r} layer {i}") for i, item in enumerate(layers_raw)]
    _infer_all(layers, tuple(shape), f"model {name!r}")
    output = "logits"
    for index, layer in enumerate(layers):
        if layer.args.get("activation") == "softmax" and layer.type != "Residual":
            if index != len(layers) - 1:
                raise SpecError(f"model {name!r} layer {index} ({layer.type}): softmax is only "
                                f"supported on the last layer (the loss applies it)")
            output = "softmax"
    last = layers[-1]
    if len(last.output_shape) != 1 or last.output_shape[0] < 2:
        raise SpecError(f"model {name!r}: the last layer must output class scores, "
                        f"(None, n_classes), but gives {_fmt(last.output_shape)}")
    _assign_names(layers)
    return ModelSpec(name=name, input_shape=tuple(shape), layers=layers,
                     description=str(raw.get("description", "")), output=output)


def _assign_names(layers: list[LayerSpec]) -> None:
    counters: dict[str, int] = {}

    def visit(layer: LayerSpec) -> None:
        base = SNAKE[layer.type]
        n = counters.get(base, 0)
        counters[base] = n + 1
        if not layer.name:
            layer.name = base if n == 0 else f"{base}_{n}"
        for child in layer.children + layer.shortcut:
            visit(child)

    for layer in layers:
        visit(layer)


def summary(spec: ModelSpec) -> str:
    """Keras' model.summary() as text: Layer (type), Output Shape, Param #, then totals."""
    longest = max(len(f"{layer.name} ({layer.type})") for layer in spec.layers)
    width = (max(29, longest + 2), 26, 10)
    rule = "_" * sum(width)
    lines = [f'Model: "{spec.name}"', rule,
             "Layer (type)".ljust(width[0]) + "Output Shape".ljust(width[1]) + "Param #".ljust(width[2]),
             "=" * sum(width)]
    for i, layer in enumerate(spec.layers):
        label = f"{layer.name} ({layer.type})"
        lines.append(label.ljust(width[0]) + _fmt(layer.output_shape).ljust(width[1])
                     + str(layer.params).ljust(width[2]))
        lines.append(rule if i < len(spec.layers) - 1 else "=" * sum(width))
    lines += [f"Total params: {spec.total_params:,}",
              f"Trainable params: {spec.trainable_params:,}",
              f"Non-trainable params: {spec.total_params - spec.trainable_params:,}", rule]
    return "\n".join(lines)


def train_flops_per_image(spec: ModelSpec, whole_input: bool = False) -> int:
    """Forward + backward arithmetic for one training image: about 3x the forward pass.

    The backward pass computes gradients for both the inputs and the weights of each layer
    (two products of the forward's size); the first layer needs no input gradient, which the
    estimate ignores (a 1% effect on model1). Counted on the rows and columns the model reads
    (ModelSpec.read_flops), the arithmetic that training does; with `whole_input`, on the
    whole input, that of the model as declared (as Keras computes it).
    """
    return 3 * (spec.flops if whole_input else spec.read_flops)
