"""The CPU pass: the same model, computed faster on a CPU.

    >>> model = accelerate(build_model(spec))   # doctest: +SKIP

build_model returns the model exactly as its spec says, in plain PyTorch, for any device.
`accelerate` turns it, in place, into one whose CPU forward and backward passes take the C
kernels (kernels/) and a few CPU-only paths, computing the same function with the same
parameters and state_dict:

- the first block conv -> pool -> ReLU in one pass (kernels.conv1_pool_relu) when no gradient
  is needed, 2x2 max pools with their ReLU and Dropout in one pass (kernels.max_pool2),
  dropout as a hashed mask recomputed in the backward pass (kernels.dropout): on CPUs with
  AVX-512 or AVX2 by default, where they are faster (kernels.fused_layers_pay_off; the
  model's `use_fused_kernels` switches them);
- without a C compiler, dropout masks as 15-bit integers from 64-bit random words;
- the small-output convolution's bf16 weight gradient as one matrix product, small Dense
  training calls in float32 under bf16 autocast (oneDNN's per-call set-up dominates there);
- the input rows and columns the output never reads cropped away (spec.read_extent), and a
  ReLU before a Flatten applied after it (both exact).

Values agree with the plain model to float rounding, gradients too (tests/test_cpu_pass.py);
only dropout draws its masks differently. Every path checks that its input is a CPU tensor,
so an accelerated model moved to another device computes through PyTorch there; `plain`
undoes the pass (the ONNX exporter needs the plain model: the C kernels are opaque to it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..perf import cpu_autocast_is_bf16
from . import kernels
from .build import KerasSequential, with_relu
from .modules import Dropout, Flatten, KerasConv2d, KerasDense


def accelerate(model: nn.Module) -> nn.Module:
    """Give a spec model (KerasSequential) the CPU's speed paths, in place; the same model.
    Other modules (a plain nn.Module of the user's) are returned as they are."""
    if not isinstance(model, KerasSequential) or isinstance(model, CpuSequential):
        return model
    for module in model.modules():
        for plain_type, fast_type in _FAST_TYPES.items():
            if type(module) is plain_type:
                # a subclass with the same fields and methods added: the module keeps its
                # parameters (optimizers holding them stay valid) and its state_dict names
                module.__class__ = fast_type
    model.__class__ = CpuSequential
    model.plan_cpu_paths()
    return model


def plain(model: nn.Module) -> nn.Module:
    """Undo accelerate, in place: every module back to its plain type; the same model."""
    for module in model.modules():
        for plain_type, fast_type in _FAST_TYPES.items():
            if type(module) is fast_type:
                module.__class__ = plain_type
    if type(model) is CpuSequential:
        model.__class__ = KerasSequential
    return model


def is_accelerated(model: nn.Module) -> bool:
    return isinstance(model, CpuSequential)


def _is_pool_block(layer: nn.Module) -> bool:
    """A 2x2 max pool that kernels.max_pool2 computes, alone or as (pool, ReLU)."""
    return kernels.pool_eligible(layer[0] if with_relu(layer) else layer)


def _dropout_after(layers: nn.ModuleList, i: int) -> Dropout | None:
    after = layers[i + 1] if i + 1 < len(layers) else None
    return after if isinstance(after, Dropout) else None


class CpuSequential(KerasSequential):
    """KerasSequential with the CPU's speed paths (made by accelerate, never built directly)."""

    def plan_cpu_paths(self) -> None:
        """Find the layers the fused paths take; called by accelerate."""
        layers = self.layers
        # layer indices i where layers i and i+1 are conv -> (pool, ReLU), a block that
        # kernels.conv1_pool_relu computes in one pass (the same parameters, the same results)
        self.fusable = [i for i in range(len(layers) - 1)
                        if with_relu(layers[i + 1]) and kernels.eligible(layers[i], layers[i + 1][0])]
        # layer index i -> (relu, dropout) where layer i is a 2x2 max pool (or a pool then
        # ReLU) that kernels.max_pool2 computes, with the Dropout layer i+1 fused in, or None
        self.pools = {i: (with_relu(layer), _dropout_after(layers, i))
                      for i, layer in enumerate(layers) if _is_pool_block(layer)}
        # layer indices i where layer i is (module, ReLU) and layer i+1 a Flatten: forward()
        # applies the ReLU after the Flatten (equal values and gradients). For a channels_last
        # input the Flatten copies into (C, H, W) order, and its gradient comes back in that
        # order: a ReLU before it would take its backward pass across two memory layouts,
        # element by element.
        self.relu_after_flatten = {i for i in range(len(layers) - 1)
                                   if with_relu(layers[i]) and isinstance(layers[i + 1], Flatten)}
        # The rows and columns of the input that the output depends on (spec.read_extent): a
        # model whose pools drop the last row of an odd-sized map never reads the image's last
        # rows, and computing the convolution outputs that lead only there is wasted work
        # (model1: 26 x 26 of 28 x 28, 15 % of its arithmetic). forward() crops them away.
        self.input_crop = self.spec.input_crop
        # the fused kernels only where they are faster than PyTorch's layers (AVX-512 and AVX2)
        self.use_fused_kernels = kernels.fused_layers_pay_off()

    @property
    def use_fused_kernels(self) -> bool:
        """Whether forward() may use the C kernels (the fused first block, pools, dropout);
        False runs every layer through PyTorch (the other CPU paths stay)."""
        return self._use_fused_kernels

    @use_fused_kernels.setter
    def use_fused_kernels(self, value: bool) -> None:
        self._use_fused_kernels = bool(value)
        for module in self.modules():
            if isinstance(module, CpuDropout):
                module.use_kernel = self._use_fused_kernels

    @property
    def runs_fused_dropout(self) -> bool:
        """Whether the model's Dropout layers run kernels.dropout (float32 and bfloat16 CPU
        inputs)."""
        return (self.use_fused_kernels and kernels.available()
                and any(isinstance(m, Dropout) for m in self.modules()))

    @property
    def runs_fused_pool(self) -> bool:
        """Whether forward() hands 2x2 max pools (with a ReLU and a Dropout after them) to
        kernels.max_pool2 (float32 and bfloat16 CPU inputs)."""
        return bool(self.pools) and self.use_fused_kernels and kernels.available()

    @property
    def runs_fused_block(self) -> bool:
        """Whether forward() hands a block to kernels.conv1_pool_relu (a float32 CPU input
        that needs no gradient; compiling the kernel on the first call)."""
        return bool(self.fusable) and self.use_fused_kernels and kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_cpu = x.device.type == "cpu"
        eager = on_cpu and not torch.compiler.is_compiling()
        fused = self.fusable if eager and self.runs_fused_block else ()
        pools = self.pools if eager and self.runs_fused_pool else {}
        if self.input_crop is not None:
            x = x[:, :, :self.input_crop[0], :self.input_crop[1]]
        i, layers = 0, self.layers
        while i < len(layers):
            if i in fused and x.dtype == torch.float32 and not x.requires_grad:
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


class CpuConv2d(KerasConv2d):
    """KerasConv2d whose bf16 training on small outputs takes the weight gradient as one
    matrix product (_SmallOutputConv)."""

    def forward(self, x):
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        if self._small_output_bf16(x):
            cast = torch.bfloat16
            with torch.autocast("cpu", enabled=False):
                return _SmallOutputConv.apply(
                    x.to(cast), self.weight.to(cast),
                    self.bias.to(cast) if self.bias is not None else None)
        return nn.Conv2d.forward(self, x)  # x already padded

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
# its weight gradient 2-3x faster as a product than through oneDNN; the second
# (13x13 -> 11x11) is twice as slow that way, so the line lies between 9 and 121 positions.
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


class CpuDense(KerasDense):
    """KerasDense whose small training calls stay in float32 under bf16 autocast.

    A bf16 matrix product goes through oneDNN, whose per-call set-up dominates for the small
    dense layers of the seed's models (model2's 432 -> 48 and 48 -> 10 layers at batch 32 were
    faster in float32); at 128 x 576 -> 64 the two were within 10 %, and for `fastnet`'s
    864 -> 10 head at batch 256 bf16 was faster (the casts cost more than the set-up saved).
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


# Limits of a CpuDense training call that stays in float32 under bf16 autocast (measured, see
# benchmarks/log/2026-11.md): multiply-adds, below the 4.7 million of model1's 576 -> 64 layer at
# batch 128, where the two took about the same time; and input values, above the 13,824 of
# model2's 432 -> 48 layer at batch 32 and below the 73,728 of model1's 576 -> 64 at batch 128
# (the two about equal) and fastnet's 221,184 (bf16 faster). At this line the recipes that
# train in bf16 by default (`fast`, `best`) keep every Dense call in bf16.
FLOAT32_DENSE_MACS = 4_000_000
FLOAT32_DENSE_INPUTS = 16_384


class CpuDropout(Dropout):
    """Dropout with the CPU's cheaper masks (the same semantics: inverted dropout at `rate`).

    For float32 and bfloat16 CPU inputs this runs kernels.dropout: one pass each way, the mask
    a hash of a seed drawn from torch's generator, recomputed in the backward pass instead of
    stored (drop probability `rate` rounded to a multiple of 1/65536). Without a C compiler
    (or use_kernel False) the keep-mask is drawn as 15-bit integers from 64-bit random words
    (four values per draw of the generator) instead of a float per value, which on the CPU is
    several times cheaper than torch.rand_like; the drop probability is then `rate` rounded to
    a multiple of 1/32768. Inside torch.compile, and on other devices, the plain Dropout runs.
    Either way a checkpoint that saves the generator's state resumes with the same masks.
    """

    use_kernel = True  # CpuSequential.use_fused_kernels sets it per instance

    def runs_kernel(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and x.dtype in kernels.DROPOUT_DTYPES and kernels.available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        if x.device.type != "cpu":
            return super().forward(x)
        if torch.compiler.is_compiling():
            # inductor draws and applies the mask in one generated loop; the int16 view of
            # int64 words below breaks its alias tracking (torch 2.13)
            keep = torch.rand_like(x) >= self.rate
            return x * keep.to(x.dtype) * (1.0 / (1.0 - self.rate))
        if self.runs_kernel(x):
            return kernels.dropout(x, self.rate)
        keep = uniform_15bit_like(x) >= round(self.rate * 32768)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.rate))


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


_FAST_TYPES = {KerasConv2d: CpuConv2d, KerasDense: CpuDense, Dropout: CpuDropout}
