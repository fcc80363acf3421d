"""monet index (against the reference's routing) and monet serve (JSON API,
then the page in headless Chromium)."""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from monet_ref import reference
from monet_ref.make_checkpoint import make_checkpoint

CORPUS_A = "the heat at the east seat is the other one. " * 4
CORPUS_B = "to the north: 42 + 17 = 59; the rate is set. " * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    model = str(root / "vd")
    make_checkpoint(model, vocab=301, layers=2, groups=1, seed=41, tokenizer=True, max_pos=256)
    a, b = root / "a.txt", root / "b.txt"
    a.write_text(CORPUS_A)
    b.write_text(CORPUS_B)
    return model, str(a), str(b), root


def run(monet_bin, *args, check=True):
    proc = subprocess.run([monet_bin, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def query(db, sql):
    import sqlite3
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_index_matches_reference(monet_bin, setup):
    model_dir, a, _, root = setup
    db = str(root / "a.db")
    out = run(monet_bin, "index", "--model", model_dir, "--corpus", a, "--out", db, "--context", "32", "--top-k", "4")
    assert "tokens/s" in out.stdout
    ids = [int(x) for x in run(monet_bin, "tokenize", "--model", model_dir, "--file", a, "--no-special").stdout.split(",")]
    model = reference.load(model_dir)
    E, groups = 32, 2
    counts = np.zeros((groups, E * E), dtype=np.int64)
    best = [dict() for _ in range(groups)]  # expert -> list of probs
    for s in range(0, len(ids), 31):
        window = [1] + ids[s:s + 31]
        _, routers = reference.forward(model, window)
        for g, layer in enumerate(sorted(routers)):
            g1, g2 = routers[layer]
            p = np.einsum("thi,thj->tij", g1[1:], g2[1:]).reshape(len(window) - 1, -1)
            counts[g] += (p > 0.01).sum(0)
            for t, k in zip(*np.nonzero(p > 0.01)):
                best[g].setdefault(int(k), []).append(p[t, k])
    got = {(g, e): n for g, e, n in query(db, "SELECT grp, expert, count FROM experts")}
    want = {(g, int(e)): int(counts[g, e]) for g in range(groups) for e in np.nonzero(counts[g])[0]}
    # probabilities within float rounding of the threshold may count either way
    assert sum(abs(got.get(k, 0) - want.get(k, 0)) for k in set(got) | set(want)) <= 0.001 * sum(want.values())
    assert query(db, "SELECT value FROM meta WHERE key = 'tokens'")[0][0] == str(len(ids))
    # top-k: at most 4 per expert, the strongest ones
    for (g, e), probs in [((g, e), v) for g in range(groups) for e, v in best[g].items()][:50]:
        rows = query(db, f"SELECT prob FROM activations WHERE grp = {g} AND expert = {e} ORDER BY prob DESC")
        want_top = sorted(probs, reverse=True)[:4]
        assert len(rows) == len(want_top)
        assert np.allclose([r[0] for r in rows], want_top, atol=1e-5)
    ctx, focus, token = query(db, "SELECT context, focus, token FROM activations LIMIT 1")[0]
    assert json.loads(ctx)[focus] == token


def test_index_resume_and_errors(monet_bin, setup):
    model_dir, a, b, root = setup
    both, resumed = str(root / "both.db"), str(root / "resumed.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", a, b, "--out", both, "--context", "32")
    run(monet_bin, "index", "--model", model_dir, "--corpus", a, "--out", resumed, "--context", "32")
    err = run(monet_bin, "index", "--model", model_dir, "--corpus", a, "--out", resumed, "--context", "32", check=False)
    assert err.returncode != 0 and "--resume" in err.stderr
    run(monet_bin, "index", "--model", model_dir, "--corpus", a, b, "--out", resumed, "--context", "32", "--resume")
    assert query(both, "SELECT grp, expert, count FROM experts ORDER BY 1, 2") == \
        query(resumed, "SELECT grp, expert, count FROM experts ORDER BY 1, 2")
    assert query(both, "SELECT value FROM meta WHERE key = 'tokens'") == query(resumed, "SELECT value FROM meta WHERE key = 'tokens'")
    bad = run(monet_bin, "index", "--model", model_dir, "--corpus", a, "--out", resumed, "--context", "16", "--resume",
              check=False)
    assert bad.returncode != 0 and "other settings" in bad.stderr
    missing = run(monet_bin, "index", "--model", model_dir, "--corpus", str(root / "nope.txt"), "--out",
                  str(root / "x.db"), check=False)
    assert missing.returncode != 0 and "nope.txt" in missing.stderr and not os.path.exists(root / "x.db")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(monet_bin, setup):
    model_dir, a, b, root = setup
    db = str(root / "viewer.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", a, b, "--out", db, "--context", "64")
    port = free_port()
    proc = subprocess.Popen([monet_bin, "serve", "--model", model_dir, "--index", db, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/api/info", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url, root
    proc.terminate()
    proc.wait(timeout=10)


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_api(server):
    url, _ = server
    info = get(url + "/api/info")
    assert info["groups"] == 2 and info["experts_per_group"] == 1024 and info["has_index"]
    experts = get(url + "/api/experts?group=1&limit=5")["experts"]
    assert len(experts) == 5 and experts[0]["count"] >= experts[-1]["count"]
    e = get(url + f"/api/expert?group=1&expert={experts[0]['expert']}")
    assert e["count"] == experts[0]["count"] and e["contexts"] and len(e["outputs"]) == 12
    assert e["i"] * 32 + e["j"] == experts[0]["expert"]
    found = get(url + "/api/search?token=the")
    assert found["experts"]
    req = urllib.request.Request(url + "/api/probe", data=json.dumps({"text": "the heat"}).encode(), method="POST")
    with urllib.request.urlopen(req) as r:
        probe = json.loads(r.read())
    assert [t["token"] for t in probe["tokens"]][0] == "<s>" and len(probe["tokens"][1]["groups"]) == 2
    for bad in ("/api/expert?group=7&expert=1", "/api/expert?group=0&expert=99999", "/api/experts?order=zzz"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url + bad)
        assert exc.value.code == 400 and "error" in json.loads(exc.value.read())
    big = urllib.request.Request(url + "/api/probe", data=json.dumps({"text": "a" * 2_000_000}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(big)
    assert exc.value.code == 413
    assert get(url + "/api/info")["groups"] == 2  # still serving after bad requests


def test_page_in_headless_chromium(server):
    """Load the page, open an expert, probe a text, build a mask; screenshot."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists("/usr/bin/chromedriver"):
        pytest.fail("Debian's chromium and chromium-driver are needed (bash scripts/deps.sh installs them)")
    url, root = server
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url + "/")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#expert-list a.expert-link")))
        assert "tokens indexed" in driver.find_element(By.ID, "info").text
        first = driver.find_element(By.CSS_SELECTOR, "#expert-list a.expert-link")
        label = first.text  # g0/ID
        first.click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#contexts .ctx .focus")))
        title = driver.find_element(By.ID, "expert-title").text
        assert f"expert {label.split('/')[1]} of group 0" in title
        assert driver.find_elements(By.CSS_SELECTOR, "#contexts .ctx")
        driver.find_element(By.ID, "add-mask").click()
        assert label in driver.find_element(By.ID, "mask-table").text
        box = driver.find_element(By.ID, "probe-text")
        box.clear()
        box.send_keys("the other heat")
        driver.find_element(By.CSS_SELECTOR, "#probe-form button").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#probe-table .probe-tok")))
        tokens = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#probe-table .probe-tok")]
        assert tokens[0] == "<s>" and len(tokens) >= 3
        shot = root / "viewer.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        os.makedirs(os.path.join(os.path.dirname(__file__), "..", "..", "build"), exist_ok=True)
        driver.save_screenshot(os.path.join(os.path.dirname(__file__), "..", "..", "build", "viewer-test.png"))
    finally:
        driver.quit()
