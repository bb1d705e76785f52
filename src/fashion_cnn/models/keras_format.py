"""Keras model files read as data: the architecture as a model spec, the weights converted
into a KerasSequential (load_keras). apps/keras_import.py writes them as a run directory.

Files read (with h5py, as data: nothing in them is executed or unpickled):

    MODEL.keras        Keras 3: a zip of config.json (the architecture) and model.weights.h5
                       (layers/<layer>/vars/0, 1, ...); ModelCheckpoint("m_{epoch}.keras")
    MODEL.h5           Keras 2, and Keras 3's legacy format: the `model_config` attribute (JSON)
                       and model_weights/<layer>/<weight name>; ModelCheckpoint("m_{epoch}.h5")
    MODEL.weights.h5   weights only, in either layout (save_weights, ModelCheckpoint with
                       save_weights_only=True): the architecture is then given as a spec

A Sequential model whose layers all have an entry in the layer registry (models/layers.py) is
imported; any other layer, a Lambda (code) or a custom object is refused, naming it. Weights
change layout: Conv2D kernels (kh, kw, in, out) -> (out, in, kh, kw), Dense (in, out) ->
(out, in), and the first Dense after a Flatten has its input rows reordered from Keras' (H, W, C)
flattening to ours, (C, H, W) (as are the vectors of a BatchNormalization between the two).

>>> net = load_keras("model1_01.keras")                                  # doctest: +SKIP
>>> net.spec.name                                                       # doctest: +SKIP
'sequential'
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, SpecError, UserError, require_module
from .args import INITIALIZERS
from .build import KerasSequential, build_model
from .layers import REGISTRY, LayerSpec
from .spec import ModelSpec, parse_spec
from .zoo import get_model_spec

INSTALL_HINT = "pip install 'fashion-cnn[keras]' (h5py)"
# The largest member of a .keras zip read into memory (a guard against zip bombs): far above
# any model of this project (model1's weights are 0.4 MB).
MAX_MEMBER_BYTES = 2 << 30
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
# Weight roles in Keras' order (Keras 3 stores them as vars/0, 1, ... in this order).
_ROLES = {"Conv2D": ("kernel", "bias"), "Dense": ("kernel", "bias"),
          "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel", "bias"),
          "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance")}


def _h5py():
    return require_module("h5py", "import-keras", INSTALL_HINT)


# ------------------------------------------------------------------------ architecture

def _snake(name: str) -> str:
    """Keras' class names snake-cased as Keras does it (utils/naming.py): "GlorotUniform" ->
    "glorot_uniform", "MaxPooling2D" -> "max_pooling2d", "ReLU" -> "re_lu"."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _initializer(value: Any) -> str | None:
    """Our name of a Keras initializer where we have the same one, else None (the default).
    Initializers only matter to training the spec from scratch: imported weights replace
    them. random_normal/uniform are left out: their ranges are settings we do not carry."""
    name = _snake(str(value.get("class_name", ""))) if isinstance(value, dict) else str(value)
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


# ------------------------------------------------------------------------ reading files

def _attr_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _attr_list(group, name: str) -> list[str]:
    """A list-of-strings attribute, also when Keras split a long one into name0, name1, ..."""
    if name in group.attrs:
        values = list(np.atleast_1d(group.attrs[name]))
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values += list(np.atleast_1d(group.attrs[f"{name}{chunk}"]))
            chunk += 1
    return [_attr_text(v) for v in values if isinstance(v, (str, bytes, np.bytes_, np.str_))]


def _array(dataset, where: str) -> np.ndarray:
    """A dataset's values as float32; only numbers are read (no object or string data)."""
    if not hasattr(dataset, "dtype") or dataset.dtype.kind not in "fiu":
        raise CheckpointError(f"{where}: not an array of numbers")
    try:
        return np.asarray(dataset[()], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: unreadable ({str(exc).splitlines()[0]})") from None


class _Weights:
    """The weight arrays of a Keras file, by layer, in one of its two layouts.

    "keras3": groups layers/<key>/vars holding 0, 1, ... (key: the snake-cased class name,
    numbered per class in model order, as Keras 3's saving_lib names them; Keras 2.13's .keras
    files say _layer_checkpoint_dependencies for layers). "keras2": a group per layer name
    whose `weight_names` attribute lists its datasets ("conv2d/kernel:0",
    "model1/conv2d/kernel").
    """

    def __init__(self, root, layout: str, source: str):
        self.root, self.layout, self.source = root, layout, source
        self.used: set[str] = set()  # the layer groups read so far

    def _holding(self) -> list[str]:
        """The layer groups that hold weights, in the file's order."""
        if self.layout == "keras2":
            return [n for n in _attr_list(self.root, "layer_names")
                    if n in self.root and _attr_list(self.root[n], "weight_names")]
        return [f"{top}/{name}/vars" for top in ("layers", "_layer_checkpoint_dependencies")
                if top in self.root for name in self.root[top]
                if "vars" in self.root[top][name] and len(self.root[top][name]["vars"])]

    def unused(self) -> list[str]:
        """The layers whose weights no layer of the model took."""
        return [name for name in self._holding() if name not in self.used]

    def arrays(self, key: str, keras_name: str | None, order_index: int
               ) -> list[tuple[str | None, np.ndarray]] | None:
        """(role or None, array) of one layer, in the file's order; None when it is absent.
        keras2 files are looked up by `keras_name`, or, for a weights-only file without the
        model's names, as the order_index-th layer that holds weights."""
        where = f"{self.source}: layer {keras_name or key!r}"
        if self.layout == "keras3":
            for top, name in [(t, n) for n in (key, keras_name) if n
                              for t in ("layers", "_layer_checkpoint_dependencies")]:
                path = f"{top}/{name}/vars"
                if path in self.root:
                    self.used.add(path)
                    group = self.root[path]
                    names = sorted(group, key=lambda n: int(n) if n.isdigit() else 10 ** 9)
                    return [(None, _array(group[n], f"{where} vars/{n}")) for n in names]
            return None
        if keras_name is None:
            named = self._holding()
            if order_index >= len(named):
                return None
            keras_name = named[order_index]
        if keras_name not in self.root:
            return None
        self.used.add(keras_name)
        group = self.root[keras_name]
        out = []
        for weight in _attr_list(group, "weight_names"):
            if weight not in group:
                raise CheckpointError(f"{where}: weight {weight!r} is listed but missing")
            role = weight.rsplit("/", 1)[-1].split(":", 1)[0]
            out.append((role, _array(group[weight], f"{where} {weight}")))
        return out


def _open(path: Path, h5py):
    """(model config or None, open h5py.File, layout, the group holding the layers)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if "config.json" not in members:
                raise CheckpointError(f"{path}: a zip without config.json, not a .keras file")
            if "model.weights.h5" not in members:
                other = " (weights saved as .npz; save them as .h5)" \
                    if "model.weights.npz" in members else ""
                raise CheckpointError(f"{path}: has no model.weights.h5{other}")
            for name in ("config.json", "model.weights.h5"):
                if members[name].file_size > MAX_MEMBER_BYTES:
                    raise CheckpointError(f"{path}: {name} is implausibly large")
            config = json.loads(archive.read("config.json").decode("utf-8"))
            h5 = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        return config, h5, "keras3", h5
    if not h5py.is_hdf5(path):
        raise CheckpointError(f"{path}: neither a .keras file (zip) nor an HDF5 (.h5) file")
    h5 = h5py.File(path, "r")
    try:
        if "model_config" in h5.attrs:
            if "model_weights" not in h5:
                raise CheckpointError(f"{path}: has a model config but no model_weights")
            config = json.loads(_attr_text(h5.attrs["model_config"]))
            return config, h5, "keras2", h5["model_weights"]
        if "layer_names" in h5.attrs or "layer_names0" in h5.attrs:
            return None, h5, "keras2", h5
        if "layers" in h5 or "_layer_checkpoint_dependencies" in h5:
            return None, h5, "keras3", h5
        raise CheckpointError(f"{path}: an HDF5 file without Keras weights")
    except BaseException:
        h5.close()
        raise


@contextlib.contextmanager
def _open_keras(path: Path) -> Iterator[tuple[dict | None, _Weights]]:
    """(model config or None for a weights-only file, its weights) of a Keras file."""
    h5py = _h5py()
    if path.is_dir():
        hint = (" (a TensorFlow SavedModel: load it in Keras and save it with "
                "model.save('model.keras'))" if (path / "saved_model.pb").exists() else "")
        raise CheckpointError(f"{path}: is a directory, not a Keras file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        config, h5, layout, root = _open(path, h5py)
    except (OSError, ValueError, KeyError, RecursionError, zipfile.BadZipFile,
            UnicodeDecodeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: unreadable Keras file ({reason})") from None
    try:
        yield config, _Weights(root, layout, str(path))
    finally:
        h5.close()


# ------------------------------------------------------------------------ converting weights

def _core(module: nn.Module) -> nn.Module:
    """The layer's own module: build.py wraps one with an activation as (module, activation),
    and moves a Conv2D's ReLU behind a following max pool."""
    return module[0] if isinstance(module, nn.Sequential) else module


def _targets(layer: LayerSpec, module: nn.Module, flat: tuple | None
             ) -> list[tuple[str, torch.Tensor, tuple, Callable[[np.ndarray], np.ndarray]]]:
    """(role, our tensor, Keras' shape, Keras array -> ours) for each weight of a layer, in
    Keras' order. `flat`: (H, W, C) of the image a Flatten before this layer flattened, whose
    (H, W, C) order Keras' input features follow and (C, H, W) ours do."""
    core, out = _core(module), []

    def features(a: np.ndarray) -> np.ndarray:  # Keras (H*W*C,) -> ours (C*H*W,)
        return a if flat is None else a.reshape(flat).transpose(2, 0, 1).reshape(-1)

    if layer.type == "Conv2D":
        o, i, kh, kw = core.weight.shape
        out.append(("kernel", core.weight, (kh, kw, i, o), lambda a: a.transpose(3, 2, 0, 1)))
    elif layer.type == "SeparableConv2D":
        dw, pw = core.depthwise.weight, core.pointwise.weight
        channels, (kh, kw) = layer.input_shape[2], dw.shape[2:]
        multiplier = dw.shape[0] // channels
        # Keras' depthwise output channel c * multiplier + m reads input channel c, as a torch
        # convolution with groups = channels
        out.append(("depthwise_kernel", dw, (kh, kw, channels, multiplier),
                    lambda a: a.reshape(kh, kw, -1).transpose(2, 0, 1)[:, None]))
        out.append(("pointwise_kernel", pw, (1, 1, pw.shape[1], pw.shape[0]),
                    lambda a: a.transpose(3, 2, 0, 1)))
        core = core.pointwise
    elif layer.type == "Dense":
        o, i = core.weight.shape
        if flat is None:
            out.append(("kernel", core.weight, (i, o), lambda a: a.T))
        else:  # rows in Keras' (H, W, C) order -> columns in our (C, H, W) order
            h, w, c = flat
            out.append(("kernel", core.weight, (i, o),
                        lambda a: a.reshape(h, w, c, o).transpose(3, 2, 0, 1).reshape(o, i)))
    elif layer.type == "BatchNormalization":
        n = layer.input_shape[-1] if len(layer.input_shape) == 3 else layer.input_shape[0]
        if layer.args["scale"]:
            out.append(("gamma", core.weight, (n,), features))
        if layer.args["center"]:
            out.append(("beta", core.bias, (n,), features))
        out += [("moving_mean", core.running_mean, (n,), features),
                ("moving_variance", core.running_var, (n,), features)]
        return out
    if getattr(core, "bias", None) is not None:
        out.append(("bias", core.bias, (core.bias.shape[0],), lambda a: a))
    return out


def _keras_keys(keras_types: list[str]) -> list[str]:
    """Each layer's group name in a Keras 3 weights file: its class snake-cased, then _1, _2,
    ... for later layers of the same class (saving_lib names a Sequential's layers so)."""
    counts: dict[str, int] = {}
    keys = []
    for kind in keras_types:
        base = _snake(kind)
        n = counts.get(base, 0)
        counts[base] = n + 1
        keys.append(base if n == 0 else f"{base}_{n}")
    return keys


def _fill(model: KerasSequential, weights: _Weights, keras_types: list[str],
          keras_names: list[str | None]) -> None:
    """Copy every weight of the file into `model`, converted; CheckpointError names the layer
    whose weights are missing or of the wrong shape."""
    spec, flat, order = model.spec, None, 0
    keys = _keras_keys(keras_types)
    for i, (layer, module) in enumerate(zip(spec.layers, model.layers)):
        if layer.type == "Flatten":  # the two orders differ unless H*W or C is 1
            shape = layer.input_shape
            flat = shape if len(shape) == 3 and shape[0] * shape[1] > 1 and shape[2] > 1 else None
        if layer.type not in _ROLES:
            continue
        targets = _targets(layer, module, flat)
        label = keras_names[i] or keys[i]
        where = f"{weights.source}: layer {label!r} ({layer.type})"
        found = weights.arrays(keys[i], keras_names[i], order)
        order += 1
        if found is None:
            raise CheckpointError(f"{where}: no weights for it in the file")
        roles = [role for role, *_ in targets]
        by_role = {role: array for role, array in found}
        if None not in by_role and set(by_role) == set(roles):
            arrays = [by_role[role] for role in roles]
        elif len(found) == len(roles):
            arrays = [array for _, array in found]
        else:
            raise CheckpointError(f"{where}: the file holds {len(found)} weights, the model "
                                  f"{len(roles)} ({', '.join(roles)})")
        for (role, tensor, keras_shape, convert), array in zip(targets, arrays):
            if array.shape != keras_shape:
                raise CheckpointError(f"{where}: {role} has shape {array.shape} in the file, "
                                      f"the model needs {keras_shape}")
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(convert(array))))
        if layer.type == "Dense":
            flat = None  # its outputs are the same features in both frameworks
    extra = weights.unused()
    if extra:
        raise CheckpointError(f"{weights.source}: the weights of {len(extra)} layer(s) fit no "
                              f"layer of the model (first: {extra[0]!r})")


def _model_spec(model: ModelSpec | str) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else get_model_spec(str(model))


def load_keras(path: str | os.PathLike, *, weights_only: bool = False,
               model: ModelSpec | str | None = None, name: str | None = None) -> KerasSequential:
    """A Keras file's model as this project's KerasSequential, weights converted, in eval
    mode. `weights_only`: take the architecture from `model` (a zoo name, a spec file or a
    ModelSpec) and only the weights from the file (any of the three kinds). `name`: the
    spec's name (default: the Keras model's). Its forward() returns logits: a last softmax
    is left to the loss and to predict, as for every model here.

    >>> net = load_keras("model1_01.keras")                      # doctest: +SKIP
    >>> net(torch.zeros(1, 1, 28, 28)).shape                     # doctest: +SKIP
    torch.Size([1, 10])
    """
    path = Path(path)
    if weights_only and model is None:
        raise UserError(f"{path}: importing weights only needs the architecture as a model "
                        f"spec (model=, --model SPEC)", setting="model")
    if model is not None and not weights_only:
        raise UserError("model= gives the architecture of a weights-only import; set "
                        "weights_only=True (--weights-only) as well", setting="model")
    with _open_keras(path) as (config, weights):
        if weights_only:
            spec = _model_spec(model)
            if name:
                spec = parse_spec({**spec.to_data(), "name": name}, name)
            if any(layer.type == "Residual" for layer in spec.layers):
                raise SpecError(f"model {spec.name!r}: Keras has no Residual layer; its weights "
                                f"cannot come from a Keras file")
            # Keras 3 files: groups named after the spec's layer types; Keras 2: the layers
            # that hold weights, in order
            keras_types = [layer.type for layer in spec.layers]
            keras_names: list[str | None] = [None] * len(spec.layers)
        else:
            if config is None:
                raise UserError(f"{path}: holds weights only, no architecture; give it as a "
                                f"model spec (weights_only=True, model=; --weights-only --model "
                                f"SPEC)", setting="model")
            spec = keras_to_spec(config, name, source=str(path))
            keras_types = _config_types(config)
            keras_names = _config_names(config)
        net = build_model(spec, seed=0)
        _fill(net, weights, keras_types, keras_names)
    return net.eval()


def _config_layers(config: dict) -> list[dict]:
    body = config.get("config")
    layers = body if isinstance(body, list) else body.get("layers", [])
    return [entry for entry in layers if entry.get("class_name") != "InputLayer"]


def _config_types(config: dict) -> list[str]:
    """Each layer's Keras class, for the Keras 3 group names (spec layers correspond one to
    one: an InputLayer is no layer of the spec)."""
    return [str(entry["class_name"]) for entry in _config_layers(config)]


def _config_names(config: dict) -> list[str | None]:
    return [entry["config"].get("name") for entry in _config_layers(config)]
