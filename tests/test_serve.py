"""`fashion-cnn serve` through FastAPI's test client: every endpoint, every kind of bad upload
(each answered 4xx with a JSON error naming the problem, and the app answering after it),
Grad-CAM overlays, the limits, temporary files removed, concurrent requests."""

from __future__ import annotations

import base64
import io
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fashion_cnn as fc
from fashion_cnn.apps.predict import predict_files
from fashion_cnn.apps.serve import Limits, create_app, is_loopback, serve
from fashion_cnn.data.fashion_mnist import CLASS_NAMES, load_data
from fashion_cnn.errors import UserError

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient

# Small limits, so that "too large" and "too many" cost little to send.
LIMITS = Limits(max_file_bytes=64 * 1024, max_files=4, request_seconds=10.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """model1 (a CNN) trained for one epoch on tiny synthetic IDX files, a figure file in its
    plots folder, and those files' test images."""
    from conftest import make_idx_dir

    root = tmp_path_factory.mktemp("serve")
    data = load_data(make_idx_dir(root / "idx"), check_md5=False)
    result = fc.train("seed-model1", root / "run", data=data, progress=False, plots=False,
                      epochs=1, threads=1)
    figure = fc.RunDir(result.run_dir).plot("metrics.png")
    figure.parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(figure)
    return result.run_dir, data


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run[0], limits=LIMITS)) as test_client:
        yield test_client


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    data = base64.b64decode(url[len(prefix):])
    assert data.startswith(PNG_MAGIC)
    return np.array(Image.open(io.BytesIO(data)))  # a writable copy


def raw_multipart(*parts: bytes, boundary: bytes = b"XyZ", close: bool = True) -> bytes:
    """A multipart body from parts given as raw bytes (headers, blank line, content): hostile
    file names that an HTTP client library would escape go through as sent."""
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def file_part(filename: bytes, content: bytes, content_type: bytes = b"image/png") -> bytes:
    return (b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: " + content_type + b"\r\n\r\n" + content)


def post_raw(client, body: bytes, boundary: bytes = b"XyZ", query: str = ""):
    return client.post("/api/predict" + query, content=body, headers={
        "content-type": "multipart/form-data; boundary=" + boundary.decode()})


def assert_still_serving(client, image: np.ndarray) -> None:
    """After a bad request: the health check and a good prediction both answer."""
    assert client.get("/healthz").json() == {"status": "ok"}
    good = client.post("/api/predict", files={"file": ("ok.png", png_bytes(image), "image/png")})
    assert good.status_code == 200 and "prediction" in good.json()["results"][0]


# ----------------------------------------------------------------------------- endpoints

def test_health_and_model_info(client, run):
    run_dir, _ = run
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/api/model").json()
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    assert info["run"] == Path(run_dir).name and info["name"] == "seed-model1"
    assert info["classes"] == list(CLASS_NAMES)
    assert info["parameters"] == 93_322  # Keras' count for the seed's model1
    assert info["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert info["input_shape"] == [28, 28, 1] and info["model_input_shape"] == [1, 28, 28]
    assert info["explain"] is True and info["figures"] == ["metrics.png"]
    assert info["limits"]["max_files"] == 4 and info["limits"]["max_file_bytes"] == 65536
    defaults = Limits()
    assert defaults.max_file_bytes == 10 * 2**20 and defaults.max_files == 16


def test_page_is_one_self_contained_file(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    # no external script, style sheet, font, image or request: the one <link> is the inline
    # icon (its SVG names its XML namespace, which is not a request), no src= at all
    links = re.findall(r"<link[^>]*>", page)
    assert len(links) == 1 and 'href="data:image/svg+xml,' in links[0]
    lowered = re.sub(r"<link[^>]*>", "", page).lower()
    assert "http://" not in lowered and "https://" not in lowered and "//cdn" not in lowered
    css = lowered.split("<style>", 1)[1].split("</style>", 1)[0]
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    assert "<script src" not in lowered and " src=" not in lowered
    assert 'type="file"' in page and "api/predict" in page and "api/figures/" in page


def test_openapi_describes_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/model", "/healthz", "/api/figures/{name}"} <= set(schema["paths"])
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert client.get("/docs").status_code == 200


def test_figures_are_served_only_by_their_known_names(client, run):
    run_dir, _ = run
    response = client.get("/api/figures/metrics.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == fc.RunDir(run_dir).plot("metrics.png").read_bytes()
    missing = client.get("/api/figures/confusion_matrix.png")
    assert missing.status_code == 404 and "metrics.png" in missing.json()["error"]
    for name in ("config.toml", "..%2Fconfig.toml", "%2E%2E%2Fmodel.safetensors",
                 "..%2F..%2F..%2Fetc%2Fpasswd", "metrics.png%00.toml", "per_class.csv"):
        response = client.get("/api/figures/" + name)
        assert response.status_code == 404, name
        assert "error" in response.json() and b"[model]" not in response.content
    assert client.get("/api/figures/../config.toml").status_code == 404


def test_unknown_paths_and_methods_answer_json(client):
    response = client.get("/nothing-here")
    assert response.status_code == 404 and response.json()["error"].startswith("no such page")
    response = client.get("/api/predict")
    assert response.status_code == 405 and "error" in response.json()


# ----------------------------------------------------------------------------- predictions

def test_predict_matches_the_predict_command(client, run, tmp_path):
    _, data = run
    images = data.test_images[:3]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"image{i}.png")
        paths[-1].write_bytes(png_bytes(image))
    response = client.post("/api/predict?top_k=10", files=[
        ("file", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert response.status_code == 200
    body = response.json()
    assert body["errors"] == 0 and body["top_k"] == 10 and body["explain"] is False
    expected = predict_files(run[0], paths)
    for i, (result, want) in enumerate(zip(body["results"], expected)):
        assert result["index"] == i and result["name"] == paths[i].name
        assert [c["class"] for c in result["top"]] == [c for c, _ in want.top(10)]
        assert [c["probability"] for c in result["top"]] == pytest.approx(
            [p for _, p in want.top(10)], abs=1e-6)
        assert result["prediction"] == result["top"][0]["class"]
        assert sum(c["probability"] for c in result["top"]) == pytest.approx(1.0, abs=1e-4)
        assert "heatmap" not in result
        # a 28x28 image is the model's input pixel for pixel (negated where its border is
        # light: random pixels' median is near 127)
        seen = 255 - images[i] if result["inverted"] else images[i]
        assert result["inverted"] == want.inverted
        assert np.array_equal(decode_data_url(result["input"]), seen)


def test_a_photo_is_shown_as_the_model_saw_it(client):
    photo = np.full((300, 200, 3), 245, np.uint8)
    photo[60:260, 50:150] = (30, 40, 120)  # a dark garment on a light background
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    response = client.post("/api/predict", data={"top_k": "2", "invert": "auto"},
                           files={"file": ("photo.jpg", buffer.getvalue(), "image/jpeg")})
    result = response.json()["results"][0]
    assert response.status_code == 200 and len(result["top"]) == 2 and result["inverted"]
    seen = decode_data_url(result["input"])
    assert seen.shape == (28, 28) and seen.max() >= 250 and seen[0, 0] == 0  # light on black


def test_some_bad_files_among_good_ones_are_reported_per_file(client, run):
    _, data = run
    good = png_bytes(data.test_images[0])
    response = client.post("/api/predict", files=[
        ("file", ("good.png", good, "image/png")),
        ("file", ("notes.txt", b"just text", "text/plain")),
        ("file", ("fake.png", b"not a png at all", "image/png")),
        ("file", ("good-again.png", good, "application/octet-stream"))])
    assert response.status_code == 200
    body = response.json()
    assert body["errors"] == 2 and [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    first, text, fake, again = body["results"]
    assert first["prediction"] == again["prediction"] and first["top"] == again["top"]
    assert text["status"] == 415 and text["error"].startswith("notes.txt: its content type")
    assert fake["status"] == 422 and "fake.png: not an image file" in fake["error"]
    assert "/tmp" not in json.dumps(body) and "upload-" not in json.dumps(body)


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    return png_bytes(noise)[:2000]


BAD_UPLOADS = [  # (file name, content, content type, status, words of the error)
    (b"notes.png", b"this is text, not pixels", b"image/png", 422, "not an image file"),
    (b"cut.png", truncated_png(), b"image/png", 422, "cannot decode the image"),
    (b"empty.png", b"", b"image/png", 422, "empty file"),
    (b"big.png", b"\0" * (LIMITS.max_file_bytes + 1), b"image/png", 413,
     "larger than the limit of 64 KiB per file"),
    (b"page.html", b"<html></html>", b"text/html", 415, "not an image type"),
    (b"../../etc/cron.d/x.png", b"x", b"image/png", 400, "path separator"),
    (b"dir\\x.png", b"x", b"image/png", 400, "path separator"),
    (b"two\nlines.png", b"x", b"image/png", 400, "control character"),
    (b"nul\0.png", b"x", b"image/png", 400, "control character"),
    ("gnp\u202e.exe".encode(), b"x", b"image/png", 400, "control character"),
    (b"x" * 300 + b".png", b"x", b"image/png", 400, "its name is 304 bytes long"),
    (b"\xff\xfe.png", b"x", b"image/png", 400, "not UTF-8"),
    (b"..", b"x", b"image/png", 400, "not a file name"),
]


@pytest.mark.parametrize("name,content,kind,status,words", BAD_UPLOADS,
                         ids=[str(b[0][:12]) for b in BAD_UPLOADS])
def test_every_bad_upload_is_a_4xx_json_error(client, run, name, content, kind, status, words):
    response = post_raw(client, raw_multipart(file_part(name, content, kind)))
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["error"] and body["results"][0]["status"] == status
    assert words in body["results"][0]["error"] and "\n" not in body["error"]
    assert_still_serving(client, run[1].test_images[0])


@pytest.mark.parametrize("body,content_type,status,words", [
    (b'{"image": "..."}', "application/json", 415, "send the images as multipart/form-data"),
    (raw_multipart(b'Content-Disposition: form-data; name="top_k"\r\n\r\n3'), None, 400,
     "no image in the request"),
    (raw_multipart(), None, 400, "no image in the request"),
    (raw_multipart(file_part(b"a.png", b"x"), close=False), None, 400, "closing boundary"),
    (raw_multipart(b'Content-Disposition: form-data; name="colour"\r\n\r\nred'), None, 400,
     "unknown form field 'colour'"),
    (raw_multipart(b'Content-Disposition: form-data; name="top_k"\r\n\r\n' + b"9" * 2000),
     None, 400, "longer than 1024 bytes"),
    (raw_multipart(b"Content-Type: image/png\r\n\r\nxx"), None, 400, "no Content-Disposition"),
    (b"garbage", "multipart/form-data", 400, "no boundary"),
])
def test_a_bad_request_as_a_whole_is_refused(client, run, body, content_type, status, words):
    content_type = content_type or "multipart/form-data; boundary=XyZ"
    response = client.post("/api/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert_still_serving(client, run[1].test_images[0])


@pytest.mark.parametrize("query,form,words", [
    ("?top_k=0", {}, "top_k='0': expected a whole number from 1 to 10"),
    ("?top_k=11", {}, "from 1 to 10"),
    ("?top_k=abc", {}, "top_k='abc'"),
    ("?explain=maybe", {}, "explain='maybe': expected true or false"),
    ("?invert=sometimes", {}, "expected one of auto, yes, no"),
    ("?top_k=3", {"top_k": "4"}, "top_k given twice"),
])
def test_bad_settings_are_refused(client, run, query, form, words):
    image = png_bytes(run[1].test_images[0])
    response = client.post("/api/predict" + query, data=form,
                           files={"file": ("a.png", image, "image/png")})
    assert response.status_code == 422 and words in response.json()["error"]


def test_too_many_files_and_too_large_bodies_are_refused_early(client, run):
    image = png_bytes(run[1].test_images[0])
    files = [("file", (f"{i}.png", image, "image/png")) for i in range(LIMITS.max_files + 1)]
    response = client.post("/api/predict", files=files)
    assert response.status_code == 413 and "more than 4 files" in response.json()["error"]
    # a declared Content-Length over the limit: refused before a byte of the body is read
    response = client.post("/api/predict", content=b"x", headers={
        "content-type": "multipart/form-data; boundary=XyZ",
        "content-length": str(LIMITS.max_body_bytes + 1)})
    assert response.status_code == 413 and "more than" in response.json()["error"]

    def endless():  # no Content-Length: counted as it arrives, refused past the limit
        chunk = b"--XyZ\r\n" + file_part(b"a.png", b"\0" * 60_000)
        sent = 0
        while sent < 10 * LIMITS.max_body_bytes:
            sent += len(chunk)
            yield chunk

    response = client.post("/api/predict", content=endless(), headers={
        "content-type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 413 and "request body is larger" in response.json()["error"]
    assert_still_serving(client, run[1].test_images[0])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit gray pixels and holds almost none: decoding it
    would fail ("cannot decode"), so a refusal naming its size was made from its header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_the_pixel_budget_is_checked_before_decoding(run, monkeypatch):
    bomb = png_header_only(30_000, 30_000)  # 900 megapixels declared in 100-odd bytes
    with TestClient(create_app(run[0], limits=Limits(max_pixels=1_000_000))) as small:
        wide = png_bytes(np.zeros((1500, 1500), np.uint8))  # a real 2.25-megapixel image
        response = small.post("/api/predict", files={"file": ("wide.png", wide, "image/png")})
        assert response.status_code == 422
        assert ("wide.png: image is 1500x1500 (2.2 megapixels), above this server's limit of 1 "
                "megapixels") in response.json()["error"]
        assert small.get("/api/model").json()["limits"]["max_pixels"] == 1_000_000
        # the bomb is over data.images' own budget (24 megapixels) too, which speaks first
        response = small.post("/api/predict", files={"file": ("bomb.png", bomb, "image/png")})
        assert response.status_code == 422 and ("bomb.png: image is 900.0 megapixels, above "
                                                "the pixel budget") in response.json()["error"]
    monkeypatch.setenv("FASHION_CNN_MAX_IMAGE_PIXELS", "2000000")  # data.images' own budget
    with TestClient(create_app(run[0])) as budget:
        response = budget.post("/api/predict", files={"file": ("bomb.png", bomb, "image/png")})
        assert response.status_code == 422 and "above the pixel budget of 2 megapixels" in \
            response.json()["error"]
        assert_still_serving(budget, run[1].test_images[0])
    with pytest.raises(UserError, match="max_pixels=3000000: above the image pixel budget"):
        create_app(run[0], limits=Limits(max_pixels=3_000_000))


def test_a_slow_upload_runs_into_the_request_time_limit(run):
    def slow():
        yield b"--XyZ\r\n" + file_part(b"a.png", b"\0" * 100)
        time.sleep(1.0)
        yield b"\r\n--XyZ--\r\n"

    with TestClient(create_app(run[0], limits=Limits(request_seconds=0.3))) as hurried:
        response = hurried.post("/api/predict", content=slow(), headers={
            "content-type": "multipart/form-data; boundary=XyZ"})
        assert response.status_code == 408 and "request time limit of 0.3 s" in \
            response.json()["error"]
        assert hurried.get("/healthz").status_code == 200


def test_uploads_go_only_to_a_temporary_folder_that_is_removed(client, run, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TemporaryDirectory goes
    image = png_bytes(run[1].test_images[0])
    assert client.post("/api/predict", files={"file": ("a.png", image, "image/png")}
                       ).status_code == 200
    assert client.post("/api/predict", files={"file": ("b.png", b"\0" * 70_000, "image/png")}
                       ).status_code == 413
    post_raw(client, raw_multipart(file_part(b"c.png", image), close=False))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_requests_get_the_same_answers(client, run):
    images = [png_bytes(image) for image in run[1].test_images[:8]]
    sequential = [client.post("/api/predict", files={"file": ("a.png", image, "image/png")}
                              ).json()["results"][0]["top"] for image in images]
    answers, failures = [None] * 32, []

    def ask(slot):
        try:
            response = client.post("/api/predict", files={
                "file": ("a.png", images[slot % 8], "image/png")})
            answers[slot] = response.json()["results"][0]["top"]
        except Exception as exc:  # reported below, in the test's own thread
            failures.append(exc)

    threads = [threading.Thread(target=ask, args=(slot,)) for slot in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(answers[slot] == sequential[slot % 8] for slot in range(32))


# ----------------------------------------------------------------------------- explanations

def test_explain_adds_a_grad_cam_overlay(client, run):
    explain = pytest.importorskip("fashion_cnn.analysis.explain")
    gradcam, overlay_heatmap = explain.gradcam, explain.overlay_heatmap
    from fashion_cnn.data.arrays import to_tensor

    cfg, model = fc.load_model(run[0])
    images = run[1].test_images[:2]
    response = client.post("/api/predict", data={"explain": "true"}, files=[
        ("file", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)])
    assert response.status_code == 200
    body = response.json()
    assert body["explain"] is True
    for result, image in zip(body["results"], images):
        overlay = decode_data_url(result["heatmap"])
        assert overlay.shape == (28, 28, 3) and overlay.dtype == np.uint8
        # coloured: the heatmap is drawn over the grayscale input, not the input alone
        assert (overlay[..., 0] != overlay[..., 2]).any()
        # and it is Grad-CAM's map of the class shown on top, over the input shown
        seen = decode_data_url(result["input"])
        x = to_tensor(seen[None], mean=cfg.stats[0], std=cfg.stats[1])
        top = cfg.class_names.index(result["prediction"])
        want = overlay_heatmap(seen, gradcam(model, x, target=[top])[0].numpy())
        assert np.abs(overlay.astype(int) - want.astype(int)).max() <= 1


def test_explain_needs_a_convolution(tmp_path):
    from conftest import make_idx_dir

    root = tmp_path
    data = load_data(make_idx_dir(root / "idx"), check_md5=False)
    dense = fc.train("dense", root / "run", data=data, progress=False, plots=False, epochs=1,
                     threads=1)
    with TestClient(create_app(dense.run_dir)) as plain:
        assert plain.get("/api/model").json()["explain"] is False
        image = png_bytes(data.test_images[0])
        response = plain.post("/api/predict?explain=true",
                              files={"file": ("a.png", image, "image/png")})
        assert response.status_code == 422 and "Conv2D" in response.json()["error"]
        response = plain.post("/api/predict", files={"file": ("a.png", image, "image/png")})
        assert response.status_code == 200


# ----------------------------------------------------------------------------- serve()

def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com", ""]))


def test_serve_warns_off_loopback_and_passes_its_limits_to_uvicorn(run, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    serve(run[0], host="0.0.0.0", port=8123, limits=Limits(max_connections=7))
    assert "warning: serving on 0.0.0.0:8123" in capsys.readouterr().err
    serve(run[0])
    assert capsys.readouterr().err == ""
    assert calls[0]["host"] == "0.0.0.0" and calls[0]["port"] == 8123
    assert calls[0]["limit_concurrency"] == 7
    assert calls[1]["host"] == "127.0.0.1" and calls[1]["port"] == 8000


def test_bad_settings_and_runs_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="max_files=0: must be a whole number") as caught:
        Limits(max_files=0)
    assert caught.value.setting == "max_files"
    with pytest.raises(UserError, match="request_seconds"):
        Limits(request_seconds=float("nan"))
    with pytest.raises(UserError):
        create_app(tmp_path / "no-such-run")
    with pytest.raises(UserError, match="port"):
        serve(tmp_path / "no-such-run", port=70000)


def test_on_loopback_only_requests_naming_this_machine_are_answered(run):
    """serve() on 127.0.0.1 lets only Host headers of this machine through: a page whose own
    name was made to resolve to 127.0.0.1 (DNS rebinding) cannot read the API."""
    app = create_app(run[0], limits=LIMITS, allowed_hosts=["localhost", "127.0.0.1"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as ours:
        assert ours.get("/api/model").status_code == 200
    with TestClient(app, base_url="http://rebound.example:8000") as theirs:
        assert theirs.get("/api/model").status_code == 400
        assert theirs.post("/api/predict", files={"file": ("a.png", b"x")}).status_code == 400


def test_the_serve_command_refuses_bad_limits_in_one_line(run, capsys):
    from fashion_cnn.cli import main

    for option, value in (("--threads", "0"), ("--max-file-mb", "0"), ("--max-files", "0"),
                          ("--port", "70000")):
        assert main(["serve", str(run[0]), option, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fashion-cnn: error: ") and "\n" not in err and option in err
