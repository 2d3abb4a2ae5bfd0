"""The demo server under misuse: hosts, cross-site posts, class caps, uploads, busy server."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import REPO, photo
from PIL import Image

pytest.importorskip("fastapi", reason="the demo extra is not installed (pip install 'reme[demo]')")
pytest.importorskip("multipart", reason="python-multipart (demo extra) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

import reme.demo.backend as backend_mod  # noqa: E402
from reme.demo import DemoBackend, create_app  # noqa: E402
from reme.demo.app import bound_host_names  # noqa: E402

DEFAULT_REF = REPO / "reference_sets" / "default"
URL = "http://127.0.0.1:7860"


@pytest.fixture()
def backend():
    # nothing here loads a segmenter unless a test asks for a segmentation
    return DemoBackend({"default": DEFAULT_REF}, device="cpu")


@pytest.fixture()
def client(backend):
    return TestClient(create_app(backend), base_url=URL)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()[:3000]


def _png_with_header_size(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h (a decompression-bomb header)."""
    data = bytearray(_png(4, 4))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_only_bound_host_names_are_answered(client, backend):
    assert client.get("/api/config").status_code == 200
    for host in ("evil.example", "attacker.test:7860", "192.0.2.1"):
        r = client.get("/api/config", headers={"host": host})
        assert r.status_code == 400, host
    other = TestClient(create_app(backend, allowed_hosts=["demo.lan"]), base_url="http://demo.lan")
    assert other.get("/api/config").status_code == 200
    assert other.get("/api/config", headers={"host": "localhost"}).status_code == 400


def test_bound_host_names():
    assert bound_host_names("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert "[::1]" in bound_host_names("::1") and "10.1.2.3" in bound_host_names("10.1.2.3")
    assert "evil.example" not in bound_host_names("0.0.0.0")


@pytest.mark.parametrize("headers", [{"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},
                                     {"origin": "http://evil.example"}, {"origin": "null"},
                                     {"origin": "http://127.0.0.1:3000"},
                                     {"referer": "http://evil.example/page.html"}])
def test_cross_site_posts_are_refused(client, backend, headers):
    r = client.post("/api/segment", data={"classes": "cat", "sample": "chelsea"}, headers=headers)
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    assert not backend._segmenters                          # nothing ran


@pytest.mark.parametrize("headers", [{"sec-fetch-site": "same-origin"}, {"origin": URL},
                                     {"referer": URL + "/"}, {}])
def test_same_origin_posts_pass_the_site_check(client, headers):
    r = client.post("/api/segment", data={"classes": ""}, headers=headers)   # reaches the class check
    assert r.status_code == 400 and "class" in r.json()["error"]


def test_empty_or_missing_classes_say_so(client):
    for data in ({"classes": "", "sample": "chelsea"}, {"sample": "chelsea"}, {"classes": " , ", "sample": "x"}):
        r = client.post("/api/segment", data=data)
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert "class" in msg and "Unprocessable" not in msg and "detail" not in r.json()


def test_class_count_is_capped_before_any_work(client, backend):
    many = ", ".join(f"thing{i}" for i in range(5000))
    t0 = time.time()
    r = client.post("/api/segment", data={"classes": many[:backend_mod.MAX_CLASS_CHARS].rsplit(",", 1)[0],
                                                "sample": "chelsea"})
    assert r.status_code == 400 and f"up to {backend_mod.MAX_CLASSES}" in r.json()["error"]
    r = client.post("/api/segment", data={"classes": many, "sample": "chelsea"})
    assert r.status_code == 400 and "characters" in r.json()["error"]
    syn = ", ".join("; ".join(f"w{i}_{j}" for j in range(10)) for i in range(30))     # 30 classes, 300 names
    r = client.post("/api/segment", data={"classes": syn, "sample": "chelsea"})
    assert r.status_code == 400 and f"up to {backend_mod.MAX_CLASS_TERMS}" in r.json()["error"]
    assert time.time() - t0 < 5 and not backend._segmenters
    assert client.get("/api/config").json()["max_classes"] == backend_mod.MAX_CLASSES


def test_upload_errors_are_plain_sentences(client):
    for payload, word in ((b"not a png", "cannot decode"), (b"", "empty"),
                          (_truncated_png(), "truncated"), (_png_with_header_size(30000, 30000), "pixels")):
        r = client.post("/api/segment", data={"classes": "cat"}, files={"image": ("x.png", payload, "image/png")})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert word in msg and "0x" not in msg and "BytesIO" not in msg, msg


def test_unknown_routes_and_references_answer_json(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/api/segment", data={"classes": "cat", "sample": "chelsea", "reference": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_favicon(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content
    assert 'rel="icon"' in client.get("/").text


def test_upload_decoded_at_working_size(monkeypatch):
    seen = []
    real = backend_mod.to_rgb_array
    monkeypatch.setattr(backend_mod, "to_rgb_array", lambda img: seen.append(img.size) or real(img))
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 100, 50)).save(buf, format="JPEG", quality=80)
    arr = backend_mod.read_upload(buf.getvalue())
    assert max(arr.shape[:2]) == backend_mod.MAX_SIDE and arr.shape[2] == 3
    # the JPEG was decoded at a reduced DCT scale, not at 4000 x 3000
    assert seen and max(seen[0]) < 2 * backend_mod.MAX_SIDE


def test_uploads_decode_a_few_at_a_time(monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real = backend_mod.to_rgb_array

    def slow(img):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return real(img)

    monkeypatch.setattr(backend_mod, "to_rgb_array", slow)
    data = _png(64, 48)
    errors = []

    def work():
        try:
            assert backend_mod.read_upload(data).shape == (48, 64, 3)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and 1 <= peak[0] <= backend_mod.DECODE_SLOTS


def test_busy_segmenter_gives_503(backend, client, monkeypatch):
    monkeypatch.setattr(backend_mod, "QUEUE_TIMEOUT_S", 0.2)
    backend._segmenters["default"] = object()    # loaded; never reached while the lock is held
    backend._lock.acquire()
    try:
        t0 = time.time()
        r = client.post("/api/segment", data={"classes": "cat", "sample": "chelsea"})
    finally:
        backend._lock.release()
    assert r.status_code == 503 and "busy" in r.json()["error"] and time.time() - t0 < 10


@pytest.mark.slow  # loads the default reference's encoders: ~10 s idle, 30 s on a busy box
def test_photo_round_trip_still_segments(client):
    """One real request through all the guards (the default reference, on CPU)."""
    buf = io.BytesIO()
    Image.fromarray(photo("chelsea")).save(buf, format="JPEG", quality=90)
    r = client.post("/api/segment", data={"classes": "cat, wall"}, headers={"origin": URL},
                    files={"image": ("chelsea.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["width"], d["height"]) == (451, 300) and [x["class"] for x in d["legend"]] == ["cat", "wall"]
    assert np.isclose(sum(x["fraction"] for x in d["legend"]), 1.0, atol=1e-3)
