"""The layer registry: one entry per Keras layer type, holding everything about it.

An entry (LayerType) gives the type's Keras arguments with their defaults, its automatic
name, how it infers its output shape, parameter count and FLOPs, the input window it reads
(for ModelSpec.read_extent), the PyTorch module it builds, which of its tensors its
regularizers apply to, and a note on its ONNX export. Spec validation (spec.py), the summary
and the builder (build.py) all read it; adding a layer type is one `register(...)` here and its
tests.

>>> REGISTRY["SeparableConv2D"].snake_name
'separable_conv2d'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import SpecError
from .args import REQUIRED, coerce, shown
from .modules import (Dropout, Flatten, KerasConv2d, KerasDense, KerasSamePool2d, Residual,
                      SeparableConv2d, activation_module, keras_init, keras_same_pads)


@dataclass
class LayerSpec:
    """One layer of a model spec, validated; shapes, parameters and FLOPs filled in by
    infer_all. Shapes are Keras order, without the batch: (H, W, C) or (units,)."""

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


Window = tuple[tuple[int, int], tuple[int, int]]  # ((kernel rows, cols), (stride rows, cols))


@dataclass(frozen=True)
class LayerType:
    keras_name: str                      # the type as Keras names it: "Conv2D"
    snake_name: str                      # Keras' automatic layer name: "conv2d", "conv2d_1"...
    args: dict[str, tuple[Any, str]]     # argument -> (default or REQUIRED, kind in args.coerce)
    # (layer, input shape, where) -> output shape; sets layer.params/trainable_params/flops
    infer: Callable[[LayerSpec, tuple, str], tuple]
    # (layer, build_child) -> nn.Module, without the activation (build.py adds it)
    build: Callable[[LayerSpec, Callable[[LayerSpec], nn.Module]], nn.Module]
    # the window an output position reads, where the layer reads windows (else None)
    window: Callable[[LayerSpec], Window | None] = lambda layer: None
    image_only: bool = False             # needs an (H, W, C) input
    activation_after: bool = False       # has an `activation` argument applied after it
    regularizers: dict[str, str] = field(default_factory=dict)  # argument -> parameter path
    onnx: str = "standard ONNX operators"


REGISTRY: dict[str, LayerType] = {}


def register(layer_type: LayerType) -> LayerType:
    REGISTRY[layer_type.keras_name] = layer_type
    return layer_type


def fmt_shape(shape: tuple) -> str:
    """A shape as Keras prints it: (None, 26, 26, 32)."""
    return "(None, " + ", ".join(str(s) for s in shape) + ")"


def conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
    """Output positions along one axis (Keras' 'valid' or 'same')."""
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel) // stride + 1


# ------------------------------------------------------------------------------ making layers

# Residual blocks inside Residual blocks, at most: deeper nesting is a mistake, and every
# walk over the layers (validation, names, the builder) recurses once per level.
MAX_NESTING = 16


def make_layer(raw: Any, where: str, depth: int = 0) -> LayerSpec:
    """A LayerSpec from one [[layers]] table: type known, arguments checked and defaulted."""
    if not isinstance(raw, dict) or "type" not in raw:
        raise SpecError(f"{where}: each layer needs a 'type', e.g. type = \"Conv2D\"")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise SpecError(f"{where}: unknown layer type {shown(kind)}; known: {', '.join(REGISTRY)}")
    if depth > MAX_NESTING:
        raise SpecError(f"{where}: Residual blocks nested more than {MAX_NESTING} deep")
    schema = REGISTRY[kind].args
    unknown = [key for key in raw if key not in schema and key not in ("type", "name")]
    if unknown:
        raise SpecError(f"{where} ({kind}): unknown argument {shown(unknown[0])}; "
                        f"{kind} takes {', '.join(schema) or 'no arguments'}")
    args = {}
    for key, (default, kind_of_arg) in schema.items():
        if key not in raw:
            if default is REQUIRED:
                raise SpecError(f"{where} ({kind}): missing required argument {key!r}")
            args[key] = coerce(kind_of_arg, default) if kind_of_arg in ("pair", "pad2d") else default
            continue
        try:
            args[key] = coerce(kind_of_arg, raw[key])
        except ValueError as exc:
            raise SpecError(f"{where} ({kind}): argument {key!r}: {exc}") from None
    if args.get("use_bias") is False and args.get("bias_regularizer") is not None:
        # no bias to regularize: Keras ignores the argument, and so does this spec
        args["bias_regularizer"] = None
    name = raw.get("name", "")
    if not isinstance(name, str) or not (name.isprintable() and len(name) <= 200):
        raise SpecError(f"{where} ({kind}): name must be a one-line string of at most 200 "
                        f"characters, got {shown(name)}")
    layer = LayerSpec(type=kind, args=args, name=name)
    if kind == "Residual":
        layer.children = [make_layer(child, f"{where} inner layer {i}", depth + 1)
                          for i, child in enumerate(args["layers"])]
    return layer


def infer_all(layers: list[LayerSpec], shape: tuple, where: str) -> tuple:
    """Fill in each layer's shapes, parameters and FLOPs from `shape` on; the output shape."""
    for index, layer in enumerate(layers):
        layer_type = REGISTRY[layer.type]
        here = f"{where} layer {index} ({layer.type})"
        if layer_type.image_only and len(shape) != 3:
            raise SpecError(f"{here}: {layer.type} needs an image input (H, W, C) but gets "
                            f"{fmt_shape(shape)}; remove the Flatten before it")
        layer.input_shape = shape
        shape = layer_type.infer(layer, shape, here)
        layer.output_shape = shape
    return shape


def window_of(layer: LayerSpec) -> Window | None:
    """The input window of a layer on an image (see LayerType.window); None otherwise."""
    if len(layer.input_shape) != 3:
        return None
    return REGISTRY[layer.type].window(layer)


# ------------------------------------------------------------------------------ the entries

def _conv_infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    a = layer.args
    (kh, kw), (sh, sw), (h, w, c) = a["kernel_size"], a["strides"], shape
    oh, ow = conv_out(h, kh, sh, a["padding"]), conv_out(w, kw, sw, a["padding"])
    if oh <= 0 or ow <= 0:
        raise SpecError(f"{where}: {layer.type} kernel {kh}x{kw} does not fit its {h}x{w} "
                        f"input (use padding = \"same\" or a smaller kernel)")
    f, bias = a["filters"], a["filters"] if a["use_bias"] else 0
    if layer.type == "SeparableConv2D":
        depth = c * a["depth_multiplier"]  # channels between the depthwise and pointwise steps
        layer.params = kh * kw * depth + depth * f + bias
        layer.flops = 2 * oh * ow * (kh * kw * depth + depth * f)
    else:
        layer.params = kh * kw * c * f + bias
        layer.flops = 2 * oh * ow * f * kh * kw * c
    layer.trainable_params = layer.params
    return (oh, ow, f)


def _conv_window(layer: LayerSpec) -> Window | None:
    a = layer.args
    return (a["kernel_size"], a["strides"]) if a["padding"] == "valid" else None


def _init_bias(module, a: dict, fan_in: int, fan_out: int) -> None:
    if module.bias is not None:
        keras_init(module.bias, a["bias_initializer"], fan_in, fan_out)


def _conv_build(layer: LayerSpec, build_child) -> nn.Module:
    a, (h, w, cin) = layer.args, layer.input_shape
    (kh, kw), cout = a["kernel_size"], a["filters"]
    module = KerasConv2d(cin, cout, (kh, kw), a["strides"], a["padding"], (h, w), a["use_bias"])
    keras_init(module.weight, a["kernel_initializer"], kh * kw * cin, kh * kw * cout)
    _init_bias(module, a, kh * kw * cin, kh * kw * cout)
    return module


def _separable_build(layer: LayerSpec, build_child) -> nn.Module:
    a, (h, w, cin) = layer.args, layer.input_shape
    (kh, kw), multiplier, cout = a["kernel_size"], a["depth_multiplier"], a["filters"]
    depthwise = KerasConv2d(cin, cin * multiplier, (kh, kw), a["strides"], a["padding"], (h, w),
                            bias=False, groups=cin)
    pointwise = nn.Conv2d(cin * multiplier, cout, 1, bias=a["use_bias"])
    # Keras' fans: depthwise kernel (kh, kw, cin, multiplier), pointwise (1, 1, cin*m, filters)
    keras_init(depthwise.weight, a["depthwise_initializer"], kh * kw * cin, kh * kw * multiplier)
    keras_init(pointwise.weight, a["pointwise_initializer"], cin * multiplier, cout)
    _init_bias(pointwise, a, cin * multiplier, cout)
    return SeparableConv2d(depthwise, pointwise)


_CONV_COMMON = {
    "filters": (REQUIRED, "posint"), "kernel_size": (REQUIRED, "pair"), "strides": (1, "pair"),
    "padding": ("valid", "padding"), "activation": (None, "activation"), "use_bias": (True, "bool"),
}
register(LayerType(
    "Conv2D", "conv2d",
    {**_CONV_COMMON, "kernel_initializer": ("glorot_uniform", "initializer"),
     "bias_initializer": ("zeros", "initializer"),
     "kernel_regularizer": (None, "regularizer"), "bias_regularizer": (None, "regularizer")},
    _conv_infer, _conv_build, _conv_window, image_only=True, activation_after=True,
    regularizers={"kernel_regularizer": "weight", "bias_regularizer": "bias"},
    onnx="Conv (with a Pad first for asymmetric 'same' padding)"))
register(LayerType(
    "SeparableConv2D", "separable_conv2d",
    {**_CONV_COMMON, "depth_multiplier": (1, "posint"),
     "depthwise_initializer": ("glorot_uniform", "initializer"),
     "pointwise_initializer": ("glorot_uniform", "initializer"),
     "bias_initializer": ("zeros", "initializer"),
     "depthwise_regularizer": (None, "regularizer"), "pointwise_regularizer": (None, "regularizer"),
     "bias_regularizer": (None, "regularizer")},
    _conv_infer, _separable_build, _conv_window, image_only=True, activation_after=True,
    regularizers={"depthwise_regularizer": "depthwise.weight",
                  "pointwise_regularizer": "pointwise.weight", "bias_regularizer": "pointwise.bias"},
    onnx="two Conv nodes: grouped (group = input channels), then 1x1"))


def _dense_infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    if len(shape) != 1:
        raise SpecError(f"{where}: Dense needs a flat input but gets {fmt_shape(shape)}; "
                        f"add a Flatten or GlobalAveragePooling2D before it")
    n_in, units = shape[0], layer.args["units"]
    layer.params = layer.trainable_params = n_in * units + (units if layer.args["use_bias"] else 0)
    layer.flops = 2 * n_in * units
    return (units,)


def _dense_build(layer: LayerSpec, build_child) -> nn.Module:
    a, n_in = layer.args, layer.input_shape[0]
    module = KerasDense(n_in, a["units"], bias=a["use_bias"])
    keras_init(module.weight, a["kernel_initializer"], n_in, a["units"])
    _init_bias(module, a, n_in, a["units"])
    return module


register(LayerType(
    "Dense", "dense",
    {"units": (REQUIRED, "posint"), "activation": (None, "activation"),
     "use_bias": (True, "bool"), "kernel_initializer": ("glorot_uniform", "initializer"),
     "bias_initializer": ("zeros", "initializer"),
     "kernel_regularizer": (None, "regularizer"), "bias_regularizer": (None, "regularizer")},
    _dense_infer, _dense_build, activation_after=True,
    regularizers={"kernel_regularizer": "weight", "bias_regularizer": "bias"}, onnx="Gemm"))


def _pool_infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    a, (h, w, c) = layer.args, shape
    (ph, pw), (sh, sw) = a["pool_size"], a["strides"] or a["pool_size"]
    oh, ow = conv_out(h, ph, sh, a["padding"]), conv_out(w, pw, sw, a["padding"])
    if oh <= 0 or ow <= 0:
        raise SpecError(f"{where}: {layer.type} pool {ph}x{pw} does not fit its {h}x{w} input")
    layer.flops = oh * ow * c * ph * pw
    return (oh, ow, c)


def _pool_window(layer: LayerSpec) -> Window | None:
    a = layer.args
    return (a["pool_size"], a["strides"] or a["pool_size"]) if a["padding"] == "valid" else None


def _ceil_mode_out(size: int, kernel: int, stride: int) -> int:
    """Windows along one axis of PyTorch's pooling with ceil_mode and no padding."""
    out = -(-(size - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size else out


def _pool_build(layer: LayerSpec, build_child) -> nn.Module:
    a = layer.args
    strides = a["strides"] or a["pool_size"]
    is_max = layer.type == "MaxPooling2D"
    if a["padding"] == "same":
        h, w, _ = layer.input_shape
        left, _, top, _ = keras_same_pads((h, w), a["pool_size"], strides)
        # ceil_mode's windows are Keras' where Keras pads at the end only and both count as
        # many windows (2x2 pools with stride 2, the common case): PyTorch's own pool, which
        # the CPU pass's kernels recognise; else the input padded as Keras pads it
        if (left, top) != (0, 0) or any(
                _ceil_mode_out(size, k, s) != conv_out(size, k, s, "same")
                for size, k, s in zip((h, w), a["pool_size"], strides)):
            return KerasSamePool2d("max" if is_max else "average", a["pool_size"], strides, (h, w))
    cls = nn.MaxPool2d if is_max else nn.AvgPool2d
    return cls(a["pool_size"], stride=strides, ceil_mode=a["padding"] == "same")


_POOL = {"pool_size": (2, "pair"), "strides": (None, "pair"), "padding": ("valid", "padding")}
for _name, _snake in (("MaxPooling2D", "max_pooling2d"), ("AveragePooling2D", "average_pooling2d")):
    register(LayerType(_name, _snake, _POOL, _pool_infer, _pool_build, _pool_window,
                       image_only=True, onnx="MaxPool" if _name.startswith("Max") else "AveragePool"))


def _same_shape(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    return shape


def _pointwise_window(layer: LayerSpec) -> Window:
    return (1, 1), (1, 1)


register(LayerType("Dropout", "dropout", {"rate": (REQUIRED, "rate")}, _same_shape,
                   lambda layer, child: Dropout(layer.args["rate"]), _pointwise_window,
                   onnx="nothing (the identity in inference)"))
register(LayerType("SpatialDropout2D", "spatial_dropout2d", {"rate": (REQUIRED, "rate")},
                   _same_shape, lambda layer, child: nn.Dropout2d(layer.args["rate"]),
                   _pointwise_window, image_only=True, onnx="nothing (the identity in inference)"))
register(LayerType("Activation", "activation", {"activation": (REQUIRED, "activation")},
                   _same_shape,
                   lambda layer, child: activation_module(layer.args["activation"]) or nn.Identity(),
                   _pointwise_window, onnx="the activation's operator"))
register(LayerType("Flatten", "flatten", {}, lambda layer, shape, where: (math.prod(shape),),
                   lambda layer, child: Flatten(), onnx="Flatten, in (C, H, W) order"))


def _global_build(layer: LayerSpec, build_child) -> nn.Module:
    pool = nn.AdaptiveAvgPool2d(1) if layer.type == "GlobalAveragePooling2D" else nn.AdaptiveMaxPool2d(1)
    return nn.Sequential(pool, Flatten())


for _name, _snake in (("GlobalAveragePooling2D", "global_average_pooling2d"),
                      ("GlobalMaxPooling2D", "global_max_pooling2d")):
    register(LayerType(_name, _snake, {}, lambda layer, shape, where: (shape[2],), _global_build,
                       image_only=True, onnx="GlobalAveragePool / GlobalMaxPool, then Flatten"))


def _batchnorm_infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    a, channels = layer.args, shape[-1]
    trainable = channels * (int(a["center"]) + int(a["scale"]))
    layer.trainable_params = trainable
    layer.params = trainable + 2 * channels  # + moving mean and variance (non-trainable)
    layer.flops = 2 * math.prod(shape)
    return shape


def _batchnorm_build(layer: LayerSpec, build_child) -> nn.Module:
    a, shape = layer.args, layer.input_shape
    # Keras: moving = momentum * moving + (1 - momentum) * batch; PyTorch uses the complement.
    # Keras normalises with the biased batch variance and updates the moving variance with
    # the unbiased one, as PyTorch does.
    cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    module = cls(shape[-1], eps=a["epsilon"], momentum=1.0 - a["momentum"],
                 affine=a["center"] or a["scale"])
    if module.affine:
        module.weight.requires_grad_(a["scale"])
        module.bias.requires_grad_(a["center"])
    return module


register(LayerType("BatchNormalization", "batch_normalization",
                   {"momentum": (0.99, "rate"), "epsilon": (1e-3, "posfloat"),
                    "center": (True, "bool"), "scale": (True, "bool")},
                   _batchnorm_infer, _batchnorm_build,
                   onnx="BatchNormalization (folded into the Conv by the exporter's optimizer)"))


def _zero_pad_infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    (top, bottom), (left, right) = layer.args["padding"]
    return (shape[0] + top + bottom, shape[1] + left + right, shape[2])


def _zero_pad_build(layer: LayerSpec, build_child) -> nn.Module:
    (top, bottom), (left, right) = layer.args["padding"]
    return nn.ZeroPad2d((left, right, top, bottom))


register(LayerType("ZeroPadding2D", "zero_padding2d", {"padding": (1, "pad2d")}, _zero_pad_infer,
                   _zero_pad_build, image_only=True, onnx="Pad"))


def _residual_infer(layer: LayerSpec, shape: tuple, where: str) -> tuple:
    """out = activation(layers(x) + shortcut(x)); the shortcut is the identity, or a 1x1
    Conv2D (+ BatchNormalization) when the shape changes (He et al. 2016, option B)."""
    main = infer_all(layer.children, shape, f"{where} (inside)")
    layer.shortcut = []
    if main != shape:
        if len(main) != 3:
            raise SpecError(f"{where}: the layers of a Residual block must keep an image shape")
        stride_h, stride_w = math.ceil(shape[0] / main[0]), math.ceil(shape[1] / main[1])
        layer.shortcut = [make_layer({"type": "Conv2D", "filters": main[2], "kernel_size": 1,
                                      "strides": [stride_h, stride_w], "use_bias": False},
                                     f"{where} shortcut"),
                          make_layer({"type": "BatchNormalization"}, f"{where} shortcut")]
        if infer_all(layer.shortcut, shape, f"{where} shortcut") != main:
            raise SpecError(f"{where}: the shortcut cannot match the block's output "
                            f"{fmt_shape(main)} from {fmt_shape(shape)}")
    inner = layer.children + layer.shortcut
    layer.params = sum(child.params for child in inner)
    layer.trainable_params = sum(child.trainable_params for child in inner)
    layer.flops = sum(child.flops for child in inner) + math.prod(main)
    return main


def _residual_build(layer: LayerSpec, build_child) -> nn.Module:
    body = nn.Sequential(*[build_child(child) for child in layer.children])
    shortcut = (nn.Sequential(*[build_child(child) for child in layer.shortcut])
                if layer.shortcut else nn.Identity())
    return Residual(body, shortcut, activation_module(layer.args["activation"]))


register(LayerType("Residual", "residual",
                   {"layers": (REQUIRED, "layers"), "activation": ("relu", "activation")},
                   _residual_infer, _residual_build, image_only=True,
                   onnx="the inner layers' operators, then Add"))
