"""`monet generate`: greedy decoding equals the float64 reference's greedy
continuation; sampling is reproducible; stop strings and limits hold."""
import json
import subprocess

import numpy as np
import pytest

from monet_ref import reference
from monet_ref.make_checkpoint import make_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, kw in {"vd": dict(decompose="vertical", layers=3, groups=2, kv_heads=2),
                     "hd": dict(decompose="horizontal", layers=3, groups=3)}.items():
        path = str(root / name)
        make_checkpoint(path, vocab=301, seed=11, tokenizer=True, max_pos=128, **kw)
        out[name] = path
    return out


def generate(monet_bin, *args, check=True):
    proc = subprocess.run([monet_bin, "generate", *args], capture_output=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def reference_greedy(path, prompt, n, masks=None):
    model = reference.load(path)
    ids = list(prompt)
    for _ in range(n):
        logits, _ = reference.forward(model, ids, masks=masks)
        nxt = int(np.argmax(logits[-1]))
        if nxt == 2:  # EOS
            break
        ids.append(nxt)
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["vd", "hd"])
def test_greedy_matches_reference(monet_bin, models, name):
    prompt = [1, 284, 259, 272, 292, 100, 7]
    want = reference_greedy(models[name], prompt, 32)
    proc = generate(monet_bin, "--model", models[name], "--ids", ",".join(map(str, prompt)), "-n", "32",
                    "--temperature", "0", "--print-ids")
    got = [int(x) for x in proc.stdout.decode().strip().split(",") if x]
    assert got == want
    assert len(got) >= 16  # a meaningful continuation, not an immediate EOS
    err = proc.stderr.decode()
    assert "prompt: 7 tokens" in err and f"generated: {len(got)} tokens" in err and "tokens/s" in err


@pytest.mark.parametrize("name", ["vd", "hd"])
def test_greedy_with_mask_matches_reference(monet_bin, models, name, tmp_path):
    """generate --mask decodes token by token (the sparse path) with the experts removed."""
    prompt = [1, 284, 259, 272, 292, 100, 7]
    E = 32
    mask = {"experts": [{"group": 0, "expert": 5 * E + 9}],
            "components": [{"group": 0, "side": 1, "index": 3}, {"group": 0, "side": 2, "index": 11}]}
    (tmp_path / "mask.json").write_text(json.dumps(mask))
    M = np.ones((E, E))
    M[5, 9] = 0
    M[3, :] = 0
    M[:, 11] = 0
    want = reference_greedy(models[name], prompt, 24, masks={0: M})
    assert want != reference_greedy(models[name], prompt, 24)  # the mask changes the continuation
    proc = generate(monet_bin, "--model", models[name], "--ids", ",".join(map(str, prompt)), "-n", "24",
                    "--temperature", "0", "--print-ids", "--mask", str(tmp_path / "mask.json"))
    assert [int(x) for x in proc.stdout.decode().strip().split(",") if x] == want


def test_text_prompt_uses_tokenizer(monet_bin, models):
    ids = subprocess.run([monet_bin, "tokenize", "--model", models["vd"], "--text", "the cat"], capture_output=True,
                         text=True, check=True).stdout.strip()
    a = generate(monet_bin, "--model", models["vd"], "-p", "the cat", "-n", "10", "--temperature", "0", "--print-ids")
    b = generate(monet_bin, "--model", models["vd"], "--ids", ids, "-n", "10", "--temperature", "0", "--print-ids")
    assert a.stdout == b.stdout


def test_seeded_sampling_is_reproducible(monet_bin, models):
    args = ["--model", models["vd"], "-p", "the", "-n", "24", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.95", "--min-p", "0.01", "--repeat-penalty", "1.1", "--print-ids"]
    a = generate(monet_bin, *args, "--seed", "5").stdout
    b = generate(monet_bin, *args, "--seed", "5").stdout
    c = generate(monet_bin, *args, "--seed", "6").stdout
    assert a == b
    assert a != c


def test_max_tokens_and_stop_string(monet_bin, models):
    full = generate(monet_bin, "--model", models["hd"], "-p", "the", "-n", "40", "--temperature", "0").stdout.decode(
        "utf-8", "replace")
    short = generate(monet_bin, "--model", models["hd"], "-p", "the", "-n", "3", "--temperature", "0", "--print-ids")
    assert len(short.stdout.decode().strip().split(",")) == 3
    text = full.rstrip("\n")
    printable = [i for i in range(5, len(text) - 3) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2]]
    assert printable, "need some printable generated text to stop on"
    k = printable[len(printable) // 2]
    stop = text[k:k + 2]
    first = text.find(stop)
    out = generate(monet_bin, "--model", models["hd"], "-p", "the", "-n", "40", "--temperature", "0",
                   "--stop", stop).stdout.decode("utf-8", "replace")
    assert out.rstrip("\n") == text[:first]


def test_bad_sampling_options(monet_bin, models):
    proc = generate(monet_bin, "--model", models["vd"], "-p", "x", "--top-p", "0", check=False)
    assert proc.returncode != 0 and b"top_p" in proc.stderr
    proc = generate(monet_bin, "--model", models["vd"], "-p", "x", "--stop", "", check=False)
    assert proc.returncode != 0 and b"stop" in proc.stderr
    proc = generate(monet_bin, "--model", models["vd"], "-n", "5", check=False)
    assert proc.returncode != 0 and b"prompt" in proc.stderr
    proc = generate(monet_bin, "--model", models["vd"], "-p", "x " * 200, "-n", "5", check=False)
    assert proc.returncode != 0 and b"max_position_embeddings" in proc.stderr
    # asking for more than the context holds stops at its end, and says so
    proc = generate(monet_bin, "--model", models["vd"], "-p", "the", "-n", "1000", "--temperature", "0",
                    "--print-ids")
    n_prompt = int(proc.stderr.decode().split("prompt: ")[1].split()[0])
    assert len(proc.stdout.decode().strip().split(",")) == 128 - n_prompt
    assert b"end of the context" in proc.stderr
