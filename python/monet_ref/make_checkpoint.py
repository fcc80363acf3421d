"""Random Monet checkpoints in Hugging Face layout, for tests and demos.

    python3 -m monet_ref.make_checkpoint OUT --preset tiny-vd [--dtype BF16] [--shards 3] ...

Router BatchNorm running statistics are calibrated by running the float64
reference on random tokens (router by router, with the stored, dtype-rounded
weights), so that each head keeps about moe_topk experts, as in trained models.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from . import reference
from .safetensors_io import round_to_dtype, write_safetensors

PRESETS = {
    "tiny-vd": dict(vocab=301, hidden=64, layers=4, heads=4, kv_heads=4, experts=32, moe_heads=4,
                    moe_dim=8, topk=4, groups=2, decompose="vertical"),
    "tiny-hd": dict(vocab=301, hidden=64, layers=4, heads=4, kv_heads=4, experts=32, moe_heads=4,
                    moe_dim=8, topk=4, groups=2, decompose="horizontal"),
}

TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def make_config(*, vocab, hidden, layers, heads, kv_heads, experts, moe_heads, moe_dim, topk, groups,
                decompose, tie, dtype, max_pos) -> dict:
    return {
        "architectures": ["MonetForCausalLM"], "model_type": "monet",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "hidden_act": "relu2",
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": TORCH_DTYPE[dtype], "moe_dim": moe_dim, "moe_heads": moe_heads,
        "moe_experts": experts, "moe_topk": topk, "moe_groups": groups, "moe_decompose": decompose,
    }


def random_weights(cfg: dict, rng: np.random.Generator, std: float) -> dict:
    D = reference.dims(cfg)
    d, hd, E, m, H = D["d"], D["hd"], D["E"], D["m"], D["H"]

    def mat(*shape, s=std):
        return rng.normal(0.0, s, size=shape)

    w = {"model.embed_tokens.weight": mat(D["V"], d, s=1.0)}
    for l in range(D["L"]):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = 1.0 + 0.1 * rng.normal(size=d)
        w[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * rng.normal(size=d)
        w[p + "self_attn.q_proj.weight"] = mat(D["nh"] * hd, d)
        w[p + "self_attn.k_proj.weight"] = mat(D["nkv"] * hd, d)
        w[p + "self_attn.v_proj.weight"] = mat(D["nkv"] * hd, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, D["nh"] * hd)
        if l % D["G"] == 0:
            for s in ("1", "2"):
                w[p + f"router.w{s}.weight"] = mat(H * E, d)
                w[p + f"router.norm{s}.running_mean"] = np.zeros(H)
                w[p + f"router.norm{s}.running_var"] = np.ones(H)
                w[p + f"router.norm{s}.num_batches_tracked"] = np.array(0, dtype=np.int64)
        if D["vd"]:
            for s in ("1", "2"):
                w[p + f"moe.u{s}.weight"] = mat(E * m // 2, d)
                w[p + f"moe.u{s}.bias"] = mat(E * m // 2, s=0.05)
            for n in ("v11", "v12", "v21", "v22"):
                w[p + f"moe.{n}.weight"] = mat(d // 2, E * m // 2)
            w[p + "moe.b1"] = mat(E, d // 2, s=0.05)
            w[p + "moe.b2"] = mat(E, d // 2, s=0.05)
        else:
            w[p + "moe.u.weight"] = mat(E * m, d)
            w[p + "moe.u.bias"] = mat(E * m, s=0.05)
            w[p + "moe.v.weight"] = mat(d, E * m)
            w[p + "moe.b"] = mat(E, d, s=0.05)
    w["model.norm.weight"] = 1.0 + 0.1 * rng.normal(size=d)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(D["V"], d)
    return w


def calibrate(cfg: dict, w: dict, rng: np.random.Generator, tokens: int = 64) -> None:
    """Sets each router's running_mean/var to the per-head statistics of its logits."""
    D = reference.dims(cfg)
    ids = rng.integers(0, D["V"], size=tokens)
    for l in range(0, D["L"], D["G"]):
        # Run the stack up to layer l's router with the routers calibrated so far.
        model = reference.Model(cfg, w)
        x = w["model.embed_tokens.weight"][ids]
        g1 = g2 = None
        for j in range(l + 1):
            p = f"model.layers.{j}."
            x = x + reference.attention(model, j, reference.rmsnorm(x, w[p + "input_layernorm.weight"], D["eps"]), D)
            y = reference.rmsnorm(x, w[p + "post_attention_layernorm.weight"], D["eps"])
            if j == l:
                break
            if j % D["G"] == 0:
                g1, g2 = reference.router(model, j, y, D)
            x = x + (reference.experts_vd if D["vd"] else reference.experts_hd)(model, j, y, g1, g2, D)
        p = f"model.layers.{l}.router."
        for s in ("1", "2"):
            z = (y @ w[p + f"w{s}.weight"].T).reshape(len(ids), D["H"], D["E"])
            w[p + f"norm{s}.running_mean"] = z.mean(axis=(0, 2))
            w[p + f"norm{s}.running_var"] = z.var(axis=(0, 2))


TINY_CHARS = "▁etaoinshrdlucmfwypvb"
TINY_MERGES = [("▁", "t"), ("t", "h"), ("▁t", "h"), ("h", "e"), ("▁th", "e"), ("i", "n"), ("e", "r"), ("a", "n"),
               ("r", "e"), ("o", "n"), ("▁", "a"), ("e", "n"), ("a", "t"), ("o", "u"), ("e", "d"), ("h", "a"),
               ("t", "o"), ("o", "r"), ("i", "t"), ("i", "s"), ("▁", "s")]
TINY_TOKENIZER_SIZE = 3 + 256 + len(TINY_CHARS) + len(TINY_MERGES)


def write_tiny_tokenizer(out_dir: str, chat_template: str | None = None) -> None:
    """A small LLaMA-layout tokenizer.json (byte fallback + a few merges) and
    tokenizer_config.json, for tests and demos of random checkpoints."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(TINY_CHARS)
    pieces += [a + b for a, b in TINY_MERGES]
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in enumerate(pieces[:3])],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [f"{a} {b}" for a, b in TINY_MERGES]},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "legacy": True}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)


def make_checkpoint(out_dir: str, *, vocab=256, hidden=64, layers=4, heads=4, kv_heads=None, experts=32,
                    moe_heads=4, moe_dim=8, topk=4, groups=2, decompose="vertical", tie=False, dtype="F32",
                    shards=1, seed=0, calibrate_router=True, max_pos=512, std=0.15, tokenizer=False,
                    chat_template=None, extra_weights=None, extra_config=None) -> dict:
    """extra_weights: more tensors (name -> float64 array) stored beside the backbone's, in `dtype`;
    extra_config: more config.json fields (a llava_monet checkpoint's, see make_llava_checkpoint)."""
    cfg = make_config(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads or heads,
                      experts=experts, moe_heads=moe_heads, moe_dim=moe_dim, topk=topk, groups=groups,
                      decompose=decompose, tie=tie, dtype=dtype, max_pos=max_pos)
    cfg.update(extra_config or {})
    rng = np.random.default_rng(seed)
    w = random_weights(cfg, rng, std)
    # Round to the stored dtype first so that calibration sees the stored model.
    w = {k: (v if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else round_to_dtype(v, dtype))
         for k, v in w.items()}
    if calibrate_router:
        calibrate(cfg, w, rng)
    w.update({k: round_to_dtype(np.asarray(v, dtype=np.float64), dtype) for k, v in (extra_weights or {}).items()})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer:
        assert vocab >= TINY_TOKENIZER_SIZE, f"the tiny tokenizer needs vocab >= {TINY_TOKENIZER_SIZE}"
        write_tiny_tokenizer(out_dir, chat_template)

    def stored(name, arr):
        if name.endswith(("running_mean", "running_var")):
            return ("F32", arr)
        if name.endswith("num_batches_tracked"):
            return ("I64", arr)
        return (dtype, arr)

    names = list(w)
    if shards <= 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), {n: stored(n, w[n]) for n in names},
                          {"format": "pt"})
        return cfg
    weight_map, total = {}, 0
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {names[i]: stored(names[i], w[names[i]]) for i in part}
        write_safetensors(os.path.join(out_dir, fname), chunk, {"format": "pt"})
        for n, (dt, arr) in chunk.items():
            weight_map[n] = fname
            total += arr.size * {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}[dt]
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return cfg


# The LLaVA layout of VisionMonet (MonetLLM/visionmonet-vd-1.4B-100BT-hf): the CLIP vision tower inside
# model.safetensors under LlavaMetaModel's module path, the projector as model.mm_projector.{0,2}.*.
LLAVA_TOWER_PREFIX = "model.vision_tower.vision_tower."
LLAVA_PROJECTOR_PREFIX = "model.mm_projector."


def random_clip_vision(vision: dict, rng: np.random.Generator, std: float = 0.1) -> dict:
    """CLIPVisionModel state_dict names (vision_model.*) with random values."""
    D, I, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    n_pos = (vision["image_size"] // p) ** 2 + 1

    def mat(*shape, s=std):
        return rng.normal(0.0, s, size=shape)

    w = {"vision_model.embeddings.class_embedding": mat(D, s=0.5),
         "vision_model.embeddings.patch_embedding.weight": mat(D, 3, p, p, s=0.05),
         "vision_model.embeddings.position_embedding.weight": mat(n_pos, D, s=0.1)}
    for name in ("pre_layrnorm", "post_layernorm"):
        w[f"vision_model.{name}.weight"] = 1.0 + 0.1 * rng.normal(size=D)
        w[f"vision_model.{name}.bias"] = mat(D, s=0.05)
    for i in range(vision["num_hidden_layers"]):
        q = f"vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[q + f"self_attn.{n}.weight"] = mat(D, D)
            w[q + f"self_attn.{n}.bias"] = mat(D, s=0.05)
        for n in ("layer_norm1", "layer_norm2"):
            w[q + f"{n}.weight"] = 1.0 + 0.1 * rng.normal(size=D)
            w[q + f"{n}.bias"] = mat(D, s=0.05)
        w[q + "mlp.fc1.weight"] = mat(I, D)
        w[q + "mlp.fc1.bias"] = mat(I, s=0.05)
        w[q + "mlp.fc2.weight"] = mat(D, I)
        w[q + "mlp.fc2.bias"] = mat(D, s=0.05)
    return w


def clip_vision_config(vision: dict) -> dict:
    """config.json of a CLIPVisionModel (what save_pretrained writes, the fields that matter)."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "num_channels": 3,
            "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", **vision}


def make_llava_checkpoint(out_dir: str, *, vision=None, projector="mlp2x_gelu", select_layer=-2,
                          select_feature="patch", aspect="pad", tower_in_model=True, projector_in_model=True,
                          projector_bin=True, tower_dir="vision_tower", dtype="F32", seed=0, **backbone) -> dict:
    """A random llava_monet checkpoint in VisionMonet's layout: a Monet backbone (make_checkpoint), a CLIP
    vision tower (in model.safetensors under LLAVA_TOWER_PREFIX when tower_in_model, and always as a
    CLIPVisionModel directory `tower_dir` with config.json, model.safetensors and preprocessor_config.json,
    which mm_vision_tower names), and the projector (model.mm_projector.* in model.safetensors when
    projector_in_model; torch.save'd as mm_projector.bin in bf16 when projector_bin)."""
    vision = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     image_size=32, patch_size=8), **(vision or {})}
    hidden = backbone.get("hidden", 64)
    rng = np.random.default_rng(seed + 1000)
    tower = random_clip_vision(vision, rng)
    D = vision["hidden_size"]
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector)
    depth = int(m.group(1)) if m else 1
    proj = {}
    for i in range(depth):
        idx = "" if projector == "linear" else f"{2 * i}."
        fan_in = D if i == 0 else hidden
        proj[LLAVA_PROJECTOR_PREFIX + idx + "weight"] = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=(hidden, fan_in))
        proj[LLAVA_PROJECTOR_PREFIX + idx + "bias"] = rng.normal(0.0, 0.05, size=hidden)
    extra = {}
    if tower_in_model:
        extra.update({LLAVA_TOWER_PREFIX + k: v for k, v in tower.items()})
    if projector_in_model:
        extra.update(proj)
    llava = {"architectures": ["LlavaMonetForCausalLM"], "model_type": "llava_monet",
             "mm_vision_tower": tower_dir, "mm_hidden_size": D, "mm_projector_type": projector,
             "mm_vision_select_layer": select_layer, "mm_vision_select_feature": select_feature,
             "image_aspect_ratio": aspect, "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
             "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
             "freeze_mm_mlp_adapter": False, "tokenizer_model_max_length": backbone.get("max_pos", 512),
             "tokenizer_padding_side": "right"}
    cfg = make_checkpoint(out_dir, dtype=dtype, seed=seed, extra_weights=extra, extra_config=llava, **backbone)

    td = os.path.join(out_dir, tower_dir)
    os.makedirs(td, exist_ok=True)
    with open(os.path.join(td, "config.json"), "w") as f:
        json.dump(clip_vision_config(vision), f, indent=2)
    with open(os.path.join(td, "preprocessor_config.json"), "w") as f:
        s = vision["image_size"]
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
                   "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s},
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}, f, indent=2)
    write_safetensors(os.path.join(td, "model.safetensors"),
                      {k: (dtype, round_to_dtype(v, dtype)) for k, v in tower.items()}, {"format": "pt"})
    if projector_bin:
        import torch  # only for this file: what LLaVA's trainer writes (torch.save of a dict of tensors)
        torch.save({k: torch.from_numpy(round_to_dtype(v, "BF16")).to(torch.bfloat16) for k, v in proj.items()},
                   os.path.join(out_dir, "mm_projector.bin"))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny-vd")
    for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "experts", "moe_heads", "moe_dim", "topk",
                 "groups", "shards", "seed", "max_pos"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    ap.add_argument("--decompose", choices=["vertical", "horizontal"])
    ap.add_argument("--dtype", choices=["F32", "BF16", "F16"], default="F32")
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--tokenizer", action="store_true", help="also write a small tokenizer (vocab >= 300)")
    args = ap.parse_args()
    kw = dict(PRESETS[args.preset])
    for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "experts", "moe_heads", "moe_dim", "topk",
                 "groups", "shards", "seed", "max_pos", "decompose"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    make_checkpoint(args.out, dtype=args.dtype, tie=args.tie, tokenizer=args.tokenizer, **kw)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
