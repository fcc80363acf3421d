"""CPU training benchmark: `monet train` vs the PyTorch peer (the training
reference python/monet_ref/train_ref.py on torch), like with like: the same
model shape and initial weights, the same batches, the same recipe
(docs/training.md: forward + backward + clip + AdamW), f32, the same threads.

    /usr/bin/python3 bench/bench_train.py [--threads 2] [--batch 4] [--seq 512] [--steps 10] [--warmup-steps 3]
                                          [--decompose HD] [--hidden 256 --layers 8 ...] [--skip-peer] [--json F]

The shape defaults to our default model (hidden 256, 8 layers, 4 heads, vocab
8192, E 64, H 4, m 16, topk 8, groups 2, VD). One random checkpoint of the
shape (weight matrices N(0, 0.02) as the recipe's init) is made once with
monet_ref.make_checkpoint and cached in bench/out/train/ (gitignored); both
sides start from it (`monet train --init`). Data: data/corpus with
data/tokenizer when present and the tokenizer fits the vocab, else a random
text file with a small tokenizer (--random-text forces that). `monet train`
tokenizes it into its cache OUT/data/train.bin and the peer reads that same
file, so with the same --seed (SplitMix64 sampling) every step of every side
sees the same sequences; the step-1 loss of the f32 peer matches ours.

Measured per side: --warmup-steps steps that are not timed, then --steps
timed steps; a step is: sample the batch, forward, backward, clip the global
gradient norm, AdamW update (no evaluation, no checkpoint: `monet train` runs
with --eval-every 0 and saves once after its last step). Ours is read from the
tokens_per_s column of OUT/train.csv; the peer times the same with
time.perf_counter. Reported: the median tokens/s over the timed steps.

The peer runs in a subprocess per setting: eager f32; torch.compile f32
(torch >= 2.0 only; the compile time is reported); eager with bf16 autocast
(f32 master weights and AdamW, bf16 GEMMs: the peer's fastest setting on a
CPU with native bf16). Limits: training FLOPs per token counted from the
shape (every GEMM of the forward pass, times 3 for forward + backward) over
the measured peak f32 GEMM rate (torch.matmul and numpy, both OpenBLAS, the
library `monet train` calls) gives a tokens/s ceiling, and each side's
achieved GFLOP/s and % of that peak.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "python"))
BINARY = os.path.join(REPO, "build", "monet")
OUT = os.path.join(HERE, "out", "train")
DEFAULT_CORPUS = os.path.join(REPO, "data", "corpus")
DEFAULT_TOKENIZER = os.path.join(REPO, "data", "tokenizer")
PEER_MODES = ("eager", "compile", "bf16")
MODE_LABEL = {"eager": "peer: PyTorch eager, f32", "compile": "peer: torch.compile, f32",
              "bf16": "peer: PyTorch eager, bf16 autocast"}
# The recipe both sides run (docs/training.md); the benchmark only needs them equal.
RECIPE = dict(lr=1e-3, warmup=100, min_lr_ratio=0.1, weight_decay=0.1, clip=1.0, aux_weight=1e-3)
INIT_STD = 0.02


# ------------------------------------------------------------------ shape, FLOPs

def shape_kwargs(a) -> dict:
    """make_checkpoint keyword arguments of the benchmarked shape."""
    return dict(vocab=a.vocab, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads or a.heads,
                experts=a.experts, moe_heads=a.moe_heads, moe_dim=a.moe_dim, topk=a.topk, groups=a.groups,
                decompose=a.decompose, tie=a.tie, max_pos=max(512, a.seq))


def check_shape(s: dict) -> str | None:
    d, nh, nkv, E, m = s["hidden"], s["heads"], s["kv_heads"], s["experts"], s["moe_dim"]
    if min(s["vocab"], d, s["layers"], nh, nkv, E, s["moe_heads"], m, s["topk"], s["groups"]) < 1:
        return "every shape flag must be >= 1"
    if d % nh or nh % nkv or (d // nh) % 2:
        return "--hidden must be a multiple of --heads with an even head size, and --heads of --kv-heads"
    if s["decompose"] == "vertical" and (d % 2 or (E * m) % 2):
        return "VD needs an even --hidden and an even --experts * --moe-dim"
    if s["topk"] >= E:
        return "--topk must be < --experts"
    return None


def flops_per_token(s: dict, T: int) -> dict:
    """Training FLOPs per token of the dense computation both sides do (every
    expert of every token, the full T x T attention), from the shape.
    Every GEMM of the forward pass costs 2 FLOPs per weight per token; the
    backward pass does two GEMMs of the same size per forward GEMM (input and
    weight gradients), so training costs 6 per weight per token. Attention:
    Q K^T and P V are 2 * T * nh * hd each per token and layer forward, 12 *
    T * nh * hd forward + backward. Elementwise work (norms, RoPE, softmaxes,
    the router's head mixing, AdamW) is not counted."""
    d, L, V, E, m, H, G = (s["hidden"], s["layers"], s["vocab"], s["experts"], s["moe_dim"], s["moe_heads"],
                           s["groups"])
    nh, nkv = s["heads"], s["kv_heads"]
    hd = d // nh
    attn_w = L * (2 * d * nh * hd + 2 * d * nkv * hd)            # q, o; k, v
    router_w = ((L + G - 1) // G) * 2 * H * E * d                # w1, w2 of every router layer
    # VD: u1,u2 [E*m/2, d], v11..v22 [d/2, E*m/2], b1,b2 [E, d/2]; HD: u [E*m, d], v [d, E*m], b [E, d]
    expert_w = L * (E * m * d + E * m * d + E * d)
    head_w = V * d
    gemm_w = attn_w + router_w + expert_w + head_w
    attention = 12 * L * T * nh * hd
    params = (V * d * (1 if s["tie"] else 2) + L * (2 * d + 2 * d * nh * hd + 2 * d * nkv * hd)
              + ((L + G - 1) // G) * 2 * H * E * d + L * (E * m * d + E * m + E * m * d + E * d) + d)
    return dict(gemm_weights=gemm_w, attn_weights=attn_w, router_weights=router_w, expert_weights=expert_w,
                lm_head_weights=head_w, gemm_flops=6 * gemm_w, attention_flops=attention,
                total=6 * gemm_w + attention, params=params)


# ------------------------------------------------------------------ inputs

def ensure_checkpoint(s: dict, seed: int) -> str:
    """A random f32 checkpoint of the shape (init as the recipe), made once."""
    key = "-".join(f"{k}{v}" for k, v in sorted(s.items()) if k != "decompose")
    path = os.path.join(OUT, f"ckpt-{s['decompose'][0]}d-{key}-s{seed}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    from monet_ref.make_checkpoint import make_checkpoint
    print(f"making {os.path.relpath(path, REPO)} ...", file=sys.stderr, flush=True)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # No router calibration: training mode normalises with the batch's statistics.
    make_checkpoint(tmp, dtype="F32", seed=seed, std=INIT_STD, calibrate_router=False, **s)
    os.replace(tmp, path)
    return path


def tokenizer_vocab(path: str) -> int | None:
    """Vocabulary size of a tokenizer folder (tokenizer.json, or the pieces of a
    SentencePiece tokenizer.model), None when it cannot be told."""
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        with open(tj, encoding="utf-8") as f:
            t = json.load(f)
        ids = list(t.get("model", {}).get("vocab", {}).values()) + [a["id"] for a in t.get("added_tokens", [])]
        return max(ids) + 1 if ids else None
    sp = os.path.join(path, "tokenizer.model")
    if not os.path.exists(sp):
        return None
    with open(sp, "rb") as f:
        buf = f.read()
    i, n = 0, 0
    try:  # ModelProto: count the top-level field 1 (repeated SentencePiece pieces)
        while i < len(buf):
            key, i = _varint(buf, i)
            wire = key & 7
            if wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 2:
                ln, i = _varint(buf, i)
                i += ln
            elif wire == 5:
                i += 4
            else:
                return None
            n += (key >> 3) == 1 and wire == 2
    except IndexError:
        return None
    return n or None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def random_text_data(seed: int) -> tuple[str, str]:
    """(text file, tokenizer folder): random words over the small tokenizer's
    letters (made once), for shapes the real tokenizer does not fit."""
    from monet_ref.make_checkpoint import TINY_CHARS, write_tiny_tokenizer
    tok = os.path.join(OUT, "tiny-tokenizer")
    if not os.path.exists(os.path.join(tok, "tokenizer_config.json")):
        os.makedirs(tok, exist_ok=True)
        write_tiny_tokenizer(tok)
    text = os.path.join(OUT, "random-text", f"random-{seed}.txt")
    if not os.path.exists(text):
        import numpy as np
        rng = np.random.default_rng(seed)
        letters = np.array(list(TINY_CHARS[1:]))
        words = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(1, 9, size=100_000)]
        os.makedirs(os.path.dirname(text), exist_ok=True)
        with open(text + ".tmp", "w") as f:
            for i in range(0, len(words), 12):
                f.write(" ".join(words[i:i + 12]) + "\n")
        os.replace(text + ".tmp", text)
    return text, tok


# ------------------------------------------------------------------ ours

def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    head = lines[0].split(",")
    return [dict(zip(head, ln.split(","))) for ln in lines[1:]]


def run_ours(a, ckpt: str, data: str, tok: str) -> dict:
    out = os.path.join(OUT, "monet-run")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a fresh run each time; the token cache data/ is kept
        if name != "data":
            p = os.path.join(out, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    total = a.warmup_steps + a.steps
    cmd = [BINARY, "train", "--data", data, "--tokenizer", tok, "--out", out, "--init", ckpt,
           "--steps", str(total), "--batch", str(a.batch), "--seq", str(a.seq), "--dtype", "f32",
           "--threads", str(a.threads), "--seed", str(a.seed), "--eval-every", "0",
           "--save-every", str(total + 1000), "--keep", "1", "--log-every", str(total + 1000),
           "--lr", str(RECIPE["lr"]), "--warmup", str(RECIPE["warmup"]),
           "--min-lr-ratio", str(RECIPE["min_lr_ratio"]), "--weight-decay", str(RECIPE["weight_decay"]),
           "--clip", str(RECIPE["clip"]), "--aux-weight", str(RECIPE["aux_weight"])]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        hint = ""
        if "smaller than the tokenizer" in r.stderr:
            hint = "\n(the tokenizer does not fit the model's vocab: pass --random-text or a larger --vocab)"
        sys.exit(f"monet train failed ({r.returncode}):\n  {' '.join(cmd)}\n{r.stderr.strip()}{hint}")
    rows = read_csv(os.path.join(out, "train.csv"))
    if len(rows) != total:
        sys.exit(f"monet train wrote {len(rows)} rows to train.csv, expected {total}")
    timed = rows[a.warmup_steps:]
    step_s = [a.batch * a.seq / float(rw["tokens_per_s"]) for rw in timed]
    for name in os.listdir(out):  # the final checkpoint is not needed
        if name.startswith("step-"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    return dict(tok_s=statistics.median(float(rw["tokens_per_s"]) for rw in timed),
                mean_tok_s=len(timed) * a.batch * a.seq / sum(step_s),
                step_s=step_s, first_step_s=a.batch * a.seq / float(rows[0]["tokens_per_s"]),
                losses=[float(rw["loss"]) for rw in rows], process_wall_s=wall,
                tokens_file=os.path.join(out, "data", "train.bin"), command=cmd)


# ------------------------------------------------------------------ the peer

def peer_worker(spec: dict) -> dict:
    """One peer setting in this process: train_ref.train's loop with timing."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from monet_ref import train_ref as tr
    torch.set_num_threads(spec["threads"])
    mode = spec["mode"]
    res = dict(mode=mode, torch=torch.__version__)
    if mode == "compile" and not hasattr(torch, "compile"):
        res["error"] = f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
        return res
    tokens = np.fromfile(spec["tokens"], dtype="<u4").astype(np.int64)
    model = tr.load_trainable(spec["ckpt"], torch.float32)
    named = list(model.named_parameters())
    rc = spec["recipe"]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if tr.decays(n, p)], "weight_decay": rc["weight_decay"]},
                             {"params": [p for n, p in named if not tr.decays(n, p)], "weight_decay": 0.0}],
                            lr=rc["lr"], betas=(0.9, 0.95), eps=1e-8)
    params = [p for _, p in named]
    aux = rc["aux_weight"]

    def objective(ids):  # train_ref.objective on a tensor [B, T+1]
        logits, routers = tr.forward_train(model, ids[:, :-1])
        lm = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        unif, amb = tr.aux_losses(routers)
        return lm + aux * (unif + amb)

    fn = objective
    if mode == "compile":
        fn = torch.compile(objective)
    rng, n, T, B = tr.SplitMix64(spec["seed"]), len(tokens), spec["seq"], spec["batch"]
    total = spec["warmup_steps"] + spec["steps"]
    step_s, losses = [], []
    for s in range(total):
        t0 = time.perf_counter()
        lr_s = tr.lr_at(s, total, rc["lr"], rc["warmup"], rc["min_lr_ratio"])
        for group in opt.param_groups:
            group["lr"] = lr_s
        opt.zero_grad(set_to_none=True)
        offs = [rng.next() % (n - T) for _ in range(B)]
        ids = torch.from_numpy(np.stack([tokens[o:o + T + 1] for o in offs]))
        try:
            if mode == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = fn(ids)
            else:
                loss = fn(ids)
            loss.backward()
        except Exception as e:  # e.g. torch.compile failing on this CPU
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            res["error"] = f"step {s + 1}: {type(e).__name__}: {msg}"
            return res
        if rc["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, rc["clip"])
        opt.step()
        losses.append(float(loss))
        step_s.append(time.perf_counter() - t0)
        if s == 0:
            print(f"  {mode}: first step {step_s[0]:.2f} s", file=sys.stderr, flush=True)
    timed = step_s[spec["warmup_steps"]:]
    res.update(tok_s=statistics.median(B * T / t for t in timed), mean_tok_s=len(timed) * B * T / sum(timed),
               step_s=timed, first_step_s=step_s[0], losses=losses)
    return res


def run_peer(a, mode: str, ckpt: str, tokens: str) -> dict:
    spec = dict(mode=mode, ckpt=ckpt, tokens=tokens, threads=a.threads, seed=a.seed, batch=a.batch, seq=a.seq,
                steps=a.steps, warmup_steps=a.warmup_steps, recipe=RECIPE)
    cmd = [a.peer_python or sys.executable, os.path.abspath(__file__), "--peer-worker", json.dumps(spec)]
    print(f"peer ({mode}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=a.peer_timeout)
    except subprocess.TimeoutExpired:
        return dict(mode=mode, error=f"did not finish within --peer-timeout {a.peer_timeout} s")
    wall = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    try:
        res = json.loads(last)
    except json.JSONDecodeError:
        return dict(mode=mode, error=f"the worker failed (exit {r.returncode}); see its stderr above")
    res["process_wall_s"] = wall
    return res


# ------------------------------------------------------------------ peak GEMM rate

def gemm_peak(threads: int, n: int, reps: int) -> dict:
    """Best GFLOP/s of an n x n x n matmul (2 n^3 FLOPs): torch f32 and numpy
    f32 (both the system BLAS, OpenBLAS here, which `monet train` calls too),
    and torch bf16 (at most 1024^3)."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)

    def best(f, n=n):
        f()
        t, spent = float("inf"), 0.0
        for _ in range(reps):  # at least one timed run; stop after 10 s (slow emulated bf16)
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
            t, spent = min(t, dt), spent + dt
            if spent > 10:
                break
        return 2 * n ** 3 / t / 1e9

    out = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    out["torch_f32"] = best(lambda: torch.matmul(a, b, out=c))
    an, bn = a.numpy(), b.numpy()
    cn = np.empty((n, n), dtype=np.float32)
    out["numpy_f32"] = best(lambda: np.matmul(an, bn, out=cn))
    try:  # at most 1024: without native bf16 (AVX512-BF16/AMX) torch emulates it at a few GFLOP/s
        nb = min(n, 1024)
        ah, bh = a[:nb, :nb].bfloat16(), b[:nb, :nb].bfloat16()
        out["torch_bf16"] = best(lambda: torch.matmul(ah, bh), nb)
        out["bf16_n"] = nb
    except Exception:  # noqa: BLE001
        pass
    out["f32"] = max(out["torch_f32"], out["numpy_f32"])
    return out


# ------------------------------------------------------------------ main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for every side (default 2)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (default 10)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them (default 3)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the weights and the batch sampling")
    g = ap.add_argument_group("model shape (default: our default model)")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    g.add_argument("--vocab", type=int, default=8192)
    g.add_argument("--experts", type=int, default=64, help="E, experts per router side")
    g.add_argument("--moe-heads", type=int, default=4, help="H, router heads")
    g.add_argument("--moe-dim", type=int, default=16, help="m, expert dimension")
    g.add_argument("--topk", type=int, default=8, help="moe_topk")
    g.add_argument("--groups", type=int, default=2, help="layers sharing one router")
    g.add_argument("--decompose", default="vertical", help="vertical/VD (default) or horizontal/HD")
    g.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    d = ap.add_argument_group("data")
    d.add_argument("--data", help="text file or folder of *.txt (default: data/corpus when present)")
    d.add_argument("--tokenizer", help="tokenizer folder for --data (default: data/tokenizer)")
    d.add_argument("--random-text", action="store_true", help="random words with a small tokenizer (vocab >= 300)")
    p = ap.add_argument_group("peer")
    p.add_argument("--skip-peer", action="store_true", help="measure monet only")
    p.add_argument("--peer-modes", default=",".join(PEER_MODES),
                   help="comma list of eager, compile, bf16 (default: all)")
    p.add_argument("--peer-python", help="python with torch for the peer (default: this one)")
    p.add_argument("--peer-timeout", type=int, default=1800, help="seconds per peer setting, compile included")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak GEMM measurement")
    ap.add_argument("--peak-reps", type=int, default=5, help="repeats of it (best taken)")
    ap.add_argument("--json", help="also write all measurements to this file")
    ap.add_argument("--peer-worker", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    if a.peer_worker:
        print(json.dumps(peer_worker(json.loads(a.peer_worker))))
        return
    sys.stdout.reconfigure(line_buffering=True)
    a.decompose = {"vd": "vertical", "hd": "horizontal"}.get(a.decompose.lower(), a.decompose.lower())
    if a.decompose not in ("vertical", "horizontal"):
        sys.exit(f"--decompose: expected vertical/VD or horizontal/HD, got {a.decompose!r}")
    if min(a.threads, a.batch, a.steps) < 1 or a.seq < 2 or a.warmup_steps < 0:
        sys.exit("--threads, --batch and --steps must be >= 1, --seq >= 2, --warmup-steps >= 0")
    modes = [m.strip() for m in a.peer_modes.split(",") if m.strip()]
    if any(m not in PEER_MODES for m in modes):
        sys.exit(f"--peer-modes: expected a comma list of {', '.join(PEER_MODES)}; got {a.peer_modes!r}")
    s = shape_kwargs(a)
    err = check_shape(s)
    if err:
        sys.exit(err)
    if not os.access(BINARY, os.X_OK):
        sys.exit(f"{os.path.relpath(BINARY, REPO)} not found: build it first with `bash scripts/build.sh`")
    # Every BLAS and OpenMP runtime in this process and its children: the same threads.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        sys.exit(f"needs numpy and torch ({e}): run with Debian's /usr/bin/python3 (python3-torch)")

    t_start = time.perf_counter()
    os.makedirs(OUT, exist_ok=True)
    # Data: the real corpus when the tokenizer fits the vocab, else random text.
    data, tok = a.data, a.tokenizer
    if a.random_text:
        data, tok = random_text_data(a.seed)
    else:
        if data is None and os.path.isdir(DEFAULT_CORPUS):
            data = DEFAULT_CORPUS
        if tok is None and os.path.isdir(DEFAULT_TOKENIZER):
            tok = DEFAULT_TOKENIZER
        nv = tokenizer_vocab(tok) if tok else None
        if data is None or tok is None or (a.data is None and nv is not None and nv > a.vocab):
            if a.data is not None:
                sys.exit("--data needs --tokenizer (or data/tokenizer)")
            why = "no data/corpus" if data is None else "no tokenizer" if tok is None else \
                f"{os.path.relpath(tok, REPO)} has {nv} ids > --vocab {a.vocab}"
            print(f"using random text ({why})", file=sys.stderr)
            data, tok = random_text_data(a.seed)
    if tok == os.path.join(OUT, "tiny-tokenizer") and a.vocab < 300:
        sys.exit("random text uses a 300-id tokenizer: --vocab must be >= 300")
    ckpt = ensure_checkpoint(s, a.seed)
    fl = flops_per_token(s, a.seq)

    print(f"peak GEMM rate ({a.peak_n}^3 matmul) ...", file=sys.stderr, flush=True)
    peak = gemm_peak(a.threads, a.peak_n, a.peak_reps)
    print("monet train ...", file=sys.stderr, flush=True)
    ours = run_ours(a, ckpt, data, tok)
    n_tokens = os.path.getsize(ours["tokens_file"]) // 4
    peers = []
    if not a.skip_peer:
        for m in modes:
            peers.append(run_peer(a, m, ckpt, ours["tokens_file"]))

    # ---------------------------------------------------------------- report
    vd = "VD" if s["decompose"] == "vertical" else "HD"
    print(f"\nMonet-{vd}: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} kv), "
          f"vocab {s['vocab']}, E {s['experts']}, H {s['moe_heads']}, m {s['moe_dim']}, topk {s['topk']}, "
          f"groups {s['groups']}{', tied' if s['tie'] else ''}: {fl['params'] / 1e6:.2f} M parameters")
    print(f"batch {a.batch} x {a.seq} = {a.batch * a.seq} tokens per step, f32, {a.threads} threads; "
          f"data {os.path.relpath(data, REPO)} ({n_tokens} training tokens, tokenizer {os.path.relpath(tok, REPO)}); "
          f"every side starts from the same checkpoint and sees the same batches (seed {a.seed})")
    print(f"a step = sample + forward + backward + clip + AdamW; {a.warmup_steps} warm-up steps, then "
          f"{a.steps} timed; tok/s = median over the timed steps")
    print(f"training FLOPs per token: {fl['total'] / 1e6:.1f} M = 6 x {fl['gemm_weights'] / 1e6:.2f} M GEMM weights "
          f"(attention {fl['attn_weights'] / 1e6:.2f}, routers {fl['router_weights'] / 1e6:.2f}, experts (all, dense) "
          f"{fl['expert_weights'] / 1e6:.2f}, lm_head {fl['lm_head_weights'] / 1e6:.2f}) + attention "
          f"{fl['attention_flops'] / 1e6:.1f} M (12 L T d, full T x T)")
    bf = peak.get("torch_bf16")
    print(f"peak GEMM ({a.peak_n}^3, {a.threads} threads): f32 {peak['f32']:.1f} GFLOP/s (torch.matmul "
          f"{peak['torch_f32']:.1f}, numpy {peak['numpy_f32']:.1f})"
          + (f"; bf16 (torch.matmul, {peak['bf16_n']}^3) {bf:.1f} GFLOP/s" if bf else "")
          + ("\n(bf16 GEMMs are slower than f32 here: this CPU has no native bf16, torch emulates it)"
             if bf and bf < peak["f32"] else "") + "\n")

    w = 36
    print(f"| {'setting':{w}s} | {'tok/s':>8s} | {'s/step':>7s} | {'GFLOP/s':>7s} | {'% of peak':>9s} | "
          f"{'monet / this':>12s} |")
    print(f"|{'-' * (w + 2)}|{'-' * 9}:|{'-' * 8}:|{'-' * 8}:|{'-' * 10}:|{'-' * 13}:|")

    def row(label, tok_s, peak_gf, note=""):
        gf = tok_s * fl["total"] / 1e9
        pct = f"{100 * gf / peak_gf:.1f}%{note}"
        print(f"| {label:{w}s} | {tok_s:8.1f} | {a.batch * a.seq / tok_s:7.3f} | {gf:7.1f} | "
              f"{pct:>9s} | {ours['tok_s'] / tok_s:11.2f}x |")

    row("monet train, f32", ours["tok_s"], peak["f32"])
    failures = []
    for p in peers:
        label = MODE_LABEL[p["mode"]]
        if "error" in p:
            print(f"| {label:{w}s} | {'failed':>8s} | {'':7s} | {'':7s} | {'':9s} | {'':12s} |")
            failures.append(f"{label}: {p['error']}")
        elif p["mode"] == "bf16" and bf:
            row(label, p["tok_s"], bf, "*")
        else:
            row(label, p["tok_s"], peak["f32"])
    row("limit: f32 GEMM peak", peak["f32"] * 1e9 / fl["total"], peak["f32"])
    if bf and any(p["mode"] == "bf16" and "error" not in p for p in peers):
        row("limit: bf16 GEMM peak", bf * 1e9 / fl["total"], bf, "*")
        print("\n* % of the bf16 GEMM peak")
    for f in failures:
        print(f"\nnot measured: {f}")
    for p in peers:
        if p["mode"] == "compile" and "error" not in p:
            print(f"\ntorch.compile: first step (compile included) {p['first_step_s']:.1f} s")

    # Like with like: the same weights and batches give the same losses.
    eager = next((p for p in peers if p["mode"] == "eager" and "error" not in p), None)
    if eager:
        lo, lp = ours["losses"], eager["losses"]
        k = min(len(lo), len(lp))
        print(f"\nloss check (same weights, same batches): step 1 monet {lo[0]:.6f}, peer f32 {lp[0]:.6f} "
              f"(rel. diff {abs(lo[0] - lp[0]) / abs(lp[0]):.1e}); step {k} monet {lo[k - 1]:.6f}, "
              f"peer {lp[k - 1]:.6f}")
    print(f"\n(monet: mean {ours['mean_tok_s']:.1f} tok/s over the timed steps, first step "
          f"{ours['first_step_s']:.3g} s; total {time.perf_counter() - t_start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(shape=s, batch=a.batch, seq=a.seq, threads=a.threads, steps=a.steps,
                           warmup_steps=a.warmup_steps, seed=a.seed, data=data, tokenizer=tok,
                           training_tokens=n_tokens, flops_per_token=fl, peak_gflops=peak, ours=ours,
                           peers=peers, recipe=RECIPE), f, indent=2)


if __name__ == "__main__":
    main()
