import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fashion_cnn as fc
from fashion_cnn.data.fashion_mnist import CLASS_NAMES, load_data, to_tensor
from fashion_cnn.apps.predict import (TRIM_THRESHOLD, ImageError, load_image, predict_files,
                                 save_inputs, to_fashion_mnist)
from fashion_cnn.training.loop import predict_logits


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fashion_cnn", *args], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A dense model trained for one epoch on tiny synthetic IDX files, and that data."""
    from conftest import make_idx_dir

    root = tmp_path_factory.mktemp("predict")
    data = load_data(make_idx_dir(root / "idx"), check_md5=False)
    result = fc.train("dense", root / "run", data=data, progress=False, plots=False, epochs=1,
                       threads=1)
    return result.run_dir, data


def _photo(size=(120, 200), box=(30, 60, 150, 110), background=250, garment=30):
    """A 'product photo' of `size` (width, height): a dark rectangle (top, left, bottom, right)
    on a light background, as a (height, width) uint8 array."""
    array = np.full((size[1], size[0]), background, dtype=np.uint8)
    top, left, bottom, right = box
    array[top:bottom, left:right] = garment
    return array


def test_a_28x28_image_on_black_is_kept_pixel_for_pixel():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    array[:3], array[-3:], array[:, :3], array[:, -3:] = 0, 0, 0, 0
    out, inverted = to_fashion_mnist(Image.fromarray(array))
    assert not inverted and np.array_equal(out, array)
    out, inverted = to_fashion_mnist(Image.fromarray(array), invert="yes")
    assert inverted and np.array_equal(out, 255 - array)


def test_a_photo_is_inverted_trimmed_resized_and_centred():
    # garment 120 rows x 50 columns, off-centre in a 200 x 120 image on a light background
    photo = _photo(size=(120, 200), box=(30, 60, 150, 110))
    out, inverted = to_fashion_mnist(Image.fromarray(photo))
    assert inverted and out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.nonzero(out > 128)
    # the longer side (height) fills the 28 rows; the width is 50/120 of it, centred
    assert rows.min() == 0 and rows.max() == 27
    width = cols.max() - cols.min() + 1
    assert abs(width - round(28 * 50 / 120)) <= 1
    assert abs((cols.min() + cols.max()) / 2 - 13.5) <= 1
    assert out[rows, cols].min() > 200  # the garment is bright
    assert out[:, :cols.min() - 1].max() == 0 and out[:, cols.max() + 2:].max() == 0  # black


def test_transparent_background_counts_as_white_and_invert_no_is_respected():
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)  # fully transparent
    rgba[20:60, 30:50] = (20, 20, 20, 255)        # an opaque dark garment
    out, inverted = to_fashion_mnist(Image.fromarray(rgba))
    assert inverted and out[out > 128].size > 0 and out[0, 0] == 0
    light = _photo(size=(60, 60), box=(10, 20, 50, 40), background=10, garment=240)
    out, inverted = to_fashion_mnist(Image.fromarray(light), invert="no")
    assert not inverted and out.max() > 200 and out[:, 0].max() == 0
    with pytest.raises(Exception, match="invert must be one of"):
        to_fashion_mnist(Image.fromarray(light), invert="maybe")


def test_16_bit_and_float_grayscale_keep_their_range(tmp_path):
    sixteen = (np.linspace(0, 65535, 28 * 28).reshape(28, 28)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(sixteen).save(path)
    out, inverted = to_fashion_mnist(load_image(path), invert="no")
    assert np.abs(out.astype(int) - (sixteen / 257).round()).max() <= 1
    eight_bit_in_32 = Image.fromarray(np.arange(28 * 28, dtype=np.int32).reshape(28, 28) % 256)
    assert eight_bit_in_32.mode == "I"
    out, _ = to_fashion_mnist(eight_bit_in_32, invert="no")
    assert np.array_equal(out, np.arange(28 * 28).reshape(28, 28) % 256)
    floats = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    out, _ = to_fashion_mnist(Image.fromarray(floats), invert="no")
    assert out[0, 0] == 0 and out[-1, -1] == 255 and 120 <= out[14, 0] <= 135


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(_photo(size=(120, 60), box=(5, 5, 20, 100))).save(path, exif=exif)
    assert Image.open(path).size == (120, 60)
    assert load_image(path).size == (60, 120)


@pytest.mark.parametrize("name,content,fragment", [
    ("missing.png", None, "file not found"),
    ("notes.png", b"this is text, not pixels", "not an image file Pillow can read"),
    ("truncated.png", "truncate", "cannot decode the image"),
    ("folder", "dir", "is a directory"),
])
def test_unusable_files_give_one_line_errors(tmp_path, name, content, fragment):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "truncate":
        noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(path)  # about 4 KB: noise does not compress
        path.write_bytes(path.read_bytes()[:2000])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_predicting_saved_test_images_matches_the_model_on_the_tensors(tiny_run, tmp_path):
    run_dir, data = tiny_run
    images = data.test_images[:6]
    paths = []
    for i, image in enumerate(images):
        image = image.copy()
        image[0, :] = 0  # a dark border, as Fashion-MNIST's own images have
        images[i] = image
        paths.append(tmp_path / f"test{i}.png")
        Image.fromarray(image).save(paths[-1])
    results = predict_files(run_dir, paths)
    config, model = fc.load_model(run_dir)
    expected = torch.softmax(predict_logits(model, to_tensor(images, config.pad,
                                                             config.data.pad_value)), 1)
    got = torch.tensor([r.probabilities for r in results])
    assert torch.allclose(got, expected, atol=1e-6)
    assert all(abs(sum(r.probabilities) - 1) < 1e-5 for r in results)
    assert results[0].top(1)[0][0] == CLASS_NAMES[int(expected[0].argmax())]
    written = save_inputs(results, tmp_path / "inputs")
    assert [p.name for p in written] == [f"test{i}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(written[2])), images[2])


def test_cli_predict_reports_each_image_and_fails_on_bad_ones(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    good = tmp_path / "coat.jpg"
    Image.fromarray(_photo()).convert("RGB").save(good)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    result = cli("predict", str(run_dir), str(good), "--top", "2")
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[1]
    assert line.startswith(str(good)) and "(inverted)" in line
    assert any(name in line for name in CLASS_NAMES)
    result = cli("predict", str(run_dir), str(good), str(bad), "--json",
                 "--save-inputs", str(tmp_path / "seen"))
    assert result.returncode == 2
    payload = json.loads(result.stdout)
    assert payload[0]["path"] == str(good) and len(payload[0]["top"]) == 3
    assert payload[0]["prediction"] == payload[0]["top"][0]["class"]
    assert payload[1] == {"path": str(bad), "error": payload[1]["error"]}
    errors = [line for line in result.stderr.splitlines() if line.startswith("fashion-cnn: error")]
    assert errors == [f"fashion-cnn: error: {bad}: not an image file Pillow can read "
                      f"(PNG, JPEG, WebP, ...)"]
    assert (tmp_path / "seen" / "coat.png").is_file()
    result = cli("predict", str(tmp_path / "norun"), str(good))
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_photos_made_from_real_images_come_back_close_to_them(real_data):
    """Real (validation) images blown up 10x, negated (dark on white) and placed off-centre on a
    larger canvas, as photos would be: the preprocessing puts each garment back where it was
    (bounding box within a pixel) with nearly the same pixels."""
    correlations = []
    for image in real_data.train_images[-20:]:
        big = np.asarray(Image.fromarray(image).resize((280, 280), Image.Resampling.BICUBIC))
        photo = np.full((500, 400), 255, dtype=np.uint8)
        photo[150:430, 40:320] = 255 - big
        out, inverted = to_fashion_mnist(Image.fromarray(photo))
        assert inverted
        box = [np.nonzero(a > TRIM_THRESHOLD) for a in (image, out)]
        for (rows, cols), (rows2, cols2) in [box]:
            assert abs(rows.min() - rows2.min()) <= 1 and abs(rows.max() - rows2.max()) <= 1
            assert abs(cols.min() - cols2.min()) <= 1 and abs(cols.max() - cols2.max()) <= 1
        correlations.append(np.corrcoef(out.ravel().astype(float),
                                        image.ravel().astype(float))[0, 1])
    assert min(correlations) > 0.8 and np.median(correlations) > 0.92, correlations
