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
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from .args import Regularizer
from .layers import REGISTRY, LayerSpec, fmt_shape, infer_all, make_layer, window_of

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
            window = window_of(layer)
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
        infer_all(layers, (*crop, self.input_shape[2]), f"model {self.name!r}")
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
    layers = [make_layer(item, f"model {name!r} layer {i}") for i, item in enumerate(layers_raw)]
    infer_all(layers, tuple(shape), f"model {name!r}")
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
                        f"(None, n_classes), but gives {fmt_shape(last.output_shape)}")
    _assign_names(layers)
    return ModelSpec(name=name, input_shape=tuple(shape), layers=layers,
                     description=str(raw.get("description", "")), output=output)


def adapt_spec(spec: ModelSpec, side: int, channels: int, num_classes: int,
               exact: bool = False) -> ModelSpec:
    """The spec fitted to a dataset: `channels` input channels, `num_classes` outputs from its
    last Dense layer, and an input of `side` pixels where that is larger than its own (smaller
    images are padded up to it), or, with `exact`, whatever it is. The same spec when nothing
    changes. SpecError names the layer that cannot take the new input (a pooling stage left
    with no pixels, say)."""
    height, width, have = spec.input_shape
    side = side if exact or side > height else height
    raw = spec.to_data()
    if height == width:
        raw["input_shape"] = [side, side, channels]
    else:
        raw["input_shape"] = [height, width, channels]
    outputs = spec.layers[-1].output_shape[0]
    if outputs != num_classes:
        dense = [i for i, layer in enumerate(raw["layers"]) if layer["type"] == "Dense"]
        if not dense or dense[-1] != len(raw["layers"]) - 1 and any(
                layer["type"] not in ("Activation", "Dropout")
                for layer in raw["layers"][dense[-1] + 1:]):
            raise SpecError(f"model {spec.name!r} ends in {spec.layers[-1].type} with {outputs} "
                            f"outputs but the data has {num_classes} classes; end it with a "
                            f"Dense layer")
        raw["layers"][dense[-1]]["units"] = num_classes
    if raw["input_shape"] == list(spec.input_shape) and outputs == num_classes:
        return spec
    try:
        return parse_spec(raw, spec.name)
    except SpecError as exc:
        shape = "x".join(str(v) for v in raw["input_shape"])
        raise SpecError(f"{exc} (the model adapted to the data's {shape} input, "
                        f"{num_classes} classes)") from None


def _assign_names(layers: list[LayerSpec]) -> None:
    counters: dict[str, int] = {}

    def visit(layer: LayerSpec) -> None:
        base = REGISTRY[layer.type].snake_name
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
        lines.append(label.ljust(width[0]) + fmt_shape(layer.output_shape).ljust(width[1])
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
