"""Interpretability commands against the float64 reference: experts, eval-loss
(with and without masks), find-experts."""
import json
import math
import subprocess

import numpy as np
import pytest

from monet_ref import reference
from monet_ref.make_checkpoint import make_checkpoint

TEXT_A = "the tooth and the other ones at the rate the east seat is set in the heat. " * 3
TEXT_B = "1234 + 5678 = 6912; {x: [0, 1, 2]} => (y) -> z !== w ??? 42 % 7 == 0 << >> || && " * 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("interp") / "vd")
    make_checkpoint(path, vocab=301, layers=3, groups=2, seed=31, tokenizer=True, max_pos=256)
    return path


def monet(monet_bin, *args):
    proc = subprocess.run([monet_bin, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tokenize(monet_bin, model_dir, text, special=False):
    out = monet(monet_bin, "tokenize", "--model", model_dir, "--text", text, *([] if special else ["--no-special"]))
    return [int(x) for x in out.strip().split(",")]


def test_experts_match_reference(monet_bin, model_dir):
    ids = tokenize(monet_bin, model_dir, "the other heat", special=True)
    out = json.loads(monet(monet_bin, "experts", "--model", model_dir, "--ids", ",".join(map(str, ids)),
                           "--threshold", "0.01", "--json"))
    _, routers = reference.forward(reference.load(model_dir), ids)
    E = 32
    assert out["experts_per_group"] == E * E
    assert len(out["tokens"]) == len(ids)
    for t, tok in enumerate(out["tokens"]):
        assert tok["id"] == ids[t]
        for g, layer in enumerate(sorted(routers)):
            g1, g2 = routers[layer]
            p = np.einsum("hi,hj->ij", g1[t], g2[t]).reshape(-1)            # [E*E]
            want = {int(k): p[k] for k in np.nonzero(p > 0.01)[0]}
            got = tok["groups"][g]
            assert got["count"] == len(want)
            assert {e["id"] for e in got["experts"]} == set(want)
            for e in got["experts"]:
                assert abs(e["p"] - want[e["id"]]) < 1e-5
                assert e["id"] == e["i"] * E + e["j"]
            probs = [e["p"] for e in got["experts"]]
            assert probs == sorted(probs, reverse=True)
    text = monet(monet_bin, "experts", "--model", model_dir, "-p", "the other heat", "--top", "3")
    assert "group 1:" in text and "experts >" in text


def test_experts_with_mask(monet_bin, model_dir, tmp_path):
    """Removed experts are listed apart; the routing of later groups is the masked model's."""
    ids = tokenize(monet_bin, model_dir, "the other heat", special=True)
    plain = json.loads(monet(monet_bin, "experts", "--model", model_dir, "--ids", ",".join(map(str, ids)), "--json"))
    E = 32
    top0 = plain["tokens"][2]["groups"][0]["experts"][0]  # the strongest expert of token 2, group 0
    mask = {"experts": [{"group": 0, "expert": top0["id"]}], "components": [{"group": 1, "side": 2, "index": 5}]}
    (tmp_path / "mask.json").write_text(json.dumps(mask))
    out = json.loads(monet(monet_bin, "experts", "--model", model_dir, "--ids", ",".join(map(str, ids)), "--json",
                           "--mask", str(tmp_path / "mask.json")))
    M0, M1 = np.ones((E, E)), np.ones((E, E))
    M0[top0["i"], top0["j"]] = 0
    M1[:, 5] = 0
    _, routers = reference.forward(reference.load(model_dir), ids, masks={0: M0, 1: M1})
    for t, tok in enumerate(out["tokens"]):
        for g, layer in enumerate(sorted(routers)):
            g1, g2 = routers[layer]
            p = np.einsum("hi,hj->ij", g1[t], g2[t])
            M = (M0, M1)[g]
            kept = {int(k) for k in np.nonzero((p * M).reshape(-1) > 0.01)[0]}
            gone = {int(k) for k in np.nonzero((p * (1 - M)).reshape(-1) > 0.01)[0]}
            got = tok["groups"][g]
            assert {e["id"] for e in got["experts"]} == kept and got["count"] == len(kept)
            assert {e["id"] for e in got["removed"]} == gone
    assert top0["id"] in {e["id"] for e in out["tokens"][2]["groups"][0]["removed"]}
    text = monet(monet_bin, "experts", "--model", model_dir, "--ids", ",".join(map(str, ids)),
                 "--mask", str(tmp_path / "mask.json"))
    assert "more removed by the mask" in text


def reference_loss(model, ids, context, bos=1, masks=None):
    total, n = 0.0, 0
    step = context - 1
    for s in range(0, len(ids), step):
        window = [bos] + ids[s:s + step]
        logits, _ = reference.forward(model, window, masks=masks)
        for t in range(len(window) - 1):
            row = logits[t]
            total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[window[t + 1]]
            n += 1
    return total / n, n


def test_eval_loss_matches_reference(monet_bin, model_dir, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text(TEXT_A[:120])
    ids = tokenize(monet_bin, model_dir, TEXT_A[:120])
    model = reference.load(model_dir)
    want, n = reference_loss(model, ids, 32)
    got = json.loads(monet(monet_bin, "eval-loss", "--model", model_dir, "--data", str(data), "--context", "32", "--json"))
    assert got["tokens"] == n
    assert abs(got["loss"] - want) < 1e-4
    assert abs(got["perplexity"] - math.exp(want)) < 1e-3 * math.exp(want)
    # with a mask: a whole side-1 component of group 0 and a side-2 one of group 1
    mask = {"components": [{"group": 0, "side": 1, "index": 3}, {"group": 1, "side": 2, "index": 5}]}
    (tmp_path / "mask.json").write_text(json.dumps(mask))
    M0, M1 = np.ones((32, 32)), np.ones((32, 32))
    M0[3, :] = 0
    M1[:, 5] = 0
    want_m, _ = reference_loss(model, ids, 32, masks={0: M0, 1: M1})
    got_m = json.loads(monet(monet_bin, "eval-loss", "--model", model_dir, "--data", str(data), "--context", "32",
                             "--mask", str(tmp_path / "mask.json"), "--json"))
    assert abs(got_m["loss"] - want_m) < 1e-4
    assert abs(want_m - want) > 1e-5


def test_find_experts_matches_statistic(monet_bin, model_dir, tmp_path):
    files = {}
    for name, text in (("prose", TEXT_A), ("symbols", TEXT_B)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(text)
    out = monet(monet_bin, "find-experts", "--model", model_dir, "--domain", f"prose={files['prose']}",
                "--domain", f"symbols={files['symbols']}", "--out-dir", str(tmp_path / "masks"), "--context", "64",
                "--min-prob", "1e-3", "--eval")
    assert "removed" in out and "perplexity change" in out
    # the statistic, recomputed from the reference's router probabilities
    model = reference.load(model_dir)
    means = {}
    for name, text in (("prose", TEXT_A), ("symbols", TEXT_B)):
        ids = tokenize(monet_bin, model_dir, text)
        acc, n = np.zeros((2, 32 * 32)), 0
        for s in range(0, len(ids), 63):
            window = [1] + ids[s:s + 63]
            _, routers = reference.forward(model, window)
            for g, layer in enumerate(sorted(routers)):
                g1, g2 = routers[layer]
                acc[g] += np.einsum("thi,thj->ij", g1[1:], g2[1:]).reshape(-1)
            n += len(window) - 1
        means[name] = acc / n
    for name, other in (("prose", "symbols"), ("symbols", "prose")):
        mask = json.loads((tmp_path / "masks" / f"{name}.json").read_text())
        got = {(e["group"], e["expert"]) for e in mask["experts"]}
        want = {(g, int(k)) for g in range(2) for k in np.nonzero((means[name][g] >= 1e-3) &
                                                                  (means[name][g] >= 2 * means[other][g]))[0]}
        # experts within float rounding of the thresholds may go either way
        borderline = {(g, int(k)) for g in range(2) for k in range(32 * 32)
                      if abs(means[name][g][k] - 1e-3) < 1e-6 or abs(means[name][g][k] - 2 * means[other][g][k]) < 1e-6}
        assert got - borderline == want - borderline
        assert len(want) > 0
