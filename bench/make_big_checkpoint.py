"""Writes a random checkpoint of the Monet-VD-1.4B shape (1.465 B parameters)
in HF layout, sharded, for speed measurements.

    python3 bench/make_big_checkpoint.py OUT [--dtype BF16|F32] [--small]

Weights ~ N(0, 0.02) (the paper's init), biases zero. Each router's BatchNorm
running statistics are set to the per-head mean/variance of its logits on
random unit-RMS inputs (what RMSNorm hands the router), so that each head
keeps about moe_topk experts as in trained models; bench_cpu.py reports the
fraction actually kept while decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from monet_ref.safetensors_io import write_safetensors  # noqa: E402

VD_1_4B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
               num_key_value_heads=16, moe_experts=512, moe_heads=8, moe_dim=16, moe_topk=8, moe_groups=4)
SMALL = dict(vocab_size=4000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, moe_experts=128, moe_heads=4, moe_dim=8, moe_topk=4, moe_groups=2)


def config(shape: dict, dtype: str) -> dict:
    return {"architectures": ["MonetForCausalLM"], "model_type": "monet", **shape,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
            "hidden_act": "relu2", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": {"BF16": "bfloat16", "F32": "float32"}[dtype], "moe_decompose": "vertical"}


def layer_tensors(c: dict, l: int, rng: np.random.Generator) -> dict:
    d, E, m, H = c["hidden_size"], c["moe_experts"], c["moe_dim"], c["moe_heads"]
    hd = d // c["num_attention_heads"]

    def normal(*shape):
        return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(0.02)

    p = f"model.layers.{l}."
    t = {p + "input_layernorm.weight": np.ones(d, np.float32),
         p + "post_attention_layernorm.weight": np.ones(d, np.float32),
         p + "self_attn.q_proj.weight": normal(c["num_attention_heads"] * hd, d),
         p + "self_attn.k_proj.weight": normal(c["num_key_value_heads"] * hd, d),
         p + "self_attn.v_proj.weight": normal(c["num_key_value_heads"] * hd, d),
         p + "self_attn.o_proj.weight": normal(d, c["num_attention_heads"] * hd)}
    if l % c["moe_groups"] == 0:
        y = rng.standard_normal(size=(256, d), dtype=np.float32)  # unit-RMS inputs, as after RMSNorm
        for s in ("1", "2"):
            w = normal(H * E, d)
            z = (y @ w.T).reshape(len(y), H, E)
            t[p + f"router.w{s}.weight"] = w
            t[p + f"router.norm{s}.running_mean"] = z.mean(axis=(0, 2)).astype(np.float32)
            t[p + f"router.norm{s}.running_var"] = z.var(axis=(0, 2)).astype(np.float32)
            t[p + f"router.norm{s}.num_batches_tracked"] = np.array(0, np.int64)
    for s in ("1", "2"):
        t[p + f"moe.u{s}.weight"] = normal(E * m // 2, d)
        t[p + f"moe.u{s}.bias"] = np.zeros(E * m // 2, np.float32)
    for n in ("v11", "v12", "v21", "v22"):
        t[p + f"moe.{n}.weight"] = normal(d // 2, E * m // 2)
    t[p + "moe.b1"] = np.zeros((E, d // 2), np.float32)
    t[p + "moe.b2"] = np.zeros((E, d // 2), np.float32)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["BF16", "F32"], default="BF16")
    ap.add_argument("--small", action="store_true", help="a small shape for trying the scripts out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    c = config(SMALL if args.small else VD_1_4B, args.dtype)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    L, d, V = c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    layers_per_shard = 4
    n_shards = 2 + (L + layers_per_shard - 1) // layers_per_shard
    weight_map, total = {}, 0

    def store(name, arr):
        if name.endswith(("running_mean", "running_var")):
            return ("F32", arr)
        if name.endswith("num_batches_tracked"):
            return ("I64", arr)
        return (args.dtype, arr)

    def write(shard_index, tensors):
        nonlocal total
        fname = f"model-{shard_index:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(os.path.join(args.out, fname), {k: store(k, v) for k, v in tensors.items()}, {"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.size * {"F32": 4, "BF16": 2, "I64": 8}[store(k, v)[0]]
        print(f"  wrote {fname} ({len(tensors)} tensors)", flush=True)

    write(1, {"model.embed_tokens.weight": rng.standard_normal(size=(V, d), dtype=np.float32) * np.float32(0.02)})
    for s in range(n_shards - 2):
        tensors = {}
        for l in range(s * layers_per_shard, min(L, (s + 1) * layers_per_shard)):
            tensors.update(layer_tensors(c, l, rng))
        write(s + 2, tensors)
    write(n_shards, {"model.norm.weight": np.ones(d, np.float32),
                     "lm_head.weight": rng.standard_normal(size=(V, d), dtype=np.float32) * np.float32(0.02)})
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    print(f"wrote {args.out}: {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
