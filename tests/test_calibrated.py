"""Data-aware fusion maths (mlpfuse.methods.calibrated) on tiny random MLPs."""

from __future__ import annotations

import pytest
import torch

from mlpfuse.compress.kmeans import kmeans
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.errors import InputError
from mlpfuse.methods import MethodOptions
from mlpfuse.methods.calibrated import (
    activation_statistics,
    calibrated_fusion,
    calibrated_prune,
    calibrated_svd,
    importance,
    neuron_activations,
    protected_neurons,
    ridge_refit,
    weighted_average,
)
from mlpfuse.methods.fusion import fusion

from .conftest import random_mlp, repeat_neurons

SILU, GELU = torch.nn.functional.silu, torch.nn.functional.gelu


def inputs(tokens: int, hidden: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def error(mlp, fused, x, act) -> float:
    return float((mlp.forward(x, act) - fused.forward(x, act)).pow(2).mean())


@pytest.mark.parametrize("gated,act", [(True, SILU), (False, GELU)])
@pytest.mark.parametrize("protect", [0, 48])
def test_full_width_and_protect_all_are_exact(gated, act, protect):
    mlp, x = random_mlp(gated=gated, small=True), inputs(200)
    fused = calibrated_fusion(mlp, mlp.width, x, act, protect=protect)
    held_out = inputs(50, seed=7)
    torch.testing.assert_close(fused.forward(held_out, act), mlp.forward(held_out, act), rtol=0, atol=1e-12)
    assert torch.equal(fused.scale, torch.ones(mlp.width))


@pytest.mark.parametrize("gated,act", [(True, SILU), (False, GELU)])
def test_refit_lowers_the_calibration_error_and_keeps_p(gated, act):
    mlp, x = random_mlp(gated=gated, small=True), inputs(600)
    plain = calibrated_fusion(mlp, 16, x, act, protect=2, refit=False)
    refit = calibrated_fusion(mlp, 16, x, act, protect=2, refit=True)
    paper = fusion(mlp, 16, MethodOptions(seed=0, backend="torch"))
    assert error(mlp, refit, x, act) < 0.9 * error(mlp, plain, x, act)
    assert error(mlp, refit, x, act) < 0.9 * error(mlp, paper, x, act)
    held_out = inputs(600, seed=9)  # the refit generalises to fresh inputs of the same distribution
    assert error(mlp, refit, held_out, act) < error(mlp, plain, held_out, act)
    # P is the cluster sizes, unchanged by the refit; only W_out moved, and it is stored divided by P
    torch.testing.assert_close(refit.scale, plain.scale, rtol=0, atol=0)
    assert float(refit.scale.sum()) == mlp.width and refit.scale.min() >= 1
    assert torch.equal(refit.w_in, plain.w_in) and torch.equal(refit.w_gate if gated else refit.b_in,
                                                                plain.w_gate if gated else plain.b_in)
    assert not torch.allclose(refit.w_out, plain.w_out)


def test_ridge_refit_stores_the_solution_divided_by_p():
    mlp, x = random_mlp(gated=True, small=True), inputs(400)
    fused = calibrated_fusion(mlp, 12, x, SILU, refit=False)
    target = mlp.forward(x, SILU)
    refit = ridge_refit(fused, mlp, x, SILU, alpha=0.0)
    h = neuron_activations(fused, x, SILU)
    least_squares = torch.linalg.lstsq(h, target).solution.T  # the effective weight, independently
    torch.testing.assert_close(refit.w_out * refit.scale[None, :], least_squares, rtol=1e-6, atol=1e-8)


def test_a_massive_activation_neuron_survives_as_a_singleton():
    mlp, x = random_mlp(gated=False, small=True), inputs(300)
    mlp.w_in[5] *= 30  # neuron 5 fires far harder than the rest
    score = importance(mlp, activation_statistics(mlp, x, GELU))
    assert int(torch.argmax(score)) == 5
    fused = calibrated_fusion(mlp, 10, x, GELU, protect=1, refit=False)
    rows = torch.isclose(fused.w_in, mlp.w_in[5], rtol=1e-12, atol=0).all(dim=1)  # kept, not averaged
    assert int(rows.sum()) == 1
    assert float(fused.scale[rows]) == 1.0
    assert fused.stats["protected"] == 1


def test_protection_threshold_and_counts():
    score = torch.tensor([1.0, 50.0, 2.0, 1.0, 30.0, 1.0])
    assert protected_neurons(score, 1).tolist() == [1]
    assert protected_neurons(score, 0, threshold=2.0).tolist() == [1, 4]  # mean 14.17, 2x = 28.3
    assert protected_neurons(score, 0, threshold=3.0).tolist() == [1]  # 3x = 42.5
    assert protected_neurons(score, 1, threshold=2.0).tolist() == [1, 4]  # the union
    with pytest.raises(InputError):
        protected_neurons(score, -1)
    with pytest.raises(InputError):
        protected_neurons(score, 0, threshold=0)


def test_weighted_kmeans_centroids_follow_the_weights():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0])
    for backend in ("torch", "faiss"):
        result = kmeans(x, 2, weights=weights, seed=0, backend=backend)
        labels = result.labels
        assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
        assert sorted(result.centroids.flatten().tolist()) == pytest.approx([0.75, 10.5])
        assert sorted(weighted_average(x, labels, weights, 2).flatten().tolist()) == pytest.approx([0.75, 10.5])
        assert torch.equal(kmeans(x, 2, weights=weights, seed=0, backend=backend).labels, labels)  # deterministic


def test_weighted_kmeans_matches_repeated_points():
    """Integer weights cluster as the points repeated that many times (same inertia, same centroids)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(20, 3, generator=g) + 6 * c for c in torch.eye(3)])
    counts = torch.randint(1, 4, (60,), generator=g)
    weighted = kmeans(x, 3, weights=counts.float(), seed=0, backend="torch")
    repeated = kmeans(x.repeat_interleave(counts, 0), 3, seed=0, backend="torch")
    assert weighted.inertia == pytest.approx(repeated.inertia, rel=1e-5)
    key = lambda c: c.sum(1).argsort()  # noqa: E731
    torch.testing.assert_close(weighted.centroids[key(weighted.centroids)], repeated.centroids[key(repeated.centroids)])


def _full_refit(h_c, h, out, alpha):
    """The refit as it was computed before statistics: float64 on all activations at once."""
    y = h @ out.T
    gram = h_c.T @ h_c
    lam = alpha * float(torch.trace(gram)) / gram.shape[0]
    return torch.linalg.solve(gram + (lam + 1e-12) * torch.eye(gram.shape[0], dtype=torch.float64), h_c.T @ y).T


@pytest.mark.parametrize("gated,act", [(True, SILU), (False, GELU)])
def test_chunked_float32_statistics_equal_the_float64_maths(gated, act):
    """The methods on float32 chunks (as fuse --calibration gives them) against float64 on all tokens at once."""
    mlp, x = random_mlp(gated=gated, small=True), inputs(1000)
    h = neuron_activations(mlp, x, act)  # float64, every token
    chunks = list(x.float().split(300))
    full_score = h.pow(2).mean(0) * mlp.w_out.double().pow(2).sum(0)
    torch.testing.assert_close(importance(mlp, activation_statistics(mlp, chunks, act)), full_score, rtol=1e-5, atol=0)
    # prune: same neurons kept, refit equal to the all-token float64 solve
    chunked, exact = calibrated_prune(mlp, 20, chunks, act), calibrated_prune(mlp, 20, x, act)
    keep = torch.argsort(-full_score, stable=True)[:20].sort().values
    expected = _full_refit(h[:, keep], h, mlp.w_out.double(), 1e-3)
    torch.testing.assert_close(exact.w_out.double(), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(chunked.w_out.double(), expected, rtol=2e-3, atol=2e-4)
    # fusion: same clusters given the same labels; the refit equal within float32 rounding
    fused64 = calibrated_fusion(mlp, 16, x, act, protect=2)
    fused32 = calibrated_fusion(mlp, 16, chunks, act, protect=2)
    assert torch.equal(fused64.scale, fused32.scale)
    torch.testing.assert_close(fused32.w_out.double(), fused64.w_out.double(), rtol=2e-3, atol=2e-4)
    # svd: whitening and refit from Grams, against the float64 run
    svd64, svd32 = calibrated_svd(mlp, 6, x, act), calibrated_svd(mlp, 6, chunks, act)
    torch.testing.assert_close(svd32.forward(x, act), svd64.forward(x, act), rtol=2e-3, atol=2e-4)


def test_bad_values_are_input_errors():
    mlp, x = random_mlp(gated=True, small=True), inputs(50)
    with pytest.raises(InputError, match="protect fewer"):
        calibrated_fusion(mlp, 4, x, SILU, protect=5)
    with pytest.raises(InputError, match="between 1 and 48"):
        calibrated_fusion(mlp, 0, x, SILU)
    with pytest.raises(InputError, match=r"\[tokens, 12\]"):
        calibrated_fusion(mlp, 8, inputs(50, hidden=7), SILU)


# --- selected fusion (grouping "select"): representatives by output-aware pivoted Cholesky ---------

from mlpfuse.methods.calibrated import activation_gram, fold_assignment, select_neurons, selected_fusion  # noqa: E402


@pytest.mark.parametrize("gated,act", [(True, SILU), (False, GELU)])
@pytest.mark.parametrize("protect", [0, 48])
def test_selected_fusion_at_full_width_is_exact(gated, act, protect):
    mlp, x = random_mlp(gated=gated, small=True), inputs(200)
    fused = selected_fusion(mlp, mlp.width, x, act, protect=protect)
    held_out = inputs(50, seed=7)
    torch.testing.assert_close(fused.forward(held_out, act), mlp.forward(held_out, act), rtol=0, atol=1e-12)
    assert torch.equal(fused.scale, torch.ones(mlp.width))


def repeated_mlp(gated: bool, distinct: int = 6, copies: tuple = (3, 1, 4, 2, 2, 5)) -> tuple[MLPWeights, torch.Tensor]:
    """An MLP of ``distinct`` neurons, neuron i repeated ``copies[i]`` times (shuffled), and its labels."""
    base = random_mlp(gated=gated, small=True, width=distinct)
    order = torch.repeat_interleave(torch.arange(distinct), torch.tensor(copies))
    order = order[torch.randperm(order.numel(), generator=torch.Generator().manual_seed(3))]
    return repeat_neurons(base, order), order


@pytest.mark.parametrize("gated,act", [(True, SILU), (False, GELU)])
@pytest.mark.parametrize("refit", [False, True])
def test_selected_fusion_of_repeated_neurons_is_exact_with_p_the_copies(gated, act, refit):
    copies = (3, 1, 4, 2, 2, 5)
    mlp, order = repeated_mlp(gated, copies=copies)
    fused = selected_fusion(mlp, len(copies), inputs(300), act, refit=refit, alpha=0.0)  # no ridge shrinkage
    held_out = inputs(60, seed=9)
    torch.testing.assert_close(fused.forward(held_out, act), mlp.forward(held_out, act), rtol=1e-9, atol=1e-9)
    # each representative is one of the copies, unchanged, and P counts its copies (P stays a separate constant)
    kept = [int(torch.nonzero((mlp.w_in == row).all(1))[0]) for row in fused.w_in]
    assert sorted(int(order[i]) for i in kept) == list(range(len(copies)))
    torch.testing.assert_close(fused.scale, torch.tensor([float(copies[int(order[i])]) for i in kept]))
    assert float(fused.scale.sum()) == pytest.approx(mlp.width)


@pytest.mark.parametrize("p_from", ["coefficients", "members"])
def test_p_counts_scaled_copies_by_their_coefficients(p_from):
    """Neurons whose up weight is a scaled copy (h_j = a_j h_s): exact, P = sum |a_j| (or the count)."""
    base = random_mlp(gated=True, small=True, width=3)
    order, factors = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1.0, -0.5, 1.0, 1.0, 0.25, 2.0], dtype=torch.float64)
    mlp = MLPWeights(w_in=base.w_in[order] * factors[:, None], w_gate=base.w_gate[order], w_out=base.w_out[:, order])
    fused = selected_fusion(mlp, 3, inputs(300), SILU, alpha=0.0, p_from=p_from)
    held_out = inputs(60, seed=9)
    torch.testing.assert_close(fused.forward(held_out, SILU), mlp.forward(held_out, SILU), rtol=1e-8, atol=1e-9)
    representatives = [int(torch.nonzero((base.w_gate == row).all(1))[0]) for row in fused.w_gate]
    for cluster, distinct in enumerate(representatives):
        members = torch.nonzero(order == distinct).flatten()
        own = torch.nonzero((mlp.w_in == fused.w_in[cluster]).all(1)).flatten()[0]
        expected = float((factors[members] / factors[own]).abs().sum()) if p_from == "coefficients" else len(members)
        assert float(fused.scale[cluster]) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(InputError, match="p_from"):
        selected_fusion(mlp, 3, inputs(50), SILU, p_from="nope")


def test_the_refit_from_the_gram_is_the_least_squares_fit_on_the_activations_divided_by_p():
    mlp, x = random_mlp(gated=True, small=True), inputs(400)
    fused = selected_fusion(mlp, 12, x, SILU, alpha=0.0)
    h_kept = neuron_activations(fused, x, SILU)  # the representatives' own activations
    expected = torch.linalg.lstsq(h_kept, mlp.forward(x, SILU)).solution.T  # [p_out, k], independent solver
    torch.testing.assert_close(fused.w_out * fused.scale.double()[None, :], expected, rtol=1e-6, atol=1e-8)
    y = mlp.forward(x, SILU)
    assert fused.stats["relative_error"] == pytest.approx(
        float((fused.forward(x, SILU) - y).norm() / y.norm()), rel=1e-6)


def test_selection_drops_a_duplicate_that_importance_keeps():
    """Two copies of the most important neuron: prune keeps both, selection keeps one and a new neuron."""
    mlp = random_mlp(gated=True, small=True, width=20)
    big = mlp.map_neurons(lambda t: torch.cat([t[:1] * 3, t[:1] * 3, t[2:]]), lambda w: torch.cat([w[:, :1] * 3, w[:, :1] * 3, w[:, 2:]], 1))
    x = inputs(300)
    selected = selected_fusion(big, 6, x, SILU)
    pruned = calibrated_prune(big, 6, x, SILU)
    assert pruned.stats["relative_error"] > selected.stats["relative_error"]
    assert (selected.w_in == big.w_in[0]).all(1).sum() == 1  # one copy, its twin folded in: P = 2 there
    assert float(selected.scale[torch.nonzero((selected.w_in == big.w_in[0]).all(1))[0]]) >= 2


def test_the_greedy_step_is_the_exact_drop_of_the_refitted_error():
    """The first pick maximises ||G_j W||^2 / G_jj (the error drop of a one-neuron refit), checked by brute force."""
    mlp, x = random_mlp(gated=False, small=True, width=16), inputs(200)
    gram = activation_gram(mlp, x, GELU).gram
    h, y = neuron_activations(mlp, x, GELU), mlp.forward(x, GELU) - mlp.b_out
    drops = [float(y.pow(2).sum() - (y - h[:, [j]] @ torch.linalg.lstsq(h[:, [j]], y).solution).pow(2).sum())
             for j in range(16)]
    assert int(select_neurons(gram, mlp.w_out, 1, alpha=0.0)[0]) == max(range(16), key=drops.__getitem__)
    forced = select_neurons(gram, mlp.w_out, 4, first=torch.tensor([5, 2]), alpha=0.0)
    assert forced[:2].tolist() == [5, 2] and len(set(forced.tolist())) == 4


def test_fold_assignment_joins_the_most_correlated_representative():
    mlp, x = random_mlp(gated=True, small=True, width=10), inputs(100)
    gram = activation_gram(mlp, x, SILU).gram
    labels, coefficient = fold_assignment(gram, torch.tensor([1, 4, 7]))
    assert labels[[1, 4, 7]].tolist() == [0, 1, 2] and coefficient[[1, 4, 7]].tolist() == [1.0, 1.0, 1.0]
    h = neuron_activations(mlp, x, SILU)
    for j in (0, 2, 3, 5, 6, 8, 9):
        corr = [abs(float(h[:, j] @ h[:, s])) / float(h[:, j].norm() * h[:, s].norm()) for s in (1, 4, 7)]
        assert int(labels[j]) == max(range(3), key=corr.__getitem__)
        s = (1, 4, 7)[int(labels[j])]
        assert float(coefficient[j]) == pytest.approx(float(h[:, j] @ h[:, s] / (h[:, s] @ h[:, s])), rel=1e-9)


def test_selected_fusion_chunked_float32_matches_float64_and_bad_values():
    mlp, x = random_mlp(gated=True, small=True), inputs(500)
    fused64 = selected_fusion(mlp, 16, x, SILU, protect=2)
    fused32 = selected_fusion(mlp.map_neurons(lambda t: t.float(), lambda w: w.float()), 16,
                              list(x.float().split(128)), SILU, protect=2)
    torch.testing.assert_close(fused32.scale, fused64.scale, rtol=1e-4, atol=0)
    torch.testing.assert_close(fused32.w_out.double(), fused64.w_out, rtol=1e-3, atol=1e-4)
    with pytest.raises(InputError, match="protect fewer"):
        selected_fusion(mlp, 4, x, SILU, protect=5)
    with pytest.raises(InputError, match="between 1 and 48"):
        select_neurons(activation_gram(mlp, x, SILU).gram, mlp.w_out, 0)
