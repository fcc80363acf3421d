"""Self-checks of the float64 reference: facts that hold by construction of the spec."""
import numpy as np

from monet_ref import reference
from monet_ref.make_checkpoint import make_checkpoint


def test_sigma():
    assert abs(reference.router_sigma(8, 512) - 2.1538746940614555) < 1e-12


def test_factorised_equals_explicit_sum(tmp_path):
    for decompose in ("vertical", "horizontal"):
        path = str(tmp_path / decompose)
        make_checkpoint(path, decompose=decompose, layers=1, groups=1, seed=3)
        model = reference.load(path)
        D = reference.dims(model.config)
        rng = np.random.default_rng(0)
        y = rng.normal(size=(3, D["d"]))
        g1, g2 = reference.router(model, 0, y, D)
        fast = (reference.experts_vd if D["vd"] else reference.experts_hd)(model, 0, y, g1, g2, D)
        slow = reference.experts_explicit(model, 0, y, g1, g2, D)
        assert np.abs(fast - slow).max() < 1e-10 * np.abs(slow).max()
        # router rows are distributions over at least one kept expert
        for g in (g1, g2):
            assert np.allclose(g.sum(-1), 1.0)
            assert ((g > 0).sum(-1) >= 1).all()


def test_literal_torch_einsum_matches(tmp_path):
    """The reference's experts against the spec's einsum form, computed independently with torch."""
    import torch
    path = str(tmp_path / "hd")
    make_checkpoint(path, decompose="horizontal", layers=1, groups=1, seed=4)
    model = reference.load(path)
    D = reference.dims(model.config)
    y = np.random.default_rng(1).normal(size=(2, D["d"]))
    g1, g2 = reference.router(model, 0, y, D)
    p = "model.layers.0.moe."
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in model.w.items() if k.startswith(p)}
    x = torch.relu(torch.tensor(y) @ t[p + "u.weight"].T + t[p + "u.bias"]) ** 2
    x = x.unflatten(-1, (D["E"], D["m"]))
    G1, G2 = torch.tensor(g1), torch.tensor(g2)
    mixed = torch.einsum("tim,thi,thj->tjm", x, G1, G2).flatten(-2)
    out = mixed @ t[p + "v.weight"].T + torch.einsum("thj,jd->td", G2, t[p + "b"])
    ours = reference.experts_hd(model, 0, y, g1, g2, D)
    assert np.abs(out.numpy() - ours).max() < 1e-10 * np.abs(ours).max()
