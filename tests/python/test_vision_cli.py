"""`monet generate / experts / chat --image` on a random llava_monet checkpoint.

generate: greedy ids equal the float64 reference pipeline's greedy
continuation; experts: image positions are reported per patch (image, patch,
row, col) with the reference's experts; chat: the first reply equals
generate on the same rendered prompt, and the next turn reuses the cache
for the image and the earlier text.
"""
import json
import os
import subprocess

import numpy as np
import pytest

from monet_ref import make_checkpoint as mc
from monet_ref import reference
from monet_ref import vision_ref as vr
from monet_ref.safetensors_io import read_safetensors

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "images")
PHOTO = os.path.join(IMAGES, "grace_hopper.jpg")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava"))
    mc.make_llava_checkpoint(d, vocab=320, tokenizer=True, chat_template=TEMPLATE)
    return d


def run(monet_bin, *args, stdin=None):
    r = subprocess.run([monet_bin, *map(str, args)], capture_output=True, text=True, input=stdin)
    assert r.returncode == 0, r.stderr
    return r


def pixel_values(monet_bin, ckpt, tmp_path):
    out = tmp_path / "px.safetensors"
    run(monet_bin, "vision", "--model", ckpt, "--image", PHOTO, "--out", out)
    return read_safetensors(str(out))["pixel_values.0"]


def test_generate_greedy_matches_reference(monet_bin, ckpt, tmp_path):
    ids = [1, 40, vr.IMAGE_TOKEN_INDEX, 41, 42]
    r = run(monet_bin, "generate", "--model", ckpt, "--image", PHOTO, "--ids", ",".join(map(str, ids)), "-n", 6,
            "--temperature", 0, "--print-ids")
    got = [int(x) for x in r.stdout.strip().split(",")]
    model, tower = reference.load(ckpt), vr.load_vision(ckpt)
    px = [pixel_values(monet_bin, ckpt, tmp_path)]
    seq, want = list(ids), []
    for _ in range(6):
        logits, _ = vr.forward_llava(model, tower, seq, px)
        top = np.sort(logits[-1])[-2:]
        assert top[1] - top[0] > 1e-3, "a near tie would make the greedy comparison meaningless"
        nxt = int(logits[-1].argmax())
        if nxt == 2:  # EOS ends generation
            break
        want.append(nxt)
        seq.append(nxt)
    assert got == want


def test_generate_needs_text_after_the_last_image(monet_bin, ckpt):
    r = subprocess.run([monet_bin, "generate", "--model", ckpt, "--image", PHOTO, "-p", "look: <image>", "-n", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "ends with an image" in r.stderr


def test_experts_per_patch(monet_bin, ckpt, tmp_path):
    r = run(monet_bin, "experts", "--model", ckpt, "--image", PHOTO, "--ids", "1,40,-200,41", "--json")
    out = json.loads(r.stdout)
    toks = out["tokens"]
    assert len(toks) == 3 + 16
    patches = [t for t in toks if "image" in t]
    assert [(t["patch"], t["row"], t["col"]) for t in patches] == [(k, k // 4, k % 4) for k in range(16)]
    assert toks[0]["piece"] == "<s>" and "piece" not in toks[2]
    model, tower = reference.load(ckpt), vr.load_vision(ckpt)
    _, routers = vr.forward_llava(model, tower, [1, 40, vr.IMAGE_TOKEN_INDEX, 41], [pixel_values(monet_bin, ckpt, tmp_path)])
    E = reference.dims(model.config)["E"]
    thr = out["threshold"]
    for pos in (2, 9, 17):  # patches 0, 7 and 15
        for g, layer in enumerate(sorted(routers)):
            g1, g2 = routers[layer]
            p = np.einsum("hi,hj->ij", g1[pos], g2[pos]).reshape(-1)
            want = {int(e) for e in np.nonzero(p > thr)[0] if abs(p[e] - thr) > 1e-4}
            got = {e["id"] for e in toks[pos]["groups"][g]["experts"] if abs(e["p"] - thr) > 1e-4}
            assert got == want, (pos, g)
            assert E * E == out["experts_per_group"]


def test_chat_with_an_image(monet_bin, ckpt, tmp_path):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"role": "user", "content": "<image>\nwhat is this"}]))
    rendered = run(monet_bin, "chat", "--model", ckpt, "--render", conv, "--add-generation-prompt").stdout
    text = rendered.rsplit("\n", 2)[0]
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = vr.tokenize_with_images(lambda s: tok(s, add_special_tokens=False).input_ids, text, tok.bos_token_id)
    gen = run(monet_bin, "generate", "--model", ckpt, "--image", PHOTO, "--ids", ",".join(map(str, ids)), "-n", 8,
              "--temperature", 0)
    chat = run(monet_bin, "chat", "--model", ckpt, "--image", PHOTO, "-n", 8, "--temperature", 0,
               stdin="what is this\nand then?\n")
    turns = chat.stderr.strip().splitlines()[-2:]
    assert f"{len(ids) - 1 + 16} new prompt positions (0 reused)" in turns[0]
    reused = int(turns[1].split("(")[1].split(" ")[0])
    assert reused >= len(ids) - 1 + 16  # the image and the first turn's prompt come from the cache
    # the first reply is generate's greedy continuation of the same prompt (same decoder, same text)
    assert chat.stdout.startswith(gen.stdout)


def test_prompt_without_placeholder_gets_the_image_first(monet_bin, ckpt):
    """As LLaVA's CLI (and monet chat, the viewer): a prompt with images but no
    <image> gets "<image>\n" per image in front."""
    for cmd in (["generate", "-n", "3", "--temperature", "0"], ["experts", "--json"]):
        bare = run(monet_bin, *cmd, "--model", ckpt, "--image", PHOTO, "-p", "what is this").stdout
        placed = run(monet_bin, *cmd, "--model", ckpt, "--image", PHOTO, "-p", "<image>\nwhat is this").stdout
        assert bare == placed and bare.strip(), cmd
