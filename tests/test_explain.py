"""Explanations: Grad-CAM and SmoothGrad (analysis/explain.py), gradcam.png, and predict's
explanation files. The sanity checks follow Adebayo et al. (2018), "Sanity Checks for
Saliency Maps": on a small CNN trained here on real Fashion-MNIST, the maps must depend on
the learned weights, sit mostly on the garment, and move with the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fashion_cnn as fc
from fashion_cnn.analysis.explain import conv_layers, map_centres
from fashion_cnn.apps.predict import to_fashion_mnist
from fashion_cnn.data.arrays import to_tensor
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.models.spec import parse_spec

# A small CNN in the shape of the seed's model1 (two valid 3x3 convolutions, each followed by a
# 2x2 max pool; an 11x11 last map): it learns in seconds, where model1 needs minutes here.
SMALL_CNN = {"name": "small-cnn", "input_shape": [28, 28, 1], "layers": [
    {"type": "Conv2D", "filters": 8, "kernel_size": 3, "activation": "relu"},
    {"type": "MaxPooling2D", "pool_size": 2},
    {"type": "Conv2D", "filters": 16, "kernel_size": 3, "activation": "relu"},
    {"type": "MaxPooling2D", "pool_size": 2},
    {"type": "Flatten"},
    {"type": "Dense", "units": 10}]}
STEPS, BATCH, LR = 200, 128, 3e-3   # about 0.84 test accuracy
N_TEST = 100                         # test images the sanity statistics are taken over


@pytest.fixture(scope="module")
def trained(real_data):
    """The small CNN after STEPS Adam steps on real training images (seeded), in eval mode
    with the CPU pass; and the first N_TEST test images as uint8 and as the model sees them."""
    spec = parse_spec(SMALL_CNN)
    model = fc.accelerate(fc.build_model(spec, seed=0))
    x = to_tensor(real_data.train_images[:30000])
    y = torch.as_tensor(real_data.train_labels[:30000])
    optimizer = torch.optim.Adam(model.parameters(), LR)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images = real_data.test_images[:N_TEST]
    return spec, model, images, to_tensor(images)


def spearman(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (N, H, W), ties given their mean rank
    (Grad-CAM maps hold many exact zeros)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        starts = np.cumsum(counts) - counts
        return (starts + (counts - 1) / 2)[inverse]

    out = []
    for u, v in zip(a.flatten(1).numpy(), b.flatten(1).numpy()):
        ru, rv = ranks(u) - ranks(u).mean(), ranks(v) - ranks(v).mean()
        denominator = np.sqrt((ru ** 2).sum() * (rv ** 2).sum())
        out.append((ru * rv).sum() / denominator if denominator else 0.0)
    return np.array(out)


# ----------------------------------------------------------------------------- sanity checks

@pytest.mark.realdata
def test_maps_depend_on_the_learned_weights(trained):
    """Adebayo's model randomization test: the same architecture with freshly drawn weights
    explains the same images with the same classes. Measured over 100 test images: mean
    Spearman correlation 0.06 (last Conv2D) and -0.07 (first), against 0.86 and 0.91 for the
    trained model's own maps of the images with faint noise added (std 0.02 of the image's
    range of 2), so the metric does see two maps that agree. 0.3 and 0.7 leave room for
    other torch builds and CPUs."""
    spec, model, _, x = trained
    target = model(x).argmax(1)
    noisy = x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for layer in (-1, 0):
        maps = fc.gradcam(model, x, target, layer=layer)
        random_maps = fc.gradcam(fc.build_model(spec, seed=1), x, target, layer=layer)
        rho = spearman(maps, random_maps)
        assert rho.mean() < 0.3, (layer, rho.mean())
        assert spearman(maps, fc.gradcam(model, noisy, target, layer=layer)).mean() > 0.7


@pytest.mark.realdata
def test_most_heatmap_mass_lies_on_the_garment(trained):
    """The share of each map's mass on the image's non-zero pixels, mean over 100 test
    images (6 all-zero maps left out): 0.70 for the trained model's last Conv2D; the garment
    covers 0.49 of the pixels (what a flat map would score), and the randomized model scores
    0.59. Footwear is what keeps it from 0.8: the model tells a sneaker or a sandal by the
    empty space above it, and its maps show that (docs/explain.md). Asserted: at least 0.6,
    0.15 above a flat map and 0.05 above the randomized model."""
    spec, model, images, x = trained
    garment = torch.as_tensor(images > 0).float()

    def share(maps):
        mass = maps.sum((1, 2))
        kept = mass > 0  # a map can be all zero: no positive evidence at that layer
        return float(((maps * garment).sum((1, 2))[kept] / mass[kept]).mean())

    target = model(x).argmax(1)
    trained_share = share(fc.gradcam(model, x, target))
    random_share = share(fc.gradcam(fc.build_model(spec, seed=1), x, target))
    flat = float(garment.mean())
    assert trained_share >= 0.6 and trained_share > flat + 0.15 and \
        trained_share > random_share + 0.05, \
        (trained_share, flat, random_share)


@pytest.mark.realdata
def test_the_map_of_a_shifted_image_is_the_shifted_map(trained):
    """Each image shifted one pixel right and down, compared away from the border (4 px):
    mean |difference| 0.094 at the first Conv2D against 0.187 without undoing the shift, and
    0.091 against 0.110 at the last (its 11x11 map moves in steps of 2 px, with max pools in
    between, so a 1-px shift changes it nearly as much as it moves it); another image's map
    differs by 0.35 and 0.23. The maps explain the same class for both images."""
    _, model, images, x = trained
    shifted = np.zeros_like(images)
    shifted[:, 1:, 1:] = images[:, :-1, :-1]
    target = model(x).argmax(1)
    inner = slice(4, 28 - 4 - 1)
    moved = slice(5, 28 - 4)
    for layer, most, ratio in ((0, 0.13, 0.65), (-1, 0.13, 1.0)):
        a = fc.gradcam(model, x, target, layer=layer)
        b = fc.gradcam(model, to_tensor(shifted), target, layer=layer)
        aligned = float((b[:, moved, moved] - a[:, inner, inner]).abs().mean())
        unaligned = float((b[:, inner, inner] - a[:, inner, inner]).abs().mean())
        other = float((a.roll(1, 0)[:, inner, inner] - a[:, inner, inner]).abs().mean())
        assert aligned <= most and aligned < ratio * unaligned and aligned < other / 2, \
            (layer, aligned, unaligned, other)


@pytest.mark.realdata
def test_figure_shows_a_right_and_a_wrong_image_per_class(trained):
    _, model, images, x = trained
    labels = np.arange(N_TEST) % 10  # labels that make the model right and wrong in every class
    with torch.no_grad():
        probabilities = torch.softmax(model(x), 1).numpy()
    fig = fc.figure_gradcam(model, x, labels, probabilities)
    ax = fig.axes[0]
    predicted = probabilities.argmax(1)
    expected = sum(int(((labels == c) & (predicted == c)).any())
                   + int(((labels == c) & (predicted != c)).any()) for c in range(10))
    assert expected > 10  # right and wrong answers in several classes
    assert len(ax.images) == 2 * expected  # an image and its heatmap each
    assert fig._suptitle.get_text().startswith("Grad-CAM of conv2d_1 (11x11 map)")


# ----------------------------------------------------------------------------- the functions

def test_gradcam_of_an_accelerated_model_equals_the_plain_one_and_leaves_it_as_it_was():
    spec = fc.get_model_spec("model1")
    plain = fc.build_model(spec, seed=0).eval()
    fast = fc.accelerate(fc.build_model(spec, seed=0))
    fast.train()
    for p in fast.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # whatever the caller's mode
        maps = fc.gradcam(fast, x)
    assert maps.shape == (5, 28, 28) and maps.dtype == torch.float32 and maps.device.type == "cpu"
    assert float(maps.min()) == 0.0 and float(maps.max()) == 1.0
    assert torch.equal(maps, fc.gradcam(plain, x))
    assert fc.is_accelerated(fast) and fast.training
    assert all(not p.requires_grad and p.grad is None for p in fast.parameters())
    # target: a chosen class gives another map than the predicted one, for some image
    other = (plain(x).argmax(1) + 1) % 10
    assert not torch.equal(fc.gradcam(plain, x, other), maps)


def test_receptive_field_centres_place_model1s_maps():
    """model1's pools drop the last row of odd-sized maps: its last 3x3 map reads input rows
    0-17, 4-21 and 8-25 of 28. A 'same'-padded model's map covers the input evenly."""
    model1 = fc.build_model(fc.get_model_spec("model1")).eval()
    layers = dict(conv_layers(model1))
    rows, cols = map_centres(model1, layers["conv2d_2"], (1, 1, 28, 28))
    assert rows.tolist() == cols.tolist() == [8.5, 12.5, 16.5]
    assert map_centres(model1, layers["conv2d"], (1, 1, 28, 28))[0].tolist() == list(range(1, 27))
    fastnet = fc.build_model(fc.get_model_spec("fastnet")).eval()
    last = conv_layers(fastnet)[-1][1]
    assert map_centres(fastnet, last, (1, 1, 28, 28))[0].tolist() == [1.5 + 4 * i for i in range(7)]


def test_gradcam_explains_a_plain_torch_module_and_refuses_bad_layers():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 24 * 24, 3))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert fc.gradcam(net, x, layer=-2).shape == (2, 28, 28)
    assert torch.equal(fc.gradcam(net, x, layer=1), fc.gradcam(net, x))
    for layer in (2, -3, 1.0):
        with pytest.raises(fc.UserError) as caught:
            fc.gradcam(net, x, layer=layer)
        assert caught.value.setting == "layer" and "must be 0 to 1" in str(caught.value)
    with pytest.raises(fc.UserError, match="target: class indices must be 0 to 2"):
        fc.gradcam(net, x, torch.tensor([0, 3]))
    with pytest.raises(fc.UserError, match="images: expected a float tensor"):
        fc.gradcam(net, x[0])


def test_a_model_without_conv2d_gets_saliency_not_gradcam():
    dense = fc.build_model(fc.get_model_spec("dense"), seed=0)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) - 0.5
    with pytest.raises(fc.UserError) as caught:
        fc.gradcam(dense, x)
    message = str(caught.value)
    assert caught.value.setting == "layer" and "no" in message and "Conv2D" in message
    assert "\n" not in message
    maps = fc.saliency(dense, x, samples=4)
    assert maps.shape == (3, 28, 28) and float(maps.min()) >= 0 and float(maps.max()) == 1.0
    probabilities = torch.softmax(dense(x), 1).detach().numpy()
    fig = fc.figure_gradcam(dense, x, np.array([0, 1, 2]), probabilities)
    assert fig._suptitle.get_text().startswith("SmoothGrad saliency (the model has no Conv2D")


def test_saliency_is_reproducible_for_a_seed():
    model = fc.build_model(parse_spec(SMALL_CNN), seed=0)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) - 0.5
    torch.manual_seed(123)  # the global generator plays no part
    first = fc.saliency(model, x, samples=4, seed=7)
    torch.manual_seed(456)
    assert torch.equal(first, fc.saliency(model, x, samples=4, seed=7))
    assert not torch.equal(first, fc.saliency(model, x, samples=4, seed=8))
    plain_gradient = fc.saliency(model, x, samples=1, noise=0.0)
    assert not torch.equal(first, plain_gradient)
    with pytest.raises(fc.UserError, match="samples=0"):
        fc.saliency(model, x, samples=0)


def test_overlay_keeps_the_image_at_alpha_0_and_puts_the_heat_where_it_is():
    image = np.full((40, 60), 200, dtype=np.uint8)
    heat = np.zeros((4, 6), dtype=np.float32)
    heat[0, 0] = 1.0  # hot top-left corner
    assert np.array_equal(fc.overlay_heatmap(image, heat, alpha=0.0), np.dstack([image] * 3))
    out = fc.overlay_heatmap(image, heat, alpha=1.0)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    red, blue = out[..., 0].astype(int), out[..., 2].astype(int)
    assert red[1, 1] > 100 and blue[1, 1] < 50    # jet's red where the heat is
    assert red[35, 55] < 50 and blue[35, 55] > 100  # jet's blue where it is not
    float_rgb = fc.overlay_heatmap(np.ones((8, 8, 3)), np.zeros((8, 8)), alpha=0.5)
    assert float_rgb.shape == (8, 8, 3) and int(float_rgb[0, 0, 0]) == 128
    with pytest.raises(fc.UserError, match="alpha"):
        fc.overlay_heatmap(image, heat, alpha=2)


# ----------------------------------------------------------------------------- predict --explain

@pytest.fixture(scope="module")
def tiny_conv_run(tmp_path_factory):
    """model1 trained for one epoch on tiny synthetic IDX files, with its figures."""
    from conftest import make_idx_dir

    root = tmp_path_factory.mktemp("explain")
    data = load_data(make_idx_dir(root / "idx"), check_md5=False)
    result = fc.train("seed-model1", root / "run", data=data, progress=False, epochs=1,
                      batch_size=16, threads=1)
    return result.run_dir


def test_every_run_writes_gradcam_png(tiny_conv_run):
    path = fc.RunDir(tiny_conv_run).plot("gradcam.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000


def test_explain_files_draws_the_heatmap_on_the_input_and_back_on_the_photo(tiny_conv_run,
                                                                          tmp_path):
    photo = np.full((200, 120), 250, dtype=np.uint8)  # (H, W): a dark coat on white
    top, left, bottom, right = 60, 30, 150, 110
    photo[top:bottom, left:right] = 30
    photo[top + 20:top + 40, left + 10:left + 30] = 90  # a pocket: not a flat garment
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "coat.png", tmp_path / "b" / "coat.png"):
        Image.fromarray(photo).save(path)
    (tmp_path / "notes.png").write_text("not an image")
    paths = [tmp_path / "coat.png", tmp_path / "notes.png", tmp_path / "b" / "coat.png"]
    explained = fc.explain_files(tiny_conv_run, paths, tmp_path / "why")
    assert [e.error is None for e in explained] == [True, False, True]
    assert explained[1].error.startswith(str(paths[1])) and explained[1].files == []
    assert [p.name for p in explained[0].files + explained[2].files] == [
        "coat-input.png", "coat-photo.png", "coat-2-input.png", "coat-2-photo.png"]
    assert explained[0].method.startswith("Grad-CAM of conv2d_2")
    assert explained[0].prediction in fc.CLASS_NAMES
    seen = np.asarray(Image.open(explained[0].files[0])).astype(float)
    shown = np.asarray(Image.open(explained[0].files[1])).astype(float)
    assert seen.shape == (224, 224, 3) and shown.shape == (400, 240, 3)  # 8x and 2x
    # overlay = 0.5 image + 0.5 colour: the heatmap's colour is 2 overlay - image
    model_input, inverted = to_fashion_mnist(Image.fromarray(photo))
    assert inverted
    photo_2x = np.repeat(np.repeat(photo, 2, 0), 2, 1)[..., None]
    colour_in = 2 * seen - np.repeat(np.repeat(model_input, 8, 0), 8, 1)[..., None]
    colour_photo = 2 * shown - photo_2x
    # Outside the coat's box (the background trimmed away: never seen) the photo is as it was.
    outside = np.ones(shown.shape[:2], bool)
    outside[2 * top:2 * bottom, 2 * left:2 * right] = False
    assert np.array_equal(shown[outside], np.repeat(photo_2x, 3, 2)[outside])
    assert not np.array_equal(shown[~outside], np.repeat(photo_2x, 3, 2)[~outside])
    # Inside, each input pixel's colour is found where it came from: the 90 x 80 box was
    # resized to 28 x 25 and placed at column 2 of the 28 x 28 input.
    for r in (4, 10, 14, 20, 25):
        for c in (4, 9, 14, 19, 24):
            y, x = top + (r + 0.5) * 90 / 28, left + (c + 0.5 - 2) * 80 / 25
            there = colour_photo[int(2 * y), int(2 * x)]
            here = colour_in[8 * r + 4, 8 * c + 4]
            assert np.abs(there - here).max() <= 20, (r, c, here, there)
    with pytest.raises(fc.UserError, match="layer must be 0 to 2 .*got 5"):
        fc.explain_files(tiny_conv_run, paths[:1], tmp_path / "why", layer=5)


def test_a_conv_without_its_own_activation_is_explained_after_its_blocks_activation():
    from fashion_cnn.analysis.explain import _block_output, conv_layers

    # fastnet: Conv2D (no activation), MaxPooling2D, BatchNormalization, Activation("relu")
    fastnet = fc.build_model(fc.get_model_spec("fastnet"), seed=0).eval()
    names = dict(zip(map(id, fastnet.layers), fastnet.layer_names))
    for (conv_name, conv), block in zip(conv_layers(fastnet), ("activation", "activation_1",
                                                               "activation_2")):
        assert names[id(_block_output(fastnet, conv))] == block, conv_name
    # the seed's Conv2D(activation="relu") layers are explained at their own output
    model1 = fc.build_model(fc.get_model_spec("model1"), seed=0)
    assert all(_block_output(model1, conv) is conv for _, conv in conv_layers(model1))
    maps = fc.gradcam(fastnet, torch.rand(4, 1, 28, 28))
    assert maps.shape == (4, 28, 28) and bool((maps.amax(dim=(1, 2)) > 0).all())


def test_the_predict_command_explains_and_refuses_a_layer_without_explain(tiny_conv_run,
                                                                         tmp_path, capsys):
    from fashion_cnn.cli import main

    image = tmp_path / "shirt.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)).save(image)
    missing = tmp_path / "missing.png"
    assert main(["predict", str(tiny_conv_run), str(image), str(missing),
                 "--explain", str(tmp_path / "why")]) == 2  # one file failed
    captured = capsys.readouterr()
    assert "shirt.png" in captured.out and "Wrote 2 explanation PNGs" in captured.err
    assert sorted(p.name for p in (tmp_path / "why").iterdir()) == ["shirt-input.png",
                                                                    "shirt-photo.png"]
    assert main(["predict", str(tiny_conv_run), str(image), "--layer", "0"]) == 2
    assert "--layer chooses the Conv2D layer of --explain" in capsys.readouterr().err
    assert main(["predict", str(tiny_conv_run), str(image), "--explain",
                 str(tmp_path / "why2"), "--layer", "7"]) == 2
    assert "--layer: layer must be 0 to" in capsys.readouterr().err
