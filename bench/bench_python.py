"""Overhead of the Python package: m.forward on the default model for a
256-token text, against the same forward pass timed inside C++
(build/monet_bench's prefill: the same ids, threads and outputs, no Python).

    .venv/bin/python bench/bench_python.py [--threads 2] [--rounds 5] [--repeat 5] [--skip-build]

Needs the package installed in the running Python (bash scripts/build_python.sh)
and builds build/monet_bench (unless --skip-build). Rows:
  last logits   m.forward(ids, logits="last", routing=False)  vs  monet_bench --logits last
  forward file  m.forward(ids) (all logits [T, V] + router arrays: `monet forward`'s outputs)
                                                              vs  monet_bench --logits all --routing 1
  text input    m.forward(text) (tokenizing included)         vs  the same C++ pass (no tokenizer)
Each figure is the best of rounds x repeat calls; rounds alternate Python and
C++ so that both see the same machine load. The limit is 1.00: no overhead.

On a loaded machine two processes' best times differ by more than the
overhead itself, so the overhead is also measured call by call in the same
process: the library times its own pass (monet._monet.last_forward_seconds(),
GIL released) and the overhead of that call is its Python wall time minus
that (argument conversion, tokenizing, the arrays handed over, the GIL).
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
BINARY = os.path.join(REPO, "build", "monet_bench")
# Untimed passes before timing, on both sides: a process's first passes compile matrix-product
# primitives for the row counts they meet (bf16 products), which the long-lived Python process
# has done already.
WARMUP = 3


def build(jobs: int) -> None:
    subprocess.run(["cmake", "-S", REPO, "-B", os.path.join(REPO, "build"), "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", os.path.join(REPO, "build"), "--target", "monet_bench", f"-j{jobs}"],
                   check=True, stdout=subprocess.DEVNULL)


def cpp_prefill(model_dir: str, ids: list, threads: int, repeat: int, logits: str, routing: bool) -> float:
    """Best prefill seconds of monet_bench over `repeat` passes (after WARMUP untimed ones)."""
    cmd = [BINARY, "--model", model_dir, "--threads", str(threads), "--ids", ",".join(map(str, ids)),
           "--decode", "1", "--repeat", str(repeat), "--warmup", str(WARMUP), "--logits", logits,
           "--routing", "1" if routing else "0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"monet_bench failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)["prefill_s"]


def timed_calls(call, repeat: int) -> list:
    """[(wall seconds, seconds inside the library)] of `repeat` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
        out.append((wall, _monet_last_forward_seconds()))
    return out


def _monet_last_forward_seconds() -> float:
    from monet import _monet
    return _monet.last_forward_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="alternations of Python and C++ measurements")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per round")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    import monet  # the installed package

    if not args.skip_build:
        build(args.threads)
    m = monet.Model(threads=args.threads)
    corpus = open(os.path.join(REPO, "tests", "data", "heldout", "austen-persuasion-end.txt"), encoding="utf-8").read()
    text = m.detokenize(m.tokenize(corpus)[:args.tokens])
    ids = m.tokenize(text)  # what m.forward(text) runs: BOS + the text's tokens
    print(f"default model, {len(ids)} tokens, {m.threads} threads, {m.backend}", file=sys.stderr)

    cases = [
        ("last logits", lambda: m.forward(ids, logits="last", routing=False), "last", False),
        ("forward file", lambda: m.forward(ids), "all", True),
        ("text input", lambda: m.forward(text), "all", True),
    ]
    for _, call, _, _ in cases:  # warm-up: every weight page touched, scratch allocated, primitives compiled
        for _ in range(WARMUP):
            call()
    calls = {name: [] for name, *_ in cases}
    cpp = {name: float("inf") for name, *_ in cases}
    for round_ in range(args.rounds):
        for name, call, logits, routing in cases:
            calls[name] += timed_calls(call, args.repeat)
            cpp[name] = min(cpp[name], cpp_prefill(m.path, ids, m.threads, args.repeat, logits, routing))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    n = args.rounds * args.repeat
    print(f"\nm.forward from Python vs the same pass in C++, default model, {len(ids)} tokens, {m.threads} threads; "
          f"best of {n} each (timings on a shared machine are noisy)\n")
    print(f"{'case':<14} {'python ms':>10} {'monet_bench':>12} {'ratio':>7} {'in-lib ms':>10} {'overhead ms':>12} "
          f"{'overhead':>9} {'limit':>6}")
    for name, *_ in cases:
        py = min(w for w, _ in calls[name])
        lib = min(c for _, c in calls[name])
        overhead = sorted(w - c for w, c in calls[name])[len(calls[name]) // 2]  # median, per call
        print(f"{name:<14} {py * 1e3:>10.2f} {cpp[name] * 1e3:>12.2f} {py / cpp[name]:>7.3f} {lib * 1e3:>10.2f} "
              f"{overhead * 1e3:>12.3f} {overhead / lib:>8.2%} {1.0:>6.2f}")
    print("\npython ms: best wall time of m.forward; monet_bench: best prefill of the same ids, logits and routing "
          "in a C++ process; in-lib ms: best time inside the library of the Python calls; overhead: median over "
          "the calls of wall - in-library time (limit: ratio 1.00, overhead 0)")


if __name__ == "__main__":
    main()
