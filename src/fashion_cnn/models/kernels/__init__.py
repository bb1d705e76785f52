"""C kernels for places where PyTorch's CPU ops spend their time moving memory or setting up.

- `conv1_pool.c`: the seed networks' first block, Conv2D(1 -> C) + ReLU + MaxPooling2D(2). As
  three library calls it moves the full-resolution convolution output through memory several
  times per step while doing almost no arithmetic; the kernel computes each pooled value from
  its input window in registers instead (see the file for the layouts).
- `max_pool.c`: MaxPooling2D(2), with the ReLU and the Dropout that follow it where they do,
  in one pass each way (one byte per pooled value kept for the backward pass, instead of
  int64 indices, a zero-filled gradient and two more passes).
- `dropout.c`: inverted dropout in one pass each way, its mask recomputed from a seed in the
  backward pass instead of stored (a fifth of a seed model2 step at batch 32 before).
- `adam.c`: Keras' Adam update over all of a model's tensors in one parallel pass (torch's
  fused kernel pays a set-up per tensor: 90 us per step for the ten tensors of model2).

They are compiled once per machine with the system's C compiler (`cc -O3 -march=native
-fopenmp`, under a second on the reference machine) into the cache directory, and called
through ctypes, so they need no build step at install time. Where there is no compiler, or the
build fails, or FASHION_CNN_NO_KERNELS is set, `available()` is False and the model runs the
same layers through PyTorch: the kernels change speed, not results (forward values equal up to
float rounding, and exactly for the max pool; ties in the max go to the first window position,
as in max_pool2d; dropout draws its masks from the same generator, in a different way).

>>> from fashion_cnn import kernels
>>> kernels.available(), kernels.status()          # doctest: +SKIP
(True, 'C kernels: compiled (~/.cache/fashion-cnn/kernels/fashion_cnn_kernels-1a2b3c4d5e6f.so)')
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ...perf import cpu_autocast_is_bf16

SOURCES = [Path(__file__).with_name(name)
           for name in ("conv1_pool.c", "max_pool.c", "dropout.c", "adam.c")]
HEADERS = [Path(__file__).with_name("simd.h")]  # included by the sources: part of the cache key
# -fno-math-errno: sqrtf without errno, so that adam.c's loop vectorizes (2x faster)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
COMPILE_TIMEOUT_S = 120
# Channels go in blocks of LANES in the C kernels: 16 on AVX-512, 8 elsewhere (simd.h). A
# multiple of 16 suits both, so a model takes the same kernels on every CPU.
LANES = 16
# PyTorch's CPU capabilities where the fused layers were measured faster than its own
# (benchmarks/RESULTS.md, "fused kernels"): AVX-512 ("AVX512") and AVX2-only CPUs
FUSED_CAPABILITIES = ("AVX2", "AVX512")
DROPOUT_DTYPES = (torch.float32, torch.bfloat16)

_library: ctypes.CDLL | None = None
_status: str | None = None  # why the kernels are or are not in use, once decided


def _cpu_signature() -> str:
    """-march=native ties the binary to the CPU: its model and flags go into the cache key."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """Compile SOURCES into one library in the cache (once per sources, compiler and CPU); its
    path."""
    from ...data.fashion_mnist import cache_root

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256("\0".join([*(f.read_text() for f in SOURCES + HEADERS), version,
                                    " ".join(FLAGS), _cpu_signature()]).encode()).hexdigest()[:12]
    target = cache_root() / "kernels" / f"fashion_cnn_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile beside the target, then rename: a concurrent process sees no half-written file
    fd, tmp_name = tempfile.mkstemp(prefix=".fashion_cnn_kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        compile_library(compiler, Path(tmp_name))
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def compile_library(compiler: str, target: Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile SOURCES into the shared library `target` (extra_flags: e.g. "-DLANES=16")."""
    result = subprocess.run([compiler, *FLAGS, *extra_flags, "-o", str(target),
                             *map(str, SOURCES)],
                            capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["(no message)"])[0]
        raise RuntimeError(f"{compiler} failed: {first}")


def _load() -> ctypes.CDLL | None:
    global _library, _status
    if _status is not None:
        return _library
    if os.environ.get("FASHION_CNN_NO_KERNELS"):
        _status = "C kernels: off (FASHION_CNN_NO_KERNELS is set)"
        return None
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        _status = f"C kernels: off (not built on {sys.platform}/{platform.machine()})"
        return None
    compiler = _compiler()
    if compiler is None:
        _status = "C kernels: off (no C compiler found; install gcc to enable it)"
        return None
    try:
        path = _build(compiler)
        library = bind(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _status = f"C kernels: off ({exc})"
        return None
    _library, _status = library, f"C kernels: compiled ({path})"
    return _library


def bind(library: ctypes.CDLL) -> ctypes.CDLL:
    """The library with its functions' argument and result types declared."""
    i64, f32p, u8p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
    flag = ctypes.c_int  # 1: out / grad_out are bfloat16
    library.conv1_pool_relu_forward.argtypes = [f32p, f32p, f32p, f32p, flag, u8p,
                                                i64, i64, i64, i64, i64, ctypes.c_int]
    library.conv1_pool_relu_backward.argtypes = [f32p, f32p, flag, u8p, f32p, f32p,
                                                 i64, i64, i64, i64, i64, ctypes.c_int]
    f32, u64, u32, c_int = ctypes.c_float, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    dropout_args = [c_int, u64, u32, f32]  # on, seed, keep threshold, scale
    library.dropout.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, ctypes.c_int,
                                ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    vp = ctypes.c_void_p
    library.max_pool2_forward.argtypes = [vp, vp, vp, i64, i64, i64, i64, c_int, c_int,
                                          *dropout_args, c_int]
    library.max_pool2_backward.argtypes = [vp, vp, vp, i64, i64, i64, i64, c_int,
                                           *dropout_args, c_int]
    library.adam_update.argtypes = [i64, ptrs, ptrs, ptrs, ptrs, ctypes.POINTER(i64), f32, f32,
                                    f32, f32, f32, ctypes.c_int]
    for name in ("conv1_pool_relu_forward", "conv1_pool_relu_backward", "max_pool2_forward",
                 "max_pool2_backward", "dropout", "adam_update"):
        getattr(library, name).restype = None
    return library


def available() -> bool:
    """True when the kernels are compiled and loaded (compiling them on the first call)."""
    return _load() is not None


def fused_layers_pay_off() -> bool:
    """Whether a model's layers should take the fused kernels (conv1_pool, max_pool, dropout)
    by default on this CPU: FASHION_CNN_FUSED_KERNELS=1 or 0 decides where it is set;
    otherwise a CPU with AVX-512 or AVX2, where the seed recipes' steps are measured faster
    with them (benchmarks/RESULTS.md, "fused kernels"). Elsewhere (ARM, x86 without AVX2)
    nobody has measured them, and PyTorch's layers stay. adam.c, a plain loop, stays in use
    everywhere."""
    forced = os.environ.get("FASHION_CNN_FUSED_KERNELS")
    if forced in ("0", "1"):
        return forced == "1"
    return torch.backends.cpu.get_cpu_capability().startswith(FUSED_CAPABILITIES)


def fused_layers_note() -> str:
    """fused_layers_pay_off's answer in words, and why (`fashion-cnn env`'s "fused layers")."""
    forced = os.environ.get("FASHION_CNN_FUSED_KERNELS")
    if forced in ("0", "1"):
        return f"{'on' if forced == '1' else 'off'} (FASHION_CNN_FUSED_KERNELS={forced})"
    if fused_layers_pay_off():
        return "on (first block, max pool, dropout)"
    return (f"off: not measured faster than PyTorch's layers on this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}, neither AVX2 nor AVX-512); "
            f"FASHION_CNN_FUSED_KERNELS=1 forces them")


def status() -> str:
    """One line: whether the kernels are in use, and why not where they are not."""
    _load()
    return _status or ""


def _pair(value) -> tuple:
    """A pooling argument as a (height, width) pair: MaxPool2d keeps what it was given."""
    return value if isinstance(value, tuple) else (value, value)


def eligible(conv: torch.nn.Conv2d, pool: torch.nn.Module) -> bool:
    """Whether (conv, pool) is the block the kernel computes: a square k x k convolution of one
    input channel to a multiple of 16 channels, stride 1, no padding or dilation, then a 2x2
    max pool with stride 2 and no padding (a ReLU follows the pool, or precedes it: the two
    orders are equal)."""
    if not isinstance(conv, torch.nn.Conv2d) or not isinstance(pool, torch.nn.MaxPool2d):
        return False
    k = conv.kernel_size
    return (conv.in_channels == 1 and conv.out_channels % LANES == 0 and k[0] == k[1]
            and conv.stride == (1, 1) and conv.padding == (0, 0)
            and getattr(conv, "same_pad", None) is None
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2)
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


class _Conv1PoolReLU(torch.autograd.Function):
    """relu(max_pool2d(conv2d(x, weight, bias), 2)) for x (N, 1, H, W) that needs no gradient,
    computed in float32 and returned as `dtype` (float32 or bfloat16)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        n, _, h, w = x.shape
        channels, k = weight.shape[0], weight.shape[-1]
        images = x.reshape(n, h, w).float().contiguous()
        taps = weight.detach().float().reshape(channels, k * k).t().contiguous()  # (k*k, C)
        shift = (bias.detach().float().contiguous() if bias is not None
                 else torch.zeros(channels))
        ph, pw = (h - k + 1) // 2, (w - k + 1) // 2
        out = torch.empty((n, ph, pw, channels), dtype=dtype)  # channels_last (N, C, ph, pw)
        need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        winner = torch.empty((n, ph, pw, channels), dtype=torch.uint8) if need_grad else None
        _library.conv1_pool_relu_forward(images.data_ptr(), taps.data_ptr(), shift.data_ptr(),
                                         out.data_ptr(), dtype == torch.bfloat16,
                                         winner.data_ptr() if need_grad else None,
                                         n, h, w, k, channels, torch.get_num_threads())
        if need_grad:
            ctx.save_for_backward(images, winner)
        ctx.shape = (n, h, w, k, channels)
        ctx.has_bias = bias is not None
        ctx.dtype = dtype
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        images, winner = ctx.saved_tensors
        n, h, w, k, channels = ctx.shape
        grad = grad_out.to(ctx.dtype).permute(0, 2, 3, 1).contiguous()  # (N, ph, pw, C)
        grad_taps = torch.empty((k * k, channels))
        grad_bias = torch.empty(channels)
        _library.conv1_pool_relu_backward(images.data_ptr(), grad.data_ptr(),
                                          ctx.dtype == torch.bfloat16, winner.data_ptr(),
                                          grad_taps.data_ptr(), grad_bias.data_ptr(),
                                          n, h, w, k, channels, torch.get_num_threads())
        grad_weight = grad_taps.t().reshape(channels, 1, k, k)
        return None, grad_weight, grad_bias if ctx.has_bias else None, None


def conv1_pool_relu(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """relu(max_pool2d(conv2d(x, weight, bias), 2)), channels_last (N, C, ph, pw).

    x: (N, 1, H, W) on the CPU, not requiring a gradient; weight (C, 1, k, k); bias (C) or None.
    Computed in float32; the result is float32, or bfloat16 under bfloat16 CPU autocast (what
    the next layer would cast it to). Call only when available() is True.
    """
    dtype = torch.bfloat16 if cpu_autocast_is_bf16() else torch.float32
    return _Conv1PoolReLU.apply(x, weight, bias, dtype)


def pool_eligible(pool: torch.nn.Module) -> bool:
    """Whether `pool` is the pooling max_pool2 computes: 2x2, stride 2, no padding or dilation,
    floor mode, no indices returned (Keras' MaxPooling2D(2))."""
    return (isinstance(pool, torch.nn.MaxPool2d) and _pair(pool.kernel_size) == (2, 2)
            and _pair(pool.stride) == (2, 2) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode
            and not pool.return_indices)


def max_pool2_takes(x: torch.Tensor) -> bool:
    """Whether max_pool2 can take `x`: a float32 or bfloat16 CPU tensor (N, C, H, W) with C a
    multiple of 16 and H and W at least 2 (any layout; channels_last needs no copy)."""
    return (x.device.type == "cpu" and x.dtype in DROPOUT_DTYPES and x.dim() == 4
            and x.shape[1] % LANES == 0 and x.shape[2] >= 2 and x.shape[3] >= 2)


class _MaxPool2(torch.autograd.Function):
    """max_pool2d(x, 2), then optionally relu, then optionally inverted dropout (see
    max_pool.c); channels_last in and out."""

    @staticmethod
    def forward(ctx, x, relu, seed, rate):
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        out = torch.empty((n, h // 2, w // 2, c), dtype=x.dtype)  # channels_last storage
        need_grad = ctx.needs_input_grad[0]
        winner = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8) if need_grad else None
        dropout = _fused_dropout(seed, rate)
        _library.max_pool2_forward(x.data_ptr(), out.data_ptr(),
                                   winner.data_ptr() if need_grad else None, n, h, w, c,
                                   x.dtype == torch.bfloat16, bool(relu), *dropout,
                                   torch.get_num_threads())
        if need_grad:
            ctx.save_for_backward(winner)
            ctx.shape, ctx.dtype = (n, c, h, w), x.dtype
            ctx.dropout = dropout
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        (winner,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad = grad_out.to(ctx.dtype).contiguous(memory_format=torch.channels_last)
        grad_in = torch.empty((n, h, w, c), dtype=ctx.dtype)
        _library.max_pool2_backward(grad.data_ptr(), winner.data_ptr(), grad_in.data_ptr(),
                                    n, h, w, c, ctx.dtype == torch.bfloat16, *ctx.dropout,
                                    torch.get_num_threads())
        return grad_in.permute(0, 3, 1, 2), None, None, None


def max_pool2(x: torch.Tensor, relu: bool = False, dropout_rate: float = 0.0,
              seed: int | None = None) -> torch.Tensor:
    """max_pool2d(x, 2) (Keras' MaxPooling2D(2): floor, no padding), then relu where `relu`,
    then inverted dropout at `dropout_rate`: the same values, and gradients, as those ops run
    one by one (kernels.dropout's mask on the channels_last pooled tensor, from `seed`, drawn
    from torch's generator as kernels.dropout draws it when None). Returns a channels_last
    tensor of x's dtype. Call only when available() and max_pool2_takes(x) are True."""
    if dropout_rate and seed is None:
        seed = draw_seed()
    return _MaxPool2.apply(x, relu, seed, dropout_rate)


def _fused_dropout(seed: int | None, rate: float) -> tuple:
    """The C kernels' dropout arguments: (on, seed, keep threshold, scale)."""
    if not rate:
        return (False, 0, 0, 1.0)
    return (True, seed & 0xFFFFFFFFFFFFFFFF, dropout_threshold(rate), 1.0 / (1.0 - rate))


def draw_seed() -> int:
    """A 64-bit dropout seed from torch's global generator (so that a checkpoint that saves
    the generator's state resumes with the same masks)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _dropout_apply(x: torch.Tensor, seed: int, rate: float) -> torch.Tensor:
    """x * keep / (1 - rate) for x contiguous in memory (any shape); see dropout.c."""
    out = torch.empty_like(x)
    _library.dropout(x.data_ptr(), out.data_ptr(), x.numel(), x.dtype == torch.bfloat16, seed,
                     dropout_threshold(rate), 1.0 / (1.0 - rate), torch.get_num_threads())
    return out


def dropout_threshold(rate: float) -> int:
    """An element is kept when its 16-bit lane is at least this: the drop probability is `rate`
    rounded to a multiple of 1/65536."""
    return min(65536, max(0, round(rate * 65536)))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout to run in: channels_last stays channels_last, anything else is made
    contiguous (the mask follows memory order, so grad and input must share a layout)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _Dropout(torch.autograd.Function):
    """Inverted dropout whose backward pass recomputes the mask from the seed."""

    @staticmethod
    def forward(ctx, x, seed, rate):
        ctx.seed, ctx.rate = seed, rate
        ctx.memory_format = _memory_format(x)
        return _dropout_apply(x.contiguous(memory_format=ctx.memory_format), seed, rate)

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.contiguous(memory_format=ctx.memory_format)
        return _dropout_apply(grad, ctx.seed, ctx.rate), None, None


def dropout(x: torch.Tensor, rate: float, seed: int | None = None) -> torch.Tensor:
    """Inverted dropout of x (float32 or bfloat16, on the CPU): each element zeroed with
    probability `rate`, the rest scaled by 1/(1-rate). The mask is a function of `seed` and of
    each element's position in memory; without a seed, one is drawn from torch's global
    generator. Call only when available() is True."""
    if x.device.type != "cpu" or x.dtype not in DROPOUT_DTYPES:
        raise ValueError(f"kernels.dropout takes float32 or bfloat16 CPU tensors, not "
                         f"{x.dtype} on {x.device}")
    if seed is None:
        seed = draw_seed()
    return _Dropout.apply(x, seed & 0xFFFFFFFFFFFFFFFF, rate)


def adam_eligible(tensor: torch.Tensor) -> bool:
    """Whether adam_update can take this parameter: float32 on the CPU, dense in memory."""
    return (tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            and (tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(
                memory_format=torch.channels_last))))


class AdamTensors:
    """The parameters, m and v of one Adam group, held ready for adam_update: the kernel's
    pointer tables are built once, and each step passes only the gradients (which autograd
    allocates anew when they are set to None between steps). Valid while these tensors keep
    their storage (updates happen in place)."""

    def __init__(self, params, ms, vs):
        count = len(params)
        self.count, self.table = count, ctypes.c_void_p * count
        self._keep = (list(params), list(ms), list(vs))  # the storage the tables point into
        self.params = self.table(*(t.data_ptr() for t in params))
        self.ms = self.table(*(t.data_ptr() for t in ms))
        self.vs = self.table(*(t.data_ptr() for t in vs))
        self.sizes = (ctypes.c_int64 * count)(*(p.numel() for p in params))

    def update(self, grads, *, lr: float, alpha: float, beta1: float, beta2: float,
               epsilon: float, weight_decay: float) -> None:
        """One step (see adam_update) with these gradients, in the parameters' order."""
        _library.adam_update(self.count, self.params, self.table(*(g.data_ptr() for g in grads)),
                             self.ms, self.vs, self.sizes, weight_decay * lr, 1.0 - beta1,
                             1.0 - beta2, alpha, epsilon, torch.get_num_threads())


def adam_update(params, grads, ms, vs, *, lr: float, alpha: float, beta1: float, beta2: float,
                epsilon: float, weight_decay: float) -> None:
    """Keras' Adam step in place over lists of float32 CPU tensors (see adam.c): w, m, v of
    each parameter updated from its gradient; alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t).
    Each parameter's gradient, m and v must have its strides and pass adam_eligible. Call only
    when available() is True."""
    AdamTensors(params, ms, vs).update(grads, lr=lr, alpha=alpha, beta1=beta1, beta2=beta2,
                                       epsilon=epsilon, weight_decay=weight_decay)
