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

from . import kernels
from .args import Regularizer
from .layers import REGISTRY, LayerSpec
from .modules import Dropout, Flatten, activation_module
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


def _with_relu(layer: nn.Module) -> bool:
    """Whether `layer` is a (module, ReLU) pair, as _layer builds a layer with
    activation="relu" and _pool_before_relu a pool followed by the ReLU."""
    return isinstance(layer, nn.Sequential) and len(layer) == 2 and isinstance(layer[1], nn.ReLU)


def _pool_before_relu(layers: nn.ModuleList) -> None:
    """Conv2D(relu) then MaxPooling2D: apply the ReLU after the pool instead.

    max and ReLU are both monotone, so relu(maxpool(z)) == maxpool(relu(z)) exactly, values and
    gradients alike; the ReLU then runs (forward and backward) on a 4x smaller tensor, which
    saves about a tenth of model1's step time. The layers keep their names and parameters.
    """
    for i in range(len(layers) - 1):
        conv, pool = layers[i], layers[i + 1]
        if _with_relu(conv) and isinstance(pool, nn.MaxPool2d):
            layers[i] = conv[0]
            layers[i + 1] = nn.Sequential(pool, nn.ReLU())


def _is_pool_block(layer: nn.Module) -> bool:
    """A 2x2 max pool that kernels.max_pool2 computes, alone or as (pool, ReLU)."""
    return kernels.pool_eligible(layer[0] if _with_relu(layer) else layer)


def _dropout_after(layers: nn.ModuleList, i: int) -> Dropout | None:
    after = layers[i + 1] if i + 1 < len(layers) else None
    return after if isinstance(after, Dropout) else None


class KerasSequential(nn.Module):
    """A stack of layers built from a ModelSpec. forward() returns logits (B, n_classes).

    Inputs are (B, C, H, W) tensors, best in channels_last memory format.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self._regularized: list[tuple[nn.Parameter, Regularizer]] = []
        self.layers = nn.ModuleList(build_layer(layer, self._regularized) for layer in spec.layers)
        self.layer_names = [layer.name for layer in spec.layers]
        _pool_before_relu(self.layers)
        # layer indices i where layers i and i+1 are conv -> (pool, ReLU), a block that
        # kernels.conv1_pool_relu computes in one pass (the same parameters, the same results)
        self.fusable = [i for i in range(len(self.layers) - 1)
                        if _with_relu(self.layers[i + 1])
                        and kernels.eligible(self.layers[i], self.layers[i + 1][0])]
        # layer index i -> (relu, dropout) where layer i is a 2x2 max pool (or a pool then
        # ReLU) that kernels.max_pool2 computes, with the Dropout layer i+1 fused in, or None
        self.pools = {i: (_with_relu(layer), _dropout_after(self.layers, i))
                      for i, layer in enumerate(self.layers) if _is_pool_block(layer)}
        # layer indices i where layer i is (module, ReLU) and layer i+1 a Flatten: forward()
        # applies the ReLU after the Flatten (equal values and gradients). For a channels_last
        # input the Flatten copies into (C, H, W) order, and its gradient comes back in that
        # order: a ReLU before it would take its backward pass across two memory layouts,
        # element by element (about 70 us of a seed model2 step at batch 32).
        self.relu_after_flatten = {i for i in range(len(self.layers) - 1)
                                   if _with_relu(self.layers[i])
                                   and isinstance(self.layers[i + 1], Flatten)}
        self.use_fused_kernels = True  # False: run every layer through PyTorch
        # The rows and columns of the input that the output depends on (spec.read_extent): a
        # model whose pools drop the last row of an odd-sized map never reads the image's last
        # rows, and computing the convolution outputs that lead only there is wasted work
        # (model1: 26 x 26 of 28 x 28, 15 % of its arithmetic). forward() crops them away.
        self.input_crop = spec.input_crop

    @property
    def use_fused_kernels(self) -> bool:
        """Whether forward() may use the C kernels (the fused first block, dropout); False runs
        every layer through PyTorch."""
        return self._use_fused_kernels

    @use_fused_kernels.setter
    def use_fused_kernels(self, value: bool) -> None:
        self._use_fused_kernels = bool(value)
        for module in self.modules():
            if isinstance(module, Dropout):
                module.use_kernel = self._use_fused_kernels

    @property
    def runs_fused_dropout(self) -> bool:
        """Whether the model's Dropout layers run kernels.dropout (for float32 and bfloat16 CPU
        inputs)."""
        return (self.use_fused_kernels and kernels.available()
                and any(isinstance(m, Dropout) for m in self.modules()))

    @property
    def runs_fused_pool(self) -> bool:
        """Whether forward() hands 2x2 max pools (with a ReLU and a Dropout after them) to
        kernels.max_pool2 (for float32 and bfloat16 CPU inputs)."""
        return bool(self.pools) and self.use_fused_kernels and kernels.available()

    @property
    def runs_fused_block(self) -> bool:
        """Whether forward() hands a block to kernels.conv1_pool_relu (for a float32 CPU input
        that needs no gradient; compiling the kernel on the first call)."""
        return bool(self.fusable) and self.use_fused_kernels and kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eager = not torch.compiler.is_compiling()
        fused = self.fusable if eager and self.runs_fused_block else ()
        pools = self.pools if eager and self.runs_fused_pool else {}
        if self.input_crop is not None:
            x = x[:, :, :self.input_crop[0], :self.input_crop[1]]
        i, layers = 0, self.layers
        while i < len(layers):
            if (i in fused and x.device.type == "cpu" and x.dtype == torch.float32
                    and not x.requires_grad):
                conv = layers[i]
                x = kernels.conv1_pool_relu(x, conv.weight, conv.bias)
                i += 2
            elif i in self.relu_after_flatten:
                module, relu = layers[i]
                x = relu(layers[i + 1](module(x)))
                i += 2
            elif i in pools and kernels.max_pool2_takes(x):
                relu, dropout = pools[i]
                rate = dropout.rate if dropout is not None and dropout.training else 0.0
                x = kernels.max_pool2(x, relu, rate)
                i += 1 if dropout is None else 2
            else:
                x = layers[i](x)
                i += 1
        return x

    @property
    def has_regularizers(self) -> bool:
        return bool(self._regularized)

    def regularization_penalty(self) -> torch.Tensor:
        """Keras' penalty, summed over layers: l1 * sum(|w|) + l2 * sum(w**2), no 1/2."""
        total = torch.zeros((), dtype=torch.float32)
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
                out.append((name, core.weight.detach()))
        return out


def build_model(spec: ModelSpec, seed: int | None = None) -> KerasSequential:
    """Build the module; with `seed`, the initial weights depend on nothing else."""
    if seed is None:
        return KerasSequential(spec).to(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return KerasSequential(spec).to(memory_format=torch.channels_last)
