"""The PyTorch modules that Keras layers become (build.py assembles them): Keras' 'same'
padding, initializers and activations, inverted dropout, (C, H, W) flattening, residual
blocks and depthwise-separable convolutions. Plain PyTorch, on any device: the CPU's speed
paths for these layers live in cpu_pass.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


_ACTIVATIONS = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "elu": nn.ELU, "selu": nn.SELU,
    "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "relu6": nn.ReLU6,
    "softplus": nn.Softplus, "leaky_relu": lambda: nn.LeakyReLU(0.2),  # Keras' default slope
}


def activation_module(name: str | None) -> nn.Module | None:
    # softmax on the last layer is fused into the cross-entropy loss; None/linear is the identity.
    if name in (None, "softmax"):
        return None
    return _ACTIVATIONS[name]()


def keras_init(tensor: torch.Tensor, name: str, fan_in: int, fan_out: int, generator=None) -> None:
    """Keras initializers. Conv fans count the receptive field: fan_in = kh*kw*in_channels."""
    with torch.no_grad():
        if name == "zeros":
            tensor.zero_()
        elif name == "ones":
            tensor.fill_(1.0)
        elif name.endswith("_uniform"):
            scale = {"glorot": 2.0 / (fan_in + fan_out), "he": 2.0 / fan_in,
                     "lecun": 1.0 / fan_in}.get(name.split("_")[0])
            if scale is None:  # random_uniform: Keras' default range is +-0.05
                tensor.uniform_(-0.05, 0.05, generator=generator)
            else:
                limit = math.sqrt(3.0 * scale)
                tensor.uniform_(-limit, limit, generator=generator)
        elif name.endswith("_normal"):
            scale = {"glorot": 2.0 / (fan_in + fan_out), "he": 2.0 / fan_in,
                     "lecun": 1.0 / fan_in}.get(name.split("_")[0])
            if scale is None:  # random_normal: Keras' default stddev 0.05
                tensor.normal_(0.0, 0.05, generator=generator)
            else:  # Keras uses a normal truncated at 2 stddev, stddev corrected by 0.8796
                std = math.sqrt(scale) / 0.87962566103423978
                nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std, generator=generator)
        else:
            raise ValueError(name)


def keras_same_pads(input_hw: tuple[int, int], kernel: tuple[int, int],
                    strides: tuple[int, int]) -> tuple[int, int, int, int]:
    """Keras' (TensorFlow's) 'same' padding as F.pad's (left, right, top, bottom): enough for
    ceil(size / stride) outputs along each axis, the odd one at the bottom/right."""
    pads = []
    for size, k, s in zip(input_hw, kernel, strides):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class KerasSamePool2d(nn.Module):
    """MaxPooling2D or AveragePooling2D with padding='same' where PyTorch's ceil_mode windows
    are not Keras' (a stride smaller than the pool, or a padding of 2 or more that Keras
    splits before and after): the input padded as Keras pads it, the maximum taken over the
    real values only (padding -inf), the average over the real values in each window."""

    def __init__(self, kind: str, pool_size: tuple[int, int], strides: tuple[int, int],
                 input_hw: tuple[int, int]):
        super().__init__()
        self.kind, self.pool_size, self.stride = kind, tuple(pool_size), tuple(strides)
        self.pads = keras_same_pads(input_hw, pool_size, strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return F.max_pool2d(F.pad(x, self.pads, value=float("-inf")), self.pool_size,
                                self.stride)
        # the mean of the real values: window sums over the count of real values in each
        # window (a padded ones map, (1, 1, H, W), pooled the same way)
        ones = F.pad(torch.ones_like(x[:1, :1]), self.pads)
        return (F.avg_pool2d(F.pad(x, self.pads), self.pool_size, self.stride)
                / F.avg_pool2d(ones, self.pool_size, self.stride))

    def extra_repr(self) -> str:
        return f"{self.kind}, pool_size={self.pool_size}, stride={self.stride}, pads={self.pads}"


class KerasConv2d(nn.Conv2d):
    """Conv2D with Keras' 'same' padding for any stride (extra row/column at bottom/right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 strides: tuple[int, int], padding: str, input_hw: tuple[int, int],
                 bias: bool = True, groups: int = 1):
        (kh, kw), (sh, sw) = kernel_size, strides
        super().__init__(in_channels, out_channels, (kh, kw), stride=(sh, sw), padding=0,
                         bias=bias, groups=groups)
        self.same_pad = None
        if padding == "same":
            self.same_pad = keras_same_pads(input_hw, (kh, kw), (sh, sw))
            left, right, top, bottom = self.same_pad
            if left == right and top == bottom:  # symmetric: let the conv pad (faster)
                self.padding, self.same_pad = (top, left), None

    def forward(self, x):
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        return super().forward(x)


class KerasDense(nn.Linear):
    """Dense: nn.Linear (its kernel stored (out, in), Keras' transposed)."""


class Residual(nn.Module):
    def __init__(self, body: nn.Sequential, shortcut: nn.Module, activation: nn.Module | None):
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.activation = activation or nn.Identity()

    def forward(self, x):
        return self.activation(self.body(x) + self.shortcut(x))


class Dropout(nn.Module):
    """Inverted dropout, as Keras: zero each value with probability `rate` in training and scale
    the rest by 1/(1-rate); the identity in eval mode. The mask comes from the device's global
    generator (torch.nn.functional.dropout)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        return F.dropout(x, self.rate, training=True)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Flatten(nn.Module):
    """Flattens in (C, H, W) order. Keras flattens (H, W, C); this only matters for imported weights."""

    def forward(self, x):
        return x.flatten(1)


class SeparableConv2d(nn.Module):
    """Keras' SeparableConv2D: a depthwise convolution (each input channel by its own
    `depth_multiplier` kernels, no bias) then a 1x1 pointwise convolution to `filters`.
    (B, C, H, W) -> (B, filters, H', W')."""

    def __init__(self, depthwise: KerasConv2d, pointwise: nn.Conv2d):
        super().__init__()
        self.depthwise, self.pointwise = depthwise, pointwise

    def forward(self, x):
        return self.pointwise(self.depthwise(x))
