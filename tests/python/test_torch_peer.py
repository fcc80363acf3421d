"""The PyTorch peer used by the benchmarks computes what the reference computes."""
import numpy as np
import pytest

from conftest import require
torch = require("torch", "Debian python3-torch")

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


def test_peer_bf16_and_tied_embeddings(tmp_path):
    """bf16 weights and activations (the benchmark's peer): close to the float64
    reference at bf16 precision; router statistics stay float32 as stored."""
    path = str(tmp_path / "tied")
    make_checkpoint(path, layers=2, groups=2, tie=True, dtype="BF16", shards=2, seed=11)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref, _ = reference.forward(reference.load(path), ids)
    model = MonetTorch.load(path, dtype=torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()  # tied: one tensor
    router = model.layers[0].router
    assert router.norm1.running_mean.dtype == torch.float32 and router.norm2.running_var.dtype == torch.float32
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))
    err = np.abs(logits[0].float().numpy() - ref).max() / np.abs(ref).max()
    assert err < 0.1, err
    assert (logits[0].float().numpy().argmax(-1) == ref.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_gathered_experts_equal_dense(tmp_path, decompose):
    """The sparse peer (index_select of the kept experts' slices) computes the
    dense einsums' result: exact up to float64 rounding, prefill and decode."""
    path = str(tmp_path / decompose)
    make_checkpoint(path, decompose=decompose, layers=3, groups=2, heads=4, kv_heads=2, experts=16, seed=5)
    ids = [[1, 17, 42, 5, 99, 250, 3, 7] * 3, [4, 8, 15, 16, 23, 42, 2, 9] * 3]  # 48 tokens: 3 chunks
    dense = MonetTorch.load(path, dtype=torch.float64)
    sparse = MonetTorch.load(path, dtype=torch.float64, experts="gather")
    assert sparse.layers[0].moe.gather and not getattr(dense.layers[0].moe, "gather", False)
    with torch.inference_mode():
        want, cache_d = dense(torch.tensor(ids))
        got, cache_s = sparse(torch.tensor(ids))
        assert (got - want).abs().max().item() < 1e-9 * want.abs().max().item()
        step_d, _ = dense(torch.tensor([[5], [6]]), cache_d)
        step_s, _ = sparse(torch.tensor([[5], [6]]), cache_s)
        assert (step_s - step_d).abs().max().item() < 1e-9 * step_d.abs().max().item()
    with pytest.raises(ValueError):
        MonetTorch.load(path, experts="sparse")
