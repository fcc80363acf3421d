"""Accuracy (and decode speed) of q8_0 checkpoints (docs/quantization.md)
against the unquantized model.

    .venv/bin/python bench/quant_accuracy.py [--model models/monet-vd-books] [--context 256]
                                            [--speed bench/out/vd-1.4b-bf16 --repeat 3 --threads 2]

Accuracy: the model is quantized (`monet quantize`) into a temporary
directory; on the held-out texts (tests/data/heldout: the default model's
validation split) it prints the perplexity (`monet eval-loss`) of the model
in exact f32, in bf16 products and as q8_0, then, for the first --context
tokens of each text, the top-1 next-token agreement and router selection
agreement of q8_0 with the f32 model (`monet forward`), for a prompt (one
call: prefill GEMMs) and token by token (--chunk 1: the int8 decode kernels).
Router agreement: the fraction of (token, router layer, side, head)
selections (the experts with g > 0) identical, and the mean Jaccard overlap.

Speed (--speed DIR, e.g. from bench/make_big_checkpoint.py --dtype BF16):
quantizes DIR once (bench/out/<name of DIR>-q8_0) and compares build/monet_bench
decode tokens/s of both, best of --repeat runs each (monet_bench --repeat).
Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))

from monet_ref.safetensors_io import read_safetensors  # noqa: E402

HELDOUT = os.path.join(REPO, "tests", "data", "heldout")


def run(*cmd) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def perplexity(monet: str, model: str, text: str, context: int, compute: str) -> float:
    out = run(monet, "eval-loss", "--model", model, "--data", text, "--context", context, "--compute", compute, "--json")
    return json.loads(out)["perplexity"]


def tokens(monet: str, model: str, text: str, n: int) -> list:
    out = run(monet, "tokenize", "--model", model, "--file", text)
    ids = [int(t) for t in out.replace(",", " ").split() if t.lstrip("-").isdigit()]
    if ids[0] != 1:
        ids = [1] + ids  # BOS first, as eval-loss's windows
    return ids[:n]


def forward(monet: str, model: str, ids: list, out: str, chunk: int) -> dict:
    run(monet, "forward", "--model", model, "--ids", ",".join(map(str, ids)), "--out", out, "--compute", "f32",
        "--chunk", chunk)
    return read_safetensors(out)


def agreement(a: dict, b: dict) -> tuple[float, float, float]:
    top1 = float(np.mean(a["logits"].argmax(-1) == b["logits"].argmax(-1)))
    same, jacc = [], []
    for name in a:
        if not name.startswith("router."):
            continue
        sa, sb = a[name] > 0, b[name] > 0  # [T, H, E]
        same.append((sa == sb).all(-1).ravel())
        inter, union = (sa & sb).sum(-1), (sa | sb).sum(-1)
        jacc.append((inter / np.maximum(union, 1)).ravel())
    return top1, float(np.concatenate(same).mean()), float(np.concatenate(jacc).mean())


def accuracy(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        q8 = os.path.join(tmp, "q8_0")
        run(args.monet, "quantize", "--model", args.model, "--out", q8, "--type", "q8_0")
        print(f"model {args.model}; held-out texts {HELDOUT}; --context {args.context}")
        print()
        print("| text | ppl f32 | ppl bf16 products | ppl q8_0 | q8_0/f32 | top-1 agree (prompt) | top-1 agree (decode) "
              "| router sets identical (prompt) | (decode) | router Jaccard (decode) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in sorted(os.listdir(HELDOUT)):
            if not name.endswith(".txt"):
                continue
            text = os.path.join(HELDOUT, name)
            p32 = perplexity(args.monet, args.model, text, args.context, "f32")
            p16 = perplexity(args.monet, args.model, text, args.context, "bf16")
            pq = perplexity(args.monet, q8, text, args.context, "f32")
            ids = tokens(args.monet, args.model, text, args.context)
            cells = []
            for chunk in (0, 1):
                a = forward(args.monet, args.model, ids, os.path.join(tmp, "a.safetensors"), chunk)
                b = forward(args.monet, q8, ids, os.path.join(tmp, "b.safetensors"), chunk)
                cells.append(agreement(a, b))
            (t_p, s_p, _), (t_d, s_d, j_d) = cells
            print(f"| {name} | {p32:.3f} | {p16:.3f} | {pq:.3f} | {pq / p32:.4f} | {t_p:.3f} | {t_d:.3f} | {s_p:.3f} "
                  f"| {s_d:.3f} | {j_d:.3f} |")


def speed(args) -> None:
    src = args.speed.rstrip("/")
    q8 = os.path.join(REPO, "bench", "out", os.path.basename(src) + "-q8_0")  # ours, wherever src lies
    if not os.path.exists(os.path.join(q8, "config.json")):
        print(f"quantizing {src} -> {q8} ...", file=sys.stderr, flush=True)
        run(args.monet, "quantize", "--model", src, "--out", q8, "--type", "q8_0")
    bench = os.path.join(os.path.dirname(args.monet), "monet_bench")
    rows = {}
    for label, path in (("bf16", src), ("q8_0", q8)):
        out = run(bench, "--model", path, "--prompt", 64, "--decode", 32, "--repeat", args.repeat,
                  "--threads", args.threads)
        rows[label] = json.loads(out)
    print()
    print(f"decode speed, {src} vs its q8_0 copy: monet_bench --prompt 64 --decode 32, best of {args.repeat}, "
          f"{args.threads} threads (shared machine: noisy)")
    print()
    print("| weights | decode tok/s | prefill tok/s | decode ratio vs bf16 | weight bytes/param (limit ratio) |")
    print("|---|---:|---:|---:|---:|")
    base = rows["bf16"]["decode_tok_s"]
    for label, r in rows.items():
        limit = "2 (1.00)" if label == "bf16" else "1.0625 (1.88)"
        print(f"| {label} | {r['decode_tok_s']:.2f} | {r.get('prefill_tok_s', float('nan')):.1f} "
              f"| {r['decode_tok_s'] / base:.2f} | {limit} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--monet", default=os.path.join(REPO, "build", "monet"))
    ap.add_argument("--model", default=os.path.join(REPO, "models", "monet-vd-books"))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--speed", help="a BF16 checkpoint directory to compare decode speed with its q8_0 copy")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    if not args.no_accuracy:
        accuracy(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    main()
