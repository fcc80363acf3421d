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
from conftest import require

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


def index_rows(db):
    return (query(db, "SELECT grp, expert, count, max_prob FROM experts ORDER BY 1, 2"),
            query(db, "SELECT grp, expert, prob, doc, pos, token, context, focus FROM activations ORDER BY 1, 2, 3, 4, 5"),
            query(db, "SELECT doc, path, tokens FROM documents ORDER BY doc"),
            query(db, "SELECT key, value FROM meta ORDER BY key"))


def test_index_commits_stops_and_resumes_inside_documents(monet_bin, setup):
    """Commits every few tokens (also inside a document), --max-tokens stops and
    --resume continues at the window where it stopped: the same index as one run."""
    model_dir, _, _, root = setup
    a, b = root / "long_a.txt", root / "long_b.txt"
    a.write_text(CORPUS_A * 6)
    b.write_text(CORPUS_B * 6)
    opts = ["--context", "16", "--top-k", "3"]
    one = str(root / "one.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", str(a), str(b), "--out", one, *opts)
    n_a = query(one, "SELECT tokens FROM documents WHERE doc = 0")[0][0]
    assert n_a > 60  # several windows of 15 tokens
    parts = str(root / "parts.db")
    out = run(monet_bin, "index", "--model", model_dir, "--corpus", str(a), str(b), "--out", parts, *opts,
              "--max-tokens", "40", "--commit-every", "10")
    assert "indexed 45 tokens" in out.stdout  # whole windows: 3 x 15
    partial = json.loads(query(parts, "SELECT value FROM meta WHERE key = 'partial'")[0][0])
    assert partial["next"] == 45 and partial["doc"] == 0 and partial["path"].endswith("long_a.txt")
    assert query(parts, "SELECT COUNT(*) FROM documents") == [(0,)]
    run(monet_bin, "index", "--model", model_dir, "--corpus", str(a), str(b), "--out", parts, *opts,
        "--resume", "--max-tokens", str(n_a), "--commit-every", "7")  # ends inside b
    partial = json.loads(query(parts, "SELECT value FROM meta WHERE key = 'partial'")[0][0])
    assert partial["doc"] == 1 and partial["path"].endswith("long_b.txt")
    run(monet_bin, "index", "--model", model_dir, "--corpus", str(a), str(b), "--out", parts, *opts,
        "--resume", "--commit-every", "25")
    assert index_rows(parts) == index_rows(one)
    # a document that changed after the index stopped inside it is refused, the index left as it was
    stopped = str(root / "stopped.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", str(a), "--out", stopped, *opts, "--max-tokens", "20")
    before = index_rows(stopped)
    a.write_text(CORPUS_B * 6)
    bad = run(monet_bin, "index", "--model", model_dir, "--corpus", str(a), "--out", stopped, *opts, "--resume",
              check=False)
    assert bad.returncode != 0 and "changed since the index stopped inside it" in bad.stderr
    assert index_rows(stopped) == before
    for flag, value in (("--commit-every", "0"), ("--max-tokens", "-1"), ("--window", "-2")):
        bad = run(monet_bin, "index", "--model", model_dir, "--corpus", str(b), "--out", str(root / "flag.db"),
                  flag, value, check=False)
        assert bad.returncode != 0 and flag in bad.stderr and not os.path.exists(root / "flag.db")


def test_index_killed_then_resumed_equals_one_run(monet_bin, setup):
    """SIGKILL after a commit inside a document, then --resume: the same index as one run."""
    import signal
    model_dir, _, _, root = setup
    big = root / "big.txt"
    big.write_text(CORPUS_A * 300)
    opts = ["--context", "64", "--top-k", "4", "--commit-every", "200"]
    one = str(root / "big-one.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", str(big), "--out", one, *opts)
    killed = str(root / "big-killed.db")
    proc = subprocess.Popen([monet_bin, "index", "--model", model_dir, "--corpus", str(big), "--out", killed, *opts],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = []
    deadline = time.time() + 60
    while not partial and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
        if os.path.exists(killed):
            try:
                partial = query(killed, "SELECT value FROM meta WHERE key = 'partial'")
            except Exception:  # noqa: BLE001  (the schema may not be there yet)
                pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert partial, "the run ended before a commit inside the document could be seen"
    stopped_at = json.loads(query(killed, "SELECT value FROM meta WHERE key = 'partial'")[0][0])["next"]
    total = query(one, "SELECT tokens FROM documents")[0][0]
    assert 0 < stopped_at < total
    run(monet_bin, "index", "--model", model_dir, "--corpus", str(big), "--out", killed, *opts, "--resume")
    assert index_rows(killed) == index_rows(one)


def test_index_queries_use_indexes(monet_bin, setup):
    """Queries by expert, group and token string are index lookups, not scans."""
    model_dir, a, b, root = setup
    db = str(root / "plan.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", a, b, "--out", db, "--context", "32")
    plans = {
        "expert": "SELECT prob FROM activations WHERE grp = 0 AND expert = 5 ORDER BY prob DESC, doc, pos",
        "token": "SELECT grp, expert, COUNT(*) FROM activations WHERE trim(token) = trim(' the') GROUP BY grp, expert",
        "group": "SELECT expert, count FROM experts WHERE grp = 1 ORDER BY count DESC LIMIT 10",
    }
    for name, sql in plans.items():
        plan = " ".join(row[-1] for row in query(db, "EXPLAIN QUERY PLAN " + sql))
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (name, plan)
        assert "SCAN activations" not in plan and "SCAN experts" not in plan, (name, plan)


def test_serve_uses_the_index_model(monet_bin, setup):
    """Without --model, serve loads the model the index was built with; a model of another
    shape is refused (its expert ids would mean other experts)."""
    model_dir, a, _, root = setup
    db = str(root / "own.db")
    run(monet_bin, "index", "--model", model_dir, "--corpus", a, "--out", db, "--context", "32")
    port = free_port()
    proc = subprocess.Popen([monet_bin, "serve", "--index", db, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "MONET_MODEL": ""})
    try:
        assert "monet viewer on" in proc.stdout.readline()
        for _ in range(300):  # the model loads after the server listens (/health: 503 until then)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        assert os.path.samefile(get(f"http://127.0.0.1:{port}/api/info")["model"], model_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    other = str(root / "other-shape")
    make_checkpoint(other, vocab=301, layers=2, groups=1, experts=16, seed=3, tokenizer=True, max_pos=256)
    bad = run(monet_bin, "serve", "--index", db, "--model", other, "--port", str(free_port()), check=False)
    assert bad.returncode != 0 and "serve it with --model of the index's model" in bad.stderr


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
    assert len(probe["next"]) == 10 and probe["masked"] == 0
    assert 0 < sum(n["p"] for n in probe["next"]) <= 1 + 1e-6
    assert [n["p"] for n in probe["next"]] == sorted((n["p"] for n in probe["next"]), reverse=True)
    # with a mask: group 0's routing comes before any masked layer, so its strongest expert on
    # token 1 is still routed, and listed as removed; the next-token distribution changes
    strongest = probe["tokens"][1]["groups"][0]["experts"][0]["expert"]
    mask = {"experts": [{"group": 0, "expert": strongest}], "components": [{"group": 1, "side": 1, "index": 0}]}
    req = urllib.request.Request(url + "/api/probe", data=json.dumps({"text": "the heat", "mask": mask}).encode(),
                                 method="POST")
    with urllib.request.urlopen(req) as r:
        masked = json.loads(r.read())
    g0 = masked["tokens"][1]["groups"][0]
    assert masked["masked"] == 2
    assert strongest in [e["expert"] for e in g0["removed"]] and strongest not in [e["expert"] for e in g0["experts"]]
    assert g0["count"] == probe["tokens"][1]["groups"][0]["count"] - 1
    assert [n["p"] for n in masked["next"]] != [n["p"] for n in probe["next"]]
    for body in ({"text": "the", "mask": {"experts": [{"group": 9, "expert": 1}]}}, {"text": "the", "next": 1000},
                 {"text": "the", "mask": "x"}, {"text": "the", "threshold": -1}):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(url + "/api/probe", data=json.dumps(body).encode(), method="POST"))
        assert exc.value.code == 400 and json.loads(exc.value.read())["error"]
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
    """Load the page, open an expert, build a mask (expert, component, file), download it,
    probe a text with and without it; screenshot."""
    webdriver = require("selenium.webdriver", "python/requirements.txt")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    if not os.path.exists("/usr/bin/chromium") or not os.path.exists("/usr/bin/chromedriver"):
        pytest.fail("Debian's chromium and chromium-driver are needed (bash scripts/deps.sh installs them)")
    url, root = server
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url + "/")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#expert-list a.expert-link")))
        assert "tokens indexed" in driver.find_element(By.ID, "info").text
        first = driver.find_element(By.CSS_SELECTOR, "#expert-list a.expert-link")
        label = first.text  # g0/ID
        expert = int(label.split("/")[1])
        first.click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#contexts .ctx .focus")))
        title = driver.find_element(By.ID, "expert-title").text
        assert f"expert {expert} of group 0" in title
        # each context: the firing token between its left and right context, as the index stores it
        e = get(url + f"/api/expert?group=0&expert={expert}")
        shown = driver.find_elements(By.CSS_SELECTOR, "#contexts .ctx")
        assert len(shown) == len(e["contexts"])
        c0 = e["contexts"][0]
        row = shown[0]
        visible = lambda s: s.replace("\n", "\u21b5").replace("\t", "\u2192")
        assert row.find_element(By.CSS_SELECTOR, ".focus").get_attribute("textContent") == visible(c0["token"])
        assert row.find_element(By.CSS_SELECTOR, ".left").get_attribute("textContent") == \
            visible("".join(c0["context"][:c0["focus"]]))
        assert row.find_element(By.CSS_SELECTOR, ".right").get_attribute("textContent") == \
            visible("".join(c0["context"][c0["focus"] + 1:]))
        assert driver.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        driver.find_element(By.ID, "add-mask").click()
        driver.find_element(By.ID, "add-col").click()
        table = driver.find_element(By.ID, "mask-table").text
        assert label in table and f"j = {e['j']}" in table
        # a mask file (as find-experts writes) adds its entries
        loaded = root / "loaded.json"
        loaded.write_text(json.dumps({"experts": [{"group": 1, "expert": 7}], "components": [{"group": 0, "side": 1, "index": 3}]}))
        driver.find_element(By.ID, "mask-file").send_keys(str(loaded))
        wait.until(lambda d: "g1/7" in d.find_element(By.ID, "mask-table").text)
        driver.find_element(By.ID, "mask-download").click()
        target = downloads / "mask.json"
        wait.until(lambda d: target.exists() and target.stat().st_size > 0)
        assert json.loads(target.read_text()) == {
            "experts": [{"group": 0, "expert": expert}, {"group": 1, "expert": 7}],
            "components": [{"group": 0, "side": 2, "index": e["j"]}, {"group": 0, "side": 1, "index": 3}]}
        box = driver.find_element(By.ID, "probe-text")
        box.clear()
        box.send_keys("the other heat")
        driver.find_element(By.ID, "probe-masked").click()
        driver.find_element(By.CSS_SELECTOR, "#probe-form button").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#probe-table .probe-tok")))
        tokens = [el.text for el in driver.find_elements(By.CSS_SELECTOR, "#probe-table .probe-tok")]
        assert tokens[0] == "<s>" and len(tokens) >= 3
        next_table = driver.find_element(By.ID, "next-table").text
        assert "p with mask" in next_table and len(next_table.splitlines()) == 11
        # experts by address: a link (#g1/5) opens one, the box takes group/id or i,j (in the chosen group)
        driver.get("about:blank")
        driver.get(url + "/#g1/5")  # a fresh page load
        wait.until(lambda d: "expert 5 of group 1" in d.find_element(By.ID, "detail").text)
        driver.execute_script("location.hash = '#g0/6'")  # a link followed within the page
        wait.until(lambda d: "expert 6 of group 0" in d.find_element(By.ID, "detail").text)
        driver.find_element(By.ID, "goto").send_keys("2, 3")
        driver.find_element(By.CSS_SELECTOR, "#goto-form button").click()
        wait.until(lambda d: "expert 67 of group 0 (i = 2, j = 3)" in d.find_element(By.ID, "detail").text)
        assert driver.execute_script("return location.hash") == "#g0/67"
        box = driver.find_element(By.ID, "goto")
        box.clear()
        box.send_keys("g0/99999")
        driver.find_element(By.CSS_SELECTOR, "#goto-form button").click()
        wait.until(lambda d: "must be an integer in [0, 1023]" in d.find_element(By.ID, "detail").text)
        shot = root / "viewer.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        os.makedirs(os.path.join(os.path.dirname(__file__), "..", "..", "build"), exist_ok=True)
        driver.save_screenshot(os.path.join(os.path.dirname(__file__), "..", "..", "build", "viewer-test.png"))
    finally:
        driver.quit()
