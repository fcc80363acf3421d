"""PyTorch reference of our training recipe (docs/training.md), to check
`monet grad` and `monet train` against, step by step.

The model is torch_model.MonetTorch in training mode: the router normalises
with the micro-batch's statistics (and updates its running statistics), the
gradient reaches w1/w2 only through the softmax of the kept raw logits.

    out = loss_and_grads("ckpt", tokens, aux_weight=1e-3)   # as `monet grad` writes it
    log = train("ckpt", train_tokens, steps=50, batch=2, seq=16, ...)  # one StepLog per step
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .torch_model import MonetTorch

MASK64 = (1 << 64) - 1


def load_trainable(path: str, dtype=torch.float64) -> MonetTorch:
    return MonetTorch.load(path, dtype=dtype, trainable=True).train()


def hf_name(key: str) -> str:
    """MonetTorch parameter/buffer name -> checkpoint (HF) tensor name."""
    return key if key.startswith("lm_head.") else "model." + key


def forward_train(model: MonetTorch, ids: torch.Tensor):
    """ids [B, T] -> logits [B, T, V], [(g1, g2) per router layer], each [B, T, H, E]."""
    x, g, routers = model.embed_tokens(ids), None, []
    for layer in model.layers:
        x, _, g = layer(x, 0, None, g)
        if hasattr(layer, "router"):
            routers.append(g)
    return model.lm_head(model.norm(x)), routers


def aux_losses(routers):
    """(L_unif, L_amb), each averaged over the router layers."""
    unif = amb = 0.0
    for g1, g2 in routers:
        H, E = g1.shape[-2:]
        gbar = [g.flatten(0, -3).mean(0).clamp_min(1e-6) for g in (g1, g2)]      # [H, E], mean over tokens
        unif = unif - (gbar[0].log().sum() + gbar[1].log().sum()) / (2 * H * E)
        worst = (1 - g1.max(-1).values).sum(-1) + (1 - g2.max(-1).values).sum(-1)  # [B, T]
        amb = amb + worst.mean() / (2 * H)
    return unif / len(routers), amb / len(routers)


def objective(model: MonetTorch, tokens, aux_weight: float):
    """One micro-batch in training mode (updates the running statistics).
    tokens [B, T+1] -> (loss, loss_lm, loss_unif, loss_amb) tensors, routers."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    logits, routers = forward_train(model, tokens[:, :-1])
    lm = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    unif, amb = aux_losses(routers)
    return (lm + aux_weight * (unif + amb), lm, unif, amb), routers


def running_stats(model: MonetTorch) -> dict:
    return {hf_name(k): v.detach().double().numpy().copy() for k, v in model.named_buffers() if "running_" in k}


def weights(model: MonetTorch) -> dict:
    """HF name -> float64 numpy array, parameters and running statistics."""
    out = {hf_name(k): p.detach().double().numpy().copy() for k, p in model.named_parameters()}
    out.update(running_stats(model))
    return out


def loss_and_grads(ckpt, tokens, aux_weight: float = 1e-3, dtype=torch.float64) -> dict:
    """What `monet grad` writes: one training-mode forward+backward of the whole
    batch tokens [B, T+1]. ckpt: a checkpoint directory or a model from
    load_trainable (its running statistics are updated, its .grad overwritten)."""
    model = load_trainable(ckpt, dtype) if isinstance(ckpt, str) else ckpt.train()
    model.zero_grad(set_to_none=True)
    losses, _ = objective(model, tokens, aux_weight)
    losses[0].backward()
    out = {name: np.array([float(v)]) for name, v in zip(("loss", "loss_lm", "loss_unif", "loss_amb"), losses)}
    for k, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        out["grad." + hf_name(k)] = g.double().numpy().copy()
    out.update({"running." + k: v for k, v in running_stats(model).items()})
    return out


class SplitMix64:
    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def lr_at(s: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Learning rate of step s (0-based) of `steps`: linear warm-up, then cosine to lr*min_lr_ratio."""
    if s < warmup:
        return lr * (s + 1) / warmup
    lo = lr * min_lr_ratio
    p = min(1.0, (s - warmup) / max(1, steps - 1 - warmup))
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * p))


def decays(name: str, p) -> bool:
    """Weight decay on weight matrices (embeddings, projections, router, u/v), not on
    norms, u biases or the expert biases b1/b2/b (2-D, but biases)."""
    return name.endswith(".weight") and p.dim() == 2


@torch.no_grad()
def evaluate(model: MonetTorch, val_tokens: np.ndarray, seq: int, max_tokens: int) -> float | None:
    """Mean token loss in inference mode on consecutive windows of seq+1 tokens at
    stride seq (each validation token is predicted once), at most max_tokens predicted
    tokens but at least one window. None when the split is shorter than seq+1."""
    if len(val_tokens) <= seq:
        return None
    n = max(1, min((len(val_tokens) - 1) // seq, max_tokens // seq))
    windows = torch.as_tensor(np.stack([val_tokens[i * seq:i * seq + seq + 1] for i in range(n)]).astype(np.int64))
    was_training = model.training
    model.eval()
    logits, _ = model(windows[:, :-1])
    model.train(was_training)
    return float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))


class StepLog(NamedTuple):
    loss: float
    loss_lm: float
    loss_unif: float
    loss_amb: float
    grad_norm: float
    lr: float
    val_loss: float | None = None


def train(init, train_tokens: np.ndarray, steps: int, batch: int, seq: int, grad_accum: int, lr: float,
          warmup: int, min_lr_ratio: float, weight_decay: float, clip: float, aux_weight: float, seed: int,
          dtype=torch.float64, val_tokens: np.ndarray | None = None, eval_every: int = 0,
          val_max_tokens: int = 1 << 62) -> list:
    """docs/training.md from `init` (a checkpoint directory, or a model from
    load_trainable, trained in place). Returns one StepLog per step; val_loss at
    steps that are multiples of eval_every and at the last step (with val_tokens)."""
    model = load_trainable(init, dtype) if isinstance(init, str) else init.train()
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
                             {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    params = [p for _, p in named]
    rng, n_train = SplitMix64(seed), len(train_tokens)
    assert n_train > seq, "the training split must be longer than seq"
    log = []
    for s in range(steps):
        lr_s = lr_at(s, steps, lr, warmup, min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr_s
        opt.zero_grad(set_to_none=True)
        sums = np.zeros(4)
        for _ in range(grad_accum):
            offs = [rng.next() % (n_train - seq) for _ in range(batch)]
            tokens = np.stack([train_tokens[o:o + seq + 1] for o in offs])
            losses, _ = objective(model, tokens, aux_weight)
            (losses[0] / grad_accum).backward()
            sums += [float(v) / grad_accum for v in losses]
        if clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:  # no clipping: the norm is still reported
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        opt.step()
        val = None
        if val_tokens is not None and eval_every > 0 and ((s + 1) % eval_every == 0 or s + 1 == steps):
            val = evaluate(model, val_tokens, seq, val_max_tokens)
        log.append(StepLog(*sums, norm, lr_s, val))
    return log
