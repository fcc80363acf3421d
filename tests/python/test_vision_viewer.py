"""The viewer's image probe (VisionMonet): `monet serve` on a random
llava_monet checkpoint. /api/probe with an image gives the routing of every
image patch, equal to `monet experts --image --json`, and the picture as the
model saw it; bad images and checkpoints without a vision tower answer 400;
the page draws one expert's heat map over the picture (headless Chromium)."""
import base64
import json
import os
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from conftest import require
from monet_ref import make_checkpoint as mc
from monet_ref.safetensors_io import read_safetensors

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "images")
PHOTO = os.path.join(IMAGES, "grace_hopper.jpg")
TEXT = "what is this"


def photo_url():
    with open(PHOTO, "rb") as f:
        return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(monet_bin, model_dir):
    port = free_port()
    proc = subprocess.Popen([monet_bin, "serve", "--model", model_dir, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # the model loads after the server listens (/health: 503 until then)
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
    proc.terminate()
    pytest.fail("monet serve did not load the model")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava-viewer"))
    mc.make_llava_checkpoint(d, vocab=320, tokenizer=True)
    return d


@pytest.fixture(scope="module")
def server(monet_bin, ckpt):
    proc, url = start_server(monet_bin, ckpt)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def post(url, body):
    """(status, JSON answer) of POST /api/probe."""
    req = urllib.request.Request(url + "/api/probe", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # (a form body is limited to 8 kB)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_probe_patches_equal_the_cli(monet_bin, ckpt, server, tmp_path):
    status, probe = post(server, {"text": TEXT, "image": photo_url(), "threshold": 0.01, "top": 1000})
    assert status == 200, probe
    # the CLI on the same prompt: the viewer puts <image> in front of a text without one, as `monet chat` does
    r = subprocess.run([monet_bin, "experts", "--model", ckpt, "--image", PHOTO, "-p", "<image>\n" + TEXT,
                        "--threshold", "0.01", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)["tokens"]
    im = probe["image"]
    assert im["grid"] == 4 and im["patch_size"] == 8 and (im["width"], im["height"]) == (32, 32)
    cli_patches = [t for t in cli if "image" in t]
    assert len(im["patches"]) == len(cli_patches) == 16
    for got, want in zip(im["patches"], cli_patches):
        assert (got["position"], got["patch"], got["row"], got["col"]) == \
            (want["position"], want["patch"], want["row"], want["col"])
        assert len(got["groups"]) == len(want["groups"]) == 2
        for g_got, g_want in zip(got["groups"], want["groups"]):
            assert g_got["count"] == g_want["count"] == len(g_got["experts"])
            assert [e["expert"] for e in g_got["experts"]] == [e["id"] for e in g_want["experts"]]
            assert np.allclose([e["p"] for e in g_got["experts"]], [e["p"] for e in g_want["experts"]], rtol=0, atol=1e-6)
    # the text positions: the same tokens and experts as the CLI's
    cli_text = [t for t in cli if "image" not in t]
    assert [(t["position"], t["id"]) for t in probe["tokens"]] == [(t["position"], t["id"]) for t in cli_text]
    assert probe["tokens"][0]["token"] == "<s>" and probe["tokens"][0]["position"] == 0
    for got, want in zip(probe["tokens"], cli_text):
        for g_got, g_want in zip(got["groups"], want["groups"]):
            assert [e["expert"] for e in g_got["experts"]] == [e["id"] for e in g_want["experts"]]
    # the picture the page draws is the one the tower saw (padded, resized, cropped)
    px_file = tmp_path / "px.safetensors"
    subprocess.run([monet_bin, "vision", "--model", ckpt, "--image", PHOTO, "--out", str(px_file)], check=True,
                   capture_output=True)
    px = read_safetensors(str(px_file))["pixel_values.0"].reshape(3, 32, 32)
    mean = np.array([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
    std = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)
    seen = np.round((px * std + mean) * 255).astype(np.uint8).transpose(1, 2, 0)
    rgb = np.frombuffer(base64.b64decode(im["rgb"]), dtype=np.uint8).reshape(32, 32, 3)
    assert np.array_equal(rgb, seen)
    # a text that places its <image> keeps it there; the image's positions move accordingly
    status, placed = post(server, {"text": "look: <image>\nnow", "image": photo_url()})
    first = placed["image"]["patches"][0]["position"]
    assert status == 200 and first > 1 and len([t for t in placed["tokens"] if t["position"] < first]) == first
    assert placed["tokens"][-1]["position"] == first + 16 + len([t for t in placed["tokens"] if t["position"] > first]) - 1
    # without an image the probe is the text probe (no "image")
    status, plain = post(server, {"text": TEXT})
    assert status == 200 and "image" not in plain and len(plain["tokens"]) >= 2


def huge_png():
    """A PNG header claiming 100000 x 100000 pixels: refused before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_probe_bad_images(server):
    cases = {
        123: "must be a string",
        "https://example.org/a.png": "remote image URLs are not fetched",
        "photo.png": "image URLs must be data: URLs",
        "data:image/png;base64": "no ','",
        "data:image/png,abc": "must be base64",
        "data:image/png;base64,@@@@": "invalid character",
        "data:image/png;base64," + base64.b64encode(b"hello").decode(): "the image",
        "data:image/png;base64," + base64.b64encode(huge_png()).decode(): "the image",
        "data:image/png;base64," + base64.b64encode(open(PHOTO, "rb").read()[:2000]).decode(): "the image",
    }
    for image, message in cases.items():
        status, err = post(server, {"text": TEXT, "image": image})
        assert status == 400 and message in err["error"], (image if len(str(image)) < 80 else str(image)[:80], err)
    status, err = post(server, {"text": "<image> and <image>", "image": photo_url()})
    assert status == 400 and "placeholders" in err["error"]
    # a picture over the decoder's pixel limit is named as such
    status, err = post(server, {"text": TEXT, "image": "data:image/png;base64," + base64.b64encode(huge_png()).decode()})
    assert "100000x100000" in err["error"] and "limit" in err["error"], err
    assert post(server, {"text": TEXT})[0] == 200  # still serving


def test_probe_without_a_vision_tower(monet_bin, tmp_path):
    model = str(tmp_path / "plain")
    mc.make_checkpoint(model, vocab=301, layers=2, groups=1, seed=5, tokenizer=True, max_pos=128)
    proc, url = start_server(monet_bin, model)
    try:
        with urllib.request.urlopen(url + "/api/info", timeout=30) as r:
            assert json.loads(r.read())["vision"] is None
        status, err = post(url, {"text": TEXT, "image": photo_url()})
        assert status == 400 and "no vision tower" in err["error"] and "llava_monet" in err["error"]
        assert post(url, {"text": TEXT})[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def heat_alphas(driver, grid):
    """The heat-map canvas's alpha at the centre of every patch, row by row."""
    return driver.execute_script("""
        const c = document.getElementById('vision-heat'), g = arguments[0];
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const out = [];
        for (let r = 0; r < g; r++) for (let k = 0; k < g; k++) {
          const x = Math.floor((k + 0.5) * c.width / g), y = Math.floor((r + 0.5) * c.height / g);
          out.push(data[4 * (y * c.width + x) + 3]);
        }
        return out;""", grid)


def patch_weights(probe, group, expert):
    im = probe["image"]
    w = np.zeros(im["grid"] * im["grid"])
    for p in im["patches"]:
        for e in p["groups"][group]["experts"]:
            if e["expert"] == expert:
                w[p["row"] * im["grid"] + p["col"]] = e["p"]
    return w


def check_heat(driver, probe, group, expert):
    alphas = np.array(heat_alphas(driver, probe["image"]["grid"]), dtype=np.float64)
    w = patch_weights(probe, group, expert)
    assert w.max() > 0 and len(set(alphas)) > 1, (w, alphas)  # drawn, and not uniform
    assert int(alphas.argmax()) == int(w.argmax())
    assert np.allclose(alphas / 255, 0.85 * w / w.max(), atol=2 / 255)  # alpha = 0.85 p / max p
    for a in range(len(w)):  # the shading orders the patches as the weights do
        for b in range(len(w)):
            if w[a] > w[b] + 1e-3 * w.max():
                assert alphas[a] >= alphas[b]


def test_heat_map_in_headless_chromium(server, tmp_path):
    webdriver = require("selenium.webdriver", "python/requirements.txt")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists("/usr/bin/chromedriver"):
        pytest.fail("Debian's chromium and chromium-driver are needed (bash scripts/deps.sh installs them)")
    _, probe = post(server, {"text": TEXT, "image": photo_url(), "threshold": 0.01})
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server + "/")
        wait.until(lambda d: "vision 4x4 patches" in d.find_element(By.ID, "info").text)
        box = driver.find_element(By.ID, "probe-text")
        box.clear()
        box.send_keys(TEXT)
        driver.find_element(By.ID, "probe-image").send_keys(PHOTO)
        wait.until(lambda d: "grace_hopper.jpg" in d.find_element(By.ID, "probe-image-note").text)
        driver.find_element(By.CSS_SELECTOR, "#probe-form button").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image-experts a.expert-link")))
        rows = [el.text for el in driver.find_elements(By.CSS_SELECTOR, "#probe-table .probe-tok")]
        assert rows[:2] == ["<s>", "<image>"]  # the image stands first, as LLaVA's CLI puts it
        # the picture is drawn (not blank)
        assert driver.execute_script("""const c = document.getElementById('vision-image');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return new Set(d.filter((_, k) => k % 4 === 0)).size""") > 10
        # an expert of group 1 among the image's strongest: its heat map
        link = driver.find_element(By.CSS_SELECTOR, '#image-experts a.expert-link[data-group="1"]')
        expert = int(link.get_attribute("data-expert"))
        link.click()
        wait.until(lambda d: f"g1/{expert}" in d.find_element(By.ID, "heat-caption").text)
        check_heat(driver, probe, 1, expert)
        # an expert of a text token in the probe table: its heat map (blank when it fires on no patch)
        cell = driver.find_elements(By.CSS_SELECTOR, "#probe-table a.expert-link")[-1]
        g2, e2 = int(cell.get_attribute("data-group")), int(cell.get_attribute("data-expert"))
        cell.click()
        wait.until(lambda d: f"g{g2}/{e2}" in d.find_element(By.ID, "heat-caption").text)
        if patch_weights(probe, g2, e2).max() > 0:
            check_heat(driver, probe, g2, e2)
        else:
            assert set(heat_alphas(driver, 4)) == {0}
            assert "under the threshold on every patch" in driver.find_element(By.ID, "heat-caption").text
        on_image = {(g, e["expert"]) for p in probe["image"]["patches"] for g in range(2) for e in p["groups"][g]["experts"]}
        # group + expert picked by hand
        strongest = max(((g, e) for g, e in on_image), key=lambda x: patch_weights(probe, *x).max())
        driver.find_element(By.CSS_SELECTOR, f'#heat-group option[value="{strongest[0]}"]').click()
        field = driver.find_element(By.ID, "heat-expert")
        field.clear()
        field.send_keys(str(strongest[1]))
        driver.find_element(By.ID, "heat-show").click()
        wait.until(lambda d: f"g{strongest[0]}/{strongest[1]}" in d.find_element(By.ID, "heat-caption").text)
        check_heat(driver, probe, *strongest)
        assert driver.find_element(By.ID, "legend-max").text == f"{patch_weights(probe, *strongest).max():.3f}"
        driver.execute_script("document.getElementById('vision').scrollIntoView()")
        shot = tmp_path / "vision-heat-map.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("MONET_SCREENSHOT_DIR"):
            os.makedirs(os.environ["MONET_SCREENSHOT_DIR"], exist_ok=True)
            driver.save_screenshot(os.path.join(os.environ["MONET_SCREENSHOT_DIR"], "vision-heat-map.png"))
    finally:
        driver.quit()
