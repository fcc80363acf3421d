"""Hugging Face's CLIPVisionModel in float64, as a peer for vision_ref (run in a subprocess with
PYTHONPATH=.venv/hf-peer: the transformers that runs on Debian's torch; see requirements-hf-peer.txt).

    python -m monet_ref.hf_clip_peer TOWER_DIR PIXELS.npy OUT.npz

TOWER_DIR holds config.json and model.safetensors as CLIPVisionModel.save_pretrained writes them.
PIXELS.npy is [B, 3, H, W]; OUT.npz gets hidden_states_{i} [B, 1+N, D] for every i.
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel

from .safetensors_io import read_safetensors


def main() -> None:
    tower_dir, pixels_path, out_path = sys.argv[1:4]
    with open(os.path.join(tower_dir, "config.json")) as f:
        cfg = CLIPVisionConfig(**{k: v for k, v in json.load(f).items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    model = CLIPVisionModel(cfg).double().eval()
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float64))
             for k, v in read_safetensors(os.path.join(tower_dir, "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.load(pixels_path)).double(), output_hidden_states=True)
    np.savez(out_path, transformers_version=transformers.__version__,
             **{f"hidden_states_{i}": h.numpy() for i, h in enumerate(out.hidden_states)})


if __name__ == "__main__":
    main()
