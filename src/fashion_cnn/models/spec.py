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
import os
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from ..perf import machine_memory_bytes
from .args import MAX_DIMENSION, Regularizer, shown
from .layers import REGISTRY, LayerSpec, fmt_shape, infer_all, make_layer, window_of

MEMORY_BUDGET_ENV = "FASHION_CNN_MEMORY_BUDGET_GB"  # gigabytes (10**9 bytes) a model may need
BYTES_PER_VALUE = 4  # float32: weights, and activations (bf16 autocast keeps fp32 weights)
# Each parameter is held four times in training: the weight, its gradient and Adam's two moments.
COPIES_PER_PARAMETER = 4
# Each activation is kept for the backward pass, which makes its gradient and a temporary.
COPIES_PER_ACTIVATION = 3

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
    schema = REGISTRY[layer.type].args
    for key, value in layer.args.items():
        if value is None:
            default, kind = schema[key]
            if kind != "activation" or default is None:
                continue
            # no activation where the default has one (Activation, Residual): say "linear",
            # which reads back as None, where leaving it out would read back as the default
            value = "linear"
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
        raise SpecError(f"model spec: unknown key {shown(sorted(map(str, unknown))[0])}; "
                        f"expected name, description, input_shape, layers")
    name = raw.get("name", default_name)
    if not is_plain_name(name):
        raise SpecError(f"model spec: name must be a one-line name of at most 200 characters, "
                        f"without / or \\, got {shown(name)}")
    if not isinstance(raw.get("description", ""), str):
        raise SpecError(f"model {name!r}: description must be a string")
    shape = raw.get("input_shape", [28, 28, 1])
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIMENSION
                       for s in shape)):
        raise SpecError(f"model {name!r}: input_shape must be [height, width, channels] of "
                        f"positive integers, got {shown(shape)}")
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
    # No memory check here: a spec is data, and printing or storing a large one needs none;
    # the model's memory is checked where it is built (check_memory).
    return ModelSpec(name=name, input_shape=tuple(shape), layers=layers,
                     description=raw.get("description", ""), output=output)


def is_plain_name(name: Any) -> bool:
    """A name that can be part of a file name (a run directory's): one line, no separators."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable()
            and "/" not in name and "\\" not in name and not name.startswith("."))


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


# ------------------------------------------------------------------------------ memory

@dataclass(frozen=True)
class MemoryEstimate:
    """What training (or only evaluating) a spec needs, roughly, in bytes: enough to refuse a
    model that cannot fit before anything is allocated, not a prediction of the peak."""

    parameters: int       # the parameter count
    parameter_bytes: int  # weights; in training also their gradients and Adam's moments
    activation_bytes: int  # a training batch's activations and their gradients, or an
                           # evaluation batch's largest layer, whichever is more
    training: bool = True

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes


def _activation_values(layers: list[LayerSpec]) -> tuple[int, int]:
    """(sum, largest) of the layers' output sizes for one image, inner layers included."""
    total = largest = 0
    for layer in layers:
        size = math.prod(layer.output_shape)
        inner_total, inner_largest = _activation_values(layer.children + layer.shortcut)
        total += size + inner_total
        largest = max(largest, size, inner_largest)
    return total, largest


def memory_estimate(spec: ModelSpec, batch_size: int = 1, eval_batch_size: int = 1,
                    training: bool = True) -> MemoryEstimate:
    """Memory to train `spec` with Adam on batches of `batch_size` images (and to evaluate it
    on batches of `eval_batch_size`), from the shapes the spec declares; with `training`
    False, to evaluate it only (the weights and an evaluation batch).

    >>> from fashion_cnn.models.zoo import get_model_spec
    >>> memory_estimate(get_model_spec("model1"), 128).total_bytes // 10**6  # megabytes
    60
    """
    values, largest = _activation_values(spec.layers)
    values += math.prod(spec.input_shape)
    training_values = values * COPIES_PER_ACTIVATION * batch_size if training else 0
    # without gradients, a layer's input and output are all that is alive at once
    evaluation = 2 * largest * eval_batch_size
    copies = COPIES_PER_PARAMETER if training else 1
    return MemoryEstimate(
        parameters=spec.total_params,
        parameter_bytes=spec.total_params * copies * BYTES_PER_VALUE,
        activation_bytes=max(training_values, evaluation) * BYTES_PER_VALUE,
        training=training)


# Where the machine's memory cannot be read, a budget that any machine that trains fits.
FALLBACK_BUDGET_BYTES = 8 * 10**9


def memory_budget() -> tuple[int, str]:
    """(bytes, where from): FASHION_CNN_MEMORY_BUDGET_GB where set, else half the memory this
    process may use (perf.machine_memory_bytes: the machine's, or its container's limit)."""
    text = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if text:
        try:
            gigabytes = float(text)
        except ValueError:
            gigabytes = math.nan
        if not (math.isfinite(gigabytes) and gigabytes > 0):
            raise SpecError(f"{MEMORY_BUDGET_ENV}={shown(text)}: expected a positive number "
                            f"of gigabytes")
        return int(gigabytes * 10**9), f"{MEMORY_BUDGET_ENV}={text}"
    total = machine_memory_bytes()
    if total is None:
        return FALLBACK_BUDGET_BYTES, "the default where the machine's memory is unknown"
    return total // 2, f"half of this machine's {_gigabytes(total)}"


def _gigabytes(size: int) -> str:
    return f"{size / 10**9:,.1f} GB"


def check_memory(spec: ModelSpec, batch_size: int = 1, eval_batch_size: int = 1, *,
                 training: bool = True) -> MemoryEstimate:
    """The memory estimate (memory_estimate); SpecError in one line, naming the model and how
    to raise the budget, where it exceeds the budget (memory_budget). Called where a model is
    built: the Trainer (training), and a run's reload (evaluating only).

    >>> from fashion_cnn.models.zoo import get_model_spec
    >>> check_memory(get_model_spec("model1"), 128).parameters
    93322
    """
    estimate = memory_estimate(spec, batch_size, eval_batch_size, training)
    budget, source = memory_budget()
    if estimate.total_bytes > budget:
        if training:
            what = f"train on batches of {batch_size}"
            weights = "with gradients and Adam's moments"
        else:
            what = f"evaluate on batches of {eval_batch_size}"
            weights = "weights"
        raise SpecError(
            f"model {spec.name!r} needs about {_gigabytes(estimate.total_bytes)} to {what} "
            f"({estimate.parameters:,} parameters: {_gigabytes(estimate.parameter_bytes)} "
            f"{weights}; activations: {_gigabytes(estimate.activation_bytes)}), more than the "
            f"memory budget of {_gigabytes(budget)} ({source}); make the model or the batch "
            f"smaller, or set {MEMORY_BUDGET_ENV} to raise the budget")
    return estimate
