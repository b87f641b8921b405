"""Data-aware MLP Fusion maths: importance, protected neurons, weighted k-means, ridge refit.

Pure tensor maths on :class:`~mlpfuse.mlp.MLPWeights` and calibration inputs ``x`` [tokens, p]
(the hidden states that enter this MLP, e.g. after the layer's norm); no architecture names, no
model. The pieces, used in this order by :func:`calibrated_fusion`:

1. :func:`neuron_activations` ``h`` [tokens, I]: what each sub-MLP feeds its output weights
   (``act(x W_in^T + b_in)``; gated: ``act(x W_gate^T + b_gate) * (x W_in^T + b_in)``);
2. :func:`importance` (length I): the mean squared output each sub-MLP writes,
   ``mean_t h[t, i]^2 * ||W_out[:, i]||^2`` (times ``P_i^2`` when a scale is set);
3. :func:`protected_neurons`: the ``m`` most important (and/or those above ``threshold`` times the
   mean importance) stay singleton clusters, unchanged: the few neurons that carry an LLM's
   massive activations must survive;
4. :func:`weighted_kmeans` of the other sub-MLPs' feature rows, each weighted by its importance, into
   the remaining ``k - m`` clusters; every cluster becomes the importance-weighted mean of its
   sub-MLPs and ``P`` holds the cluster sizes (as in MLP Fusion: ``sum_i f_i ~ P_c f(centroid_c)``);
5. :func:`ridge_refit`: the output weight is refitted in closed form so that the fused MLP's output
   matches the original's on the calibration inputs, ``E = argmin ||H_f E^T - Y||^2 + lam ||E||^2``
   with ``H_f`` the fused activations [tokens, k] and ``Y`` the original output minus ``b_out``.
   The stored weight is ``E / P`` (column-wise), so **P stays a standalone constant** scale and the
   function is ``H_f (W_out * P)^T = H_f E^T``: the training-dynamics property of MLP Fusion is kept.

``fuse --calibration`` (mlpfuse/calibration.py) runs the model layer by layer and calls the
data-aware form of the chosen method with each layer's inputs: :func:`calibrated_fusion` for
``fusion`` (and ``cluster``, with sqrt(P) folded and no refit), :func:`calibrated_prune` for
``prune``, :func:`calibrated_svd` for ``svd``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import InputError
from ..mlp import MLPWeights


def neuron_activations(mlp: MLPWeights, x: torch.Tensor, activation) -> torch.Tensor:
    """The sub-MLPs' activations ``h`` [tokens, I] on calibration inputs ``x`` [tokens, p] (float64).

    ``mlp.forward(x) == h @ (W_out * P)^T + b_out``. Raises InputError when ``x``'s width is not
    the MLP's hidden size.
    """
    _check_inputs(mlp, x)
    x = x.double()
    up = torch.nn.functional.linear(x, mlp.w_in.double(), None if mlp.b_in is None else mlp.b_in.double())
    if mlp.w_gate is None:
        return activation(up)
    gate = torch.nn.functional.linear(x, mlp.w_gate.double(), None if mlp.b_gate is None else mlp.b_gate.double())
    return activation(gate) * up


def importance(mlp: MLPWeights, h: torch.Tensor) -> torch.Tensor:
    """Per-neuron importance (length I, float64): mean squared output norm each sub-MLP writes.

    ``h`` [tokens, I] from :func:`neuron_activations`. With a scale P, neuron i's output weight is
    ``W_out[:, i] * P_i``.
    """
    out_norm = mlp.w_out.double().pow(2).sum(dim=0)
    if mlp.scale is not None:
        out_norm = out_norm * mlp.scale.double().pow(2)
    return h.double().pow(2).mean(dim=0) * out_norm


def protected_neurons(score: torch.Tensor, m: int = 0, threshold: float | None = None) -> torch.Tensor:
    """Indices (sorted, int64) of the neurons that stay singleton clusters.

    The ``m`` highest ``score`` values (ties to the lower index), plus, with ``threshold``, every
    neuron whose score exceeds ``threshold`` times the mean score. Raises InputError for a negative
    ``m`` or a non-positive ``threshold``.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise InputError(f"the number of protected neurons must be an integer >= 0, got {m!r}")
    if threshold is not None and not threshold > 0:
        raise InputError(f"the protection threshold must be > 0 (a multiple of the mean importance), got {threshold!r}")
    chosen = torch.zeros(score.numel(), dtype=torch.bool)
    chosen[torch.argsort(-score.double(), stable=True)[:m]] = True
    if threshold is not None:
        chosen |= score.double().cpu() > threshold * score.double().mean().cpu()
    return torch.nonzero(chosen).flatten()


def weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, k: int, *, seed: int = 0,
                    max_iter: int = 100) -> torch.Tensor:
    """Labels (length n, int64, every cluster non-empty) of a weighted k-means of the rows of ``x`` [n, d].

    Minimises ``sum_i w_i ||x_i - c_{label_i}||^2``: weighted k-means++ seeding (a row drawn with
    probability ~ ``w_i * D_i^2``), then Lloyd iterations with weighted-mean centroids; an empty
    cluster takes the row that costs most. Rows of zero weight still get the nearest centroid
    (a tiny floor keeps them from being ignored entirely). Deterministic for a given ``seed``.
    Raises InputError unless ``1 <= k <= n``.
    """
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise InputError(f"k must be an integer between 1 and the number of rows {n}, got {k!r}")
    if k == n:
        return torch.arange(n)
    x = x.double().cpu()
    w = weights.double().cpu().clamp_min(0)
    w = w + max(float(w.mean()), 1e-300) * 1e-9  # zero-weight rows still count a little
    gen = torch.Generator().manual_seed(seed)
    centres = [int(torch.multinomial(w / w.sum(), 1, generator=gen))]
    nearest = (x - x[centres[0]]).pow(2).sum(1)
    for _ in range(1, k):
        mass = w * nearest
        pick = int(torch.multinomial(mass / mass.sum(), 1, generator=gen)) if mass.sum() > 0 else \
            int(torch.argmax(nearest))
        centres.append(pick)
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    c = x[centres].clone()
    labels = None
    for _ in range(max_iter):
        distance = torch.cdist(x, c).pow(2)
        new = distance.argmin(dim=1)
        sums = torch.zeros_like(c).index_add_(0, new, x * w[:, None])
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, new, w)
        counts = torch.bincount(new, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():  # relocate: the costliest row
            cost = w * distance.gather(1, new[:, None]).squeeze(1)
            cost[counts[new] <= 1] = -1  # never empty another cluster
            row = int(torch.argmax(cost))
            counts[new[row]] -= 1
            new[row] = empty
            counts[empty] = 1
            sums = torch.zeros_like(c).index_add_(0, new, x * w[:, None])
            mass = torch.zeros(k, dtype=torch.float64).index_add_(0, new, w)
        c = sums / mass[:, None]
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
    return new


def weighted_average(tensor: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int,
                     dim: int = 0) -> torch.Tensor:
    """Weighted mean of ``tensor``'s slices along ``dim`` within each of the ``k`` clusters (float64)."""
    moved = tensor.double().movedim(dim, 0)
    w = weights.double().reshape((-1,) + (1,) * (moved.dim() - 1))
    sums = torch.zeros((k,) + moved.shape[1:], dtype=torch.float64).index_add_(0, labels, moved * w)
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, weights.double())
    return (sums / mass.reshape((k,) + (1,) * (moved.dim() - 1))).movedim(0, dim)


def ridge_refit(fused: MLPWeights, x: torch.Tensor, target: torch.Tensor, activation,
                alpha: float = 1e-3) -> MLPWeights:
    """``fused`` with its output weight refitted on calibration data; P and every other tensor unchanged.

    Solves ``E = argmin ||H_f E^T - (target - b_out)||^2 + lam ||E||^2`` in float64, ``H_f`` =
    :func:`neuron_activations` of ``fused`` on ``x`` [tokens, p], ``target`` [tokens, p_out] the
    original MLP's output, ``lam = alpha * trace(H_f^T H_f) / k`` (a scale-free ridge), and stores
    ``W_out = E / P`` so the fused forward is ``H_f E^T + b_out``. Raises InputError for
    ``alpha < 0`` or mismatched token counts.
    """
    if not alpha >= 0:
        raise InputError(f"the ridge strength alpha must be >= 0, got {alpha!r}")
    if target.shape[0] != x.shape[0]:
        raise InputError(f"calibration inputs and targets differ in tokens: {x.shape[0]} vs {target.shape[0]}")
    h = neuron_activations(fused, x, activation)
    y = target.double() - (0 if fused.b_out is None else fused.b_out.double())
    gram = h.T @ h
    lam = alpha * float(torch.trace(gram)) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    effective = torch.linalg.solve(gram + lam * eye + 1e-12 * eye, h.T @ y).T  # [p_out, k]
    scale = torch.ones(gram.shape[0], dtype=torch.float64) if fused.scale is None else fused.scale.double()
    return replace(fused, w_out=(effective / scale[None, :]).to(fused.w_out.dtype), low_rank={})


def calibrated_fusion(mlp: MLPWeights, k: int, x: torch.Tensor, activation, *, protect: int = 0,
                      threshold: float | None = None, refit: bool = True, alpha: float = 1e-3,
                      seed: int = 0) -> MLPWeights:
    """Data-aware MLP Fusion of ``mlp`` to width ``k`` on calibration inputs ``x`` [tokens, p].

    Protected neurons (see :func:`protected_neurons`) become singleton clusters; the others are
    grouped by :func:`weighted_kmeans` (weights = :func:`importance`) into ``k - m`` clusters and
    averaged with the same weights; ``scale`` = P = cluster sizes (1 for protected neurons, summing
    to I). With ``refit`` the output weight is :func:`ridge_refit` (stored divided by P). ``k == I``
    keeps every neuron (the original function, exactly; nothing to refit). ``stats`` records the
    protected count and the cluster-size histogram. Raises InputError when ``k`` is not in
    ``1..I``, when more neurons are protected than ``k`` allows, or for a bad ``x``.
    """
    width = mlp.width
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise InputError(f"the fused width k must be an integer between 1 and {width}, got {k!r}")
    if mlp.low_rank:
        raise InputError("calibrated fusion needs a dense MLP, not a low-rank (svd) one")
    h = neuron_activations(mlp, x, activation)
    score = importance(mlp, h)
    protected = protected_neurons(score, protect, threshold)
    if k == width:
        labels = torch.arange(width)
    else:
        if protected.numel() > k or (protected.numel() == k and k < width):
            raise InputError(f"{protected.numel()} protected neurons leave no cluster for the other "
                             f"{width - protected.numel()} at width {k}; protect fewer than {k}")
        rest = torch.ones(width, dtype=torch.bool)
        rest[protected] = False
        others = torch.nonzero(rest).flatten()
        features = mlp.neuron_features().double()
        if mlp.scale is not None:  # the output part of a sub-MLP is its effective weight
            features[:, -mlp.w_out.shape[0]:] *= mlp.scale.double()[:, None]
        sub = weighted_kmeans(features[others], score[others], k - protected.numel(), seed=seed)
        labels = torch.empty(width, dtype=torch.long)
        labels[protected] = torch.arange(protected.numel())
        labels[others] = sub + protected.numel()
    sizes = torch.bincount(labels, minlength=k).to(torch.float32)
    weights = score + score.mean() * 1e-9 + 1e-300
    prior = torch.ones(width, dtype=torch.float64) if mlp.scale is None else mlp.scale.double()
    fused = mlp.map_neurons(
        lambda t: weighted_average(t, labels, weights, k, dim=0).to(t.dtype),
        # the cluster's output weight is the weighted mean of its members' effective weights
        lambda w: weighted_average(w.double() * prior[None, :], labels, weights, k, dim=1).to(w.dtype),
    )
    fused.scale = sizes
    if k == width:
        fused = replace(fused, **{name: getattr(mlp, name) for name in ("w_in", "b_in", "w_gate", "b_gate")},
                        w_out=(mlp.w_out.double() * prior[None, :]).to(mlp.w_out.dtype))
    elif refit:
        target = h @ (mlp.w_out.double() * prior[None, :]).T
        if mlp.b_out is not None:
            target = target + mlp.b_out.double()
        fused = ridge_refit(fused, x, target, activation, alpha)
    fused.stats = {"protected": int(protected.numel()), "cluster_sizes": size_histogram(sizes),
                   "refit": bool(refit and k < width)}
    return fused


def size_histogram(sizes: torch.Tensor) -> dict[int, int]:
    """Cluster-size histogram ``{size: number of clusters of that size}`` (sizes present only, ascending)."""
    histogram = torch.bincount(sizes.round().long())
    return {int(s): int(n) for s, n in enumerate(histogram.tolist()) if n and s}


def original_output(mlp: MLPWeights, h: torch.Tensor) -> torch.Tensor:
    """The MLP's output (float64) from its neuron activations ``h`` [tokens, I]: ``h (W_out * P)^T + b_out``."""
    prior = torch.ones(mlp.width, dtype=torch.float64) if mlp.scale is None else mlp.scale.double()
    target = h @ (mlp.w_out.double() * prior[None, :]).T
    return target if mlp.b_out is None else target + mlp.b_out.double()


def calibrated_prune(mlp: MLPWeights, k: int, x: torch.Tensor, activation, *, refit: bool = True,
                     alpha: float = 1e-3) -> MLPWeights:
    """Structured pruning on calibration inputs ``x`` [tokens, p]: keep the ``k`` neurons of highest
    :func:`importance` (in their original order), then :func:`ridge_refit` the output weight.

    ``k == I`` returns the original function exactly. Raises InputError for ``k`` outside ``1..I``
    or a bad ``x``.
    """
    width = mlp.width
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise InputError(f"the pruned width k must be an integer between 1 and {width}, got {k!r}")
    h = neuron_activations(mlp, x, activation)
    score = importance(mlp, h)
    keep = torch.argsort(-score, stable=True)[:k].sort().values
    pruned = mlp.map_neurons(lambda t: t[keep].clone(), lambda w: w[:, keep].clone())
    pruned.scale = None if mlp.scale is None else mlp.scale[keep].clone()
    if refit and k < width:
        pruned = ridge_refit(pruned, x, original_output(mlp, h), activation, alpha)
    pruned.stats = {"kept_importance": float(score[keep].sum() / score.sum().clamp_min(1e-300)),
                    "refit": bool(refit and k < width)}
    return pruned


def _whitening(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with ``L L^T`` the Gram ``inputs^T inputs`` (float64), damped by 1e-6 of its mean diagonal
    so that it is positive definite even for too few tokens or dead inputs."""
    gram = inputs.double().T @ inputs.double()
    damp = 1e-6 * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    lower = torch.linalg.cholesky(gram + damp * torch.eye(gram.shape[0], dtype=torch.float64))
    return lower, torch.linalg.inv(lower)


def whitened_factors(weight: torch.Tensor, inputs: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware rank-``rank`` factors (A [r, in], B [out, r]) of ``weight`` [out, in] (float64).

    SVD-LLM style: with ``L`` the Cholesky factor of the inputs' Gram ``X^T X`` (``inputs`` = X
    [tokens, in]), ``B A`` minimises ``||X W^T - X (B A)^T||`` over rank-r matrices: the SVD of
    ``W L`` truncated to ``r``, multiplied back by ``L^-1``.
    """
    lower, inverse = _whitening(inputs)
    u, s, vh = torch.linalg.svd(weight.double() @ lower, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]) @ inverse, u[:, :rank] * root


def calibrated_svd(mlp: MLPWeights, rank: int, x: torch.Tensor, activation, *, alpha: float = 1e-3) -> MLPWeights:
    """Activation-aware truncated SVD of every projection on calibration inputs ``x`` [tokens, p].

    The input-side weights (up, gate) are factorised by :func:`whitened_factors` on ``x``; then the
    output weight is fitted on the *compressed* activations ``h'`` (ridge, as :func:`ridge_refit`)
    to the original output, and that fit is factorised on ``h'`` (reduced-rank regression). Biases
    stay. ``stats["rank"]`` holds ``rank``. Raises InputError for a bad ``x``.
    """
    h = neuron_activations(mlp, x, activation)
    target = original_output(mlp, h)
    factors, dense = {}, {}
    for name in ("w_gate", "w_in"):
        weight = getattr(mlp, name)
        if weight is not None:
            first, second = whitened_factors(weight, x, rank)
            factors[name], dense[name] = (first.to(weight.dtype), second.to(weight.dtype)), (second @ first).to(weight.dtype)
    squeezed = replace(mlp, **dense, scale=None, low_rank={})
    refit = ridge_refit(squeezed, x, target, activation, alpha)  # the output weight on h' (effective: no P)
    h_new = neuron_activations(squeezed, x, activation)
    first, second = whitened_factors(refit.w_out.double(), h_new, rank)
    factors["w_out"] = (first.to(mlp.w_out.dtype), second.to(mlp.w_out.dtype))
    dense["w_out"] = (second @ first).to(mlp.w_out.dtype)
    return replace(mlp, **dense, scale=None, stats={"rank": rank, "refit": True}, low_rank=factors)


def _check_inputs(mlp: MLPWeights, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != mlp.hidden or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"calibration inputs must be [tokens, {mlp.hidden}], got {shape}")
