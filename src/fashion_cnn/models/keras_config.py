"""A Keras Sequential model's architecture (its config.json / model_config, as data) as a
model spec in this project's vocabulary: each layer mapped to its registry entry, or refused in
one line naming it (code, custom objects, layers and options this project lacks).
models/keras_format.py reads the files and converts the weights.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpecError
from .args import INITIALIZERS
from .layers import REGISTRY
from .spec import ModelSpec, parse_spec

# Keras layers that hold Python code or TensorFlow operations: never run, always refused.
CODE_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda"}
# Keras options that this project's layers lack: a layer is imported only where each has a
# value that means "off" (the Keras default).
_OFF: dict[str, tuple] = {
    "data_format": (None, "channels_last"), "dilation_rate": (None, 1, [1, 1]),
    "groups": (None, 1), "activity_regularizer": (None,), "kernel_constraint": (None,),
    "bias_constraint": (None,), "depthwise_constraint": (None,),
    "pointwise_constraint": (None,), "lora_rank": (None, 0), "noise_shape": (None,),
    "keepdims": (None, False), "renorm": (None, False), "virtual_batch_size": (None,),
    "adjustment": (None,), "gamma_regularizer": (None,), "beta_regularizer": (None,),
    "gamma_constraint": (None,), "beta_constraint": (None,), "quantization_config": (None,),
}

def snake_name(name: str) -> str:
    """Keras' class names snake-cased as Keras does it (utils/naming.py): "GlorotUniform" ->
    "glorot_uniform", "MaxPooling2D" -> "max_pooling2d", "ReLU" -> "re_lu"."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _initializer(value: Any) -> str | None:
    """Our name of a Keras initializer where we have the same one, else None (the default).
    Initializers only matter to training the spec from scratch: imported weights replace
    them. random_normal/uniform are left out: their ranges are settings we do not carry."""
    name = snake_name(str(value.get("class_name", ""))) if isinstance(value, dict) else str(value)
    return name if name in INITIALIZERS and not name.startswith("random_") else None


def _f32(value: Any) -> float:
    """A factor Keras 2 saved as float32 (0.009999999776482582) as written (0.01)."""
    return float(str(np.float32(value)))


def _regularizer(value: Any, where: str) -> dict | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ("l1", "l2", "l1_l2"):
        return {"l1": 0.01 if "l1" in value else 0.0, "l2": 0.01 if "l2" in value else 0.0}
    kind = value.get("class_name") if isinstance(value, dict) else None
    config = value.get("config") or {} if isinstance(value, dict) else {}
    if kind not in ("L1", "L2", "L1L2"):
        raise SpecError(f"{where}: regularizer {kind or value!r} is not supported "
                        f"(l1, l2 and l1_l2 are)")
    l1, l2 = _f32(config.get("l1", 0.0)), _f32(config.get("l2", 0.0))
    return {"l1": l1, "l2": l2} if l1 or l2 else None


def _activation(value: Any, where: str) -> Any:
    if isinstance(value, dict):  # a custom activation: an object, or a registered function
        name = value.get("config") or value.get("class_name")
        raise SpecError(f"{where}: custom activation {name!r} cannot be imported (no code from "
                        f"a model file is run)")
    return value


def _layer_from_keras(entry: Any, index: int, source: str) -> dict | None:
    """One [[layers]] table from one Keras layer config; None for an InputLayer."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise SpecError(f"{source}: layer {index} of the model config is not a layer "
                        f"(class_name and config)")
    kind, config = str(entry.get("class_name", "")), entry["config"]
    where = f"{source}: layer {config.get('name', index)!r} ({kind})"
    module, registered = entry.get("module"), entry.get("registered_name")
    if kind in CODE_LAYERS:
        raise SpecError(f"{where} holds Python code, which is never run from a model file; "
                        f"rebuild the model without it")
    if (module and not str(module).startswith("keras")) or registered not in (None, kind) \
            or ">" in kind:
        raise SpecError(f"{where} is a custom object ({registered or module}); only Keras' "
                        f"own layers can be imported")
    if kind == "InputLayer":
        return None
    simple = {"ReLU": "relu", "Softmax": "softmax", "ELU": "elu"}
    if kind in simple:  # activation layers: Activation of the same function, at its defaults
        off = {"ReLU": {"max_value": None, "negative_slope": 0.0, "threshold": 0.0},
               "Softmax": {"axis": -1}, "ELU": {"alpha": 1.0}}[kind]
        if kind == "ReLU" and config.get("max_value") == 6.0:
            off, simple = {**off, "max_value": 6.0}, {**simple, "ReLU": "relu6"}
        if any(config.get(k, v) not in (v, [v]) for k, v in off.items()):
            raise SpecError(f"{where}: settings other than the defaults are not supported")
        return {"type": "Activation", "activation": simple[kind]}
    if kind == "LeakyReLU":
        slope = config.get("negative_slope", config.get("alpha", 0.3))
        if not math.isclose(float(slope), 0.2, rel_tol=1e-6):
            raise SpecError(f"{where}: negative_slope {slope} is not supported (0.2 is, as "
                            f"activation = \"leaky_relu\")")
        return {"type": "Activation", "activation": "leaky_relu"}
    if kind not in REGISTRY or kind == "Residual":
        raise SpecError(f"{where}: fashion-cnn has no {kind} layer; known: "
                        f"{', '.join(k for k in REGISTRY if k != 'Residual')}")
    for key, allowed in _OFF.items():
        if key in config and config[key] not in allowed:
            raise SpecError(f"{where}: {key} = {config[key]!r} is not supported")
    layer: dict[str, Any] = {"type": kind}
    for key, (_, arg_kind) in REGISTRY[kind].args.items():
        if key not in config:
            continue
        value = config[key]
        if arg_kind == "initializer":
            value = _initializer(value)
        elif arg_kind == "regularizer":
            value = _regularizer(value, f"{where}: {key}")
        elif arg_kind == "activation":
            value = _activation(value, where)
        if value is not None:
            layer[key] = value
    return layer


def _input_shape(layers: list, model_config: dict, source: str) -> list[int]:
    """(H, W, C) from the InputLayer, the first layer's batch_input_shape or build_config, or
    the model's build_input_shape; a 2-D input (H, W) gets one channel."""
    candidates = []
    for entry in layers[:1]:
        config = entry.get("config", {}) if isinstance(entry, dict) else {}
        candidates += [config.get("batch_shape"), config.get("batch_input_shape"),
                       (entry.get("build_config") or {}).get("input_shape")]
    candidates.append(model_config.get("build_input_shape"))
    shape = next((s for s in candidates if isinstance(s, list) and s), None)
    if shape is None:
        raise SpecError(f"{source}: the model config gives no input shape (build the model, "
                        f"or start it with keras.Input(shape=...), before saving it)")
    dims = shape[1:]
    if len(dims) == 2:
        dims = [*dims, 1]
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise SpecError(f"{source}: input shape {tuple(shape)} is not an image (batch, height, "
                        f"width, channels) of a fixed size")
    return dims


def keras_to_spec(config: dict | str, name: str | None = None,
                  source: str = "Keras model") -> ModelSpec:
    """The model spec of a Keras Sequential model's config: a dict or JSON text, as in a
    .keras file's config.json or a .h5 file's `model_config` attribute. SpecError names the
    layer that cannot be imported. `source` names the file in messages.

    >>> spec = keras_to_spec(json.loads(Path("config.json").read_text()))   # doctest: +SKIP
    >>> [layer.type for layer in spec.layers][:2]                             # doctest: +SKIP
    ['Conv2D', 'MaxPooling2D']
    """
    if isinstance(config, (str, bytes)):
        try:
            config = json.loads(config)
        except ValueError:
            raise SpecError(f"{source}: the model config is not valid JSON") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise SpecError(f"{source}: the model config has no class_name")
    kind = config["class_name"]
    if kind != "Sequential":
        raise SpecError(f"{source}: is a {kind} model; only Sequential models can be imported")
    body = config.get("config")
    model_config = body if isinstance(body, dict) else {}
    layers = body if isinstance(body, list) else model_config.get("layers")  # Keras < 2.2: a list
    if not isinstance(layers, list) or not layers:
        raise SpecError(f"{source}: the Sequential model has no layers")
    raw = [_layer_from_keras(entry, i, source) for i, entry in enumerate(layers)]
    shape = _input_shape(layers, model_config, source)
    spec_name = name or str(model_config.get("name") or "keras")
    try:
        spec = parse_spec({"name": spec_name, "description": f"imported from {Path(source).name}",
                           "input_shape": shape, "layers": [r for r in raw if r is not None]},
                          spec_name)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    kept = [entry["config"] for entry, r in zip(layers, raw) if r is not None]
    for layer, config in zip(spec.layers, kept):
        axis = config.get("axis", -1) if layer.type == "BatchNormalization" else -1
        if axis not in (-1, [-1], len(layer.input_shape), [len(layer.input_shape)]):
            raise SpecError(f"{source}: layer {config.get('name')!r} (BatchNormalization): "
                            f"axis {axis!r} is not supported (the last axis, the channels, is)")
    return spec


def config_layers(config: dict) -> list[dict]:
    body = config.get("config")
    layers = body if isinstance(body, list) else body.get("layers", [])
    return [entry for entry in layers if entry.get("class_name") != "InputLayer"]


def config_types(config: dict) -> list[str]:
    """Each layer's Keras class, for the Keras 3 group names (spec layers correspond one to
    one: an InputLayer is no layer of the spec)."""
    return [str(entry["class_name"]) for entry in config_layers(config)]


def config_names(config: dict) -> list[str | None]:
    return [entry["config"].get("name") for entry in config_layers(config)]
