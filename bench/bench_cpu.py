"""CPU benchmark: monet vs the PyTorch peer (the reference modules on torch),
same checkpoint, same threads, same machine, same run.

    /usr/bin/python3 bench/bench_cpu.py [--threads 2] [--dtype bf16,f32] [--small] [--skip-build]

Builds build/monet_bench (unless --skip-build) and, once (cached in
bench/out/, gitignored), a random checkpoint of the Monet-VD-1.4B shape with
calibrated routers per dtype. Then measures batch-1 greedy decode tokens/s
after a --prompt-token prompt and prefill tokens/s of a --prefill-token
prompt (each after one untimed warm-up pass), for monet (build/monet_bench) and for two peers
(python/monet_ref/torch_model.py, torch.inference_mode, torch.set_num_threads):
the reference's dense einsums, and the sparse peer that gathers only the kept
experts' slices (monet's algorithm in PyTorch), in each dtype, plus the memory-bandwidth limit of decode: measured copy
bandwidth (bytes read + written) over the bytes one decode step must read
(dense, as the peer: every weight but the embedding table; monet: attention,
routers, lm_head and only the expert slices the routers kept). Needs a python
with torch (Debian's /usr/bin/python3). --small tries everything at a small
shape in seconds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "python"))
BINARY = os.path.join(REPO, "build", "monet_bench")


def build(threads: int, targets=("monet_bench",)) -> None:
    subprocess.run(["cmake", "-S", REPO, "-B", os.path.join(REPO, "build"), "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", os.path.join(REPO, "build"), "--target", *targets, f"-j{threads}"],
                   check=True, stdout=subprocess.DEVNULL)


def ensure_q8_checkpoint(bf16_path: str) -> str:
    """The q8_0 copy of a checkpoint (monet quantize, docs/quantization.md), made once."""
    path = bf16_path + "-q8_0"
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"making {path} ...", file=sys.stderr, flush=True)
        subprocess.run([os.path.join(REPO, "build", "monet"), "quantize", "--model", bf16_path, "--out", path],
                       check=True, stdout=sys.stderr)
    return path


def ensure_checkpoint(dtype: str, small: bool) -> str:
    path = os.path.join(HERE, "out", f"{'small' if small else 'vd-1.4b'}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):  # config.json is written last
        print(f"making {path} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.join(HERE, "make_big_checkpoint.py"), path, "--dtype", dtype.upper()]
        subprocess.run(cmd + (["--small"] if small else []), check=True, stdout=sys.stderr)
    return path


def monet_bench(path: str, threads: int, prompt: int, decode: int, batch: int = 1, repeat: int = 1,
                huge_pages: bool = False) -> dict:
    """One monet_bench process: one untimed pass first, as the peer's warm-up
    (a first pass over weights mapped from the file also reads the pages that
    are not cached, e.g. after the peer's run pushed them out), then the
    best of `repeat`."""
    r = subprocess.run([BINARY, "--model", path, "--threads", str(threads), "--prompt", str(prompt),
                        "--decode", str(decode), "--batch", str(batch), "--repeat", str(repeat), "--warmup", "1",
                        "--huge-pages", "1" if huge_pages else "0"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"monet_bench failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)


def run_ours(path: str, threads: int, prompt: int, decode: int, prefill: int, repeat: int) -> dict:
    """Best of `repeat` runs of each measurement, each in its own process
    after a warm-up pass (monet_bench)."""
    dec = monet_bench(path, threads, prompt, decode, repeat=repeat)
    pre = monet_bench(path, threads, prefill, 1, repeat=repeat)
    return {"decode_tok_s": dec["decode_tok_s"], "prefill_tok_s": pre["prefill_tok_s"],
            "expert_fraction": dec["expert_fraction"], "decode_run": dec, "prefill_run": pre}


def prompt_ids(n: int, vocab: int, seq: int = 0) -> list:
    return [(i * 7919 + seq * 104729 + 13) % vocab for i in range(n)]  # the same ids monet_bench uses


def peer_decode_seconds(model, prompts: list, decode: int) -> float:
    """Greedy decode of `decode` steps after `prompts` (B sequences of one
    length, one cache for the batch): seconds of the decode steps."""
    import torch
    logits, cache = model(torch.tensor(prompts))
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(decode):
        logits, cache = model(nxt, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def run_peer(path: str, dtype: str, threads: int, prompt: int, decode: int, prefill: int, repeat: int,
             batches: list, experts: str = "dense") -> dict:
    """Loads once; best of `repeat` runs of each measurement. batched: {B: tokens/s of B sequences decoding together}.
    experts: "dense" (the reference's einsums over every expert) or "gather" (only the kept experts' slices)."""
    import torch

    from monet_ref.torch_model import MonetTorch
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = MonetTorch.load(path, dtype={"bf16": torch.bfloat16, "f32": torch.float32}[dtype], experts=experts)
    load_s = time.perf_counter() - t0
    V = model.config["vocab_size"]
    decode_s = prefill_s = float("inf")
    batched = {}
    with torch.inference_mode():
        _, warm = model(torch.tensor([prompt_ids(16, V)]))  # warm-up: kernels, allocator
        model(torch.tensor([[1]]), warm)
        del warm
        for _ in range(repeat):
            decode_s = min(decode_s, peer_decode_seconds(model, [prompt_ids(prompt, V)], decode))
            ids = torch.tensor([prompt_ids(prefill, V)])
            t0 = time.perf_counter()
            model(ids)
            prefill_s = min(prefill_s, time.perf_counter() - t0)
        for B in batches:
            prompts = [prompt_ids(prompt, V, b) for b in range(B)]
            batched[B] = B * decode / min(peer_decode_seconds(model, prompts, decode) for _ in range(repeat))
    del model
    return {"load_s": load_s, "decode_tokens": decode, "decode_s": decode_s, "decode_tok_s": decode / decode_s,
            "prefill_tokens": prefill, "prefill_s": prefill_s, "prefill_tok_s": prefill / prefill_s,
            "batched": batched}


def bandwidth(threads: int) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, read GB/s) over 1 GiB buffers, best of 10."""
    import torch
    torch.set_num_threads(threads)
    n = 1 << 28  # float32
    src, dst = torch.ones(n), torch.empty(n)

    def best(f):
        f()
        t = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return t

    copy = 2 * n * 4 / best(lambda: dst.copy_(src)) / 1e9
    read = n * 4 / best(lambda: src.sum()) / 1e9
    return copy, read


# monet's decode reads bf16 routers of 1536 inputs or more as an int8 copy (34 bytes per 32
# weights) plus, in bf16, the rows of the logits its bounds cannot drop: 28.6 of 512 per
# head on the Monet-VD-1.4B shape (docs/architecture.md, routers).
INT8_ROUTER_BYTES = 34 / 32 + 2 * 28.6 / 512


def decode_bytes(config: dict, elem: float, expert_fraction: float,
                 router_elem: float | None = None) -> tuple[float, float]:
    """(dense bytes, monet sparse bytes) one batch-1 decode step reads, from the config,
    at elem bytes per weight (router_elem per router weight for monet; the dense peer
    reads them at 2 bytes when elem is less, as q8_0 keeps the routers bf16).
    Both read the attention and router matrices, the lm_head and one embedding
    row; dense reads every expert matrix, monet the fraction of expert slices
    (u rows, v columns, b rows) its routers kept."""
    c = config
    d, L, V, E, m, H = (c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["moe_experts"],
                        c["moe_dim"], c["moe_heads"])
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = d // nh
    attn = L * (2 * d * nh * hd + 2 * d * nkv * hd)
    routers = ((L + c["moe_groups"] - 1) // c["moe_groups"]) * 2 * H * E * d
    # VD: u1,u2 | v11,v12,v21,v22 | b1,b2; HD: u | v | b (the same sizes)
    experts = L * (E * m * d + E * m * d + E * d)
    common = (attn + V * d + d + (2 * L + 1) * d) * elem
    dense = common + routers * max(elem, 2) + experts * elem
    return dense, common + routers * (elem if router_elem is None else router_elem) + expert_fraction * experts * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--dtype", "--dtypes", dest="dtypes", default="bf16,f32", help="comma list of bf16, f32")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the decode (default 64)")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill timing (default 128)")
    ap.add_argument("--decode-tokens", "--decode", dest="decode", type=int, default=32,
                    help="decode steps timed for monet (default 32)")
    ap.add_argument("--peer-decode-tokens", "--peer-decode", dest="peer_decode", type=int, default=8,
                    help="decode steps timed for the peer (default 8: ~1 tok/s in f32 at full size)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repeat each measurement, report the best (a noisy machine); default 1")
    ap.add_argument("--batches", default="1,4,16",
                    help="batched decode: comma list of batch sizes (B sequences decoding together; default 1,4,16; "
                         "empty: skip)")
    ap.add_argument("--small", action="store_true", help="a small shape (hidden 512, 4 layers), to try things out")
    ap.add_argument("--skip-build", action="store_true", help="use build/monet_bench as it is")
    ap.add_argument("--q8", action="store_true",
                    help="also monet's decode and prefill with the bf16 checkpoint quantized to q8_0 (the peer's "
                         "column: its bf16 figures)")
    ap.add_argument("--huge-pages", action="store_true",
                    help="also time monet's decode with --huge-pages (weight files cached in 4 KiB pages read "
                         "again into 2 MiB ones; converted weights copied into huge pages)")
    ap.add_argument("--json", help="also write all measurements to this file")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # keep the table after the progress lines on stderr
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        sys.exit(f"--batches: expected a comma list of batch sizes, got {args.batches!r}")
    if any(b < 1 for b in batches):
        sys.exit("--batches: batch sizes must be >= 1")
    if min(args.prompt, args.prefill, args.decode, args.peer_decode, args.repeat, args.threads) < 1:
        sys.exit("--prompt, --prefill, --decode-tokens, --peer-decode-tokens, --repeat and --threads must be >= 1")
    if not dtypes or any(dt not in ("bf16", "f32") for dt in dtypes):
        sys.exit(f"--dtype: expected a comma list of bf16, f32; got {args.dtypes!r}")
    if args.q8 and "bf16" not in dtypes:
        sys.exit("--q8 quantizes the bf16 checkpoint: keep bf16 in --dtype")
    if not args.skip_build:
        build(args.threads, ("monet_bench", "monet") if args.q8 else ("monet_bench",))
    if not os.access(BINARY, os.X_OK):
        sys.exit(f"{BINARY} not found: build first (bash scripts/build.sh) or drop --skip-build")
    if importlib.util.find_spec("torch") is None:
        sys.exit("the peer needs torch: run with Debian's /usr/bin/python3 (python3-torch)")

    t_start = time.perf_counter()
    copy_bw, read_bw = bandwidth(args.threads)
    rows = []
    for dtype in dtypes:
        path = ensure_checkpoint(dtype, args.small)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        print(f"{dtype}: monet ...", file=sys.stderr, flush=True)
        ours = run_ours(path, args.threads, args.prompt, args.decode, args.prefill, args.repeat)
        if args.huge_pages:
            ours["huge_run"] = monet_bench(path, args.threads, args.prompt, args.decode, repeat=args.repeat,
                                           huge_pages=True)
        print(f"{dtype}: peer ...", file=sys.stderr, flush=True)
        peer = run_peer(path, dtype, args.threads, args.prompt, args.peer_decode, args.prefill, args.repeat, batches)
        print(f"{dtype}: sparse peer ...", file=sys.stderr, flush=True)
        gather = run_peer(path, dtype, args.threads, args.prompt, args.peer_decode, args.prefill, args.repeat, batches,
                          experts="gather")
        batched_ours = {B: monet_bench(path, args.threads, args.prompt, args.decode, B, args.repeat)["decode_tok_s"]
                        for B in batches}
        batched_peer = peer["batched"]
        int8_routers = config["hidden_size"] >= 1536  # (CpuBackend::router's kBoundedRouterMinK)
        dense_b, sparse_b = decode_bytes(config, 2 if dtype == "bf16" else 4, ours["expert_fraction"],
                                         router_elem=INT8_ROUTER_BYTES if dtype == "bf16" and int8_routers else None)
        rows.append(dict(dtype=dtype, ours=ours, peer=peer, gather=gather, dense_bytes=dense_b, sparse_bytes=sparse_b,
                         batched_ours=batched_ours, batched_peer=batched_peer))
        if args.q8 and dtype == "bf16":
            print("q8_0: monet ...", file=sys.stderr, flush=True)
            q8 = run_ours(ensure_q8_checkpoint(path), args.threads, args.prompt, args.decode, args.prefill, args.repeat)
            if args.huge_pages:
                q8["huge_run"] = monet_bench(ensure_q8_checkpoint(path), args.threads, args.prompt, args.decode,
                                             repeat=args.repeat, huge_pages=True)
            # (bytes: every matrix at 34 bytes per 32 values; the routers, which stay bf16, as
            # bf16 decode reads them; the embedding row and norms, a few KB, counted at 34/32 too)
            rows.append(dict(dtype="q8_0", ours=q8, peer=peer, gather=gather, dense_bytes=decode_bytes(config, 2, 1.0)[0],
                             sparse_bytes=decode_bytes(config, 34 / 32, q8["expert_fraction"],
                                                          router_elem=INT8_ROUTER_BYTES if int8_routers else 2)[1],
                             batched_ours={}, batched_peer={}))

    shape = "small" if args.small else "1.4B"
    print(f"\nMonet-VD-{shape} shape, random weights, {args.threads} threads; decode after a {args.prompt}-token "
          f"prompt (monet {args.decode} steps, peer {args.peer_decode}; best of {args.repeat}); memory bandwidth: copy "
          f"{copy_bw:.1f} GB/s (read+write), read {read_bw:.1f} GB/s\n")
    w = 64
    print("peer: the reference modules in PyTorch (dense einsums over every expert); sparse peer: the same in "
          "PyTorch gathering only the kept experts' slices (index_select + batched matmul), monet's algorithm\n")
    print(f"| {'metric':{w}s} | {'monet':>9s} | {'peer':>9s} | {'ratio':>7s} | {'sparse peer':>11s} | {'ratio':>7s} |")
    print(f"|{'-' * (w + 2)}|{'-' * 10}:|{'-' * 10}:|{'-' * 8}:|{'-' * 12}:|{'-' * 8}:|")

    def row(label, a, b, fmt="9.2f", c=None):
        extra = f" {c:11.2f} | {a / c:6.2f}x |" if c is not None else ""
        print(f"| {label:{w}s} | {a:{fmt}} | {b:{fmt}} | {a / b:6.2f}x |{extra}")

    for r in rows:
        dt, ours, peer, gather = r["dtype"], r["ours"], r["peer"], r["gather"]
        def in_2mib(run):  # the mapped weight files' bytes in 2 MiB pages (the page cache's state)
            return f"{run.get('huge_page_bytes', 0) / 1e9:.2f} of {run['weight_bytes'] / 1e9:.2f} GB in 2 MiB pages"
        row(f"{dt} decode tok/s (batch 1; {in_2mib(ours['decode_run'])})", ours["decode_tok_s"], peer["decode_tok_s"],
            c=gather["decode_tok_s"])
        if "huge_run" in ours:
            row(f"{dt} decode tok/s, --huge-pages (load {ours['huge_run']['load_s']:.1f} s)",
                ours["huge_run"]["decode_tok_s"], peer["decode_tok_s"], c=gather["decode_tok_s"])
        row(f"{dt} prefill tok/s ({args.prefill} tokens)", ours["prefill_tok_s"], peer["prefill_tok_s"],
            c=gather["prefill_tok_s"])
        for B in r["batched_ours"]:
            row(f"{dt} batched decode tok/s (B = {B})", r["batched_ours"][B], r["batched_peer"][B],
                c=gather["batched"][B])
    print("\nDecode limits (bytes read per token / bandwidth); monet reads the expert slices its routers kept, "
          "the peer every weight:\n")
    print(f"| {'limit':{w}s} | {'monet':>9s} | {'peer':>9s} | {'ratio':>7s} |")
    print(f"|{'-' * (w + 2)}|{'-' * 10}:|{'-' * 10}:|{'-' * 8}:|")
    for r in rows:
        dt, sb, db = r["dtype"], r["sparse_bytes"], r["dense_bytes"]
        print(f"| {dt + ' expert slices read per token':{w}s} | {100 * r['ours']['expert_fraction']:8.1f}% | "
              f"{100.0:8.1f}% |         |")
        row(f"{dt} GB read per decoded token", sb / 1e9, db / 1e9, "9.3f")
        row(f"{dt} tok/s limit at copy bandwidth", copy_bw * 1e9 / sb, copy_bw * 1e9 / db)
        row(f"{dt} tok/s limit at read bandwidth", read_bw * 1e9 / sb, read_bw * 1e9 / db)
        ours_pct = 100 * r["ours"]["decode_tok_s"] * sb / (copy_bw * 1e9)
        peer_pct = 100 * r["peer"]["decode_tok_s"] * db / (copy_bw * 1e9)
        print(f"| {dt + ' decode, % of the copy-bandwidth limit':{w}s} | {ours_pct:8.0f}% | {peer_pct:8.0f}% |"
              f"         |")
        if "huge_run" in r["ours"]:
            huge_pct = 100 * r["ours"]["huge_run"]["decode_tok_s"] * sb / (copy_bw * 1e9)
            print(f"| {dt + ' decode, huge pages, % of that limit':{w}s} | {huge_pct:8.0f}% |           |         |")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=shape, threads=args.threads, prompt=args.prompt, prefill=args.prefill,
                           repeat=args.repeat, copy_gb_s=copy_bw, read_gb_s=read_bw, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
