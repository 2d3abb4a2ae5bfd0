"""The demo page: its JSON API (default suite) and a real browser session (``-m browser``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, SHARED, photo
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the demo extra is not installed (pip install 'reme[demo]')")
pytest.importorskip("multipart", reason="python-multipart (demo extra) is not installed")

CHROMIUM = "/usr/bin/chromium"
DEFAULT_REF = REPO / "reference_sets" / "default"


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from reme.demo import DemoBackend, create_app

    backend = DemoBackend({"default": DEFAULT_REF}, device="cpu")
    # the app answers its bound host names only (TestClient would send Host: testserver)
    return TestClient(create_app(backend), base_url="http://127.0.0.1:7860"), backend


def test_demo_api_segment_and_evidence(client, tmp_path):
    c, backend = client
    cfg = c.get("/api/config").json()
    assert cfg["references"] == ["default"] and "chelsea" in cfg["samples"]
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(photo("chelsea")).save(path, quality=92)
    with open(path, "rb") as f:
        r = c.post("/api/segment", data={"classes": "cat; kitten, wall, floor", "reference": "default"},
                   files={"image": ("chelsea.jpg", f, "image/jpeg")})
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["width"], d["height"]) == (451, 300) and d["overlay"].startswith("data:image/png;base64,")
    assert [x["class"] for x in d["legend"]] == ["cat", "wall", "floor"]
    # the classes' shares and the unlabelled share ("none of these", left uncoloured) add up to 1
    assert abs(sum(x["fraction"] for x in d["legend"]) + d["unlabelled"]["fraction"] - 1.0) < 1e-3
    import numpy as np

    ys, xs = np.nonzero(backend._results[d["result_id"]].label_map >= 0)   # a labelled pixel, nearest the middle
    i = int(np.argmin((xs - 225) ** 2 + (ys - 150) ** 2))
    ev = c.get("/api/evidence", params={"result_id": d["result_id"], "x": int(xs[i]), "y": int(ys[i])}).json()
    ref = backend.segmenter("default").reference
    assert ev["class"] in ("cat", "wall", "floor") and ev["unlabelled"] is None and len(ev["neighbours"]) == 10
    assert all(set(n["labels"]) <= set(ref.labels) and n["labels"] for n in ev["neighbours"])
    sims = [n["similarity"] for n in ev["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    assert abs(sum(n["weight"] for n in ev["neighbours"]) - 1.0) < 1e-3   # top_k = 10: all of A1's mass
    assert abs(sum(v[1] for v in ev["votes"]) - 1.0) < 1e-3
    # each voting reference label names the test class it speaks for in A2 (eq. 2)
    assert all(v[2] in ("cat", "wall", "floor") and 0 < v[3] <= 1 for v in ev["votes"])
    assert ev["class_scores"][0][0] == ev["class"]
    assert ev["images_readable"] == SHARED.is_dir()
    first = ev["neighbours"][0]
    if first["thumb"]:                                                     # the photo is here: its crop
        thumb = c.get("/" + first["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    else:                                                                  # no tile; one line on --image-root
        assert "--image-root" in ev["photos_hint"] and first["image"] and len(first["bbox"]) == 4
    # errors come back as JSON with a message, not a traceback
    assert c.get("/api/evidence", params={"result_id": d["result_id"], "x": 9999, "y": 0}).status_code == 400
    assert c.get("/api/evidence", params={"result_id": "gone", "x": 0, "y": 0}).status_code == 404
    bad = c.post("/api/segment", data={"classes": "cat"}, files={"image": ("x.png", b"not a png", "image/png")})
    assert bad.status_code == 400 and "cannot decode" in bad.json()["error"]
    assert c.post("/api/segment", data={"classes": "cat", "sample": "chelsea", "reference": "nope"}).status_code == 404
    assert c.get("/api/refcrop/default/99999999.png").status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"reme demo exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """``reme demo`` on a free port of 127.0.0.1 (the embedded reference, CPU), for this module."""
    tmp = tmp_path_factory.mktemp("demo")
    port = _free_port()
    log = open(tmp / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "reme.cli", "demo", "--port", str(port), "--device", "cpu",
                             "--reference", str(DEFAULT_REF), "-q"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url + "api/config", proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True,
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   "--disable-component-update"])


needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                    reason=f"Debian chromium not found at {CHROMIUM} (apt-get install chromium)")


@pytest.mark.browser
@needs_chromium
def test_demo_in_browser(demo_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    url = demo_url
    upload = tmp_path / "chelsea.jpg"
    Image.fromarray(photo("chelsea")).save(upload, quality=92)
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        sync_api.expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
        assert page.locator("#reference option").all_inner_texts() == ["default"]
        page.set_input_files("#image-file", str(upload))
        page.fill("#classes", "cat, wall, floor, rug")
        page.click("#run")
        overlay = page.locator("#overlay")
        sync_api.expect(page.locator("#result")).to_be_visible(timeout=120_000)
        assert overlay.get_attribute("src").startswith("data:image/png")
        legend = page.locator("#legend tbody tr:not(.unlabelled-row)").all_inner_texts()
        assert len(legend) == 4 and any("cat" in row for row in legend)
        assert page.locator("#legend tbody tr.unlabelled-row").count() == 1   # "none of these" is on
        nat = page.evaluate("() => [document.getElementById('overlay').naturalWidth, "
                            "document.getElementById('overlay').naturalHeight]")
        assert nat == [451, 300]
        box = overlay.bounding_box()
        overlay.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.45})
        items = page.locator("#ev-neighbours li")
        sync_api.expect(items).to_have_count(10, timeout=30_000)
        labels = page.locator("#ev-neighbours .ref-labels").all_inner_texts()
        from reme.reference import load_reference

        known = set(load_reference(DEFAULT_REF, verify=False).labels)
        assert all(lab and set(lab.split(", ")) <= known for lab in labels), labels
        assert page.locator("#ev-title").inner_text().startswith("segment ")
        page.wait_for_function("() => [...document.querySelectorAll('#ev-neighbours img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        if page.locator("#ev-neighbours img").count() < 10:               # photos not here: no broken tiles
            sync_api.expect(page.locator("#ev-photos")).to_contain_text("--image-root")
            assert page.locator("#ev-neighbours .nophoto").count() == 10 - page.locator("#ev-neighbours img").count()
        shot = tmp_path / "reme_demo.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert Image.open(shot).size[0] >= 1000
    shutil.copy(shot, "/tmp/reme_demo_screenshot.png")


@pytest.mark.browser
@needs_chromium
def test_teach_by_example_in_browser(demo_url, tmp_path):
    """Segment a bundled photo, click a region, "Label this" as another class: the overlay is
    redrawn, the clicked region now has the taught class, the examples list shows it; Undo
    empties the list and restores the first overlay."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo_url)
        expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
        page.select_option("#sample", "chelsea")
        page.fill("#classes", "cat, wall, floor")
        page.click("#run")
        expect(page.locator("#result")).to_be_visible(timeout=120_000)
        overlay = page.locator("#overlay")
        first = overlay.get_attribute("src")
        assert page.locator("#teach").is_hidden() and page.locator("#examples-box").is_hidden()
        box = overlay.bounding_box()
        spot = {"x": box["width"] * 400 / 451, "y": box["height"] * 280 / 300}   # lower right: not the cat
        overlay.click(position=spot)
        expect(page.locator("#teach")).to_be_visible(timeout=30_000)
        before = page.locator("#ev-title").inner_text()
        assert page.evaluate("() => [...document.querySelectorAll('#class-names option')].map(o => o.value)") == \
            ["cat", "wall", "floor"]
        page.fill("#teach-label", "radiator")
        page.click("#teach-run")
        expect(page.locator("#examples tbody tr")).to_have_count(1, timeout=60_000)
        expect(page.locator("#status")).to_contain_text("Labelled as", timeout=30_000)
        assert overlay.get_attribute("src") != first and page.locator("#teach").is_hidden()
        assert page.input_value("#classes") == "cat, wall, floor, radiator"   # the new label became a class
        row = page.locator("#examples tbody tr").inner_text()
        assert "radiator" in row and "chelsea" in row
        assert "radiator" in page.locator("#legend tbody").inner_text()
        overlay.click(position=spot)                                            # the region now says so
        expect(page.locator("#ev-title")).to_contain_text("radiator", timeout=30_000)
        assert "radiator" not in before
        expect(page.locator(".taught").first).to_be_visible()
        page.wait_for_function("() => [...document.querySelectorAll('#ev-neighbours img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        shots = Path(os.environ.get("REME_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "reme_demo_taught.png"), full_page=True)
        page.locator("#examples button.undo").first.click()
        expect(page.locator("#examples tbody tr")).to_have_count(0, timeout=60_000)
        expect(page.locator("#examples-box")).to_be_hidden()
        expect(page.locator("#status")).to_contain_text("segmented again", timeout=30_000)
        page.fill("#classes", "cat, wall, floor")
        page.click("#run")
        expect(page.locator("#status")).to_contain_text("Done in", timeout=60_000)
        assert overlay.get_attribute("src") == first                            # undo restored the result
        browser.close()


@pytest.mark.browser
@needs_chromium
def test_unlabelled_and_coverage_in_browser(demo_url, tmp_path):
    """"None of these" on the page: chelsea with "cat, water" shows an "unlabelled" legend row
    with its share, a coverage mark on "water" (the embedded reference has no water label); a
    click on an unlabelled pixel says why and offers "Label this as"; labelling it redraws the
    overlay."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(demo_url)
        expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
        page.select_option("#sample", "chelsea")
        page.fill("#classes", "cat, water")
        page.click("#run")
        expect(page.locator("#status")).to_contain_text("Done in", timeout=120_000)
        unl = page.locator("#legend tr.unlabelled-row")
        expect(unl).to_have_count(1)
        share = float(unl.locator("td").nth(2).inner_text().rstrip("%"))
        assert 0 < share < 100 and "unlabelled" in unl.inner_text()
        expect(page.locator('#legend tr[data-class="water"] .uncovered')).to_be_visible()
        expect(page.locator('#legend tr[data-class="cat"] .uncovered')).to_have_count(0)
        expect(page.locator('#coverage li[data-class="water"]')).to_contain_text("Label this as")
        overlay = page.locator("#overlay")
        first = overlay.get_attribute("src")
        box = overlay.bounding_box()
        spot = {"x": box["width"] * 400 / 451, "y": box["height"] * 280 / 300}   # the floor, lower right
        overlay.click(position=spot)
        expect(page.locator("#ev-title")).to_contain_text("unlabelled", timeout=30_000)
        expect(page.locator("#ev-unlabelled")).to_contain_text("Unlabelled:")
        expect(page.locator("#teach")).to_be_visible()
        expect(page.locator("#teach-info")).to_contain_text("unlabelled")
        assert page.input_value("#teach-label") == "water"                      # the uncovered class, offered
        shots = Path(os.environ.get("REME_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "reme_demo_unlabelled.png"), full_page=True)
        page.click("#teach-run")
        expect(page.locator("#status")).to_contain_text("Labelled as", timeout=60_000)
        assert overlay.get_attribute("src") != first
        after = float(page.locator("#legend tr.unlabelled-row td").nth(2).inner_text().rstrip("%"))
        assert after < share
        water = page.locator('#legend tr[data-class="water"] td').nth(2).inner_text()
        assert float(water.rstrip("%")) > 0
        overlay.click(position=spot)
        expect(page.locator("#ev-title")).to_contain_text("water", timeout=30_000)
        expect(page.locator("#ev-unlabelled")).to_be_hidden()
        page.screenshot(path=str(shots / "reme_demo_unlabelled_taught.png"), full_page=True)
        page.locator("#undo-all").click()
        expect(page.locator("#examples-box")).to_be_hidden(timeout=60_000)
        browser.close()
    assert not [e for e in errors if "Content Security Policy" in e], errors
