"""The PyTorch modules that Keras layers become (build.py assembles them): Keras' 'same'
padding, initializers and activations, inverted dropout, (C, H, W) flattening, residual
blocks, depthwise-separable convolutions, and the CPU speed paths of Conv2D and Dense that
compute the same values (the small-output convolution's weight gradient, small Dense calls in
float32 under bf16 autocast).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..perf import cpu_autocast_is_bf16
from . import kernels


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
            h, w = input_hw
            pad_h = max((math.ceil(h / sh) - 1) * sh + kh - h, 0)
            pad_w = max((math.ceil(w / sw) - 1) * sw + kw - w, 0)
            self.same_pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            if pad_h % 2 == 0 and pad_w % 2 == 0:  # symmetric: let the conv pad (faster)
                self.padding, self.same_pad = (pad_h // 2, pad_w // 2), None

    def forward(self, x):
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        if self._small_output_bf16(x):
            cast = torch.bfloat16
            with torch.autocast("cpu", enabled=False):
                return _SmallOutputConv.apply(
                    x.to(cast), self.weight.to(cast),
                    self.bias.to(cast) if self.bias is not None else None)
        return super().forward(x)

    def _small_output_bf16(self, x: torch.Tensor) -> bool:
        """Whether the weight gradient is better taken as one matrix product (see
        _SmallOutputConv): bf16 training of a plain convolution with at most
        SMALL_OUTPUT_POSITIONS output positions."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu"
                and cpu_autocast_is_bf16() and not torch.compiler.is_compiling()):
            return False
        if (self.stride != (1, 1) or self.padding != (0, 0) or self.dilation != (1, 1)
                or self.groups != 1 or x.dim() != 4):
            return False
        kh, kw = self.kernel_size
        return (x.shape[2] - kh + 1) * (x.shape[3] - kw + 1) <= SMALL_OUTPUT_POSITIONS


# Output positions up to which _SmallOutputConv is used. Measured with bf16, channels_last, two
# threads (benchmarks/RESULTS.md): model1's third convolution (5x5 -> 3x3, 64 channels) takes
# its weight gradient in 0.80 ms as a product against 2.31 ms through oneDNN at batch 128
# (0.22 / 0.61 ms for model2's at batch 32); the second (13x13 -> 11x11) is twice as slow
# that way, so the line lies between 9 and 121 positions.
SMALL_OUTPUT_POSITIONS = 16


class _SmallOutputConv(torch.autograd.Function):
    """conv2d (stride 1, no padding) whose weight gradient is one matrix product.

    oneDNN's bf16 backward-weights kernel is slow on small images (a 3x3 output): there, the
    product of the output gradient (C_out, N*oh*ow) with the input patches (N*oh*ow, k*k*C_in),
    gathered from the channels_last input, is 2-3x faster. Forward and the input gradient stay
    with oneDNN. Inputs arrive already in bf16 (the caller casts, as autocast would).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        n, channels, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        oh, ow = height - kh + 1, width - kw + 1
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view, contiguous for channels_last x
        s = rows.stride()
        # (N*oh*ow, kh*kw*C) patches: position (i, j) takes rows i..i+kh-1, columns j..j+kw-1
        patches = rows.as_strided((n, oh, ow, kh, kw, channels),
                                  (s[0], s[1], s[2], s[1], s[2], s[3]))
        patches = patches.reshape(-1, kh * kw * channels)
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (N*oh*ow, C_out)
        grad_weight = (grad_rows.t() @ patches).view(out_channels, kh, kw, channels)
        grad_weight = grad_weight.permute(0, 3, 1, 2)  # (C_out, C_in, kh, kw), channels_last
        grad_bias = grad_rows.sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class KerasDense(nn.Linear):
    """Dense: nn.Linear whose small calls stay in float32 under bf16 autocast.

    A bf16 matrix product goes through oneDNN, whose per-call set-up dominates for the small
    dense layers of the seed's models: forward and backward of model2's 432 -> 48 layer at
    batch 32 took 330-440 us in bf16 against 176-261 us in float32, its 48 -> 10 layer 272
    against 109 us; at 128 x 576 -> 64 the two were within 10 %. A larger input turns it
    around: for `fastnet`'s 864 -> 10 head at batch 256, float32 took 509 us and bf16 438 (the
    input's cast to float32 and its gradient's cast back cost more than the call set-up saved).
    So a training call with at most FLOAT32_DENSE_MACS multiply-adds and FLOAT32_DENSE_INPUTS
    input values computes in float32 (more exact, and faster), and returns float32, which the
    next bf16 operation casts as autocast would. Inference (no gradient) stays in bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._small_call_in_bf16(x):
            with torch.autocast("cpu", enabled=False):
                return F.linear(x.float(), self.weight, self.bias)
        return super().forward(x)

    def _small_call_in_bf16(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or not torch.is_grad_enabled() or not cpu_autocast_is_bf16():
            return False
        return (x.numel() <= FLOAT32_DENSE_INPUTS
                and x.numel() * self.out_features <= FLOAT32_DENSE_MACS)


# Limits of a KerasDense training call that stays in float32 under bf16 autocast (measured, see
# above): multiply-adds, below the 4.7 million of model1's 576 -> 64 layer at batch 128, where
# the two took about the same time; and input values, above the 13,824 of model2's 432 -> 48
# layer at batch 32 and below the 73,728 of model1's 576 -> 64 at batch 128 (the two about
# equal) and fastnet's 221,184 (bf16 faster). At this line the recipes that train in bf16 by
# default (`fast`, `best`) keep every Dense call in bf16, their last partial batch included.
FLOAT32_DENSE_MACS = 4_000_000
FLOAT32_DENSE_INPUTS = 16_384


class Residual(nn.Module):
    def __init__(self, body: nn.Sequential, shortcut: nn.Module, activation: nn.Module | None):
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.activation = activation or nn.Identity()

    def forward(self, x):
        return self.activation(self.body(x) + self.shortcut(x))


class Dropout(nn.Module):
    """Inverted dropout, as nn.Dropout (and Keras): zero each value with probability `rate` in
    training and scale the rest by 1/(1-rate); the identity in eval mode.

    On the CPU, for float32 and bfloat16, this runs kernels.dropout: one pass each way, the
    mask a hash of a seed drawn from torch's generator, recomputed in the backward pass instead
    of stored (drop probability `rate` rounded to a multiple of 1/65536). Elsewhere (no C
    compiler, other dtypes or devices, inside torch.compile, use_kernel False) the keep-mask is
    drawn as 15-bit integers from 64-bit random words (four values per draw of the generator)
    instead of a float per value: on CPU, torch.rand_like took a tenth of model3's batch-32 step
    and bernoulli_ more; this is about 6x cheaper. There the drop probability is `rate` rounded
    to a multiple of 1/32768. Inside torch.compile the mask is torch.rand_like's. Either way a
    checkpoint that saves the generator's state resumes with the same masks.
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate
        self.use_kernel = True  # KerasSequential.use_fused_kernels sets this

    def runs_kernel(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and x.device.type == "cpu" and x.dtype in kernels.DROPOUT_DTYPES
                and not torch.compiler.is_compiling() and kernels.available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        if self.runs_kernel(x):
            return kernels.dropout(x, self.rate)
        if torch.compiler.is_compiling():
            # inductor draws and applies the mask in one generated loop; the int16 view of
            # int64 words below breaks its alias tracking (torch 2.13)
            keep = torch.rand_like(x) >= self.rate
        else:
            keep = uniform_15bit_like(x) >= round(self.rate * 32768)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.rate))

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def uniform_15bit_like(x: torch.Tensor) -> torch.Tensor:
    """Independent uniform integers in [0, 32768), int16, shaped and laid out like `x`.

    One int64 draw of the global generator gives four 16-bit lanes; random_() fills only the
    low 63 bits, so each lane keeps its low 15 bits (all uniform). The result is a view with
    x's memory layout (channels_last stays channels_last), so the mask multiply stays a
    same-layout elementwise op.
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    lanes = words.view(torch.int16)[:n].bitwise_and_(0x7FFF)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        batch, channels, height, width = x.shape
        return lanes.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return lanes.view(x.shape)


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
