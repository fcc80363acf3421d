"""The PyTorch peer used by the benchmarks computes what the reference computes."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from monet_ref import reference  # noqa: E402
from monet_ref.make_checkpoint import make_checkpoint  # noqa: E402
from monet_ref.torch_model import MonetTorch  # noqa: E402


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_peer_matches_reference_and_decodes_with_cache(tmp_path, decompose):
    path = str(tmp_path / decompose)
    make_checkpoint(path, decompose=decompose, layers=3, groups=2, heads=4, kv_heads=2, seed=7)
    ids = [1, 17, 42, 5, 99, 250, 3, 7]
    ref, _ = reference.forward(reference.load(path), ids)
    model = MonetTorch.load(path, dtype=torch.float32)
    with torch.inference_mode():
        full, _ = model(torch.tensor([ids]))
        assert np.abs(full[0].numpy() - ref).max() / np.abs(ref).max() < 1e-4
        _, cache = model(torch.tensor([ids[:5]]))
        steps = []
        for t in ids[5:]:
            logits, cache = model(torch.tensor([[t]]), cache)
            steps.append(logits[0, -1])
        assert torch.allclose(torch.stack(steps), full[0, 5:], atol=1e-4 * full.abs().max().item())
