"""VisionMonet in the engine: `monet vision --model` against the float64 reference pipeline.

On random llava_monet checkpoints in the released layout (make_llava_checkpoint):
the vision features (the selected CLIP hidden state), the projected image
embeddings, and the logits and router probabilities of image+text prompts,
for several tower shapes, selections, activations and projector types, in
F32 and BF16; the projector read from mm_projector.bin (torch.save) when
model.safetensors has none; the tower read from --vision-tower; masks apply
to image tokens; `<image>` prompts tokenized as LLaVA does; clear errors for
a checkpoint without a tower and for placeholders that do not match the
images.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from monet_ref import make_checkpoint as mc
from monet_ref import reference
from monet_ref import vision_ref as vr
from monet_ref.safetensors_io import read_safetensors, write_safetensors

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "images")
PHOTO_A = os.path.join(IMAGES, "grace_hopper.jpg")
PHOTO_B = os.path.join(IMAGES, "rocket.jpg")

CASES = {
    "default": dict(),
    "wide-cls-last": dict(vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, image_size=20, patch_size=4),
                          select_layer=-1, select_feature="cls_patch"),
    "gelu-linear-square": dict(vision=dict(hidden_size=24, intermediate_size=96, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=28, patch_size=14, hidden_act="gelu"),
                               projector="linear", aspect="square", select_layer=1),
    "mlp3-bf16": dict(projector="mlp3x_gelu", dtype="BF16"),
}


def tolerance(case):
    return 2e-2 if case.get("dtype") == "BF16" else 1e-4


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_vision(monet_bin, *args):
    # exact float32 products: compared with the float64 reference
    r = subprocess.run([monet_bin, "vision", "--compute", "f32", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def run_failing(monet_bin, *args):
    r = subprocess.run([monet_bin, "vision", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 1, f"expected an error: {r.stdout}{r.stderr}"
    assert "internal error" not in r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, kw in CASES.items():
        d = str(tmp_path_factory.mktemp(name))
        mc.make_llava_checkpoint(d, vocab=320, tokenizer=True, **kw)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_image_text_forward_matches_reference(monet_bin, checkpoints, tmp_path, name):
    path = checkpoints[name]
    model, tower = reference.load(path), vr.load_vision(path)
    ids = [1, 40, 41, vr.IMAGE_TOKEN_INDEX, 50, 60, vr.IMAGE_TOKEN_INDEX, 70, 80, 90]
    out = tmp_path / "out.safetensors"
    run_vision(monet_bin, "--model", path, "--image", PHOTO_A, "--image", PHOTO_B, "--ids", ",".join(map(str, ids)),
               "--out", out)
    got = read_safetensors(str(out))
    tol = tolerance(CASES[name])
    pixels = [got["pixel_values.0"], got["pixel_values.1"]]
    for i, px in enumerate(pixels):
        feats = vr.encode(tower, px)
        assert got[f"features.{i}"].shape == feats.shape
        assert rel_err(got[f"features.{i}"], feats) < tol, f"features {i}"
        emb = vr.project(tower, feats)
        assert rel_err(got[f"image_embeds.{i}"], emb) < tol, f"image_embeds {i}"
    logits, routers = vr.forward_llava(model, tower, ids, pixels)
    n = len(vr.encode(tower, pixels[0]))
    assert got["logits"].shape == logits.shape == (8 + 2 * n, 320)
    assert list(got["ids"][:3]) == [1, 40, 41] and (got["ids"][3:3 + n] == vr.IMAGE_TOKEN_INDEX).all()
    assert rel_err(got["logits"], logits) < tol
    print(f"\n{name}: features {rel_err(got['features.0'], vr.encode(tower, pixels[0])):.1e}, "
          f"logits {rel_err(got['logits'], logits):.1e} (relative to the largest)")
    for layer, (g1, g2) in routers.items():
        assert np.abs(got[f"router.{layer}.g1"] - g1).max() < 50 * tol
        assert np.abs(got[f"router.{layer}.g2"] - g2).max() < 50 * tol


def test_pixel_values_follow_the_tower_and_aspect(monet_bin, checkpoints, tmp_path):
    """pad (expand2square) for image_aspect_ratio pad, the processor alone for square, at the tower's size."""
    for name, mode in (("default", "pad"), ("gelu-linear-square", "crop")):
        size = CASES[name].get("vision", {}).get("image_size", 32)
        out = tmp_path / f"{name}.safetensors"
        run_vision(monet_bin, "--model", checkpoints[name], "--image", PHOTO_B, "--out", out)
        plain = tmp_path / f"{name}-plain.safetensors"
        run_vision(monet_bin, "--image", PHOTO_B, "--out", plain, "--size", size, *(["--crop"] if mode == "crop" else []))
        assert np.array_equal(read_safetensors(str(out))["pixel_values.0"], read_safetensors(str(plain))["pixel_values"])


def test_projector_from_mm_projector_bin(monet_bin, tmp_path):
    """A checkpoint whose model.safetensors has no projector: mm_projector.bin (bf16, torch.save) is used."""
    torch = pytest.importorskip("torch")
    d = str(tmp_path / "ckpt")
    mc.make_llava_checkpoint(d, vocab=320, tokenizer=True, projector_in_model=False)
    proj = {k: v.float().numpy() for k, v in torch.load(os.path.join(d, "mm_projector.bin")).items()}
    model = reference.load(d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "vision_tower", "config.json")) as f:
        vision = json.load(f)
    tower = vr.tower_from_weights(cfg, vision, model.w, projector_weights=proj)
    out = tmp_path / "out.safetensors"
    r = run_vision(monet_bin, "--model", d, "--image", PHOTO_A, "--ids", "1,-200,9", "--out", out)
    assert "mm_projector.bin" in r.stderr
    got = read_safetensors(str(out))
    logits, _ = vr.forward_llava(model, tower, [1, vr.IMAGE_TOKEN_INDEX, 9], [got["pixel_values.0"]])
    assert rel_err(got["logits"], logits) < 1e-4
    # --projector names a file explicitly (here: the same weights converted to safetensors)
    st = tmp_path / "proj.safetensors"
    write_safetensors(str(st), {k: ("F32", v) for k, v in proj.items()})
    out2 = tmp_path / "out2.safetensors"
    run_vision(monet_bin, "--model", d, "--image", PHOTO_A, "--ids", "1,-200,9", "--out", out2, "--projector", st)
    assert np.array_equal(read_safetensors(str(out2))["logits"], got["logits"])


def test_tower_from_vision_tower_dir(monet_bin, tmp_path):
    """Without the tower in model.safetensors: --vision-tower DIR (a CLIPVisionModel directory)."""
    d = str(tmp_path / "ckpt")
    mc.make_llava_checkpoint(d, vocab=320, tokenizer=True, tower_in_model=False, tower_dir="clip")
    moved = str(tmp_path / "elsewhere")
    shutil.move(os.path.join(d, "clip"), moved)
    err = run_failing(monet_bin, "--model", d, "--image", PHOTO_A, "--out", tmp_path / "x.safetensors")
    assert "clip" in err and "--vision-tower" in err  # mm_vision_tower names a directory that is gone
    out = tmp_path / "out.safetensors"
    r = run_vision(monet_bin, "--model", d, "--vision-tower", moved, "--image", PHOTO_A, "--ids", "1,-200,9",
                   "--out", out)
    assert "elsewhere" in r.stderr
    got = read_safetensors(str(out))
    model = reference.load(d)
    tower = vr.load_vision(d, vision_tower_dir=moved)
    logits, _ = vr.forward_llava(model, tower, [1, vr.IMAGE_TOKEN_INDEX, 9], [got["pixel_values.0"]])
    assert rel_err(got["logits"], logits) < 1e-4


def test_missing_tower_lists_what_was_found(monet_bin, tmp_path):
    d = str(tmp_path / "ckpt")
    mc.make_llava_checkpoint(d, vocab=320, tokenizer=True, tower_in_model=False)
    os.remove(os.path.join(d, "vision_tower", "model.safetensors"))
    err = run_failing(monet_bin, "--model", d, "--image", PHOTO_A, "--out", tmp_path / "x.safetensors")
    assert "vision_model.embeddings.patch_embedding.weight" in err
    assert "model.layers" in err and "model.mm_projector" in err  # what the checkpoint holds
    assert "--vision-tower" in err


def test_masks_apply_to_image_tokens(monet_bin, checkpoints, tmp_path):
    path = checkpoints["default"]
    model, tower = reference.load(path), vr.load_vision(path)
    E = reference.dims(model.config)["E"]
    ids = [1, 40, vr.IMAGE_TOKEN_INDEX, 50]
    out = tmp_path / "plain.safetensors"
    run_vision(monet_bin, "--model", path, "--image", PHOTO_A, "--ids", ",".join(map(str, ids)), "--out", out)
    got = read_safetensors(str(out))
    px = [got["pixel_values.0"]]
    ref_logits, routers = vr.forward_llava(model, tower, ids, px)
    # Remove the experts the first image patch (position 2) uses most in group 0, and a component in group 1.
    g1, g2 = routers[0]
    i, j = int(g1[2].sum(0).argmax()), int(g2[2].sum(0).argmax())
    i2 = int(routers[2][0][5].sum(0).argmax())
    M = {0: np.ones((E, E)), 1: np.ones((E, E))}
    M[0][i, j] = 0
    M[1][i2, :] = 0
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"experts": [{"group": 0, "expert": i * E + j}],
                                "components": [{"group": 1, "side": 1, "index": i2}]}))
    masked = tmp_path / "masked.safetensors"
    run_vision(monet_bin, "--model", path, "--image", PHOTO_A, "--ids", ",".join(map(str, ids)), "--out", masked,
               "--mask", mask)
    x, patch_of = vr.llava_embeds(model, tower, ids, px)
    ref_masked, _ = reference.forward_embeds(model, x, masks=M)
    assert rel_err(ref_masked[:3], ref_logits[:3]) > 1e-4, "the mask must change the image positions' outputs"
    assert rel_err(read_safetensors(str(masked))["logits"], ref_masked) < 1e-4


def test_prompt_with_image_placeholders(monet_bin, checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = checkpoints["default"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = "the <image>\nwhat is in it? and <image> here"
    want = vr.tokenize_with_images(lambda s: tok(s).input_ids, prompt, tok.bos_token_id)
    out = tmp_path / "p.safetensors"
    run_vision(monet_bin, "--model", path, "--image", PHOTO_A, "--image", PHOTO_B, "-p", prompt, "--out", out)
    got = read_safetensors(str(out))
    n = 16
    expanded = []
    for t in want:
        expanded += [t] * (n if t == vr.IMAGE_TOKEN_INDEX else 1)
    assert list(got["ids"]) == expanded
    model, tower = reference.load(path), vr.load_vision(path)
    logits, _ = vr.forward_llava(model, tower, want, [got["pixel_values.0"], got["pixel_values.1"]])
    assert rel_err(got["logits"], logits) < 1e-4
    err = run_failing(monet_bin, "--model", path, "--image", PHOTO_A, "-p", "no placeholder", "--out", tmp_path / "x")
    assert "placeholder" in err
    err = run_failing(monet_bin, "--model", path, "--image", PHOTO_A, "-p", "<image> <image>", "--out", tmp_path / "x")
    assert "placeholder" in err
