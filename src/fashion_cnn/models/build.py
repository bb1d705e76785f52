"""Spec -> nn.Module: each layer from the registry (layers.py), with Keras' initializers and
per-layer regularizers, assembled into KerasSequential.

>>> from fashion_cnn.models.zoo import get_model_spec
>>> model = build_model(get_model_spec("model1"))    # doctest: +SKIP
>>> model(torch.zeros(2, 1, 28, 28)).shape           # doctest: +SKIP
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from .args import Regularizer
from .layers import REGISTRY, LayerSpec
from .modules import activation_module
from .spec import ModelSpec


def build_layer(spec: LayerSpec, regularized: list) -> nn.Module:
    """The module of one layer (the registry's builder), with its activation after it as a
    (module, activation) pair; appends (parameter, Regularizer) for each regularizer set."""
    layer_type = REGISTRY[spec.type]
    module = layer_type.build(spec, lambda child: build_layer(child, regularized))
    for key, path in layer_type.regularizers.items():
        reg = spec.args.get(key)
        param = module.get_parameter(path) if reg is not None else None
        if param is not None:
            regularized.append((param, reg))
    activation = activation_module(spec.args.get("activation")) if layer_type.activation_after else None
    return nn.Sequential(module, activation) if activation is not None else module


def with_relu(layer: nn.Module) -> bool:
    """Whether `layer` is a (module, ReLU) pair, as build_layer builds a layer with
    activation="relu" and _pool_before_relu a pool followed by the ReLU."""
    return isinstance(layer, nn.Sequential) and len(layer) == 2 and isinstance(layer[1], nn.ReLU)


def _pool_before_relu(layers: nn.ModuleList) -> None:
    """Conv2D(relu) then MaxPooling2D: apply the ReLU after the pool instead.

    max and ReLU are both monotone, so relu(maxpool(z)) == maxpool(relu(z)) exactly, values and
    gradients alike, on any device; the ReLU then runs (forward and backward) on a 4x smaller
    tensor. The layers keep their names and parameters, and this arrangement fixes the names
    of the state_dict (a conv before a pool is "layers.i.weight", not "layers.i.0.weight").
    """
    for i in range(len(layers) - 1):
        conv, pool = layers[i], layers[i + 1]
        if with_relu(conv) and isinstance(pool, nn.MaxPool2d):
            layers[i] = conv[0]
            layers[i + 1] = nn.Sequential(pool, nn.ReLU())


class KerasSequential(nn.Module):
    """A stack of layers built from a ModelSpec: plain PyTorch on any device. forward() maps
    images (B, C, H, W), best in channels_last memory format, to logits (B, n_classes).

    This is the model exactly as its spec says. The CPU's speed paths (the C kernels and the
    rest) are a separate pass, models.cpu_pass.accelerate, which computes the same function.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self._regularized: list[tuple[nn.Parameter, Regularizer]] = []
        self.layers = nn.ModuleList(build_layer(layer, self._regularized) for layer in spec.layers)
        self.layer_names = [layer.name for layer in spec.layers]
        _pool_before_relu(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @property
    def has_regularizers(self) -> bool:
        return bool(self._regularized)

    def regularization_penalty(self) -> torch.Tensor:
        """Keras' penalty, summed over layers: l1 * sum(|w|) + l2 * sum(w**2), no 1/2."""
        total = torch.zeros((), dtype=torch.float32, device=self._regularized[0][0].device
                            if self._regularized else None)
        for param, reg in self._regularized:
            if not param.requires_grad:
                continue
            if reg.l2:
                total = total + reg.l2 * param.float().square().sum()
            if reg.l1:
                total = total + reg.l1 * param.float().abs().sum()
        return total

    def named_weight_layers(self) -> list[tuple[str, torch.Tensor]]:
        """(layer name, kernel) for every Conv2D and Dense layer, in order (for histograms)."""
        out = []
        for name, layer in zip(self.layer_names, self.layers):
            core = layer[0] if isinstance(layer, nn.Sequential) else layer  # (module, activation)
            if isinstance(core, (nn.Conv2d, nn.Linear)):
                out.append((name, core.weight.detach().cpu()))
        return out


def build_model(spec: ModelSpec, seed: int | None = None) -> KerasSequential:
    """Build the module on the CPU, as its spec says (see cpu_pass.accelerate for the CPU's
    speed paths); with `seed`, the initial weights depend on nothing else. Move it with
    .to(device) as any module."""
    if seed is None:
        return KerasSequential(spec).to(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return KerasSequential(spec).to(memory_format=torch.channels_last)
