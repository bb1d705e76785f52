import torch

from fashion_cnn.data.augment import affine_params, augment_batch, random_erasing, warp
from fashion_cnn.training.config import AugmentConfig


def _images(n=4, size=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 0.5


def test_zero_ranges_are_the_identity():
    x = _images()
    cfg = AugmentConfig(enabled=True)  # rotation 0, shift 0, zoom 0
    theta = affine_params(len(x), cfg, torch.Generator().manual_seed(0))
    out = warp(x, theta)
    assert torch.allclose(out, x, atol=1e-5)


def test_pure_shift_moves_by_k_pixels():
    x = torch.full((1, 1, 36, 36), -0.5)
    x[0, 0, 10:14, 12:20] = 1.0
    for k in (1, 3):
        theta = torch.tensor([[[1.0, 0.0, -2.0 * k / 36], [0.0, 1.0, 0.0]]])  # k px to the right
        out = warp(x, theta, fill_mode="constant", cval=-0.5)
        expected = torch.full_like(x, -0.5)
        expected[0, 0, 10:14, 12 + k:20 + k] = 1.0
        assert torch.allclose(out, expected, atol=1e-5), k


def test_shift_range_is_fraction_of_size():
    cfg = AugmentConfig(enabled=True, width_shift_range=0.1)
    theta = affine_params(2000, cfg, torch.Generator().manual_seed(0))
    tx_pixels = -theta[:, 0, 2] / 2 * 36
    assert tx_pixels.abs().max() <= 3.6 + 1e-5 and tx_pixels.abs().max() > 3.4
    assert torch.all(theta[:, 1, 2] == 0)


def test_rotation_range_degrees():
    cfg = AugmentConfig(enabled=True, rotation_range=2)
    theta = affine_params(2000, cfg, torch.Generator().manual_seed(0))
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert angles.abs().max() <= 2.0 + 1e-4 and angles.abs().max() > 1.9


def test_deterministic_for_a_seed_and_resumable_from_generator_state():
    cfg = AugmentConfig(enabled=True, rotation_range=10, width_shift_range=0.1,
                        height_shift_range=0.1, zoom_range=0.1, random_erasing=0.5)
    x = _images(8)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(7)
    augment_batch(x, cfg, gen)
    saved = gen.get_state()
    second = augment_batch(x, cfg, gen)
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert torch.equal(augment_batch(x, cfg, resumed), second)


def test_nearest_fill_repeats_the_edge():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :, -1] = 1.0  # bright right edge column
    theta = torch.tensor([[[1.0, 0.0, 2.0 * 2 / 8], [0.0, 1.0, 0.0]]])  # content moves 2 px left
    out = warp(x, theta, fill_mode="nearest")
    assert torch.allclose(out[0, 0, :, -3:], torch.ones(8, 3), atol=1e-5)


def test_random_erasing_changes_a_rectangle_only():
    cfg = AugmentConfig(enabled=True, random_erasing=1.0)
    x = torch.full((16, 1, 28, 28), -0.5)
    out = random_erasing(x, cfg, torch.Generator().manual_seed(0))
    changed = (out != x)[:, 0]
    for mask in changed:
        rows = mask.any(1).nonzero().flatten()
        cols = mask.any(0).nonzero().flatten()
        assert len(rows) > 0
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.9  # a filled rectangle (noise may equal -0.5 rarely)
    assert out.min() >= -0.5 and out.max() <= 1.5


def test_output_is_channels_last():
    cfg = AugmentConfig(enabled=True, rotation_range=2)
    out = augment_batch(_images(), cfg, torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_horizontal_flip_alone_mirrors_about_half_the_images_exactly():
    cfg = AugmentConfig(enabled=True, horizontal_flip=True)
    x = _images(64)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each image exactly one of the two
    assert 16 <= sum(mirrored) <= 48
    # the same draws as the resampling path: with a shift of 0 the mirrored images match
    theta = affine_params(64, cfg, torch.Generator().manual_seed(0))
    assert [bool(t) for t in theta[:, 0, 0] < 0] == mirrored
    assert torch.allclose(warp(x, theta), out, atol=1e-4)


def test_nearest_interpolation_shifts_whole_pixels_without_blur():
    x = torch.full((1, 1, 28, 28), -0.5)
    x[0, 0, 8:16, 6:18] = torch.linspace(0.0, 1.5, 12)
    shift = 1.4  # pixels to the right: nearest rounds it to one whole pixel
    theta = torch.tensor([[[1.0, 0.0, -2.0 * shift / 28], [0.0, 1.0, 0.0]]])
    sharp = warp(x, theta, fill_mode="constant", cval=-0.5, interpolation_order=0)
    assert torch.allclose(sharp, torch.roll(x, 1, dims=-1), atol=1e-6)
    blurred = warp(x, theta, fill_mode="constant", cval=-0.5, interpolation_order=1)
    assert not torch.isin(blurred, x).all()  # bilinear makes values the image never had
