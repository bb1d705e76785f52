"""The fused first block (kernels/conv1_pool.c) against the same layers run by PyTorch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from fashion_cnn import kernels
from fashion_cnn.build import build_model
from fashion_cnn.zoo import get_model_spec

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"no fused kernel here: {kernels.status()}")


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


@pytest.mark.parametrize("name", ["model1", "model2", "model3", "model4"])
def test_seed_models_use_the_kernel_and_agree_with_pytorch(name):
    spec = get_model_spec(name)
    h, w, _ = spec.input_shape
    model = build_model(spec, seed=0)
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
        assert build_model(get_model_spec(name), seed=0).fusable == []
    # an input that needs a gradient (saliency maps) takes PyTorch's path
    model = build_model(get_model_spec("model1"), seed=0).eval()
    x = images(2, 28, 28).requires_grad_()
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_switched_off_by_the_environment():
    code = ("from fashion_cnn import kernels; import sys; "
            "print(kernels.status()); sys.exit(0 if not kernels.available() else 1)")
    env = dict(os.environ, FASHION_CNN_NO_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FASHION_CNN_NO_KERNELS" in done.stdout
