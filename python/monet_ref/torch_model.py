"""The PyTorch peer: Monet's reference modules (the computation of the HF
remote code, written here from shared/monet-spec.md) on torch, for benchmarks.

It computes what the reference modules compute, the way they compute it:
dense einsums over all E experts per token (or, with experts="gather", only
the slices of the experts each token's routers kept: the sparse algorithm in
PyTorch, for a peer that shares monet's algorithmic advantage), the router's BatchNorm in eval
mode, a concatenating KV cache. Works with torch >= 1.13.

Norms, the router and softmaxes run in float32, or in float64 when the weights
are float64. In training mode (model.train(), used by train_ref.py) the router
normalises with batch statistics and updates its running statistics.

    model = MonetTorch.load("ckpt", dtype=torch.bfloat16)
    logits, cache = model(ids[None])               # prefill, ids [B, T]
    logits, cache = model(next_ids[:, None], cache)  # one decode step
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch
from torch import nn

from .reference import router_sigma

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64}


def read_safetensors_torch(path: str) -> dict:
    """name -> torch tensor, BF16 kept as torch.bfloat16 (no float32 detour)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        arr = np.frombuffer(raw[b:e], dtype=_NP[info["dtype"]]).reshape(info["shape"])
        t = torch.from_numpy(arr.copy())
        out[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
    return out


def load_tensors(path: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors_torch(os.path.join(path, "model.safetensors"))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for s in shards:
        out.update(read_safetensors_torch(os.path.join(path, s)))
    return out


# Modules are built on the "meta" device (no memory, no random init) and then
# filled from the checkpoint: initialising 1.4 B parameters would take longer
# than the benchmark.
META = torch.device("meta")


def wide(dtype):
    """The dtype norms, routing and softmax run in: float32, or float64 for float64 models."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, device=META))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(wide(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        self.hd = c["hidden_size"] // self.nh
        d = c["hidden_size"]
        self.q_proj = nn.Linear(d, self.nh * self.hd, bias=False, device=META)
        self.k_proj = nn.Linear(d, self.nkv * self.hd, bias=False, device=META)
        self.v_proj = nn.Linear(d, self.nkv * self.hd, bias=False, device=META)
        self.o_proj = nn.Linear(self.nh * self.hd, d, bias=False, device=META)
        self.theta = c.get("rope_theta", 10000.0)

    def forward(self, x, pos0, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        rd = wide(x.dtype)
        pos = torch.arange(pos0, pos0 + T, dtype=rd)
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.hd, 2, dtype=rd) / self.hd)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        new_cache = (k, v)
        rep = self.nh // self.nkv
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ kk.transpose(2, 3)) / self.hd ** 0.5
        S = kk.shape[2]
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores.to(wide(q.dtype)), dim=-1).to(q.dtype) @ vv
        return self.o_proj(attn.transpose(1, 2).reshape(B, T, -1)), new_cache


class Router(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.H, self.E = c["moe_heads"], c["moe_experts"]
        self.w1 = nn.Linear(c["hidden_size"], self.H * self.E, bias=False, device=META)
        self.w2 = nn.Linear(c["hidden_size"], self.H * self.E, bias=False, device=META)
        self.norm1 = nn.BatchNorm1d(self.H, affine=False, device=META)
        self.norm2 = nn.BatchNorm1d(self.H, affine=False, device=META)
        self.sigma = router_sigma(c["moe_topk"], self.E)

    def side(self, w, norm, x):
        z = w(x).unflatten(-1, (self.H, -1))
        z = z.to(wide(z.dtype))                                             # [B, T, H, E]
        if self.training:  # BatchNorm1d(H) training mode, as docs/training.md
            zd = z.detach()
            mean, var = zd.mean((0, 1, 3)), zd.var((0, 1, 3), unbiased=False)
            cnt = zd.numel() // self.H  # N*E values per head
            with torch.no_grad():
                norm.running_mean.copy_(0.9 * norm.running_mean + 0.1 * mean)
                norm.running_var.copy_(0.9 * norm.running_var + 0.1 * (var * cnt / (cnt - 1)))
                norm.num_batches_tracked += 1
            norm.batch_stats = (mean, var)  # for tests
        else:
            mean, var = norm.running_mean.to(z.dtype), norm.running_var.to(z.dtype)
        # Selection only: no gradient through the normalisation.
        n = (z.detach() - mean[:, None]) / torch.sqrt(var[:, None] + norm.eps)
        cut = n.amax(-1, keepdim=True).clamp_max(self.sigma)
        return torch.softmax(torch.where(n >= cut, z, torch.tensor(-1e10, dtype=z.dtype)), dim=-1)

    def forward(self, x):
        return self.side(self.w1, self.norm1, x), self.side(self.w2, self.norm2, x)


def relu2(x):
    return torch.relu(x).square()


def kept_experts(g):
    """g [N, H, E] -> idx [N, K]: each token's experts that some head kept,
    padded with experts no head kept (K: the most any token kept), and
    g[n, :, idx[n]] [N, H, K]. A padding expert has g = 0 in every head, so it
    adds exactly nothing."""
    keep = (g > 0).any(1)
    K = max(int(keep.sum(-1).max()), 1)
    idx = keep.to(torch.float32).topk(K, dim=-1).indices
    return idx, torch.gather(g, 2, idx[:, None, :].expand(-1, g.shape[1], -1))


def gathered(w, idx):
    """Expert-major w [E, ...] at idx [N, K] -> [N, K, ...] (index_select: a copy of only those slices)."""
    return w.index_select(0, idx.flatten()).view(*idx.shape, *w.shape[1:])


class GatheredExperts:
    """The sparse peer: the same algorithm as monet's sparse expert path in
    PyTorch. Per token, index_select gathers only the u and v slices of the
    experts its routers kept, and batched matmuls (einsum over the gathered
    slices) apply them; exact (the skipped experts have g = 0). Tokens go in
    chunks of 16 to bound the gathered copies."""
    chunk = 16

    def use_gathered(self):
        """Keeps expert-major copies of the v weights (and drops the dense ones)."""
        E = self.E
        for name in self.v_names:
            lin = getattr(self, name)
            w = lin.weight.data  # [d_out, E*m]
            setattr(self, name + "_e", w.view(w.shape[0], E, -1).permute(1, 2, 0).contiguous())
            lin.weight = None
        self.gather = True

    def forward(self, x, g1, g2):
        if not getattr(self, "gather", False):
            return self.dense(x, g1, g2)
        B, T, d = x.shape
        y = x.reshape(B * T, d)
        g1 = g1.reshape(B * T, *g1.shape[2:]).type_as(x)
        g2 = g2.reshape(B * T, *g2.shape[2:]).type_as(x)
        out = [self.rows(y[n:n + self.chunk], g1[n:n + self.chunk], g2[n:n + self.chunk])
               for n in range(0, B * T, self.chunk)]
        return torch.cat(out).view(B, T, d)

    def acts(self, u, y, idx):
        """relu2 of the kept experts' u slices: [n, K, m]"""
        w = u.weight.view(self.E, -1, y.shape[-1])
        b = u.bias.view(self.E, -1)
        return relu2(torch.einsum("nkmd,nd->nkm", gathered(w, idx), y) + gathered(b, idx))


class VDExperts(GatheredExperts, nn.Module):
    def __init__(self, c):
        super().__init__()
        d, E, m = c["hidden_size"], c["moe_experts"], c["moe_dim"]
        self.E = E
        self.u1 = nn.Linear(d, E * m // 2, device=META)
        self.u2 = nn.Linear(d, E * m // 2, device=META)
        self.v11 = nn.Linear(E * m // 2, d // 2, bias=False, device=META)
        self.v12 = nn.Linear(E * m // 2, d // 2, bias=False, device=META)
        self.v21 = nn.Linear(E * m // 2, d // 2, bias=False, device=META)
        self.v22 = nn.Linear(E * m // 2, d // 2, bias=False, device=META)
        self.b1 = nn.Parameter(torch.empty(E, d // 2, device=META))
        self.b2 = nn.Parameter(torch.empty(E, d // 2, device=META))
        self.v_names = ("v11", "v12", "v21", "v22")

    def rows(self, y, g1, g2):
        """The gathered form of dense() for n tokens: y [n, d], g [n, H, E]."""
        i1, h1 = kept_experts(g1)
        i2, h2 = kept_experts(g2)
        x1, x2 = self.acts(self.u1, y, i1), self.acts(self.u2, y, i2)
        a1, a2 = h1.sum(1), h2.sum(1)                                   # [n, K]
        p1 = torch.einsum("nhk,nkm->nhm", h1, x1)
        p2 = torch.einsum("nhk,nkm->nhm", h2, x2)
        proj = lambda c, w, idx: torch.einsum("nkm,nkmd->nd", c, gathered(w, idx))  # noqa: E731
        bias = lambda a, b, idx: torch.einsum("nk,nkd->nd", a, gathered(b, idx))  # noqa: E731
        left = (proj(a1[..., None] * x1, self.v11_e, i1) + proj(torch.einsum("nhk,nhm->nkm", h1, p2), self.v12_e, i1)
                + bias(a1, self.b1.type_as(y), i1))
        right = (proj(torch.einsum("nhk,nhm->nkm", h2, p1), self.v21_e, i2) + proj(a2[..., None] * x2, self.v22_e, i2)
                 + bias(a2, self.b2.type_as(y), i2))
        return torch.cat((left, right), dim=-1)

    def dense(self, x, g1, g2):
        g1, g2 = g1.type_as(x), g2.type_as(x)
        x1 = relu2(self.u1(x).unflatten(-1, (self.E, -1)))
        x2 = relu2(self.u2(x).unflatten(-1, (self.E, -1)))
        x11 = self.v11(torch.einsum("btim,bthi->btim", x1, g1).flatten(-2))
        x12 = self.v12(torch.einsum("btjm,bthj,bthi->btim", x2, g2, g1).flatten(-2))
        x13 = torch.einsum("bthi,id->btd", g1, self.b1.type_as(x))
        x21 = self.v21(torch.einsum("btim,bthi,bthj->btjm", x1, g1, g2).flatten(-2))
        x22 = self.v22(torch.einsum("btjm,bthj->btjm", x2, g2).flatten(-2))
        x23 = torch.einsum("bthj,jd->btd", g2, self.b2.type_as(x))
        return torch.cat((x11 + x12 + x13, x21 + x22 + x23), dim=-1)


class HDExperts(GatheredExperts, nn.Module):
    def __init__(self, c):
        super().__init__()
        d, E, m = c["hidden_size"], c["moe_experts"], c["moe_dim"]
        self.E = E
        self.u = nn.Linear(d, E * m, device=META)
        self.v = nn.Linear(E * m, d, bias=False, device=META)
        self.b = nn.Parameter(torch.empty(E, d, device=META))
        self.v_names = ("v",)

    def rows(self, y, g1, g2):
        """The gathered form of dense() for n tokens: y [n, d], g [n, H, E]."""
        i1, h1 = kept_experts(g1)
        i2, h2 = kept_experts(g2)
        p = torch.einsum("nhk,nkm->nhm", h1, self.acts(self.u, y, i1))
        coef = torch.einsum("nhk,nhm->nkm", h2, p)
        return (torch.einsum("nkm,nkmd->nd", coef, gathered(self.v_e, i2))
                + torch.einsum("nk,nkd->nd", h2.sum(1), gathered(self.b.type_as(y), i2)))

    def dense(self, x, g1, g2):
        g1, g2 = g1.type_as(x), g2.type_as(x)
        x = relu2(self.u(x).unflatten(-1, (self.E, -1)))
        x = self.v(torch.einsum("btim,bthi,bthj->btjm", x, g1, g2).flatten(-2))
        return x + torch.einsum("bthj,jd->btd", g2, self.b.type_as(x))


class Layer(nn.Module):
    def __init__(self, c, l):
        super().__init__()
        eps = c.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(c["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps)
        self.self_attn = Attention(c)
        self.moe = VDExperts(c) if c.get("moe_decompose", "vertical") == "vertical" else HDExperts(c)
        if l % c["moe_groups"] == 0:
            self.router = Router(c)

    def forward(self, x, pos0, cache, g):
        h, cache = self.self_attn(self.input_layernorm(x), pos0, cache)
        x = x + h
        y = self.post_attention_layernorm(x)
        if hasattr(self, "router"):
            g = self.router(y)
        return x + self.moe(y, *g), cache, g


class MonetTorch(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"], device=META)
        self.layers = nn.ModuleList(Layer(c, l) for l in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c.get("rms_norm_eps", 1e-6))
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False, device=META)

    @classmethod
    def load(cls, path: str, dtype=torch.bfloat16, trainable: bool = False, experts: str = "dense") -> "MonetTorch":
        """Loads a checkpoint directory; weights in `dtype` (torch.bfloat16,
        float32 or float64), router BatchNorm statistics in float32 (float64 for
        float64 models). trainable: parameters require grad (tied embeddings are
        one Parameter). experts: "dense" (the reference's einsums over every
        expert) or "gather" (only the kept experts' slices, GatheredExperts;
        inference only)."""
        if experts not in ("dense", "gather") or (experts == "gather" and trainable):
            raise ValueError(f"experts={experts!r}: expected 'dense', or 'gather' for inference")
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        if c.get("rope_scaling"):
            raise ValueError(f"{path}: rope_scaling {c['rope_scaling']} is not supported")
        model = cls(c)  # on the meta device: the checkpoint's tensors are assigned, not copied
        state = {}
        for name, t in load_tensors(path).items():
            key = name[len("model."):] if name.startswith("model.") else name
            if "num_batches" in key:
                state[key] = t
            elif "running_" in key:
                state[key] = t.to(wide(dtype))
            else:
                state[key] = t.to(dtype).contiguous()
        if c.get("tie_word_embeddings", False):
            state["lm_head.weight"] = state["embed_tokens.weight"]  # as HF ties: the embedding wins
        expected = {k: v.shape for k, v in list(model.named_parameters()) + list(model.named_buffers())}
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        params = {}  # id(tensor) -> Parameter: a tied tensor becomes one Parameter
        for key, t in state.items():
            if t.shape != expected[key]:
                raise ValueError(f"{path}: {key} has shape {list(t.shape)}, expected {list(expected[key])}")
            owner, _, attr = key.rpartition(".")
            mod = model.get_submodule(owner)
            if attr in mod._parameters:
                if id(t) not in params:
                    params[id(t)] = nn.Parameter(t, requires_grad=trainable)
                mod._parameters[attr] = params[id(t)]
            else:
                mod._buffers[attr] = t
        if experts == "gather":
            for layer in model.layers:
                layer.moe.use_gathered()
        return model.eval()

    def forward(self, ids, cache=None):
        """ids [B, T]; cache: list of per-layer (k, v) or None. Returns logits [B, T, V], cache."""
        pos0 = 0 if cache is None else cache[0][0].shape[2]
        x = self.embed_tokens(ids)
        new_cache, g = [], None
        for l, layer in enumerate(self.layers):
            x, kv, g = layer(x, pos0, None if cache is None else cache[l], g)
            new_cache.append(kv)
        return self.lm_head(self.norm(x)), new_cache

