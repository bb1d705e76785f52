"""Keras model files read as data: the architecture as a model spec (keras_config.py), the
weights converted into a KerasSequential (load_keras). apps/keras_import.py writes them as a
run directory.

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
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import fileio
from ..errors import CheckpointError, SpecError, UserError, first_line, require_module
from .build import KerasSequential, build_model
from .layers import LayerSpec
from .spec import ModelSpec, check_memory, parse_spec
from .keras_config import config_names, config_types, snake_name, keras_to_spec
from .zoo import get_model_spec

INSTALL_HINT = "pip install 'fashion-cnn[keras]' (h5py)"
# The largest member of a .keras zip read into memory (a guard against zip bombs): far above
# any model of this project (model1's weights are 0.4 MB).
MAX_MEMBER_BYTES = 2 << 30
# Weight roles in Keras' order (Keras 3 stores them as vars/0, 1, ... in this order).
_ROLES = {"Conv2D": ("kernel", "bias"), "Dense": ("kernel", "bias"),
          "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel", "bias"),
          "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance")}


def _h5py():
    return require_module("h5py", "import-keras", INSTALL_HINT)


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
        raise CheckpointError(f"{where}: unreadable ({first_line(exc)})") from None


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
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    fileio.require_regular_file(path, "a Keras file", CheckpointError)  # a FIFO never blocks
    try:
        config, h5, layout, root = _open(path, h5py)
    except (OSError, ValueError, KeyError, RecursionError, zipfile.BadZipFile,
            UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable Keras file ({first_line(exc)})") from None
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
        base = snake_name(kind)
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
            keras_types = config_types(config)
            keras_names = config_names(config)
        check_memory(spec, training=False)  # before anything is allocated
        net = build_model(spec, seed=0)
        _fill(net, weights, keras_types, keras_names)
    return net.eval()
