"""Cluster averages and neuron features: the faster paths give the same values as the plain maths."""

import pytest
import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods.fusion import cluster_average


def reference_average(tensor, labels, k, dim):
    moved = tensor.double().movedim(dim, 0)
    out = torch.stack([moved[labels == j].mean(0) for j in range(k)])
    return out.to(tensor.dtype).movedim(0, dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [0, 1])
def test_cluster_average_matches_float64_means(dtype, dim):
    g = torch.Generator().manual_seed(0)
    n, k = 300, 40
    labels = torch.cat([torch.arange(k), torch.randint(k, (n - k,), generator=g)])
    shape = (n, 24) if dim == 0 else (24, n)
    t = torch.randn(*shape, generator=g).to(dtype)
    got = cluster_average(t, labels, k, dim)
    want = reference_average(t, labels, k, dim)
    assert got.dtype == dtype and got.shape == want.shape
    # the same value up to the last bit of the storage dtype (float32 sums for 16-bit inputs)
    assert torch.allclose(got.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cluster_average_exact_on_repeated_neurons(dtype):
    g = torch.Generator().manual_seed(1)
    rows = (torch.randn(7, 16, generator=g) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)
    labels = torch.arange(7).repeat(13)  # every neuron 13 times
    t = rows[labels]
    assert torch.equal(cluster_average(t, labels, 7, 0), rows)
    assert torch.equal(cluster_average(t.T, labels, 7, 1), rows.T)


def test_neuron_features_layout():
    g = torch.Generator().manual_seed(2)
    mlp = MLPWeights(w_in=torch.randn(10, 4, generator=g).bfloat16(), w_out=torch.randn(4, 10, generator=g).bfloat16(),
                     b_in=torch.randn(10, generator=g), w_gate=torch.randn(10, 4, generator=g).bfloat16())
    want = torch.cat([mlp.w_gate.float(), mlp.w_in.float(), mlp.b_in[:, None], mlp.w_out.float().T], 1)
    got = mlp.neuron_features()
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_weights_from_centroids_equal_cluster_averages(dtype, gated):
    from mlpfuse.methods import MethodOptions
    from mlpfuse.methods.fusion import centroid_mlp

    g = torch.Generator().manual_seed(3)
    n, p, k = 64, 8, 12
    mlp = MLPWeights(w_in=torch.randn(n, p, generator=g).to(dtype), w_out=torch.randn(p, n, generator=g).to(dtype),
                     b_in=None if gated else torch.randn(n, generator=g).to(dtype),
                     w_gate=torch.randn(n, p, generator=g).to(dtype) if gated else None,
                     b_out=torch.randn(p, generator=g).to(dtype))
    fused, sizes = centroid_mlp(mlp, k, MethodOptions(seed=1, backend="torch", device="cpu"))
    from mlpfuse.compress.kmeans import kmeans

    labels = kmeans(  # the same call centroid_mlp makes: the same labels
        mlp.neuron_features(), k, seed=1, backend="torch", device="cpu").labels
    assert torch.equal(sizes, torch.bincount(labels, minlength=k).float())
    tol = torch.finfo(dtype).eps
    for name, dim in (("w_in", 0), ("w_gate", 0), ("b_in", 0), ("w_out", 1)):
        src = getattr(mlp, name)
        if src is None:
            assert getattr(fused, name) is None
            continue
        want = reference_average(src, labels, k, dim)
        got = getattr(fused, name)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=1e-7), name
    assert torch.equal(fused.b_out, mlp.b_out)
