"""The paper's baselines next to fusion: svd, sketch, mmd, prune (docs/ntk-check.md)."""

from __future__ import annotations

import pytest
import torch
import transformers

from mlpfuse import FuseSettings, fuse_checkpoint, fuse_model, load
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, get_method, method_names
from mlpfuse.methods.mmd import support_points
from mlpfuse.methods.prune import importance
from mlpfuse.methods.svd import fused_parameter_count, matched_rank

from .conftest import build_tiny, model_inputs, outputs_of, random_mlp

GELU = torch.nn.functional.gelu


def test_all_six_methods_are_registered():
    assert {"fusion", "cluster", "svd", "sketch", "mmd", "prune"} <= set(method_names())


@pytest.mark.parametrize("gated", [False, True])
def test_prune_keeps_the_most_important_neurons_unchanged(gated):
    mlp = random_mlp(gated=gated, bias=True)
    pruned = get_method("prune")(mlp, 10, MethodOptions())
    keep = torch.topk(importance(mlp), 10).indices.sort().values
    assert pruned.width == 10 and pruned.scale is None
    assert torch.equal(pruned.w_in, mlp.w_in[keep]) and torch.equal(pruned.w_out, mlp.w_out[:, keep])
    if gated:
        assert torch.equal(pruned.w_gate, mlp.w_gate[keep])
    x = torch.randn(5, mlp.hidden, dtype=torch.float64)
    full = get_method("prune")(mlp, mlp.width, MethodOptions())
    assert torch.allclose(full.forward(x, GELU), mlp.forward(x, GELU), atol=1e-12)


def test_sketch_is_seeded_and_unbiased_for_a_linear_mlp():
    mlp = random_mlp(width=64, hidden=8)
    k = 16
    one, again, other = (get_method("sketch")(mlp, k, MethodOptions(seed=s)) for s in (3, 3, 4))
    assert one.width == k and torch.equal(one.w_in, again.w_in) and not torch.equal(one.w_in, other.w_in)
    x = torch.randn(4, 8, dtype=torch.float64)
    identity = lambda t: t  # noqa: E731  (E[S S^T] = Id makes the linear MLP unbiased)
    mean = torch.stack([get_method("sketch")(mlp, k, MethodOptions(seed=s)).forward(x, identity)
                        for s in range(200)]).mean(0)
    exact = mlp.forward(x, identity)
    single = (one.forward(x, identity) - exact).norm()
    assert (mean - exact).norm() < 0.35 * single


@pytest.mark.parametrize("gated", [False, True])
def test_svd_rank_matches_the_fused_parameter_count(gated):
    mlp = random_mlp(width=48, hidden=12, gated=gated, bias=True)
    for k in (4, 12, 30):
        rank = matched_rank(mlp, k)
        result = get_method("svd")(mlp, k, MethodOptions())
        assert result.width == mlp.width and result.stats["rank"] == rank
        assert result.num_parameters() <= fused_parameter_count(mlp, k) or rank == 1
        larger = result.num_parameters() + len(result.low_rank) * (mlp.width + mlp.hidden)
        assert larger > fused_parameter_count(mlp, k)
        for name, (first, second) in result.low_rank.items():
            weight = getattr(mlp, name)
            singular = torch.linalg.svdvals(weight)
            # Eckart-Young: the best rank-r error is the norm of the dropped singular values
            assert torch.allclose((weight - second @ first).norm(), singular[rank:].norm(), rtol=1e-9)
            assert torch.allclose(getattr(result, name), second @ first, atol=1e-12)


def test_svd_is_exact_for_a_low_rank_mlp():
    mlp = random_mlp(width=48, hidden=12)
    g = torch.Generator().manual_seed(5)
    mlp.w_in = torch.randn(48, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 12, generator=g, dtype=torch.float64)
    mlp.w_out = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 48, generator=g, dtype=torch.float64)
    result = get_method("svd")(mlp, 12, MethodOptions())
    assert result.stats["rank"] >= 2
    x = torch.randn(6, 12, dtype=torch.float64)
    assert torch.allclose(result.forward(x, GELU), mlp.forward(x, GELU), atol=1e-10)


def test_mmd_lowers_the_discrepancy_and_keeps_the_factor_i_over_k():
    mlp = random_mlp(width=60, hidden=6)
    features = mlp.neuron_features()
    _, start = support_points(features, 12, seed=0, steps=0)
    _, optimised = support_points(features, 12, seed=0, steps=30)
    assert optimised < 0.9 * start
    result = get_method("mmd")(mlp, 12, MethodOptions(seed=0))
    assert result.width == 12 and torch.equal(result.scale, torch.full((12,), 5.0))
    assert torch.equal(result.b_out, mlp.b_out)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_svd_checkpoint_round_trip(name, tiny_checkpoint, tmp_path):
    source, _, task = tiny_checkpoint(name)
    settings = FuseSettings(layers="0", dim=8, method="svd", backend="torch")
    fuse_checkpoint(str(source), tmp_path / "svd", settings)
    loaded = load(tmp_path / "svd", task=task).eval()
    in_memory, _ = build_tiny(name)
    fuse_model(in_memory, settings)
    inputs = model_inputs(name)
    assert torch.allclose(outputs_of(loaded, inputs), outputs_of(in_memory, inputs), atol=1e-5)
    section = loaded.config.mlpfuse
    assert {spec["type"] for spec in section["modules"]} == {"lowrank"}
    if name == "bert":  # the shipped remote code alone rebuilds the factorised modules
        remote = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "svd", trust_remote_code=True).eval()
        assert torch.allclose(outputs_of(remote, inputs), outputs_of(loaded, inputs), atol=1e-6)
