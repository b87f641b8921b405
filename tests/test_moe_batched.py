"""Batched k-means over the experts of one MoE layer: same quality as a loop."""

from __future__ import annotations

import torch

from mlpfuse.compress.fuse_moe import batched_clusterings
from mlpfuse.methods import MethodOptions, get_method

from .conftest import random_mlp


def experts(count=4, width=48, hidden=16, seed=0):
    return [random_mlp(width, hidden, gated=True, seed=seed + i, dtype=torch.float32) for i in range(count)]


def test_batched_clusterings_feed_fusion_and_match_a_loop_in_quality():
    mlps, k = experts(), 12
    options = MethodOptions(backend="torch", device="cpu")
    clusterings = batched_clusterings(mlps, k, "fusion", options)
    assert len(clusterings) == len(mlps) and all(c is not None for c in clusterings)
    for mlp, clustering in zip(mlps, clusterings):
        batched = get_method("fusion")(mlp, k, MethodOptions(backend="torch", device="cpu", clustering=clustering))
        alone = get_method("fusion")(mlp, k, options)
        assert batched.width == k and batched.scale.sum().item() == mlp.width
        assert torch.equal(batched.scale, torch.bincount(clustering.labels, minlength=k).float())
        assert batched.stats["inertia"] <= alone.stats["inertia"] * 1.1


def test_chunks_of_experts_cluster_as_well_as_one_batch(monkeypatch):
    import mlpfuse.compress.fuse_moe as fuse_moe

    mlps, options = experts(count=5), MethodOptions(device="cpu")
    whole = batched_clusterings(mlps, 12, "fusion", options)
    monkeypatch.setattr(fuse_moe, "BATCH_BYTES", mlps[0].neuron_features().numel() * 4 * 2)  # 2 experts a chunk
    chunked = batched_clusterings(mlps, 12, "fusion", options)
    assert len(chunked) == 5
    for part, full in zip(chunked, whole):
        assert torch.bincount(part.labels, minlength=12).min() >= 1
        assert abs(part.inertia - full.inertia) <= 0.1 * full.inertia


def test_no_batching_for_faiss_requests_or_methods_without_kmeans():
    mlps = experts()
    assert batched_clusterings(mlps, 12, "fusion", MethodOptions(backend="faiss")) == [None] * 4
    assert batched_clusterings(mlps, 12, "prune", MethodOptions()) == [None] * 4
    assert batched_clusterings(mlps[:1], 12, "fusion", MethodOptions()) == [None]
