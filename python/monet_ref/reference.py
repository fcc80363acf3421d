"""Float64 reference implementation of Monet inference (shared/monet-spec.md).

Readable over fast: one function per op, shapes in comments. Weights are
widened to float64 from whatever dtype the checkpoint stores.

    model = load("path/to/checkpoint")
    logits, routers = forward(model, [1, 5, 9])   # routers: {layer: (g1, g2)}, each [T, H, E]
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .safetensors_io import read_safetensors


@dataclass
class Model:
    config: dict
    w: dict  # name -> float64 array

    def get(self, key, default=None):
        return self.config.get(key, default)


def load(path: str) -> Model:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(path, shard)))
    else:
        tensors = read_safetensors(os.path.join(path, "model.safetensors"))
    w = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    return Model(config, w)


def dims(cfg: dict) -> dict:
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    return dict(d=cfg["hidden_size"], L=cfg["num_hidden_layers"], nh=nh, nkv=nkv,
                hd=cfg["hidden_size"] // nh, V=cfg["vocab_size"], E=cfg["moe_experts"],
                H=cfg["moe_heads"], m=cfg["moe_dim"], k=cfg["moe_topk"], G=cfg["moe_groups"],
                eps=cfg.get("rms_norm_eps", 1e-6), theta=cfg.get("rope_theta", 10000.0),
                vd=cfg.get("moe_decompose", "vertical") == "vertical")


def router_sigma(k: int, E: int) -> float:
    """Phi^-1(1 - k/E)."""
    return NormalDist().inv_cdf(1.0 - k / E)


def rmsnorm(x, w, eps):
    # x [T, d]
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, pos, theta):
    # x [T, heads, hd]; rotate_half pairs (i, i + hd/2)
    hd = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    ang = pos[:, None] * inv_freq[None, :]                            # [T, hd/2]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
    half = hd // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def attention(model, l, x, D):
    # x [T, d] (normed) -> [T, d]
    p = f"model.layers.{l}.self_attn."
    T = x.shape[0]
    q = (x @ model.w[p + "q_proj.weight"].T).reshape(T, D["nh"], D["hd"])
    k = (x @ model.w[p + "k_proj.weight"].T).reshape(T, D["nkv"], D["hd"])
    v = (x @ model.w[p + "v_proj.weight"].T).reshape(T, D["nkv"], D["hd"])
    pos = np.arange(T, dtype=np.float64)
    q, k = rope(q, pos, D["theta"]), rope(k, pos, D["theta"])
    rep = D["nh"] // D["nkv"]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)           # [T, nh, hd]
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D["hd"])           # [nh, T, T]
    scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", probs, v).reshape(T, D["nh"] * D["hd"])
    return out @ model.w[p + "o_proj.weight"].T


def router_side(z, mean, var, sigma):
    # z [T, H, E] raw logits -> g [T, H, E]
    n = (z - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)
    cut = np.minimum(n.max(-1, keepdims=True), sigma)
    logits = np.where(n >= cut, z, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def router(model, l, y, D):
    # y [T, d] -> g1, g2 [T, H, E]
    p = f"model.layers.{l}.router."
    T, sigma = y.shape[0], router_sigma(D["k"], D["E"])
    gs = []
    for s in ("1", "2"):
        z = (y @ model.w[p + f"w{s}.weight"].T).reshape(T, D["H"], D["E"])
        gs.append(router_side(z, model.w[p + f"norm{s}.running_mean"], model.w[p + f"norm{s}.running_var"], sigma))
    return gs[0], gs[1]


def relu2(x):
    return np.maximum(x, 0.0) ** 2


def experts_vd(model, l, y, g1, g2, D):
    # y [T, d], g [T, H, E] -> [T, d]; the factorised formulas of the spec
    p = f"model.layers.{l}.moe."
    T, E, hm = y.shape[0], D["E"], D["m"] // 2
    x1 = relu2(y @ model.w[p + "u1.weight"].T + model.w[p + "u1.bias"]).reshape(T, E, hm)
    x2 = relu2(y @ model.w[p + "u2.weight"].T + model.w[p + "u2.bias"]).reshape(T, E, hm)
    a1, a2 = g1.sum(1), g2.sum(1)                                          # [T, E]
    p1 = np.einsum("thi,tic->thc", g1, x1)                                 # [T, H, m/2]
    p2 = np.einsum("thj,tjc->thc", g2, x2)
    in11 = (a1[..., None] * x1).reshape(T, -1)
    in12 = np.einsum("thi,thc->tic", g1, p2).reshape(T, -1)
    in21 = np.einsum("thj,thc->tjc", g2, p1).reshape(T, -1)
    in22 = (a2[..., None] * x2).reshape(T, -1)
    left = in11 @ model.w[p + "v11.weight"].T + in12 @ model.w[p + "v12.weight"].T + a1 @ model.w[p + "b1"]
    right = in21 @ model.w[p + "v21.weight"].T + in22 @ model.w[p + "v22.weight"].T + a2 @ model.w[p + "b2"]
    return np.concatenate([left, right], axis=-1)


def experts_hd(model, l, y, g1, g2, D):
    p = f"model.layers.{l}.moe."
    T, E, m = y.shape[0], D["E"], D["m"]
    x = relu2(y @ model.w[p + "u.weight"].T + model.w[p + "u.bias"]).reshape(T, E, m)
    P = np.einsum("thi,tic->thc", g1, x)                                   # [T, H, m]
    q = np.einsum("thj,thc->tjc", g2, P).reshape(T, -1)                    # [T, E*m]
    return q @ model.w[p + "v.weight"].T + g2.sum(1) @ model.w[p + "b"]


def experts_explicit(model, l, y, g1, g2, D, mask=None):
    """out = sum_h sum_{i,j} M[i,j] g1[h,i] g2[h,j] E_ij(y): the composed experts one by one.
    mask: [E, E] array of 0/1 (None: all ones). Slow; for tests on tiny models."""
    p = f"model.layers.{l}.moe."
    T, E, d, m = y.shape[0], D["E"], D["d"], D["m"]
    out = np.zeros((T, d))
    M = np.ones((E, E)) if mask is None else mask
    for t in range(T):
        pw = np.einsum("hi,hj->ij", g1[t], g2[t]) * M                      # [E, E]
        if D["vd"]:
            hm = m // 2
            x1 = relu2(model.w[p + "u1.weight"] @ y[t] + model.w[p + "u1.bias"]).reshape(E, hm)
            x2 = relu2(model.w[p + "u2.weight"] @ y[t] + model.w[p + "u2.bias"]).reshape(E, hm)
            V = {n: model.w[p + n + ".weight"].reshape(d // 2, E, hm) for n in ("v11", "v12", "v21", "v22")}
            for i, j in zip(*np.nonzero(pw)):
                left = V["v11"][:, i] @ x1[i] + V["v12"][:, i] @ x2[j] + model.w[p + "b1"][i]
                right = V["v21"][:, j] @ x1[i] + V["v22"][:, j] @ x2[j] + model.w[p + "b2"][j]
                out[t] += pw[i, j] * np.concatenate([left, right])
        else:
            x = relu2(model.w[p + "u.weight"] @ y[t] + model.w[p + "u.bias"]).reshape(E, m)
            V = model.w[p + "v.weight"].reshape(d, E, m)
            for i, j in zip(*np.nonzero(pw)):
                out[t] += pw[i, j] * (V[:, j] @ x[i] + model.w[p + "b"][j])
    return out


def forward(model: Model, ids, masks: dict | None = None, trace: dict | None = None):
    """ids: list of token ids. masks: {group: [E, E] 0/1 matrix} (uses the explicit sum).
    Returns logits [T, V] and {router layer: (g1, g2)}. trace: a dict to fill with the
    intermediates "resid_pre.{l}", "attn_out.{l}", "moe_out.{l}", "resid_post.{l}" [T, d]."""
    ids = np.asarray(ids, dtype=np.int64)
    return forward_embeds(model, model.w["model.embed_tokens.weight"][ids], masks, trace)


def forward_embeds(model: Model, x, masks: dict | None = None, trace: dict | None = None):
    """forward() from input embeddings x [T, d] (token rows of embed_tokens, or image features)."""
    D = dims(model.config)
    x = np.asarray(x, dtype=np.float64)
    routers, g1, g2 = {}, None, None
    trace = {} if trace is None else trace
    for l in range(D["L"]):
        p = f"model.layers.{l}."
        trace[f"resid_pre.{l}"] = x
        attn_out = attention(model, l, rmsnorm(x, model.w[p + "input_layernorm.weight"], D["eps"]), D)
        trace[f"attn_out.{l}"] = attn_out
        x = x + attn_out
        y = rmsnorm(x, model.w[p + "post_attention_layernorm.weight"], D["eps"])
        if l % D["G"] == 0:
            g1, g2 = router(model, l, y, D)
            routers[l] = (g1, g2)
        group = l // D["G"]
        if masks and group in masks:
            moe_out = experts_explicit(model, l, y, g1, g2, D, masks[group])
        else:
            moe_out = (experts_vd if D["vd"] else experts_hd)(model, l, y, g1, g2, D)
        trace[f"moe_out.{l}"] = moe_out
        x = x + moe_out
        trace[f"resid_post.{l}"] = x
    x = rmsnorm(x, model.w["model.norm.weight"], D["eps"])
    head = model.w.get("lm_head.weight", model.w["model.embed_tokens.weight"])
    if model.config.get("tie_word_embeddings", False):
        head = model.w["model.embed_tokens.weight"]
    return x @ head.T, routers
