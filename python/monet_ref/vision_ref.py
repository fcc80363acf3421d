"""Float64 reference of the LLaVA-style vision side of VisionMonet.

CLIP ViT vision encoder (Hugging Face CLIPVisionModel semantics), LLaVA's
feature selection (a hidden state of the encoder, CLS dropped), the
mlpNx_gelu projector, and the whole pipeline: the `<image>` placeholder of
the prompt replaced by the projected patch features, then the Monet backbone
of reference.py. Readable over fast; shapes in comments.

    tower = load_vision(ckpt_dir)                  # weights under any prefix, config from the checkpoint
    feats = encode(tower, pixel_values)            # [patches, mm_hidden] selected hidden state
    emb = project(tower, feats)                    # [patches, hidden]
    logits, routers = forward_llava(model, tower, ids_with_image, [pixel_values])
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from . import reference
from .safetensors_io import read_safetensors

IMAGE_TOKEN_INDEX = -200  # LLaVA's marker for an image in a list of token ids (llava/constants.py)
IMAGE_PLACEHOLDER = "<image>"

# openai/clip-vit-* vision configs (their config.json "vision_config"), for a
# checkpoint that names its tower instead of shipping it.
KNOWN_TOWERS = {
    "openai/clip-vit-base-patch16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=224, patch_size=16),
    "openai/clip-vit-base-patch32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=224, patch_size=32),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14),
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14),
}


@dataclass
class Tower:
    vision: dict      # CLIP vision config: hidden_size, intermediate_size, num_hidden_layers, ...
    w: dict           # "embeddings.patch_embedding.weight" ... (prefix up to vision_model. removed), float64
    projector: list   # [(weight [out, in], bias [out]) or "gelu"] in order
    select_layer: int = -2
    select_feature: str = "patch"


def vision_defaults(cfg: dict) -> dict:
    out = dict(layer_norm_eps=1e-5, hidden_act="quick_gelu")
    out.update(cfg)
    return out


def find_prefix(names, what="vision_model.embeddings.patch_embedding.weight") -> str:
    hits = sorted(n[:-len(what)] for n in names if n.endswith(what))
    if len(hits) != 1:
        raise ValueError(f"expected one tensor named *{what}, found {hits}")
    return hits[0] + "vision_model."


def projector_layers(w: dict, prefix: str, kind: str) -> list:
    """LLaVA's build_vision_projector: 'linear', 'mlp{N}x_gelu' (Linear, (GELU, Linear) x N-1), 'identity'."""
    if kind == "identity":
        return []
    if kind == "linear":
        depth = 1
    else:
        m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
        if not m:
            raise ValueError(f"unsupported mm_projector_type {kind}")
        depth = int(m.group(1))
    layers = []
    for i in range(depth):
        idx = "" if kind == "linear" else f"{2 * i}."
        if i:
            layers.append("gelu")
        layers.append((w[f"{prefix}{idx}weight"], w[f"{prefix}{idx}bias"]))
    return layers


def tower_from_weights(config: dict, vision: dict, weights: dict, projector_weights: dict | None = None) -> Tower:
    """weights: every tensor of the checkpoint (name -> array); the tower's prefix is found by name."""
    prefix = find_prefix(weights)
    w = {k[len(prefix):]: np.asarray(v, dtype=np.float64) for k, v in weights.items() if k.startswith(prefix)}
    kind = config.get("mm_projector_type", "linear")
    pw = projector_weights if projector_weights is not None else weights
    pprefix = [k[:-len("weight")] for k in pw if k.endswith(("mm_projector.0.weight", "mm_projector.weight"))]
    pprefix = [p[:-2] if p.endswith("0.") else p for p in pprefix] or [""]
    pw = {k: np.asarray(v, dtype=np.float64) for k, v in pw.items()}
    proj = projector_layers(pw, pprefix[0], kind)
    return Tower(vision_defaults(vision), w, proj, config.get("mm_vision_select_layer", -2),
                 config.get("mm_vision_select_feature", "patch"))


def load_vision(path: str, vision_tower_dir: str | None = None) -> Tower:
    """The tower of a llava_monet checkpoint directory: the CLIP config from the tower directory
    (vision_tower_dir, else mm_vision_tower when it is a directory) or KNOWN_TOWERS; the weights from
    vision_tower_dir's model.safetensors when given, else the checkpoint's, else mm_vision_tower's
    directory (the engine's order); the projector from the checkpoint."""
    m = reference.load(path)
    cfg = m.config
    name = vision_tower_dir or cfg["mm_vision_tower"]
    tower_dir = name if os.path.isabs(name) else os.path.join(path, name)
    if os.path.exists(os.path.join(tower_dir, "config.json")):
        with open(os.path.join(tower_dir, "config.json")) as f:
            vc = json.load(f)
        vision = vc.get("vision_config", vc)
    else:
        vision = KNOWN_TOWERS[name]
    tower_file = os.path.join(tower_dir, "model.safetensors")
    has_own = any(k.endswith("vision_model.embeddings.patch_embedding.weight") for k in m.w)
    if os.path.exists(tower_file) and (vision_tower_dir or not has_own):
        weights = {k: v for k, v in m.w.items() if "vision_model." not in k}
        weights.update(read_safetensors(tower_file))
    else:
        weights = m.w
    return tower_from_weights(cfg, vision, weights)


def layer_norm(x, w, b, eps):
    # x [T, d]; biased variance, as torch
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def gelu(x):
    # exact erf GELU (torch.nn.GELU())
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def patchify(pixels, p):
    # pixels [3, H, W] -> [gh*gw, 3*p*p], rows in raster order, columns as the conv weight [D, 3, p, p] flattens
    c, h, wd = pixels.shape
    gh, gw = h // p, wd // p
    x = pixels[:, :gh * p, :gw * p].reshape(c, gh, p, gw, p)
    return x.transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p)


def encoder_hidden_states(tower: Tower, pixels) -> list:
    """HF CLIPVisionModel(..., output_hidden_states=True).hidden_states for one image: L+1 arrays [1+N, D]."""
    v, w = tower.vision, tower.w
    D, p, nh = v["hidden_size"], v["patch_size"], v["num_attention_heads"]
    hd, eps = D // nh, v["layer_norm_eps"]
    act = quick_gelu if v["hidden_act"] == "quick_gelu" else gelu
    pixels = np.asarray(pixels, dtype=np.float64)
    patches = patchify(pixels, p) @ w["embeddings.patch_embedding.weight"].reshape(D, -1).T  # [N, D]
    x = np.concatenate([w["embeddings.class_embedding"][None, :], patches], axis=0)           # [1+N, D]
    x = x + w["embeddings.position_embedding.weight"][:x.shape[0]]
    x = layer_norm(x, w["pre_layrnorm.weight"], w["pre_layrnorm.bias"], eps)
    states = [x]
    T = x.shape[0]
    for i in range(v["num_hidden_layers"]):
        q_ = f"encoder.layers.{i}."
        h = layer_norm(x, w[q_ + "layer_norm1.weight"], w[q_ + "layer_norm1.bias"], eps)
        q = (h @ w[q_ + "self_attn.q_proj.weight"].T + w[q_ + "self_attn.q_proj.bias"]).reshape(T, nh, hd)
        k = (h @ w[q_ + "self_attn.k_proj.weight"].T + w[q_ + "self_attn.k_proj.bias"]).reshape(T, nh, hd)
        vv = (h @ w[q_ + "self_attn.v_proj.weight"].T + w[q_ + "self_attn.v_proj.bias"]).reshape(T, nh, hd)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)                                    # [nh, T, T], no mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), vv).reshape(T, D)
        x = x + a @ w[q_ + "self_attn.out_proj.weight"].T + w[q_ + "self_attn.out_proj.bias"]
        h = layer_norm(x, w[q_ + "layer_norm2.weight"], w[q_ + "layer_norm2.bias"], eps)
        h = act(h @ w[q_ + "mlp.fc1.weight"].T + w[q_ + "mlp.fc1.bias"])
        x = x + h @ w[q_ + "mlp.fc2.weight"].T + w[q_ + "mlp.fc2.bias"]
        states.append(x)
    return states


def encode(tower: Tower, pixels):
    """LLaVA's CLIPVisionTower.feature_select: hidden_states[select_layer], CLS dropped for 'patch'."""
    h = encoder_hidden_states(tower, pixels)[tower.select_layer]
    if tower.select_feature == "patch":
        return h[1:]
    if tower.select_feature == "cls_patch":
        return h
    raise ValueError(f"unsupported mm_vision_select_feature {tower.select_feature}")


def project(tower: Tower, feats):
    x = feats
    for layer in tower.projector:
        x = gelu(x) if layer == "gelu" else x @ layer[0].T + layer[1]
    return x


def image_embeddings(tower: Tower, pixels):
    return project(tower, encode(tower, pixels))


def llava_embeds(model: reference.Model, tower: Tower, ids, images):
    """LLaVA's prepare_inputs_labels_for_multimodal for one sequence: every IMAGE_TOKEN_INDEX in ids is
    replaced by the next image's projected features. Returns x [T', d] and, per position, the image patch
    it holds (or -1)."""
    table = model.w["model.embed_tokens.weight"]
    parts, patch_of, k = [], [], 0
    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            e = image_embeddings(tower, images[k])
            k += 1
            parts.append(e)
            patch_of += list(range(len(e)))
        else:
            parts.append(table[t][None, :])
            patch_of.append(-1)
    if k != len(images):
        raise ValueError(f"{len(images)} images for {k} placeholders")
    return np.concatenate(parts, axis=0), patch_of


def forward_llava(model: reference.Model, tower: Tower, ids, images, masks: dict | None = None):
    x, _ = llava_embeds(model, tower, ids, images)
    return reference.forward_embeds(model, x, masks)


def tokenize_with_images(tokenizer_encode, prompt: str, bos_id: int):
    """LLaVA's tokenizer_image_token: each chunk between <image> placeholders tokenized on its own, the
    first chunk keeping its BOS, IMAGE_TOKEN_INDEX between chunks. LLaVA drops the first token of every
    later chunk, which is the BOS the tokenizer gave it; here only a BOS is dropped, which is the same
    for a tokenizer that adds BOS and keeps the text of chunks tokenized without special tokens (chat
    templates that spell out <s>)."""
    chunks = [tokenizer_encode(c) for c in prompt.split(IMAGE_PLACEHOLDER)]
    bos_first = bool(chunks and chunks[0] and chunks[0][0] == bos_id)
    ids = []
    for i, c in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c[1:] if i and bos_first and c and c[0] == bos_id else c)
    return ids
