"""Accuracy of bf16 products against the float64 reference: monet with
--compute f32 and --compute bf16, and the PyTorch peer in bf16, on the golden
tests' random tiny checkpoints (12-token prefill). Prints a table of the
largest logit error relative to the largest logit, and of the largest router
probability error, per checkpoint.

    .venv/bin/python bench/bf16_accuracy.py [--monet build/monet]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))

from monet_ref import reference  # noqa: E402
from monet_ref.make_checkpoint import make_checkpoint  # noqa: E402
from monet_ref.safetensors_io import read_safetensors  # noqa: E402

CASES = {
    "vd f32": dict(decompose="vertical", layers=4, groups=2),
    "hd f32": dict(decompose="horizontal", layers=4, groups=2),
    "vd bf16": dict(decompose="vertical", layers=3, groups=2, dtype="BF16"),
    "hd bf16": dict(decompose="horizontal", layers=3, groups=2, dtype="BF16"),
    "vd bf16 gqa": dict(decompose="vertical", layers=3, groups=2, heads=4, kv_heads=2, dtype="BF16"),
    "vd bf16 3 shards": dict(decompose="vertical", layers=4, groups=2, shards=3, dtype="BF16"),
}
IDS = [1, 17, 42, 5, 99, 250, 3, 7, 128, 64, 31, 200]


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def monet_forward(monet: str, path: str, compute: str, out: str) -> dict:
    subprocess.run([monet, "forward", "--model", path, "--ids", ",".join(map(str, IDS)), "--out", out,
                    "--compute", compute], check=True, capture_output=True)
    return read_safetensors(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--monet", default=os.path.join(REPO, "build", "monet"))
    args = ap.parse_args()
    import torch
    from monet_ref.torch_model import MonetTorch

    print("| checkpoint | monet f32: logits | monet bf16: logits | routers | torch bf16 peer: logits |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw) in enumerate(CASES.items()):
            path = os.path.join(tmp, name.replace(" ", "-"))
            make_checkpoint(path, seed=100 + i, **kw)
            ref_logits, ref_routers = reference.forward(reference.load(path), IDS)
            exact = monet_forward(args.monet, path, "f32", os.path.join(tmp, "f32.safetensors"))
            bf16 = monet_forward(args.monet, path, "bf16", os.path.join(tmp, "bf16.safetensors"))
            router_err = max(float(np.abs(bf16[f"router.{l}.g{s}"] - g).max())
                             for l, gs in ref_routers.items() for s, g in zip((1, 2), gs))
            peer = MonetTorch.load(path, dtype=torch.bfloat16)
            with torch.inference_mode():
                peer_logits, _ = peer(torch.tensor([IDS]))
            print(f"| {name} | {rel(exact['logits'], ref_logits):.1e} | {100 * rel(bf16['logits'], ref_logits):.1f} % "
                  f"| {router_err:.3f} | {100 * rel(peer_logits[0].float().numpy(), ref_logits):.1f} % |")
    print("\nlogits: largest error / largest |logit| of the float64 reference; routers: largest absolute error "
          "of a router probability (monet bf16)")


if __name__ == "__main__":
    main()
