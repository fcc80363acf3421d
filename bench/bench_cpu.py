"""CPU benchmark: monet vs the PyTorch peer (the reference modules on torch),
same checkpoint, same threads, same machine, same run.

    python3 bench/bench_cpu.py [--threads 2] [--dtypes bf16,f32] [--small]

Builds (once, cached in bench/out/) a random checkpoint of the Monet-VD-1.4B
shape with calibrated routers, then measures batch-1 greedy decode tokens/s
after a 64-token prompt and prefill tokens/s of a 128-token prompt, for
monet (build/monet_bench) and for the peer in bf16 and f32, plus the
memory-bandwidth limit: measured copy bandwidth over the bytes a decode step
must read (dense: every weight; monet: what its sparse decode reads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "python"))


def ensure_checkpoint(dtype: str, small: bool) -> str:
    path = os.path.join(HERE, "out", f"{'small' if small else 'vd-1.4b'}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"making {path} ...", flush=True)
        cmd = [sys.executable, os.path.join(HERE, "make_big_checkpoint.py"), path, "--dtype", dtype.upper()]
        subprocess.run(cmd + (["--small"] if small else []), check=True)
    return path


def run_ours(path: str, threads: int, prompt: int, decode: int) -> dict:
    binary = os.path.join(REPO, "build", "monet_bench")
    out = {}
    dec = subprocess.run([binary, "--model", path, "--threads", str(threads), "--prompt", str(prompt),
                          "--decode", str(decode)], capture_output=True, text=True, check=True)
    out.update(json.loads(dec.stdout))
    pre = subprocess.run([binary, "--model", path, "--threads", str(threads), "--prompt", "128", "--decode", "1"],
                         capture_output=True, text=True, check=True)
    out["prefill128_tok_s"] = json.loads(pre.stdout)["prefill_tok_s"]
    return out


def run_peer(path: str, dtype: str, threads: int, prompt: int, decode: int) -> dict:
    import torch

    from monet_ref.torch_model import MonetTorch
    torch.set_num_threads(threads)
    tdtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    t0 = time.perf_counter()
    model = MonetTorch.load(path, dtype=tdtype)
    load_s = time.perf_counter() - t0
    V = model.config["vocab_size"]
    ids = torch.tensor([[(i * 7919 + 13) % V for i in range(prompt)]])
    with torch.inference_mode():
        model(ids[:, :4])  # warm-up
        logits, cache = model(ids)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode):
            logits, cache = model(nxt, cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
        ids128 = torch.tensor([[(i * 7919 + 13) % V for i in range(128)]])
        t0 = time.perf_counter()
        model(ids128)
        prefill_s = time.perf_counter() - t0
    del model, cache
    return {"load_s": load_s, "decode_tok_s": decode / decode_s, "prefill128_tok_s": 128 / prefill_s}


def copy_bandwidth(threads: int) -> float:
    """GB/s of a large memory copy, counting bytes read plus bytes written."""
    import torch
    torch.set_num_threads(threads)
    n = 1 << 28  # 1 GiB of float32
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def decode_bytes(path: str, elem: int, expert_fraction: float) -> tuple[float, float]:
    """(dense bytes, monet sparse bytes) one decode step must read."""
    c = json.load(open(os.path.join(path, "config.json")))
    d, L, V, E, m, H = (c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["moe_experts"],
                        c["moe_dim"], c["moe_heads"])
    hd = d // c["num_attention_heads"]
    attn = L * (2 * d * c["num_attention_heads"] * hd + 2 * d * c["num_key_value_heads"] * hd)
    routers = ((L + c["moe_groups"] - 1) // c["moe_groups"]) * 2 * H * E * d
    experts = L * (E * m * d + E * m * d + E * d)  # u1,u2 | v11..v22 | b1,b2
    head = V * d
    dense = (attn + routers + experts + head) * elem
    sparse = (attn + routers + expert_fraction * experts + head) * elem
    return dense, sparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32, help="decode steps for monet")
    ap.add_argument("--peer-decode", type=int, default=8, help="decode steps for the peer (it is slow)")
    ap.add_argument("--small", action="store_true", help="a small shape, to try the script out")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(REPO, "build", "monet_bench")):
        sys.exit("build first: bash scripts/build.sh")
    bw = copy_bandwidth(args.threads)
    rows = []
    for dtype in args.dtypes.split(","):
        path = ensure_checkpoint(dtype, args.small)
        ours = run_ours(path, args.threads, args.prompt, args.decode)
        peer = run_peer(path, dtype, args.threads, args.prompt, args.peer_decode)
        dense_b, sparse_b = decode_bytes(path, 2 if dtype == "bf16" else 4, ours["expert_fraction"])
        rows.append((dtype, ours, peer, dense_b, sparse_b))

    print(f"\nMonet-VD-{'small' if args.small else '1.4B'} shape, random weights, {args.threads} threads, "
          f"copy bandwidth {bw:.1f} GB/s (read+write)\n")
    print(f"{'metric':42s} {'monet':>10s} {'peer':>10s} {'ratio':>7s}")
    for dtype, ours, peer, dense_b, sparse_b in rows:
        for key, label in (("decode_tok_s", f"{dtype} decode tok/s (batch 1)"),
                           ("prefill128_tok_s", f"{dtype} prefill tok/s (128 tokens)")):
            print(f"{label:42s} {ours[key]:10.2f} {peer[key]:10.2f} {ours[key] / peer[key]:6.2f}x")
    print()
    for dtype, ours, peer, dense_b, sparse_b in rows:
        print(f"{dtype}: expert slices read per token {100 * ours['expert_fraction']:.1f}%; "
              f"bytes/token dense {dense_b / 1e9:.2f} GB, monet {sparse_b / 1e9:.2f} GB; "
              f"bandwidth limit dense {bw * 1e9 / dense_b:.2f} tok/s, monet sparse {bw * 1e9 / sparse_b:.2f} tok/s; "
              f"monet reaches {ours['decode_tok_s'] * sparse_b / 1e9:.1f} GB/s "
              f"({100 * ours['decode_tok_s'] * sparse_b / (bw * 1e9):.0f}% of copy bandwidth)")


if __name__ == "__main__":
    main()
