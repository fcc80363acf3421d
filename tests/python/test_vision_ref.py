"""The float64 vision reference (python/monet_ref/vision_ref.py) against its peers.

- the CLIP vision encoder against Hugging Face's CLIPVisionModel in float64
  (every hidden state, several shapes and both activations), run from the
  separate transformers in .venv/hf-peer (python/requirements-hf-peer.txt);
- the mlp2x_gelu projector against torch (nn.Linear, nn.GELU, nn.Linear);
- the pipeline's LLaVA conventions: tokenizer_image_token's splitting of a
  prompt at `<image>` (LLaVA's code, transcribed, as the peer), and the
  placeholder replaced by the projected patches before the Monet backbone;
- the random llava_monet checkpoint's layout (config fields, tower prefix,
  mm_projector.bin readable by torch.load with LLaVA's key names).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from monet_ref import make_checkpoint as mc
from monet_ref import reference
from monet_ref import vision_ref as vr
from monet_ref.safetensors_io import read_safetensors, write_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf_peer_dir() -> str:
    """.venv/hf-peer beside the running interpreter's environment (scripts/deps.sh installs it)."""
    d = os.path.join(sys.prefix, "hf-peer")
    if not os.path.isdir(os.path.join(d, "transformers")):
        pytest.fail(f"{d} is missing: run scripts/deps.sh (it installs python/requirements-hf-peer.txt there)")
    return d


SHAPES = [
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
         patch_size=8),
    dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, image_size=20,
         patch_size=4),
    dict(hidden_size=24, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2, image_size=28,
         patch_size=14, hidden_act="gelu"),
]


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_clip_encoder_matches_hf_clip_vision_model(tmp_path, shape):
    vision = SHAPES[shape]
    rng = np.random.default_rng(shape)
    weights = mc.random_clip_vision(vision, rng)
    tower_dir = tmp_path / "tower"
    tower_dir.mkdir()
    (tower_dir / "config.json").write_text(json.dumps(mc.clip_vision_config(vision)))
    write_safetensors(str(tower_dir / "model.safetensors"), {k: ("F64", v) for k, v in weights.items()})
    pixels = rng.normal(0.0, 1.0, size=(2, 3, vision["image_size"], vision["image_size"]))
    np.save(tmp_path / "pixels.npy", pixels)
    env = dict(os.environ, PYTHONPATH=hf_peer_dir() + os.pathsep + os.path.join(REPO, "python"))
    r = subprocess.run([sys.executable, "-m", "monet_ref.hf_clip_peer", str(tower_dir), str(tmp_path / "pixels.npy"),
                        str(tmp_path / "hf.npz")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf = np.load(tmp_path / "hf.npz")
    assert str(hf["transformers_version"]) == "4.44.2"
    cfg = {"mm_projector_type": "identity", "mm_vision_select_layer": -2}
    tower = vr.tower_from_weights(cfg, mc.clip_vision_config(vision), weights)
    worst = 0.0
    for b in range(2):
        ours = vr.encoder_hidden_states(tower, pixels[b])
        assert len(ours) == vision["num_hidden_layers"] + 1
        for i, h in enumerate(ours):
            ref = hf[f"hidden_states_{i}"][b]
            worst = max(worst, float(np.abs(h - ref).max() / np.abs(ref).max()))
        # LLaVA's selection: hidden_states[-2] without CLS
        assert np.array_equal(vr.encode(tower, pixels[b]), ours[-2][1:])
    print(f"\nmax relative difference to CLIPVisionModel (float64): {worst:.2e}")
    assert worst < 1e-12


def test_projector_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 20)).double()
    w = {f"model.mm_projector.{k}": v.detach().numpy() for k, v in mlp.state_dict().items()}
    layers = vr.projector_layers(w, "model.mm_projector.", "mlp2x_gelu")
    tower = vr.Tower({}, {}, layers)
    x = np.random.default_rng(0).normal(0.0, 2.0, size=(7, 12))
    ref = mlp(torch.from_numpy(x)).detach().numpy()
    assert np.abs(vr.project(tower, x) - ref).max() < 1e-13


def llava_tokenizer_image_token(prompt, tokenize, bos_id, image_token_index=vr.IMAGE_TOKEN_INDEX):
    """llava/mm_utils.py tokenizer_image_token, transcribed: the peer of vision_ref.tokenize_with_images."""
    prompt_chunks = [tokenize(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == bos_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def test_tokenize_with_images_is_llavas(tmp_path):
    transformers = pytest.importorskip("transformers")
    mc.write_tiny_tokenizer(str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))

    def enc(s):
        return tok(s).input_ids

    for prompt in ["<image>\nDescribe the image.", "the <image> and <image> then", "no image here", "<image>",
                   "text first <image>", "<image><image>"]:
        ours = vr.tokenize_with_images(enc, prompt, tok.bos_token_id)
        assert ours == llava_tokenizer_image_token(prompt, enc, tok.bos_token_id), prompt
        assert ours.count(vr.IMAGE_TOKEN_INDEX) == prompt.count("<image>")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    mc.make_llava_checkpoint(str(d), vocab=320, tokenizer=True, dtype="BF16")
    return str(d)


def test_llava_checkpoint_layout(llava_dir):
    torch = pytest.importorskip("torch")
    with open(os.path.join(llava_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava_monet" and cfg["architectures"] == ["LlavaMonetForCausalLM"]
    for k, v in {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                 "image_aspect_ratio": "pad", "mm_hidden_size": 32, "mm_patch_merge_type": "flat"}.items():
        assert cfg[k] == v, k
    names = set(read_safetensors(os.path.join(llava_dir, "model.safetensors")))
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= names
    assert vr.find_prefix(names) == "model.vision_tower.vision_tower.vision_model."
    proj = torch.load(os.path.join(llava_dir, "mm_projector.bin"))
    assert sorted(proj) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                            "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert all(t.dtype == torch.bfloat16 for t in proj.values())


def test_pipeline_replaces_the_placeholder_by_image_features(llava_dir):
    model = reference.load(llava_dir)
    tower = vr.load_vision(llava_dir)
    rng = np.random.default_rng(5)
    px = [rng.normal(size=(3, 32, 32)), rng.normal(size=(3, 32, 32))]
    ids = [1, 40, vr.IMAGE_TOKEN_INDEX, 41, 42, vr.IMAGE_TOKEN_INDEX, 43]
    x, patch_of = vr.llava_embeds(model, tower, ids, px)
    n = (32 // 8) ** 2
    assert x.shape == (5 + 2 * n, 64)
    assert patch_of[2:2 + n] == list(range(n)) and patch_of[:2] == [-1, -1]
    assert np.array_equal(x[2:2 + n], vr.image_embeddings(tower, px[0]))
    assert np.array_equal(x[4 + n:4 + 2 * n], vr.image_embeddings(tower, px[1]))
    logits, routers = vr.forward_llava(model, tower, ids, px)
    assert logits.shape == (5 + 2 * n, 320) and np.isfinite(logits).all()
    # text-only prompts are the backbone's forward
    l2, _ = vr.forward_llava(model, tower, [1, 40, 41], [])
    l3, _ = reference.forward(model, [1, 40, 41])
    assert np.array_equal(l2, l3)
