"""The C kernels: the fused first block (kernels/conv1_pool.c) against the same layers run by
PyTorch, and dropout (kernels/dropout.c) against its definition written out in numpy."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fashion_cnn.models import kernels
from fashion_cnn.models.build import build_model
from fashion_cnn.models.cpu_pass import accelerate
from fashion_cnn.models.zoo import get_model_spec

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"no C kernels here: {kernels.status()}")


def reference(x, weight, bias):
    return torch.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2))


def images(n, h, w, seed=0):
    """Like Fashion-MNIST: values in [0, 1) on a background of exact zeros (ties in the pool)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g) * (torch.rand(n, 1, h, w, generator=g) > 0.4)


def test_the_compiler_is_found_where_ci_runs():
    # where a C compiler exists, the kernel must build: a silent fallback would hide a bug
    if shutil.which("cc") or shutil.which("gcc"):
        assert "compiled" in kernels.status()


@pytest.mark.parametrize("n,size,k,channels,use_bias", [
    (1, 28, 3, 32, True),     # model1's first block, one image
    (5, 28, 3, 32, True),     # an odd batch: the two threads get unequal shares
    (64, 32, 3, 16, True),    # model3's padded input
    (3, 28, 5, 48, False),    # a 5x5 kernel, no bias
    (4, 30, 4, 32, True),     # an odd convolution output (27): the last row/column dropped
])
def test_forward_and_gradients_equal_pytorch(n, size, k, channels, use_bias):
    x = images(n, size, size)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(channels, 1, k, k, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(channels, generator=g) * 0.1).requires_grad_() if use_bias else None
    params = [weight] + ([bias] if use_bias else [])

    expected = reference(x, weight, bias)
    actual = kernels.conv1_pool_relu(x, weight, bias)
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    upstream = torch.randn(expected.shape, generator=g)
    want = torch.autograd.grad(expected, params, upstream)
    got = torch.autograd.grad(actual, params, upstream)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ties_go_to_the_first_window_position_as_in_max_pool():
    # Only the centre tap is non-zero and pixels take three values, so many windows have
    # positions of equal value whose neighbourhoods differ: the gradient of the other taps
    # then tells which position won.
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, (4, 1, 28, 28), generator=g).float() / 2
    weight = torch.zeros(16, 1, 3, 3)
    weight[:, 0, 1, 1] = torch.rand(16, generator=g) + 0.1
    weight.requires_grad_()
    bias = torch.randn(16, generator=g).requires_grad_()
    upstream = torch.randn(4, 16, 13, 13, generator=g)
    want = torch.autograd.grad(reference(x, weight, bias), (weight, bias), upstream)
    got = torch.autograd.grad(kernels.conv1_pool_relu(x, weight, bias), (weight, bias), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_gradients_are_deterministic():
    x, weight = images(33, 28, 28), torch.randn(32, 1, 3, 3).requires_grad_()
    bias = torch.randn(32).requires_grad_()
    upstream = torch.randn(33, 32, 13, 13)
    first = torch.autograd.grad(kernels.conv1_pool_relu(x, weight, bias), (weight, bias), upstream)
    second = torch.autograd.grad(kernels.conv1_pool_relu(x, weight, bias), (weight, bias), upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_nan_weights_give_nan_outputs_not_zeros():
    # a ReLU must not hide a spoiled weight: the loss has to turn NaN so training stops
    weight = torch.randn(16, 1, 3, 3)
    weight[3] = float("nan")
    out = kernels.conv1_pool_relu(images(2, 28, 28), weight, torch.zeros(16))
    assert out[:, 3].isnan().all() and not out[:, :3].isnan().any()


def test_under_bf16_autocast_the_block_returns_bfloat16_rounded_once():
    # the next layer would cast the output to bfloat16: the kernel writes it so, from the same
    # float32 values, rounded to nearest-even as PyTorch rounds
    x = images(7, 28, 28)
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(32, 1, 3, 3, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(32, generator=g) * 0.1).requires_grad_()
    weight.data[5] = float("nan")  # a NaN channel stays NaN after rounding
    full = kernels.conv1_pool_relu(x, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = kernels.conv1_pool_relu(x, weight, bias)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half, full.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    assert half[:, 5].isnan().all() and not half[:, :5].isnan().any()
    # gradients: those of the float32 block for the same (bfloat16) upstream gradient
    upstream = torch.randn(full.shape, generator=g).to(torch.bfloat16)
    got = torch.autograd.grad(half, [weight, bias], upstream)
    want = torch.autograd.grad(full, [weight, bias], upstream.float())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["model1", "model2", "model3", "model4"])
def test_seed_models_use_the_kernel_and_agree_with_pytorch(name):
    spec = get_model_spec(name)
    h, w, _ = spec.input_shape
    model = accelerate(build_model(spec, seed=0))
    assert model.fusable == [0]
    model.eval()  # no dropout: both passes see the same network
    x = images(6, h, w).contiguous(memory_format=torch.channels_last)

    def run(fused):
        model.use_fused_kernels = fused
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_fused, grads_fused = run(True)
    out_plain, grads_plain = run(False)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_blocks_the_kernel_does_not_cover_run_through_pytorch():
    for name in ("dense", "cnn6", "fastnet"):
        assert accelerate(build_model(get_model_spec(name), seed=0)).fusable == []
    # an input that needs a gradient (saliency maps) takes PyTorch's path
    model = accelerate(build_model(get_model_spec("model1"), seed=0)).eval()
    x = images(2, 28, 28).requires_grad_()
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_switched_off_by_the_environment():
    code = ("from fashion_cnn.models import kernels; import sys; "
            "print(kernels.status()); sys.exit(0 if not kernels.available() else 1)")
    env = dict(os.environ, FASHION_CNN_NO_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FASHION_CNN_NO_KERNELS" in done.stdout


# ---- dropout -----------------------------------------------------------------------------

def keep_mask(seed, n, rate):
    """dropout.c's mask for n elements in memory order, from its definition (numpy's uint64
    arithmetic wraps as C's does)."""
    with np.errstate(over="ignore"):
        index = np.arange(1, (n + 3) // 4 + 1, dtype=np.uint64)
        z = np.uint64(seed) + index * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    lanes = z.astype("<u8").view("<u2")[:n]  # lane l of word q is element 4q + l
    return torch.from_numpy(lanes.astype(np.int64) >= round(rate * 65536))


def expected_dropout(x, seed, rate):
    """x * keep / (1 - rate), the mask taken over x's storage order, in x's layout."""
    storage = x.permute(0, 2, 3, 1) if x.is_contiguous(memory_format=torch.channels_last) \
        and x.dim() == 4 else x
    keep = keep_mask(seed, x.numel(), rate).reshape(storage.shape)
    scale = torch.tensor(1.0 / (1.0 - rate), dtype=torch.float32)
    out = (storage.float() * torch.where(keep, scale, torch.zeros(()))).to(x.dtype)
    return out.permute(0, 3, 1, 2) if storage is not x else out


@pytest.mark.parametrize("shape,channels_last,dtype", [
    ((3, 5, 7, 11), False, torch.float32),     # 1155 values: a last partial word and block
    ((32, 32, 13, 13), True, torch.float32),   # model2's first dropout, run on two threads
    ((32, 64, 5, 5), True, torch.bfloat16),    # model2's second one under bf16 autocast
    ((1000,), False, torch.bfloat16),
])
def test_dropout_equals_its_definition(shape, channels_last, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed, rate = 0x0123456789ABCDEF, 0.2
    out = kernels.dropout(x, rate, seed)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    # exact: one float32 product per value, rounded once (to bfloat16 as PyTorch rounds)
    assert torch.equal(out, expected_dropout(x, seed, rate))
    # a different seed is a different mask
    assert not torch.equal(out, kernels.dropout(x, rate, seed + 1))


def test_dropout_gradient_uses_the_forward_mask():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = kernels.dropout(x, 0.5, 77)
    # the upstream gradient in another layout: it is brought to the input's before the mask
    upstream = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grad, expected_dropout(upstream.contiguous(
        memory_format=torch.channels_last), 77, 0.5))
    assert torch.equal(grad == 0, out == 0)


def test_dropout_keeps_one_minus_rate_uniformly_whatever_the_threads():
    x = torch.ones(1 << 20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.dropout(x, 0.3, 11)
        torch.set_num_threads(2)
        two = kernels.dropout(x, 0.3, 11)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    kept = (one != 0).float()
    assert abs(kept.mean().item() - 0.7) < 0.002
    for lane in range(4):  # each 16-bit lane of a word keeps its share
        assert abs(kept[lane::4].mean().item() - 0.7) < 0.004
    centred = kept - kept.mean()  # neighbours are independent
    assert abs((centred[1:] * centred[:-1]).mean().item() / kept.var().item()) < 0.01
    assert torch.allclose(one[one != 0], torch.tensor(1 / 0.7))


def test_dropout_refuses_dtypes_it_would_misread():
    with pytest.raises(ValueError, match="float64"):
        kernels.dropout(torch.ones(8, dtype=torch.float64), 0.5, 1)


def test_dropout_lets_nan_through_as_pytorch_does():
    x = torch.full((4096,), float("nan"))
    assert kernels.dropout(x, 0.5, 1).isnan().all()
    assert kernels.dropout(x.bfloat16(), 0.5, 1).isnan().all()


def test_dropout_layer_draws_its_seed_from_the_global_generator():
    from fashion_cnn.models.cpu_pass import CpuDropout

    layer = CpuDropout(0.25).train()
    x = torch.randn(6, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)  # a resumed generator state gives the same mask
    torch.manual_seed(5)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    assert torch.equal(first, kernels.dropout(x, 0.25, seed))


def test_switching_kernels_off_reaches_the_dropout_layers():
    from fashion_cnn.models.cpu_pass import CpuDropout

    model = accelerate(build_model(get_model_spec("model2"), seed=0))
    model.use_fused_kernels = True  # the default only on AVX2 and AVX-512 CPUs
    layers = [m for m in model.modules() if isinstance(m, CpuDropout)]
    assert len(layers) == 2 and model.runs_fused_dropout
    model.use_fused_kernels = False
    assert not any(layer.use_kernel for layer in layers) and not model.runs_fused_dropout
    x = torch.randn(2, 32, 13, 13)
    assert not layers[0].runs_kernel(x)


# ---- max pool (+ ReLU, + dropout) ----------------------------------------------------------

def pool_reference(x, relu, rate, seed):
    """The ops kernels.max_pool2 fuses, one by one."""
    out = F.max_pool2d(x, 2)
    if relu:
        out = torch.relu(out)
    if rate:
        out = kernels.dropout(out.contiguous(memory_format=torch.channels_last), rate, seed)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64, 11, 11),   # model1/model2's second pool: odd sides
                                   (2, 16, 6, 7),     # one block of channels, odd width
                                   (2, 80, 9, 8),     # a partial 64-channel dropout chunk
                                   (1, 16, 2, 2)])
@pytest.mark.parametrize("relu,rate", [(False, 0.0), (True, 0.0), (True, 0.2), (False, 0.5)])
def test_max_pool_equals_the_pytorch_ops_it_fuses(dtype, shape, relu, rate):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    x[:, :, 0, 1] = x[:, :, 0, 0]  # ties: the first window position wins, as in max_pool2d
    x[:, :3, 1, :] = 0.0           # ties at zero, the ReLU's edge
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = kernels.max_pool2(mine, relu, rate, seed=99)
    want = pool_reference(theirs, relu, rate, 99)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, want)
    upstream = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(upstream)
    want.backward(upstream)
    assert mine.grad.dtype == dtype
    assert torch.equal(mine.grad, theirs.grad)
    with torch.no_grad():  # inference: no winners kept, the same values
        assert torch.equal(kernels.max_pool2(x, relu, rate, seed=99), want.detach())


def test_max_pool_takes_only_what_it_computes():
    x = torch.randn(2, 16, 5, 5)
    assert kernels.max_pool2_takes(x) and kernels.max_pool2_takes(x.bfloat16())
    assert not kernels.max_pool2_takes(torch.randn(2, 8, 5, 5))  # channels in blocks of 16
    assert not kernels.max_pool2_takes(torch.randn(2, 16, 1, 5))
    assert not kernels.max_pool2_takes(x.double())
    assert not kernels.pool_eligible(torch.nn.MaxPool2d(3))
    assert not kernels.pool_eligible(torch.nn.MaxPool2d(2, ceil_mode=True))  # Keras 'same'
    assert kernels.pool_eligible(torch.nn.MaxPool2d(2))


@pytest.mark.parametrize("name", ["model2", "fastnet"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_training_step_is_the_same_with_the_pool_kernel(name, precision):
    """The fused pools (with model2's ReLU and Dropout) and the ReLU moved after the Flatten
    change nothing: equal outputs and gradients, the dropout masks included."""
    from fashion_cnn.devices import autocast

    model = accelerate(build_model(get_model_spec(name), seed=0)).train()
    model.use_fused_kernels = True  # the default only on AVX2 and AVX-512 CPUs
    assert model.pools and model.runs_fused_pool
    if name == "model2":  # its second pool takes the ReLU and the Dropout after it
        relu, dropout = model.pools[4]
        assert relu and dropout is model.layers[5]
        assert model.relu_after_flatten == {6}
    h, w, _ = model.spec.input_shape
    x = images(8, h, w).contiguous(memory_format=torch.channels_last)
    pools, moved = model.pools, model.relu_after_flatten

    def run(fused):
        model.pools, model.relu_after_flatten = (pools, moved) if fused else ({}, set())
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with autocast("cpu", precision):
            out = model(x)
        out.float().square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_fused, grads_fused = run(True)
    out_plain, grads_plain = run(False)
    assert torch.equal(out_fused, out_plain)
    assert all(torch.equal(a, b) for a, b in zip(grads_fused, grads_plain))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_vector_width_changes_no_result(tmp_path, monkeypatch, precision):
    """The kernels take 16 lanes on AVX-512 and 8 elsewhere (simd.h): both widths, built here,
    give model1's first block and model2's fused pool and dropout the same outputs and
    gradients bit for bit, so a run trains and resumes alike on either kind of CPU."""
    import ctypes

    from fashion_cnn.devices import autocast

    compiler = kernels._compiler()
    libraries = {}
    for lanes in (8, 16):
        path = tmp_path / f"kernels-{lanes}.so"
        kernels.compile_library(compiler, path, (f"-DLANES={lanes}",))
        libraries[lanes] = kernels.bind(ctypes.CDLL(str(path)))
    x = images(6, 28, 28, seed=2).contiguous(memory_format=torch.channels_last)
    for name in ("model1", "model2"):
        model = accelerate(build_model(get_model_spec(name), seed=0)).train()
        model.use_fused_kernels = True
        results = []
        for library in libraries.values():
            monkeypatch.setattr(kernels, "_library", library)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            with autocast("cpu", precision):
                out = model(x)
            out.float().square().sum().backward()
            results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results)), name


def test_model2_training_forward_draws_its_masks_as_the_unfused_layers_do():
    """model2 in training: its second pool with the ReLU and Dropout after it, against every
    layer after the first block run apart (kernels on), from one generator state: the fused
    dropout draws its seed where the Dropout layer would."""
    model = accelerate(build_model(get_model_spec("model2"), seed=0)).train()
    x = images(4, 28, 28).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    fused = model(x)
    torch.manual_seed(3)
    rows, cols = model.input_crop  # forward() first drops what the model never reads
    h, layers = x[:, :, :rows, :cols], model.layers
    h = kernels.conv1_pool_relu(h, layers[0].weight, layers[0].bias)  # the block, no dropout
    for layer in list(layers)[2:]:
        h = layer(h) if not isinstance(layer, torch.nn.Sequential) or len(layer) != 2 \
            or not isinstance(layer[0], torch.nn.MaxPool2d) else torch.relu(F.max_pool2d(h, 2))
    assert torch.equal(fused, h)


def test_fused_kernels_default_to_the_cpus_with_avx2_or_avx512(monkeypatch):
    from fashion_cnn.models import kernels

    monkeypatch.delenv("FASHION_CNN_FUSED_KERNELS", raising=False)
    capability = torch.backends.cpu.get_cpu_capability()
    measured = capability == "AVX2" or capability.startswith("AVX512")
    assert kernels.fused_layers_pay_off() is measured
    assert accelerate(build_model(get_model_spec("model2"), seed=0)).use_fused_kernels is measured
    assert kernels.fused_layers_note().startswith("on (" if measured else "off: not measured")
    for capability, expected in (("AVX2", True), ("AVX512", True), ("AVX512_BF16", True),
                                 ("DEFAULT", False), ("SVE256", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert kernels.fused_layers_pay_off() is expected, capability
    monkeypatch.undo()
    for forced, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("FASHION_CNN_FUSED_KERNELS", forced)
        model = accelerate(build_model(get_model_spec("model2"), seed=0))
        assert model.use_fused_kernels is expected and model.runs_fused_pool is expected
        assert kernels.fused_layers_note() == f"{'on' if expected else 'off'} " \
                                              f"(FASHION_CNN_FUSED_KERNELS={forced})"
