import math

import pytest
import torch

from fashion_cnn.models.build import build_model
from fashion_cnn.errors import SpecError
from fashion_cnn.models.args import parse_regularizer
from fashion_cnn.models.spec import parse_spec, summary
from fashion_cnn.models.zoo import get_model_spec, list_models
from fashion_cnn.training.recipes import list_recipes, load_config

SEED_PARAMS = {"model1": 93322, "model2": 67786, "model3": 104650, "model4": 158858, "dense": 101770}
# Keras' count for the zoo's SeparableConv2D model: 320 + 2,400 + 4,736 + 36,928 + 650
# (SeparableConv2D: kh*kw*C*depth_multiplier + C*depth_multiplier*filters + filters)
KERAS_PARAMS = {**SEED_PARAMS, "separable": 45034}


@pytest.mark.parametrize("name,params", sorted(KERAS_PARAMS.items()))
def test_parameter_counts_equal_keras(name, params):
    spec = get_model_spec(name)
    assert spec.total_params == params
    model = build_model(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) == params
    assert summary(spec).splitlines()[-4] == f"Total params: {params:,}"


def test_summary_matches_keras_layout():
    text = summary(get_model_spec("model1"))
    assert text.splitlines()[0] == 'Model: "model1"'
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "conv2d_1 (Conv2D)" in text and "(None, 11, 11, 64)" in text and "36928" in text
    assert "max_pooling2d_1 (MaxPooling2D)" in text  # not truncated


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_builds_and_runs(name):
    spec = get_model_spec(name)
    h, w, c = spec.input_shape
    model = build_model(spec, seed=0)
    out = model(torch.randn(3, c, h, w).contiguous(memory_format=torch.channels_last))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_resolves(name):
    cfg = load_config(name)
    assert cfg.model.input_shape[0] == 28 + 2 * cfg.pad


def test_glorot_uniform_and_zero_bias():
    model = build_model(get_model_spec("model1"), seed=0)
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]  # conv2d_1: 3x3x32 -> 64
    limit = math.sqrt(6.0 / (9 * 32 + 9 * 64))
    assert conv.weight.abs().max() <= limit
    assert conv.weight.abs().max() > 0.95 * limit  # fills the range
    assert torch.all(conv.bias == 0)


def test_relu_after_pool_reordering_is_exact():
    # The builder applies a Conv2D's ReLU after the following max pool; check against the
    # layer order as written, values and gradients.
    model = build_model(get_model_spec("model1"), seed=0)
    conv1, conv2, conv3 = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    dense1, dense2 = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    pool = torch.nn.functional.max_pool2d
    x = torch.randn(5, 1, 28, 28)

    def as_written(x):
        h = pool(torch.relu(conv1(x)), 2)
        h = pool(torch.relu(conv2(h)), 2)
        h = torch.relu(conv3(h)).flatten(1)
        return dense2(torch.relu(dense1(h)))

    expected, actual = as_written(x), model(x)
    assert torch.allclose(actual, expected, atol=1e-6)
    g1 = torch.autograd.grad(expected.sum(), conv1.weight)[0]
    g2 = torch.autograd.grad(actual.sum(), conv1.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_read_extent_follows_the_floors_of_valid_layers():
    assert get_model_spec("model1").read_extent == (26, 26)  # 26 -> 13 and 11 -> 5 drop a row
    assert get_model_spec("model3").read_extent == (34, 34)
    assert get_model_spec("dense").read_extent == (28, 28)

    def extent(layers, shape=(28, 28, 1)):
        return parse_spec({"input_shape": list(shape), "layers": layers + [
            {"type": "Flatten"}, {"type": "Dense", "units": 10}]}).read_extent

    conv = {"type": "Conv2D", "filters": 4, "kernel_size": 3}
    assert extent([conv]) == (28, 28)  # every output position is kept
    assert extent([{**conv, "strides": 2}]) == (27, 27)  # 13 windows of stride 2 cover 27
    assert extent([{**conv, "kernel_size": [3, 2]}, {"type": "MaxPooling2D"}]) == (28, 27)
    assert extent([conv, {"type": "MaxPooling2D", "pool_size": 3}], (28, 20, 1)) == (26, 20)
    # BatchNormalization's statistics span every position; 'same' layers pad at the end
    assert extent([conv, {"type": "BatchNormalization"}, {"type": "MaxPooling2D"}]) == (28, 28)
    assert extent([{**conv, "padding": "same"}, {"type": "MaxPooling2D"}], (27, 27, 1)) == (27, 27)
    assert extent([conv, {"type": "Dropout", "rate": 0.5}, {"type": "MaxPooling2D"}],
                  (29, 29, 1)) == (28, 28)
    spec = get_model_spec("model1")
    assert spec.read_flops < spec.flops
    assert get_model_spec("fastnet").read_flops == get_model_spec("fastnet").flops
    assert get_model_spec("fastnet").input_crop is None and spec.input_crop == (26, 26)


@pytest.mark.parametrize("name", list_models())
def test_pixels_outside_the_read_extent_change_nothing(name):
    # the claim behind the crop, checked on the layers as built without it: changing every
    # pixel past read_extent leaves the logits bit for bit; one pixel inside changes them
    spec = get_model_spec(name)
    model = build_model(spec, seed=0).eval()  # the plain model reads every pixel
    height, width, channels = spec.input_shape
    rows, cols = spec.read_extent
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, channels, height, width, generator=g)
    outside = x.clone()
    outside[:, :, rows:, :] = torch.rand(outside[:, :, rows:, :].shape, generator=g)
    outside[:, :, :, cols:] = torch.rand(outside[:, :, :, cols:].shape, generator=g)
    inside = x.clone()
    inside[:, :, rows - 1, cols - 1] += 1.0
    with torch.no_grad():
        base = model(x)
        assert torch.equal(model(outside), base) or (rows, cols) == (height, width)
        assert not torch.equal(model(inside), base)


@pytest.mark.parametrize("name", ["model1", "model3"])
def test_cropped_input_gives_the_uncropped_values_and_gradients(name):
    from fashion_cnn.models.cpu_pass import accelerate

    spec = get_model_spec(name)
    model = accelerate(build_model(spec, seed=0)).eval()  # model3's dropout: other masks
    assert model.input_crop == spec.read_extent
    height, width, channels = spec.input_shape
    x = torch.rand(4, channels, height, width, generator=torch.Generator().manual_seed(2))
    results = []
    for crop in (spec.read_extent, None):
        model.input_crop = crop
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_cropped, grads_cropped), (out_whole, grads_whole) = results
    torch.testing.assert_close(out_cropped, out_whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_cropped, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_padding_model_input_shapes():
    spec = get_model_spec("model3")
    assert spec.input_shape == (36, 36, 1)
    assert spec.layers[0].output_shape == (34, 34, 32)


def _spec(layers, shape=(28, 28, 1)):
    return {"name": "t", "input_shape": list(shape), "layers": layers}


@pytest.mark.parametrize("layers,fragment", [
    ([{"type": "Conv3D", "filters": 2}], "layer 0: unknown layer type 'Conv3D'"),
    ([{"type": "Conv2D", "filters": 2}], "layer 0 (Conv2D): missing required argument 'kernel_size'"),
    ([{"type": "Conv2D", "filters": -1, "kernel_size": 3}], "layer 0 (Conv2D): argument 'filters'"),
    ([{"type": "Dense", "units": 10, "activaton": "relu"}], "unknown argument 'activaton'"),
    ([{"type": "Dense", "units": 10}], "layer 0 (Dense): Dense needs a flat input"),
    ([{"type": "Conv2D", "filters": 4, "kernel_size": 30}, {"type": "Flatten"},
      {"type": "Dense", "units": 10}], "layer 0 (Conv2D): Conv2D kernel 30x30 does not fit"),
    ([{"type": "Flatten"}, {"type": "Dense", "units": 10, "activation": "softmax"},
      {"type": "Dense", "units": 10}], "softmax is only supported on the last layer"),
    ([{"type": "Flatten"}, {"type": "Dense", "units": 10, "kernel_regularizer": "l3(0.1)"}],
     "layer 1 (Dense): argument 'kernel_regularizer'"),
    ([{"type": "Dropout", "rate": 1.5}, {"type": "Flatten"}, {"type": "Dense", "units": 10}],
     "layer 0 (Dropout): argument 'rate'"),
])
def test_bad_specs_name_layer_and_reason(layers, fragment):
    with pytest.raises(SpecError, match=None) as info:
        parse_spec(_spec(layers))
    assert fragment in str(info.value)


def test_regularizer_syntax_and_keras_defaults():
    assert parse_regularizer("l2").l2 == 0.01
    assert parse_regularizer("l1").l1 == 0.01
    reg = parse_regularizer("l1_l2")
    assert (reg.l1, reg.l2) == (0.01, 0.01)
    reg = parse_regularizer("l1_l2(l1=0.001, l2=0.002)")
    assert (reg.l1, reg.l2) == (0.001, 0.002)
    assert parse_regularizer({"l2": 1e-4}).l2 == 1e-4
    assert parse_regularizer(None) is None
    for bad in ("l2(__import__('os'))", "l2(-1)", "dropout(0.1)"):
        with pytest.raises(ValueError):
            parse_regularizer(bad)


def test_batchnorm_keras_momentum_maps_to_torch():
    spec = parse_spec(_spec([{"type": "Conv2D", "filters": 4, "kernel_size": 3},
                             {"type": "BatchNormalization"}, {"type": "Flatten"},
                             {"type": "Dense", "units": 10}]))
    assert spec.layers[1].params == 16 and spec.layers[1].trainable_params == 8
    bn = build_model(spec).layers[1]
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)


def test_same_padding_and_strides_like_keras():
    spec = parse_spec(_spec([{"type": "Conv2D", "filters": 4, "kernel_size": 3, "strides": 2,
                              "padding": "same"}, {"type": "GlobalAveragePooling2D"},
                             {"type": "Dense", "units": 10}]))
    assert spec.layers[0].output_shape == (14, 14, 4)
    model = build_model(spec)
    assert model.layers[0](torch.zeros(1, 1, 28, 28)).shape == (1, 4, 14, 14)


def test_residual_block_shapes():
    spec = parse_spec(_spec([
        {"type": "Conv2D", "filters": 8, "kernel_size": 3, "padding": "same"},
        {"type": "Residual", "layers": [
            {"type": "Conv2D", "filters": 16, "kernel_size": 3, "strides": 2, "padding": "same"},
            {"type": "BatchNormalization"}, {"type": "Activation", "activation": "relu"},
            {"type": "Conv2D", "filters": 16, "kernel_size": 3, "padding": "same"}]},
        {"type": "GlobalAveragePooling2D"}, {"type": "Dense", "units": 10}]))
    assert spec.layers[1].output_shape == (14, 14, 16)
    model = build_model(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) + 2 * 16 + 2 * 16 == spec.total_params
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_small_output_conv_gradients_equal_conv2d():
    # the matrix-product weight gradient, checked exactly in float32 ...
    from fashion_cnn.models.cpu_pass import _SmallOutputConv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(48, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    weight.requires_grad_()
    bias = torch.randn(48, generator=g).requires_grad_()
    upstream = torch.randn(6, 48, 3, 3, generator=g)
    want = torch.autograd.grad(torch.nn.functional.conv2d(x, weight, bias), (x, weight, bias),
                               upstream)
    got = torch.autograd.grad(_SmallOutputConv.apply(x, weight, bias), (x, weight, bias), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_small_output_conv_is_used_in_bf16_training_only(monkeypatch):
    # ... and in a seed model under bf16 autocast, against oneDNN's bf16 backward
    import fashion_cnn.models.cpu_pass as build
    model = build.accelerate(build_model(get_model_spec("model1"), seed=0))
    conv3 = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][2]
    x = torch.rand(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)

    def conv3_grad(positions):
        monkeypatch.setattr(build, "SMALL_OUTPUT_POSITIONS", positions)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return conv3.weight.grad.clone()

    monkeypatch.setattr(build, "SMALL_OUTPUT_POSITIONS", 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv3._small_output_bf16(torch.zeros(2, 64, 5, 5))
    assert not conv3._small_output_bf16(torch.zeros(2, 64, 5, 5))   # fp32: oneDNN
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert not conv3._small_output_bf16(torch.zeros(2, 64, 5, 5))  # inference: oneDNN
    through_onednn = conv3_grad(0)
    torch.testing.assert_close(conv3_grad(16), through_onednn, rtol=0.03,
                               atol=0.03 * through_onednn.abs().max().item())


def test_small_dense_calls_stay_float32_under_bf16_autocast(monkeypatch):
    import fashion_cnn.models.cpu_pass as build
    model = build.accelerate(build_model(get_model_spec("model2"), seed=0))
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [type(m) for m in dense] == [build.CpuDense] * 2
    first = dense[0]  # 432 -> 48
    x = torch.randn(32, 432)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small = first(x)                # 32 * 432 * 48 = 663,552 multiply-adds
        monkeypatch.setattr(build, "FLOAT32_DENSE_MACS", 32 * 432 * 48 - 1)
        large = first(x)
        monkeypatch.setattr(build, "FLOAT32_DENSE_MACS", 32 * 432 * 48)
        monkeypatch.setattr(build, "FLOAT32_DENSE_INPUTS", 32 * 432 - 1)
        wide = first(x)
        from_bf16_input = dense[1](torch.randn(32, 48).bfloat16())
    assert small.dtype == torch.float32 and large.dtype == wide.dtype == torch.bfloat16
    assert from_bf16_input.dtype == torch.float32  # a bf16 input is widened, not refused
    torch.testing.assert_close(small, torch.nn.functional.linear(x, first.weight, first.bias))
    assert first(x).dtype == torch.float32  # outside autocast: plain float32
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert first(x).dtype == torch.bfloat16  # inference stays in bf16


def test_separable_conv2d_counts_shapes_and_initialises_as_keras():
    spec = parse_spec({"input_shape": [13, 13, 32], "layers": [
        {"type": "SeparableConv2D", "filters": 64, "kernel_size": 3, "depth_multiplier": 2,
         "pointwise_regularizer": "l2(0.01)"},
        {"type": "SeparableConv2D", "filters": 8, "kernel_size": [3, 3], "strides": 2,
         "padding": "same", "use_bias": False},
        {"type": "Flatten"}, {"type": "Dense", "units": 10}]})
    first, second = spec.layers[:2]
    # Keras: depthwise 3*3*32*2, pointwise (32*2)*64, bias 64
    assert first.params == 3 * 3 * 32 * 2 + 64 * 64 + 64 == 4736
    assert first.output_shape == (11, 11, 64) and first.name == "separable_conv2d"
    assert second.params == 3 * 3 * 64 + 64 * 8 and second.output_shape == (6, 6, 8)
    model = build_model(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) == spec.total_params
    x = torch.randn(2, 32, 13, 13).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)
    separable = model.layers[0]
    depthwise, pointwise = separable.depthwise, separable.pointwise
    assert depthwise.groups == 32 and tuple(depthwise.weight.shape) == (64, 1, 3, 3)
    assert tuple(pointwise.weight.shape) == (64, 64, 1, 1)
    # glorot_uniform with Keras' fans: depthwise (3, 3, 32, 2) -> 288 in, 18 out
    limit = math.sqrt(6 / (288 + 18))
    assert depthwise.weight.abs().max() <= limit and depthwise.weight.abs().max() > 0.9 * limit
    assert torch.count_nonzero(pointwise.bias) == 0
    # the regularizer applies to the pointwise kernel only (Keras: 0.01 * sum(w**2))
    expected = 0.01 * pointwise.weight.square().sum()
    torch.testing.assert_close(model.regularization_penalty(), expected)
    # a depthwise-separable convolution is a grouped then a 1x1 convolution
    manual = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, depthwise.weight, groups=32),
                                        pointwise.weight, pointwise.bias)
    torch.testing.assert_close(separable(x), manual)


def _keras_same_pool(x, k: int, s: int, kind: str) -> torch.Tensor:
    """Keras/TensorFlow 'same' pooling of one (H, W) map, window by window: ceil(H / s)
    outputs, the padding split with the odd row/column after, padded values ignored."""
    h, w = x.shape
    oh, ow = -(-h // s), -(-w // s)
    top = max((oh - 1) * s + k - h, 0) // 2
    left = max((ow - 1) * s + k - w, 0) // 2
    out = torch.empty(oh, ow)
    for i in range(oh):
        for j in range(ow):
            r, c = i * s - top, j * s - left
            window = x[max(r, 0):min(r + k, h), max(c, 0):min(c + k, w)]
            out[i, j] = window.max() if kind == "max" else window.mean()
    return out


@pytest.mark.parametrize("kind", ["max", "average"])
@pytest.mark.parametrize("size", [5, 6, 7, 8])
@pytest.mark.parametrize("pool", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_pooling_has_keras_windows(kind, size, pool, stride):
    # e.g. 2x2 stride 1 on 6x6 gives 6x6 in Keras (PyTorch's ceil_mode: 5x5), and a 3x3
    # stride 3 pool on 7x7 pads a row before and after (ceil_mode: two after)
    layer_type = "MaxPooling2D" if kind == "max" else "AveragePooling2D"
    spec = parse_spec({"name": "p", "input_shape": [size, size, 1], "layers": [
        {"type": layer_type, "pool_size": pool, "strides": stride, "padding": "same"},
        {"type": "Flatten"}, {"type": "Dense", "units": 2}]})
    model = build_model(spec, seed=0).eval()
    x = torch.randn(2, 1, size, size)
    pooled = model.layers[0](x)
    for image in range(2):
        torch.testing.assert_close(pooled[image, 0], _keras_same_pool(x[image, 0], pool,
                                                                      stride, kind))
    assert model(x).shape == (2, 2)  # the inferred shape is the computed one
