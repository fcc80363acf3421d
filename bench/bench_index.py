"""Expert-index benchmark: `monet index` vs the PyTorch peer, like with like:
the same checkpoint (the default model unless --model), the same corpus and
token ids, the same windows (BOS + context-1 tokens), the same threads, the
same result (per router group and expert: fire count above --threshold, max
probability, the top-k activations with their contexts, written to SQLite).

    /usr/bin/python3 bench/bench_index.py [--corpus FILES...] [--model DIR] [--threads 2]
                                          [--context 256] [--top-k 32] [--max-tokens N] [--compute auto|f32|bf16]
                                          [--peer-dtypes bf16,f32]

The corpus defaults to data/corpus/*.txt (bash scripts/fetch_corpus.sh makes
it). Ours: `monet index` end to end (tokenising, the routing-only forward,
bookkeeping, every SQLite commit), timed by the process and by its own report.
The peer: python/monet_ref/torch_model.py (the reference modules: dense
einsums over all experts), run layer by layer up to the last router (as ours:
nothing after it is needed), windows in batches of --peer-batch; then, per
router group, the reference's dense expert probabilities
p[t, i, j] = sum_h g1[t,h,i] g2[t,h,j] (E^2 per token, fine at E = 64),
counts and max by tensor reductions, the top-k by torch.topk over the kept
top-k and the batch; at the end the same tables written with executemany.
Its token ids come from `monet tokenize` (untimed, so the peer does not pay
for tokenising). Peer settings: bf16 weights and compute (oneDNN), and f32.

Checks: the fire counts per group of the two must agree (to 0.1 %:
probabilities within float rounding of the threshold may count either way).
Limit: the dense GEMM FLOPs per token of the routing-only forward (the
weights of layers 0 .. last router, attention over half a window on
average) over the measured peak f32 GEMM rate, as tokens/s.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)
BINARY = os.path.join(REPO, "build", "monet")
DEFAULT_MODEL = os.path.join(REPO, "models", "monet-vd-books")


def config_of(model: str) -> dict:
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)


def last_router_layer(c: dict) -> int:
    return (c["num_hidden_layers"] - 1) // c["moe_groups"] * c["moe_groups"]


def flops_per_token(c: dict, context: int) -> float:
    """Dense FLOPs of the routing-only forward per token (2 per weight per
    token over every GEMM of layers 0 .. last router, the last one only up to
    its router; attention scores and values over half a window on average)."""
    d, E, m, H, G = c["hidden_size"], c["moe_experts"], c["moe_dim"], c["moe_heads"], c["moe_groups"]
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = d // nh
    last = last_router_layer(c)
    attn = (last + 1) * (2 * d * nh * hd + 2 * d * nkv * hd)
    router = (last // G + 1) * 2 * H * E * d
    experts = last * (2 * E * m * d + E * d)  # u (or u1, u2), v (or v11..v22), b (or b1, b2)
    scores = (last + 1) * 2 * (context / 2) * nh * hd  # q k^T and p v
    return 2.0 * (attn + router + experts) + 2.0 * scores


# ------------------------------------------------------------------ ours

def run_ours(a, files: list[str], db: str) -> dict:
    cmd = [BINARY, "index", "--model", a.model, "--corpus", *files, "--out", db, "--threads", str(a.threads),
           "--context", str(a.context), "--top-k", str(a.top_k), "--threshold", str(a.threshold),
           "--compute", a.compute]
    if a.max_tokens:
        cmd += ["--max-tokens", str(a.max_tokens)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"monet index failed ({r.returncode}):\n  {' '.join(cmd)}\n{r.stderr.strip()}")
    m = re.search(r"indexed (\d+) tokens in ([\d.]+) s", r.stdout)
    if not m:
        sys.exit(f"unexpected output of monet index: {r.stdout!r}")
    tokens, secs = int(m.group(1)), float(m.group(2))
    return dict(tokens=tokens, seconds=secs, tok_s=tokens / secs, process_wall_s=wall,
                process_tok_s=tokens / wall, counts=group_counts(db))


def group_counts(db: str) -> list[int]:
    con = sqlite3.connect(db)
    try:
        return [n for _, n in con.execute("SELECT grp, SUM(count) FROM experts GROUP BY grp ORDER BY grp")]
    finally:
        con.close()


# ------------------------------------------------------------------ the peer

def token_ids(a, files: list[str]) -> list[list[int]]:
    out = []
    for f in files:
        r = subprocess.run([BINARY, "tokenize", "--model", a.model, "--file", f, "--no-special"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"monet tokenize failed: {r.stderr.strip()}")
        out.append([int(x) for x in r.stdout.strip().split(",")] if r.stdout.strip() else [])
    return out


def peer_worker(spec: dict) -> dict:
    """One peer setting in this process."""
    import torch

    from monet_ref.torch_model import MonetTorch
    torch.set_num_threads(spec["threads"])
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[spec["dtype"]]
    model = MonetTorch.load(spec["model"], dtype=dtype)
    c = model.config
    E, K, thr, bos, ctx = c["moe_experts"], spec["top_k"], spec["threshold"], c.get("bos_token_id", 1), spec["context"]
    last = last_router_layer(c)
    groups = last // c["moe_groups"] + 1
    step = ctx - 1
    with open(spec["pieces"]) as f:
        pieces = json.load(f)
    docs = spec["ids"]
    if spec["max_tokens"]:
        docs, left = [], spec["max_tokens"]
        for ids in spec["ids"]:  # whole windows up to the budget, as --max-tokens
            if left <= 0:
                break
            n = min(len(ids), -(-left // step) * step)
            docs.append(ids[:n])
            left -= n

    def routing(ids):  # ids [B, T] -> [(g1, g2)] per group, [B, T, H, E] each
        x = model.embed_tokens(ids)
        g, out = None, []
        for l, layer in enumerate(model.layers):
            h, _ = layer.self_attn(layer.input_layernorm(x), 0, None)
            x = x + h
            y = layer.post_attention_layernorm(x)
            if hasattr(layer, "router"):
                g = layer.router(y)
                out.append(g)
            if l == last:
                return out
            x = x + layer.moe(y, *g)

    counts = [torch.zeros(E * E, dtype=torch.int64) for _ in range(groups)]
    maxp = [torch.zeros(E * E) for _ in range(groups)]
    top_p = [torch.full((E * E, K), float("-inf")) for _ in range(groups)]
    top_at = [torch.zeros((E * E, K), dtype=torch.int64) for _ in range(groups)]  # doc << 32 | pos
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for doc, ids in enumerate(docs):
            starts = list(range(0, len(ids), step))
            full = [s for s in starts if s + step <= len(ids)]
            batches = [full[i:i + spec["batch"]] for i in range(0, len(full), spec["batch"])]
            batches += [[s] for s in starts if s + step > len(ids)]  # the short last window
            for b in batches:
                win = torch.tensor([[bos] + ids[s:s + step] for s in b])
                n = win.shape[1] - 1
                at = torch.tensor([[(doc << 32) | (s + t) for t in range(n)] for s in b]).reshape(-1)
                for gi, (g1, g2) in enumerate(routing(win)):
                    g1, g2 = g1[:, 1:].float(), g2[:, 1:].float()
                    p = torch.einsum("bthi,bthj->btij", g1, g2).reshape(-1, E * E)  # [N, E^2]
                    fired = p > thr
                    counts[gi] += fired.sum(0)
                    maxp[gi] = torch.maximum(maxp[gi], p.max(0).values)
                    cand = torch.cat([top_p[gi], p.masked_fill(~fired, float("-inf")).t()], 1)
                    cand_at = torch.cat([top_at[gi], at.expand(E * E, -1)], 1)
                    top_p[gi], k = cand.topk(K, dim=1)
                    top_at[gi] = cand_at.gather(1, k)
                tokens += len(b) * n
    forward_s = time.perf_counter() - t0
    # the same tables as monet index
    con = sqlite3.connect(spec["db"])
    con.executescript("""
        CREATE TABLE experts(grp INTEGER, expert INTEGER, count INTEGER, max_prob REAL, PRIMARY KEY(grp, expert));
        CREATE TABLE activations(grp INTEGER, expert INTEGER, prob REAL, doc INTEGER, pos INTEGER,
                                 token TEXT, context TEXT, focus INTEGER);
        CREATE INDEX act_expert ON activations(grp, expert, prob DESC);
        CREATE INDEX act_token_trim ON activations(trim(token));""")
    W = spec["window"]
    for gi in range(groups):
        cnt, mx = counts[gi].tolist(), maxp[gi].tolist()
        con.executemany("INSERT INTO experts VALUES (?, ?, ?, ?)",
                        [(gi, e, cnt[e], mx[e]) for e in range(E * E) if cnt[e]])
        rows = []
        tp, ta = top_p[gi].tolist(), top_at[gi].tolist()
        for e in range(E * E):
            for p, code in zip(tp[e], ta[e]):
                if p == float("-inf"):
                    break
                doc, pos = code >> 32, code & 0xFFFFFFFF
                ids = docs[doc]
                lo, hi = max(0, pos - W), min(len(ids), pos + W + 1)
                rows.append((gi, e, p, doc, pos, pieces[ids[pos]], json.dumps([pieces[i] for i in ids[lo:hi]]), pos - lo))
        con.executemany("INSERT INTO activations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    total_s = time.perf_counter() - t0
    return dict(tokens=tokens, forward_s=forward_s, seconds=total_s, tok_s=tokens / total_s,
                forward_tok_s=tokens / forward_s, counts=[int(x.sum()) for x in counts])


def run_peer(a, dtype: str, ids: list[list[int]], pieces: str, db: str) -> dict:
    spec = dict(model=a.model, dtype=dtype, threads=a.threads, top_k=a.top_k, threshold=a.threshold,
                context=a.context, window=a.window, batch=a.peer_batch, max_tokens=a.max_tokens, ids=ids,
                pieces=pieces, db=db)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        r = subprocess.run([sys.executable, __file__, "--peer-worker", f.name], capture_output=True, text=True)
    finally:
        os.remove(f.name)
    if r.returncode != 0:
        sys.exit(f"peer ({dtype}) failed:\n{r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_pieces(a, path: str) -> None:
    """The text of every token id (`monet tokenize --decode` of each id alone;
    SentencePiece drops a first token's leading space there, which does not
    matter for timing) as a JSON list, for the peer's context columns."""
    V = config_of(a.model)["vocab_size"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{i}\n" for i in range(V)))
    try:
        r = subprocess.run([BINARY, "tokenize", "--model", a.model, "--decode", "@" + f.name, "--jsonl", "--no-special"],
                           capture_output=True, text=True)
    finally:
        os.remove(f.name)
    if r.returncode != 0:
        sys.exit(f"monet tokenize --decode failed: {r.stderr.strip()}")
    texts = [json.loads(line) for line in r.stdout.splitlines()]
    if len(texts) != V:
        sys.exit(f"monet tokenize --decode gave {len(texts)} texts for {V} ids")
    with open(path, "w") as f:
        json.dump(texts, f)


# ------------------------------------------------------------------ main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", nargs="+", help="text files (default: data/corpus/*.txt)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.01)
    ap.add_argument("--max-tokens", type=int, default=0, help="index only about this many tokens (0: all)")
    ap.add_argument("--compute", default="auto", choices=["auto", "f32", "bf16"],
                    help="monet's products (f32 with --peer-dtypes f32: the same arithmetic, for the agreement check)")
    ap.add_argument("--peer-dtypes", default="bf16,f32")
    ap.add_argument("--peer-batch", type=int, default=8, help="windows per peer forward")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peer-worker", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    if a.peer_worker:
        with open(a.peer_worker) as f:
            print(json.dumps(peer_worker(json.load(f))))
        return
    if not os.access(BINARY, os.X_OK):
        sys.exit(f"{BINARY} not found: build first (bash scripts/build.sh)")
    files = a.corpus or sorted(glob.glob(os.path.join(REPO, "data", "corpus", "*.txt")))
    if not files:
        sys.exit("no corpus: pass --corpus FILES or run bash scripts/fetch_corpus.sh (writes data/corpus/)")
    for f in files:
        if not os.path.isfile(f):
            sys.exit(f"{f}: not a file")
    dtypes = [d for d in a.peer_dtypes.split(",") if d]
    if any(d not in ("bf16", "f32") for d in dtypes):
        sys.exit("--peer-dtypes takes bf16 and/or f32")
    c = config_of(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        print("monet index ...", file=sys.stderr, flush=True)
        ours = run_ours(a, files, os.path.join(tmp, "ours.db"))
        peers = {}
        if not a.skip_peer:
            ids = token_ids(a, files)
            pieces = os.path.join(tmp, "pieces.json")
            write_pieces(a, pieces)
            for d in dtypes:
                print(f"peer {d} ...", file=sys.stderr, flush=True)
                peers[d] = run_peer(a, d, ids, pieces, os.path.join(tmp, f"peer-{d}.db"))
        from bench_train import gemm_peak
        peak = gemm_peak(a.threads, a.peak_n, 5)
    fl = flops_per_token(c, a.context)

    print(f"\nmonet index, {os.path.relpath(a.model, REPO)} ({c['moe_experts'] ** 2:,} experts x "
          f"{last_router_layer(c) // c['moe_groups'] + 1} groups), {ours['tokens']:,} tokens of {len(files)} file(s), "
          f"{a.threads} threads, windows of {a.context}, top-{a.top_k}\n")
    w = 44
    print(f"| {'setting':{w}s} | {'tokens/s':>9s} | {'vs monet':>8s} | {'GFLOP/s':>7s} |")
    print(f"|{'-' * (w + 2)}|{'-' * 10}:|{'-' * 9}:|{'-' * 8}:|")

    def row(label, tok_s):
        print(f"| {label:{w}s} | {tok_s:9.0f} | {tok_s / ours['tok_s']:7.2f}x | {tok_s * fl / 1e9:7.1f} |")
    row("monet index (end to end, SQLite included)", ours["tok_s"])
    for d, p in peers.items():
        row(f"peer {d}: forward + statistics", p["forward_tok_s"])
        row(f"peer {d}: + SQLite write", p["tok_s"])
    row(f"limit: f32 GEMM peak ({peak['f32']:.0f} GFLOP/s)", peak["f32"] * 1e9 / fl)
    print(f"\n{fl / 1e6:.2f} MFLOP per token (dense GEMMs of the routing-only forward); "
          f"monet process wall time {ours['process_wall_s']:.1f} s ({ours['process_tok_s']:.0f} tokens/s with loading)")
    for d, p in peers.items():
        if p["tokens"] != ours["tokens"]:
            sys.exit(f"peer {d} indexed {p['tokens']} tokens, monet {ours['tokens']}")
        worst = max(abs(x - y) / max(1, y) for x, y in zip(p["counts"], ours["counts"]))
        print(f"fire counts per group, peer {d} vs monet: largest relative difference {worst:.2e}")
        if worst > 1e-3:
            sys.exit("the peer and monet disagree on what fired: not the same computation")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(ours=ours, peers=peers, peak_gflops=peak, flops_per_token=fl, files=files), f, indent=1)


if __name__ == "__main__":
    main()
