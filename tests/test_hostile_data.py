"""Hostile data files and images: every bad input ends in one library error naming the file,
within bounded time and memory.

Property tests (Hypothesis) feed the IDX reader, the .npz loader and the image opener random
bytes and random mutations of valid files and assert: success, or a UserError (DataError),
never another exception. Then one test per class of attack: a gzip bomb, an absurd header, a
pixel bomb, a FIFO or device where a file is expected, a damaged file under a warm cache.

The Hypothesis profile is chosen in conftest.py: "ci" (the default) keeps this file within
seconds, HYPOTHESIS_PROFILE=long runs many more examples (by hand).
"""

from __future__ import annotations

import gzip
import io
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fashion_cnn import fileio, perf
from fashion_cnn.data import fashion_mnist as fdata
from fashion_cnn.data import images as images_module
from fashion_cnn.data.folders import load_image_folder
from fashion_cnn.data.images import (DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, conform,
                                     fit_image, image_header, open_image)
from fashion_cnn.data.sources import load_npz, open_dataset
from fashion_cnn.errors import DataError, UserError

from conftest import make_idx_dir
from dataset_files import write_idx_folder

MEMORY_CAP = 1 << 30  # bytes: what a command may take on a hostile input (issue 24)


# ----------------------------------------------------------------------------- valid files

def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                    *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


_RNG = np.random.default_rng(24)
VALID_IDX = {3: _idx_bytes(_RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)),
             1: _idx_bytes((np.arange(12) % 10).astype(np.uint8))}


def _image_bytes() -> list[bytes]:
    """Small valid images in the formats and modes Pillow writes here."""
    from PIL import Image

    rgb = Image.fromarray(_RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    images = [(rgb, "PNG"), (rgb.convert("L"), "PNG"), (rgb.convert("RGBA"), "PNG"),
              (rgb.convert("P"), "PNG"), (rgb.convert("I;16"), "PNG"), (rgb, "JPEG"),
              (rgb.convert("P"), "GIF"), (rgb, "BMP"), (rgb, "TIFF"), (rgb.convert("F"), "TIFF"),
              (rgb, "WEBP"), (rgb, "ICO"), (rgb.convert("1"), "PNG")]
    out = []
    for image, fmt in images:
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt)
        except (KeyError, OSError):  # a codec this Pillow was built without
            continue
        out.append(buffer.getvalue())
    return out


VALID_IMAGES = _image_bytes()


def _npz_bytes(compressed: bool, **extra) -> bytes:
    buffer = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(buffer, x_train=_RNG.integers(0, 256, (6, 8, 8), dtype=np.uint8),
         y_train=np.arange(6) % 3, x_test=np.zeros((2, 8, 8), np.uint8),
         y_test=np.array([0, 1]), **extra)
    return buffer.getvalue()


VALID_NPZ = [_npz_bytes(False), _npz_bytes(True),
             _npz_bytes(False, class_names=np.array(["a", "b", "c"]))]


# ----------------------------------------------------------------------------- mutations

EXTREMES = [0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 60000, 28]


@st.composite
def mutated(draw, originals: list[bytes]) -> bytes:
    """A valid file with a few random edits: bytes flipped, a 32-bit field set to an extreme
    (a header's dimensions), bytes inserted or removed, the end cut off."""
    raw = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "field", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[at] ^= draw(st.integers(1, 255))
        elif kind == "field":
            value = draw(st.sampled_from(EXTREMES) | st.integers(0, 0xFFFF_FFFF))
            raw[at:at + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 64))]
        else:
            del raw[at:]
    return bytes(raw)


def _outcome(call):
    """Run `call`; a UserError is an answer, as is a result. Anything else fails the test."""
    try:
        return call()
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return exc


# ----------------------------------------------------------------------------- properties

@given(raw=st.binary(max_size=3000) | mutated(list(VALID_IDX.values())),
       compress=st.sampled_from(["no", "gzip", "gzip then damage"]), ndim=st.sampled_from([1, 3]),
       image_size=st.sampled_from([None, 28]), damage=st.binary(min_size=1, max_size=8),
       at=st.integers(0, 10_000))
def test_the_idx_reader_answers_any_bytes_with_data_or_a_data_error(raw, compress, ndim,
                                                                    image_size, damage, at):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("x.idx.gz" if compress != "no" else "x.idx")
        if compress != "no":
            raw = gzip.compress(raw, mtime=0)
        if compress == "gzip then damage":
            at %= len(raw)
            raw = raw[:at] + damage + raw[at + len(damage):]
        path.write_bytes(raw)
        result = _outcome(lambda: fdata.read_idx(path, ndim, image_size=image_size,
                                                 decoded_md5=True, stored_digests=("md5",)))
        if isinstance(result, UserError):
            assert str(result).startswith(str(path))
        else:
            assert result.array.dtype == np.uint8 and result.array.ndim == ndim


@given(raw=mutated(list(VALID_IDX.values())), part=st.sampled_from(
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]),
    gz=st.booleans())
def test_a_mutated_idx_dataset_loads_or_is_refused_in_one_line(raw, part, gz):
    with tempfile.TemporaryDirectory() as folder:
        directory = make_idx_dir(Path(folder) / "idx", n_train=12, n_test=4, gz=gz)
        path = directory / (part + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        _outcome(lambda: fdata.load_data(directory, check_md5=False, use_cache=False))
        _outcome(lambda: open_dataset(str(directory)))


@given(raw=st.binary(max_size=2000) | mutated(VALID_NPZ))
def test_the_npz_loader_answers_any_bytes_with_data_or_a_data_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        path.write_bytes(raw)
        _outcome(lambda: load_npz(path))
        _outcome(lambda: open_dataset(str(path)))


@given(raw=st.binary(max_size=2000) | mutated(VALID_IMAGES),
       prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM",
                               b"II*\x00", b"RIFF"]))
def test_the_image_opener_answers_any_bytes_with_an_image_or_a_data_error(raw, prefix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.png"
        path.write_bytes(prefix + raw if not raw.startswith(prefix) else raw)
        header = _outcome(lambda: image_header(path))
        image = _outcome(lambda: open_image(path, upright=True))
        if not isinstance(image, UserError):
            assert not isinstance(header, UserError)
            assert image.width * image.height <= DEFAULT_MAX_IMAGE_PIXELS


@given(files=st.lists(mutated(VALID_IMAGES), min_size=1, max_size=3))
def test_an_image_folder_with_mutated_files_loads_or_is_refused_in_one_line(files):
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "pets"
        for cls in ("cat", "dog"):
            (root / cls).mkdir(parents=True)
            Image.new("RGB", (10, 10), (200, 10, 10)).save(root / cls / "good.png")
        for i, raw in enumerate(files):
            (root / ("cat", "dog")[i % 2] / f"odd{i}.png").write_bytes(raw)
        _outcome(lambda: load_image_folder(root, image_size=8, use_cache=False))
        _outcome(lambda: load_image_folder(root, use_cache=False))


# ----------------------------------------------------------------------------- gzip bombs

def _gzip_bomb(path: Path, header: bytes, inflated: int) -> Path:
    """`header` then `inflated` zero bytes, gzipped into a small file: identical gzip members
    one after another (a valid gzip file), so only one 8 MiB member is ever compressed."""
    chunk = 8 << 20
    member = gzip.compress(bytes(chunk), compresslevel=9, mtime=0)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(header, mtime=0))
        for _ in range(inflated // chunk):
            handle.write(member)
    return path


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST folder whose training images inflate to 4 GiB behind a header that
    announces 60 images."""
    directory = make_idx_dir(tmp_path_factory.mktemp("bomb") / "idx", n_train=60, n_test=20)
    header = struct.pack(">HBBIII", 0, 0x08, 3, 60, 28, 28)
    _gzip_bomb(directory / "train-images-idx3-ubyte.gz", header, 4 << 30)
    return directory


def test_a_gzip_bomb_is_refused_after_the_announced_bytes(bomb_dir):
    path = bomb_dir / "train-images-idx3-ubyte.gz"
    assert path.stat().st_size < 8 << 20  # 4 GiB inflated from a few MB
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="holds more data than the 47040 bytes announced"):
            fdata.read_idx(path, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # inflating all 4 GiB would take gigabytes; reading stops after ~47 KB
    assert peak < 16 << 20, peak


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(*args: str, timeout: float = 120, env: dict | None = None):
    """Run `fashion-cnn ARGS` with its address space capped at MEMORY_CAP; (exit status,
    stdout, stderr, peak resident bytes of that one process)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "fashion_cnn", *args], stdout=out,
                                stderr=err, preexec_fn=_limit_memory,
                                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:  # reaped here (not by Popen) to read this child's own peak memory
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise AssertionError(f"fashion-cnn {' '.join(args)}: still running after "
                                     f"{timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read().decode(), err.read().decode(),
                usage.ru_maxrss * 1024)  # Linux reports KiB


def _assert_one_line(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_the_cli_refuses_a_gzip_bomb_in_one_line_under_a_memory_cap(bomb_dir):
    code, _, err, peak = run_capped("data", "--data-dir", str(bomb_dir), "--no-checksum")
    _assert_one_line(code, err, "train-images-idx3-ubyte.gz", "holds more data")
    assert peak < MEMORY_CAP


# ----------------------------------------------------------------------------- absurd headers

@pytest.mark.parametrize("gz", [True, False])
def test_an_absurd_header_is_refused_before_anything_is_allocated(tmp_path, gz):
    # 4e9 images of 28x28: 3.1 TB announced by a file of a few bytes
    raw = struct.pack(">HBBIII", 0, 0x08, 3, 4_000_000_000, 28, 28) + bytes(784)
    path = tmp_path / ("huge.gz" if gz else "huge")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as caught:
            fdata.read_idx(path, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith(str(path)) and "header announces 4000000000 items" in message
    assert ("compressed file can hold" if gz else "expected 3136000000000") in message
    assert peak < 1 << 20, peak


def test_an_npz_whose_headers_overstate_its_arrays_is_refused_before_allocation(tmp_path):
    # a genuine .npy header announcing 1e12 pixels, followed by 100 bytes
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (1_000_000, 1000, 1000)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", header.getvalue() + bytes(100))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="x_train.npy announces shape"):
            load_npz(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_an_npz_member_that_claims_more_than_deflate_can_give_is_refused(tmp_path):
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x_train.npy", bytes(1000))
    raw = bytearray(path.read_bytes())
    # the member's uncompressed size, in its local header (offset 22) and the central
    # directory's entry (offset 24 from its signature), set to 4 GB
    struct.pack_into("<I", raw, 22, 4_000_000_000)
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 4_000_000_000)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="more than a .*compressed file can hold"):
        load_npz(path)
    # stored (np.savez): the sizes must agree, else numpy would allocate what is announced
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x_train.npy", bytes(1000))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 22, 4_000_000_000)
    struct.pack_into("<I", raw, raw.index(b"PK\x01\x02") + 24, 4_000_000_000)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="x_train.npy announces 4,000,000,000 bytes"):
        load_npz(path)


def test_pickled_npz_arrays_are_never_loaded(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}, None], dtype=object), y_train=np.arange(2),
             x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.arange(1))
    with pytest.raises(DataError, match="Python objects, which are never unpickled"):
        load_npz(path)


# ----------------------------------------------------------------------------- pixel bombs

def _png(width: int, height: int, mode: str = "L") -> bytes:
    """A valid PNG of zeros (8-bit gray or RGBA), compressed row by row: never held whole."""
    colour, channels = {"L": (0, 1), "RGBA": (6, 4)}[mode]
    pack = zlib.compressobj(1)  # the fastest level: 256 MB of zeros still shrink 230-fold
    row = bytes(1 + width * channels)  # filter byte 0, then the pixels
    data = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height and whose pixel data is a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_png(300, 200))
    assert open_image(path).size == (300, 200)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "50000")
    with pytest.raises(DataError) as caught:
        open_image(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "300x200" in message
    assert "pixel budget of 0.05 megapixels" in message and MAX_IMAGE_PIXELS_ENV in message
    # far past the budget Pillow's own bomb check (its limit left as it is) speaks first:
    # the same line
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV)
    path.write_bytes(_png_header_only(30000, 30000))
    with pytest.raises(DataError, match=f"900.0 megapixels, above the pixel budget of "
                                        f"{DEFAULT_MAX_IMAGE_PIXELS / 1e6:g} megapixels"):
        image_header(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(UserError, match=f"{MAX_IMAGE_PIXELS_ENV}=lots: not a positive"):
        open_image(path)


def test_an_image_folder_skips_an_image_over_the_budget_by_name(tmp_path, monkeypatch, capsys):
    from PIL import Image

    root = tmp_path / "shapes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 12), 40 * i).save(root / cls / f"{i}.png")
    (root / "a" / "poster.png").write_bytes(_png(400, 300))
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "100000")
    data = load_image_folder(root, image_size=12)
    assert len(data.train_labels) == 6
    assert "poster.png (image is 400x300" in capsys.readouterr().err
    with pytest.raises(DataError, match="poster.png: cannot read as an image .*pixel budget"):
        load_image_folder(root, image_size=12, strict=True)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "200000")  # raised: decoded, not from the cache
    data = load_image_folder(root, image_size=12)
    assert len(data.train_labels) == 7 and not data.from_cache


def test_the_cli_refuses_a_pixel_bomb_in_one_line_under_a_memory_cap(tmp_path):
    from PIL import Image

    root = tmp_path / "photos"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("L", (16, 16)).save(root / cls / "0.png")
    # 6000 x 6000 RGBA: 36 MP (over the 24 MP budget, under twice it, where Pillow's own
    # check would speak) in a file of about 600 KB; decoded it would take 144 MB and its
    # conversions more
    (root / "a" / "bomb.png").write_bytes(_png(6000, 6000, "RGBA"))
    code, _, err, peak = run_capped("data", "--dataset", str(root), "--strict")
    _assert_one_line(code, err, "bomb.png", "6000x6000", "pixel budget", MAX_IMAGE_PIXELS_ENV)
    assert peak < MEMORY_CAP


def _jpeg(path: Path, width: int, height: int) -> Path:
    """A JPEG of one flat colour, written fast (low quality): its header is what counts."""
    from PIL import Image

    Image.new("RGB", (width, height), (180, 40, 90)).save(path, quality=10)
    return path


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_within_the_budget(tmp_path):
    photo = _jpeg(tmp_path / "phone.jpg", 8000, 6000)  # 48 MP: a full-resolution phone photo
    assert image_header(photo) == (8000, 6000, "RGB")  # accepted: it will be decoded drafted
    assert open_image(photo).size == (4000, 3000)  # half scale: 12 MP, within the 24 MP budget
    # brought to 28 pixels: decoded at 1/8, still over DRAFT_FACTOR x 28 on both sides
    assert open_image(photo, size=28).size == (1000, 750)
    assert fit_image(open_image(photo, size=28), 28, 3).shape == (28, 28, 3)
    # the same pixels as a PNG cannot be decoded at a reduced scale: refused from its header
    png = tmp_path / "phone.png"
    png.write_bytes(_png(8000, 6000))
    with pytest.raises(DataError, match="8000x6000 .48.0 megapixels., above the pixel budget"):
        open_image(png)


def test_a_jpeg_over_the_budget_even_at_an_eighth_is_refused(tmp_path, monkeypatch):
    photo = _jpeg(tmp_path / "wide.jpg", 4000, 3000)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "150000")  # 1/8 scale: 500x375 = 187,500 pixels
    for read in (open_image, image_header):
        with pytest.raises(DataError, match="4000x3000 .12.0 megapixels., above the pixel"):
            read(photo)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "200000")
    assert open_image(photo).size == (500, 375)


def test_pillows_own_limit_is_never_lowered(tmp_path, monkeypatch):
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "small.png"
    path.write_bytes(_png(300, 200))
    open_image(path)
    image_header(path)
    assert Image.MAX_IMAGE_PIXELS == before
    # a budget raised above Pillow's limit raises it for the call only
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(4 * before))
    path.write_bytes(_png_header_only(20000, 10000))  # 200 MP: over twice Pillow's own limit
    assert image_header(path) == (20000, 10000, "L")
    assert Image.MAX_IMAGE_PIXELS == before
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV)
    with pytest.raises(DataError, match="200.0 megapixels, above the pixel budget"):
        image_header(path)


# ----------------------------------------------------------------------------- image_size

def test_an_image_size_beyond_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(images_module, "machine_memory_bytes", lambda: 64 << 20)  # 64 MiB
    images = _RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as caught:
            conform(images, 4096, 1, "letterbox")  # 12 x 4096 x 4096: 192 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.setting == "data.image_size" and peak < 1 << 20, peak
    assert str(caught.value).startswith("data.image_size=4096: 12 images of 4096x4096 take")
    root = tmp_path / "shapes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    with pytest.raises(DataError, match="data.image_size=2048: 6 images of 2048x2048x3") as caught:
        load_image_folder(root, image_size=2048, use_cache=False)  # 72 MiB together
    assert caught.value.setting == "data.image_size"
    assert len(load_image_folder(root, image_size=1024, use_cache=False).train_labels) == 6


def test_fashion_mnist_at_the_largest_image_size_is_refused_in_one_line(real_data):
    # 70,000 images of 4096 x 4096: about a terabyte, above any machine this runs on
    assert perf.machine_memory_bytes() < 70_000 * 4096 * 4096
    with pytest.raises(DataError, match="data.image_size=4096: 60,000 images of 4096x4096"):
        open_dataset("fashion-mnist", image_size=4096)


def test_machine_memory_is_read_and_bounded_by_the_physical_memory():
    memory = perf.machine_memory_bytes()
    assert memory is None or 0 < memory <= os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- special files

def _answers_without_blocking(call, fifo: Path, seconds: float = 10):
    """`call()`'s outcome; fails (and unblocks the call) if it waits on the FIFO."""
    outcome = {}

    def target():
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a writer releases the blocked open
        os.close(fd)
        thread.join(5)
        raise AssertionError(f"blocked on the FIFO {fifo}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def test_fifos_devices_and_directories_are_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    readers = [("an IDX file", lambda p: fdata.read_idx(p, 3)),
               ("an image file", open_image), ("an image file", image_header),
               ("an .npz dataset", load_npz), ("a file", fileio.sha256_file),
               ("a TOML file", lambda p: fileio.require_regular_file(p, "a TOML file"))]
    for path, kind in ((fifo, "a named pipe (FIFO)"), (Path("/dev/zero"), "a character device"),
                       (folder, "a directory")):
        for what, read in readers:
            with pytest.raises(UserError) as caught:
                _answers_without_blocking(lambda: read(path), fifo)
            assert str(caught.value) == (f"{path}: is {kind}, not a regular file "
                                         f"(expected {what})")


def test_a_fifo_in_a_dataset_is_refused_or_skipped_without_blocking(tmp_path, capsys):
    from PIL import Image

    directory = make_idx_dir(tmp_path / "idx", n_train=12, n_test=4)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(directory / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: is a named pipe"):
        _answers_without_blocking(lambda: fdata.load_data(directory, check_md5=False),
                                  directory / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: is a named pipe"):
        _answers_without_blocking(lambda: open_dataset(str(directory)),
                                  directory / "t10k-labels-idx1-ubyte.gz")
    npz = tmp_path / "data.npz"
    os.mkfifo(npz)
    with pytest.raises(DataError, match="data.npz: is a named pipe .*expected a folder or an"):
        _answers_without_blocking(lambda: open_dataset(str(npz)), npz)
    root = tmp_path / "shapes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 12), 40 * i).save(root / cls / f"{i}.png")
    os.mkfifo(root / "a" / "pipe.png")
    data = _answers_without_blocking(lambda: load_image_folder(root), root / "a" / "pipe.png")
    assert len(data.train_labels) == 6
    assert "pipe.png (is a named pipe (FIFO)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- damaged caches

def _damage_in_place(path: Path, offset: int) -> None:
    """Change one byte, keeping the file's size and its access and modification times."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_source_damaged_under_a_warm_cache_is_noticed(tmp_path):
    directory = make_idx_dir(tmp_path / "raw", n_train=12, n_test=4, gz=False)
    first = fdata.load_data(directory, check_md5=False)
    assert fdata.load_data(directory, check_md5=False).from_cache and not first.from_cache
    _damage_in_place(directory / "train-images-idx3-ubyte", 16 + 5)  # a pixel of image 0
    again = fdata.load_data(directory, check_md5=False)
    assert not again.from_cache
    assert again.train_images[0, 0, 5] == first.train_images[0, 0, 5] ^ 0xFF
    # gzipped: the damage breaks the stream's CRC, and the load says so instead of the cache
    gz = make_idx_dir(tmp_path / "gz", n_train=12, n_test=4, gz=True)
    fdata.load_data(gz, check_md5=False)
    path = gz / "train-images-idx3-ubyte.gz"
    _damage_in_place(path, path.stat().st_size - 6)  # inside the CRC-32 at the end
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: gzip stream is corrupt"):
        fdata.load_data(gz, check_md5=False)


def test_a_damaged_cache_file_is_decoded_again(tmp_path):
    directory = make_idx_dir(tmp_path / "idx", n_train=12, n_test=4)
    first = fdata.load_data(directory, check_md5=False)
    cached = sorted(fdata.cache_root().glob("decoded/*/train_images.npy"),
                    key=lambda p: p.stat().st_mtime_ns)[-1]
    _damage_in_place(cached, cached.stat().st_size - 1)
    again = fdata.load_data(directory, check_md5=False)
    assert not again.from_cache and np.array_equal(again.train_images, first.train_images)
    assert fdata.load_data(directory, check_md5=False).from_cache  # the cache was rewritten


def test_an_image_damaged_under_a_warm_folder_cache_is_noticed(tmp_path):
    from PIL import Image

    root = tmp_path / "shapes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 12), 40 * i + 1).save(root / cls / f"{i}.bmp")
    first = load_image_folder(root)
    assert load_image_folder(root).from_cache and not first.from_cache
    path = root / "b" / "2.bmp"
    _damage_in_place(path, path.stat().st_size - 1)  # the last pixel of the first row (BMP)
    again = load_image_folder(root)
    assert not again.from_cache and not np.array_equal(again.train_images, first.train_images)


def test_idx_folders_keep_their_checksums_and_messages(tmp_path):
    images = _RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6) % 3
    directory = write_idx_folder(tmp_path / "three", images, labels, images[:3], labels[:3])
    import hashlib

    stored = (directory / "train-labels-idx1-ubyte.gz").read_bytes()
    (directory / "SHA256SUMS").write_text(
        f"{hashlib.sha256(stored).hexdigest()}  train-labels-idx1-ubyte.gz\n")
    data = open_dataset(str(directory))
    assert data.verified_md5 and data.train_images.shape[1:] == (28, 28)
    (directory / "SHA256SUMS").write_text(f"{'0' * 64}  train-labels-idx1-ubyte.gz\n")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: checksum mismatch"):
        open_dataset(str(directory))


def test_fit_image_accepts_what_open_image_returns(tmp_path):
    for i, raw in enumerate(VALID_IMAGES):
        path = tmp_path / f"{i}.img"
        path.write_bytes(raw)
        assert fit_image(open_image(path), 5, 3).shape == (5, 5, 3)
