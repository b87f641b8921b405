"""Data-aware MLP compression maths from calibration statistics: importance, protected neurons,
weighted k-means, ridge refit, activation-aware SVD.

Pure tensor maths on :class:`~mlpfuse.compress.mlp.MLPWeights` and calibration inputs ``x``: the hidden
states that enter this MLP (e.g. after the layer's norm), given as one [tokens, p] tensor or as a
sequence of such chunks (what ``fuse --calibration`` caches per layer). No architecture names, no
model. Every method works from **sums accumulated chunk by chunk** (float32 activations on the
compute device, float64 accumulators), so memory does not grow with the number of tokens:

1. :func:`activation_statistics`: per-neuron ``sum_t h[t, i]^2`` of the activations ``h`` [tokens, I]
   that each sub-MLP feeds its output weights (``act(x W_in^T + b_in)``; gated:
   ``act(x W_gate^T + b_gate) * (x W_in^T + b_in)``), and optionally the input Gram ``X^T X``;
2. :func:`importance` (length I): the mean squared output each sub-MLP writes,
   ``mean_t h[t, i]^2 * ||W_out[:, i]||^2`` (times ``P_i^2`` when a scale is set);
3. :func:`protected_neurons`: the ``m`` most important stay singleton clusters, unchanged: the few
   neurons that carry an LLM's massive activations must survive;
4. importance-weighted k-means (``mlpfuse.compress.kmeans.kmeans(..., weights=)``) of the other sub-MLPs'
   feature rows into the remaining ``k - m`` clusters; every cluster becomes the importance-weighted
   mean of its sub-MLPs and ``P`` holds the cluster sizes (MLP Fusion: ``sum_i f_i ~ P_c f(c)``);
5. :func:`ridge_refit`: a second chunked pass accumulates ``G = H_f^T H_f`` and ``C = H_f^T Y``
   (``H_f`` the compressed MLP's activations [tokens, k], ``Y`` the original output minus ``b_out``)
   and solves ``E = argmin ||H_f E^T - Y||^2 + lam ||E||^2`` in float64. The stored weight is
   ``E / P`` (column-wise), so **P stays a standalone constant** scale and the function is
   ``H_f (W_out * P)^T = H_f E^T``: the training-dynamics property of MLP Fusion is kept.

Steps 3-4 are the ``kmeans`` grouping. The default grouping, ``select`` (:func:`selected_fusion`),
replaces them: one pass accumulates the activation Gram ``H^T H`` (:func:`activation_gram`), an
output-aware pivoted Cholesky picks the ``k`` representatives (:func:`select_neurons`), the others
fold into the one they correlate with most (:func:`fold_assignment`), the centroid is the
representative itself and P counts the members by their least-squares coefficients; the refit
(step 5) comes from blocks of the same Gram.

``fuse --calibration`` (mlpfuse/compress/calibration.py) runs the model layer by layer and calls the
data-aware form of the chosen method with each layer's cached inputs: :func:`selected_fusion` or
:func:`calibrated_fusion` (``--grouping``) for ``fusion`` (and ``cluster``, with sqrt(P) folded and no refit), :func:`calibrated_prune` for
``prune``, :func:`calibrated_svd` for ``svd``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.errors import InputError

CHUNK_TOKENS = 4096  # rows per chunk when one [tokens, p] tensor is given
# Lloyd iterations of the importance-weighted k-means: FAISS's own default. The refit that follows
# absorbs what further iterations would move, and one iteration of an 8B-sized layer (14,336 neurons,
# 12,288 features, k = 7,168) is about 2.5 TFLOP.
KMEANS_ITERATIONS = 25


def token_chunks(x) -> list[torch.Tensor]:
    """Calibration inputs as a list of [t, p] chunks: a tensor is split into ``CHUNK_TOKENS`` rows,
    a sequence of tensors is taken as it is. Raises InputError when empty."""
    chunks = list(x.split(CHUNK_TOKENS)) if isinstance(x, torch.Tensor) else list(x)
    if not chunks:
        raise InputError("no calibration inputs: the calibration text gave no tokens")
    return chunks


def _compute_dtype(chunks: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when the inputs are float64 (the maths' own tests), else float32."""
    return torch.float64 if chunks[0].dtype == torch.float64 else torch.float32


def _on(tensor, device, dtype):
    return None if tensor is None else tensor.to(device=device, dtype=dtype)


def neuron_activations(mlp: MLPWeights, x: torch.Tensor, activation) -> torch.Tensor:
    """The sub-MLPs' activations ``h`` [tokens, I] on inputs ``x`` [tokens, p], in ``x``'s device and
    float dtype (float32 for half precisions).

    ``mlp.forward(x) == h @ (W_out * P)^T + b_out``. Raises InputError when ``x``'s width is not
    the MLP's hidden size.
    """
    _check_inputs(mlp, x)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(dtype)
    up = torch.nn.functional.linear(x, _on(mlp.w_in, x.device, dtype), _on(mlp.b_in, x.device, dtype))
    if mlp.w_gate is None:
        return activation(up)
    gate = torch.nn.functional.linear(x, _on(mlp.w_gate, x.device, dtype), _on(mlp.b_gate, x.device, dtype))
    return activation(gate) * up


@dataclass
class ActivationStatistics:
    """Sums over the calibration tokens of one MLP (float64, on the compute device).

    ``tokens``: how many; ``square_sum`` [I]: ``sum_t h[t, i]^2``; ``input_gram`` [p, p] or None:
    ``X^T X`` of the MLP's inputs.
    """

    tokens: int
    square_sum: torch.Tensor
    input_gram: torch.Tensor | None = None


def activation_statistics(mlp: MLPWeights, x, activation, *, device=None,
                          input_gram: bool = False) -> ActivationStatistics:
    """Accumulate :class:`ActivationStatistics` over the chunks of ``x`` (see :func:`token_chunks`)
    on ``device`` (None: the chunks' own). Memory: one chunk's activations [t, I] at a time."""
    chunks = token_chunks(x)
    dtype = _compute_dtype(chunks)
    device = torch.device(device) if device is not None else chunks[0].device
    tokens, square, gram = 0, torch.zeros(mlp.width, dtype=torch.float64, device=device), None
    for chunk in chunks:
        chunk = chunk.to(device=device, dtype=dtype)
        h = neuron_activations(mlp, chunk, activation)
        square += h.pow(2).sum(0, dtype=torch.float64)
        if input_gram:
            part = (chunk.T @ chunk).double()
            gram = part if gram is None else gram + part
        tokens += chunk.shape[0]
    return ActivationStatistics(tokens, square, gram)


def importance(mlp: MLPWeights, stats: ActivationStatistics) -> torch.Tensor:
    """Per-neuron importance (length I, float64, CPU): mean squared output norm each sub-MLP writes,
    ``stats.square_sum[i] / tokens * ||W_out[:, i] * P_i||^2``."""
    out_norm = mlp.w_out.double().pow(2).sum(dim=0)
    if mlp.scale is not None:
        out_norm = out_norm * mlp.scale.double().pow(2)
    return stats.square_sum.cpu() / max(stats.tokens, 1) * out_norm


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
    chosen[torch.argsort(-score.double().cpu(), stable=True)[:m]] = True
    if threshold is not None:
        chosen |= score.double().cpu() > threshold * score.double().mean().cpu()
    return torch.nonzero(chosen).flatten()


def weighted_average(tensor: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int,
                     dim: int = 0) -> torch.Tensor:
    """Weighted mean of ``tensor``'s slices along ``dim`` within each of the ``k`` clusters (float64)."""
    moved = tensor.double().movedim(dim, 0)
    w = weights.double().reshape((-1,) + (1,) * (moved.dim() - 1))
    sums = torch.zeros((k,) + moved.shape[1:], dtype=torch.float64).index_add_(0, labels, moved * w)
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, weights.double())
    return (sums / mass.reshape((k,) + (1,) * (moved.dim() - 1))).movedim(0, dim)


def _effective_out(mlp: MLPWeights) -> torch.Tensor:
    """``W_out * P`` (float64) [p_out, I]: the output weight the function uses."""
    prior = torch.ones(mlp.width, dtype=torch.float64) if mlp.scale is None else mlp.scale.double()
    return mlp.w_out.double() * prior[None, :]


@dataclass
class RefitStatistics:
    """Sums over the calibration tokens for an output refit (float64): ``gram`` = H_c^T H_c [k, k],
    ``cross`` = H_c^T y [k, p_out], ``y_square`` = sum ||y_t||^2 and ``y_sum`` = sum y_t [p_out], with
    ``H_c`` the compressed activations and ``y`` the original output minus ``b_out``."""

    gram: torch.Tensor
    cross: torch.Tensor
    y_square: float
    y_sum: torch.Tensor
    tokens: int

    def relative_error(self, effective: torch.Tensor, b_out: torch.Tensor | None) -> float:
        """``||H_c E^T - y|| / ||y + b_out||`` over the tokens, for an effective output weight ``E``
        [p_out, k], from the sums alone: ``||H E^T - y||^2 = y.y - 2 tr(E C) + tr(E G E^T)``."""
        e = effective.double().to(self.gram.device)
        diff = self.y_square - 2 * float((e * self.cross.T).sum()) + float(((e @ self.gram) * e).sum())
        bias = torch.zeros_like(self.y_sum) if b_out is None else b_out.double().to(self.y_sum.device)
        norm = self.y_square + 2 * float(bias @ self.y_sum) + self.tokens * float(bias @ bias)
        diff = max(diff, 0.0)
        return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


def refit_statistics(compressed: MLPWeights, original: MLPWeights, x, activation, *, device=None) -> RefitStatistics:
    """:class:`RefitStatistics` over the chunks of ``x``: ``H_c`` [tokens, k] the activations of
    ``compressed``'s input side, ``y`` the ``original`` MLP's output minus its ``b_out``. One chunk's
    activations of both MLPs are alive at a time."""
    chunks = token_chunks(x)
    dtype = _compute_dtype(chunks)
    device = torch.device(device) if device is not None else chunks[0].device
    out = _effective_out(original).to(device=device, dtype=dtype)
    gram = cross = y_sum = None
    y_square, tokens = 0.0, 0
    for chunk in chunks:
        chunk = chunk.to(device=device, dtype=dtype)
        h_c = neuron_activations(compressed, chunk, activation)
        y = neuron_activations(original, chunk, activation) @ out.T
        g, c, s = (h_c.T @ h_c).double(), (h_c.T @ y).double(), y.sum(0, dtype=torch.float64)
        gram, cross, y_sum = (g, c, s) if gram is None else (gram + g, cross + c, y_sum + s)
        y_square += float(y.double().pow(2).sum())
        tokens += chunk.shape[0]
    return RefitStatistics(gram, cross, y_square, y_sum, tokens)


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, alpha: float) -> torch.Tensor:
    """``E`` [p_out, k] = ``argmin ||H E^T - Y||^2 + lam ||E||^2`` from ``gram`` = H^T H [k, k] and
    ``cross`` = H^T Y [k, p_out] (float64), ``lam = alpha * trace(gram) / k`` (scale-free)."""
    k = gram.shape[0]
    lam = alpha * float(torch.trace(gram)) / k
    eye = torch.eye(k, dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram + (lam + 1e-12) * eye, cross).T


def ridge_refit(fused: MLPWeights, original: MLPWeights, x, activation, alpha: float = 1e-3, *,
                device=None) -> MLPWeights:
    """``fused`` with its output weight refitted to ``original``'s output on calibration inputs ``x``
    (a [tokens, p] tensor or chunks); P and every other tensor unchanged.

    Solves ``E = argmin ||H_f E^T - (Y - b_out)||^2 + lam ||E||^2`` (:func:`refit_statistics`,
    :func:`solve_ridge`) and stores ``W_out = E / P`` so the fused forward is ``H_f E^T + b_out``
    (P stays a standalone constant; DESIGN.md, "data-aware compression"). Raises InputError for
    ``alpha < 0`` or a bad ``x``.
    """
    if not alpha >= 0:
        raise InputError(f"the ridge strength alpha must be >= 0, got {alpha!r}")
    stats = refit_statistics(fused, original, x, activation, device=device)
    effective = solve_ridge(stats.gram, stats.cross, alpha)
    scale = torch.ones(fused.width, dtype=torch.float64) if fused.scale is None else fused.scale.double()
    refit = replace(fused, w_out=(effective.cpu() / scale[None, :]).to(fused.w_out.dtype), low_rank={})
    refit.stats = {**fused.stats, "relative_error": stats.relative_error(effective, fused.b_out)}
    return refit


def output_error(compressed: MLPWeights, original: MLPWeights, x, activation, *, device=None) -> float:
    """``||compressed(x) - original(x)|| / ||original(x)||`` over the calibration tokens (one chunked pass)."""
    stats = refit_statistics(compressed, original, x, activation, device=device)
    return stats.relative_error(_effective_out(compressed), compressed.b_out)


def importance_clusters(mlp: MLPWeights, k: int, score: torch.Tensor, protected: torch.Tensor, *, seed: int = 0,
                        backend: str = "torch", device=None, init: str | None = None) -> tuple[torch.Tensor, str]:
    """(labels (length I, int64), the k-means backend that ran): protected neurons are clusters ``0..m-1``, the others are grouped by an
    importance-weighted k-means of their feature rows (output part: the effective weight W_out * P)
    into clusters ``m..k-1`` (``mlpfuse.compress.kmeans.kmeans``, any backend and device)."""
    from mlpfuse.compress.kmeans import kmeans

    width, m = mlp.width, protected.numel()
    rest = torch.ones(width, dtype=torch.bool)
    rest[protected] = False
    others = torch.nonzero(rest).flatten()
    features = mlp.neuron_features().float()
    if mlp.scale is not None:
        features[:, -mlp.w_out.shape[0]:] *= mlp.scale.float()[:, None]
    result = kmeans(features[others], k - m, seed=seed, backend=backend, device=device, init=init,
                    weights=score[others].float(), max_iter=KMEANS_ITERATIONS)
    labels = torch.empty(width, dtype=torch.long)
    labels[protected] = torch.arange(m)
    labels[others] = result.labels + m
    return labels, result.backend


def calibrated_fusion(mlp: MLPWeights, k: int, x, activation, *, protect: int = 0,
                      threshold: float | None = None, refit: bool = True, alpha: float = 1e-3,
                      seed: int = 0, backend: str = "torch", device=None, init: str | None = None) -> MLPWeights:
    """Data-aware MLP Fusion of ``mlp`` to width ``k`` on calibration inputs ``x`` ([tokens, p] or chunks).

    Protected neurons (see :func:`protected_neurons`) become singleton clusters; the others are
    grouped by :func:`importance_clusters` into ``k - m`` clusters and averaged with their
    importance as weights; ``scale`` = P = cluster sizes (1 for protected neurons, summing to I).
    With ``refit`` the output weight is :func:`ridge_refit` (stored divided by P). ``k == I`` keeps
    every neuron (the original function, exactly; nothing to refit). ``stats`` records the
    protected count and the cluster-size histogram. ``device``: where the activations are computed
    and the k-means runs (None: the inputs' device). Raises InputError when ``k`` is not in
    ``1..I``, when more neurons are protected than ``k`` allows, or for a bad ``x``.
    """
    width = mlp.width
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise InputError(f"the fused width k must be an integer between 1 and {width}, got {k!r}")
    if mlp.low_rank:
        raise InputError("calibrated fusion needs a dense MLP, not a low-rank (svd) one")
    score = importance(mlp, activation_statistics(mlp, x, activation, device=device))
    protected = protected_neurons(score, protect, threshold)
    backend_run = None
    if k == width:
        labels = torch.arange(width)
    else:
        if protected.numel() > k or (protected.numel() == k and k < width):
            raise InputError(f"{protected.numel()} protected neurons leave no cluster for the other "
                             f"{width - protected.numel()} at width {k}; protect fewer than {k}")
        labels, backend_run = importance_clusters(mlp, k, score, protected, seed=seed, backend=backend,
                                                  device=device, init=init)
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
        fused = ridge_refit(fused, mlp, x, activation, alpha, device=device)
    error = 0.0 if k == width else (fused.stats or {}).get("relative_error")  # None without refit
    fused.stats = {"protected": int(protected.numel()), "cluster_sizes": size_histogram(sizes),
                   "refit": bool(refit and k < width), "backend": backend_run, "relative_error": error}
    return fused


@dataclass
class ActivationGram:
    """Sums over the calibration tokens of one MLP's activations ``h`` [tokens, I] (float64):
    ``gram`` = H^T H [I, I], ``column_sum`` = sum_t h_t [I], ``tokens``."""

    gram: torch.Tensor
    column_sum: torch.Tensor
    tokens: int


def activation_gram(mlp: MLPWeights, x, activation, *, device=None) -> ActivationGram:
    """:class:`ActivationGram` over the chunks of ``x`` (see :func:`token_chunks`) on ``device``
    (None: the chunks' own). Memory: one chunk's activations [t, I] plus the [I, I] sum."""
    chunks = token_chunks(x)
    dtype = _compute_dtype(chunks)
    device = torch.device(device) if device is not None else chunks[0].device
    gram = torch.zeros(mlp.width, mlp.width, dtype=torch.float64, device=device)
    column_sum = torch.zeros(mlp.width, dtype=torch.float64, device=device)
    tokens = 0
    for chunk in chunks:
        h = neuron_activations(mlp, chunk.to(device=device, dtype=dtype), activation)
        gram += (h.T @ h).double()
        column_sum += h.sum(0, dtype=torch.float64)
        tokens += chunk.shape[0]
    return ActivationGram(gram, column_sum, tokens)


def select_neurons(gram: torch.Tensor, effective_out: torch.Tensor, k: int, first: torch.Tensor | None = None,
                   alpha: float = 1e-3) -> torch.Tensor:
    """The ``k`` neurons (indices in selection order, int64) whose activations best reproduce the MLP's
    output by least squares: greedy forward selection, an output-weighted pivoted Cholesky of ``gram``.

    ``gram`` = H^T H [I, I] of the activations, ``effective_out`` = W_out * P [p_out, I], so the
    output is ``Y = H W^T``. With ``S`` the chosen set and ``R = G - G[:, S] G[S, S]^-1 G[S, :]``
    (the Schur complement: the part of every activation that ``H_S`` does not explain), the
    refitted error is ``||Y - H_S E*||^2 = tr(W R W^T)``; adding neuron ``j`` lowers it by
    ``||(R W^T)[j]||^2 / R[j, j]`` (one rank-one Cholesky step). Each step picks the largest drop,
    the denominator damped by ``lam = alpha * mean(diag G)`` (the refit's ridge, so neurons that
    the chosen ones nearly explain are not picked for noise). ``first`` (indices) are taken before
    any other, in the given order (protected neurons). Column subset selection by pivoted
    Cholesky/Nystrom as in MoDeGPT (Lin et al. 2024), here scored by the output error instead of
    ridge leverage. Cost: O(I (k + p_out)) per step, float64 on ``gram``'s device.
    Raises InputError when ``k`` is not in ``1..I``.
    """
    width = gram.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise InputError(f"the number of selected neurons must be an integer between 1 and {width}, got {k!r}")
    gram = gram.double()
    device = gram.device
    residual_diag = torch.diagonal(gram).clone()
    lam = alpha * float(residual_diag.mean().clamp_min(0)) + 1e-300
    floor = 1e-12 * float(residual_diag.max().clamp_min(1e-300))
    # T = R W^T [I, p_out] is never formed after the start: T = T0 - L V with L [I, step] the Cholesky
    # columns and V [step, p_out] the picked rows of T (each / sqrt(pivot)); only the row norms
    # ||T_i||^2 are kept, updated with matrix-vector products
    start = gram @ effective_out.double().to(device).T
    norms = start.pow(2).sum(1)
    factor = torch.zeros(k, width, dtype=torch.float64, device=device)  # rows: L^T (R = G - L L^T)
    picked = torch.zeros(k, start.shape[1], dtype=torch.float64, device=device)  # rows: V
    blocked = torch.zeros(width, dtype=torch.float64, device=device)  # -inf for the taken
    forced = [] if first is None else [int(i) for i in first.tolist()]
    chosen: list[int] = []
    for step in range(k):
        if step < len(forced):
            j = forced[step]
        else:
            gain = norms.clamp_min(0) / (residual_diag + lam) + blocked
            gain = torch.where(residual_diag > floor, gain, gain - torch.inf)
            j = int(torch.argmax(gain))
            if not bool(torch.isfinite(gain[j])):  # everything left is explained: take the largest remaining
                j = int(torch.argmax(torch.diagonal(gram) + blocked))
        pivot = float(residual_diag[j])
        if pivot > floor:
            root = pivot ** 0.5
            known, at_j = factor[:step], factor[:step, j]
            row = (start[j] - at_j @ picked[:step]) / root  # T[j] / sqrt(R[j, j])
            both = torch.stack([at_j, picked[:step] @ row]) @ known  # one pass over L: [L L[j], L V row]
            column = (gram[j] - both[0]) / root  # R[:, j] / sqrt(R[j, j])
            dots = start @ row - both[1]  # T_i . row
            norms -= column * (2 * dots - column * float(row @ row))  # ||T_i - column_i row||^2
            factor[step], picked[step] = column, row
            residual_diag -= column.pow(2)
        residual_diag[j] = 0.0
        blocked[j] = -torch.inf
        chosen.append(j)
    return torch.tensor(chosen, dtype=torch.long)


def fold_assignment(gram: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (length I, int64): each neuron's cluster, coefficients (length I, float64)).

    Kept neuron ``kept[c]`` is cluster ``c`` with coefficient 1; every other neuron joins the kept
    neuron whose activations it correlates with most, ``|G[j, s]| / sqrt(G[j, j] G[s, s])``
    (uncentred, on the calibration tokens; ties to the lower cluster), with the least-squares
    coefficient ``a_j = G[j, s] / G[s, s]`` of ``h_j ~ a_j h_s`` (0 for a dead neuron)."""
    gram = gram.double()
    width, kept = gram.shape[0], kept.to(gram.device)
    diag = torch.diagonal(gram).clamp_min(1e-300)
    cross = gram[:, kept]  # [I, k]
    corr = cross.abs() / (diag[:, None] * diag[kept][None, :]).sqrt()
    labels = torch.argmax(corr, dim=1)
    coefficient = cross.gather(1, labels[:, None]).squeeze(1) / diag[kept][labels]
    labels[kept] = torch.arange(kept.numel(), device=gram.device)
    coefficient[kept] = 1.0
    return labels.cpu(), coefficient.cpu()


def selected_fusion(mlp: MLPWeights, k: int, x, activation, *, protect: int = 0, threshold: float | None = None,
                    refit: bool = True, alpha: float = 1e-3, device=None, p_from: str = "coefficients") -> MLPWeights:
    """Data-aware MLP Fusion by selection: fusion's P over pruning's basis (see :func:`calibrated_fusion`).

    1. ``k`` representative neurons by :func:`select_neurons` on the activation Gram (the protected
       ones first: :func:`protected_neurons` of :func:`importance`);
    2. every other neuron joins the representative it correlates with most (:func:`fold_assignment`):
       clusters whose centroid is the representative itself (its input-side weights unchanged,
       the medoid). ``scale`` = P, a standalone constant: with ``p_from="coefficients"`` (default)
       ``P_c = sum_members |a_j|`` (``a_j`` the least-squares coefficient of ``h_j ~ a_j h_c``, 1
       for the representative): how many copies of the representative its members amount to, the
       cluster size when they are copies. That is the count the Adam NTK sees: a member's
       output-weight kernel term ``h_j(x) g(x) sign(h_j(z) g(z))`` is ``|a_j|`` times the
       representative's (MLP Fusion's argument, Wei et al. 2023, App. A.3, for members that are
       scaled copies). ``p_from="members"``: the plain member counts (integers summing to I),
       which overweights the many weakly correlated members (measured on SmolLM2, docs/llm.md);
    3. the cluster's effective output weight is the fold ``sum_members a_j W_out[:, j] P_j``
       (stored divided by P) or, with ``refit``, the ridge refit of the output weight on the
       calibration tokens, from the same Gram (``H_f = H[:, kept]``: no second pass), stored
       divided by P so P stays a standalone constant.

    Exact cases: ``k == I`` (P = 1, the original); neurons repeated ``r`` times fused to the number
    of distinct ones (the copies fold into one representative with coefficient 1 and P = r, either
    way). Raises InputError as :func:`calibrated_fusion`, and for an unknown ``p_from``.
    """
    width = mlp.width
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise InputError(f"the fused width k must be an integer between 1 and {width}, got {k!r}")
    if mlp.low_rank:
        raise InputError("calibrated fusion needs a dense MLP, not a low-rank (svd) one")
    stats = activation_gram(mlp, x, activation, device=device)
    prior = torch.ones(width, dtype=torch.float64) if mlp.scale is None else mlp.scale.double()
    effective = mlp.w_out.double() * prior[None, :]
    score = torch.diagonal(stats.gram).cpu() / max(stats.tokens, 1) * effective.pow(2).sum(0)
    protected = protected_neurons(score, protect, threshold)
    if protected.numel() > k or (protected.numel() == k and k < width):
        raise InputError(f"{protected.numel()} protected neurons leave no cluster for the other "
                         f"{width - protected.numel()} at width {k}; protect fewer than {k}")
    if k == width:
        kept = torch.arange(width)
    else:
        first = protected[torch.argsort(-score[protected], stable=True)]
        kept = select_neurons(stats.gram, effective, k, first=first, alpha=alpha).sort().values
    labels, coefficient = fold_assignment(stats.gram, kept)
    if p_from == "members":
        sizes = torch.bincount(labels, minlength=k).to(torch.float64)
    elif p_from == "coefficients":  # how many copies of the representative the members amount to
        sizes = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, coefficient.abs())
    else:
        raise InputError(f"p_from must be 'coefficients' or 'members', got {p_from!r}")
    folded = torch.zeros(effective.shape[0], k, dtype=torch.float64).index_add_(
        1, labels, effective * coefficient[None, :])
    fused = mlp.map_neurons(lambda t: t[kept].clone(), lambda w: w[:, kept].clone())
    error = 0.0
    if k < width:  # H_f = H[:, kept]: the refit's sums are blocks of the Gram
        gram, kept_d = stats.gram, kept.to(stats.gram.device)
        eff_d = effective.to(gram.device)
        sums = RefitStatistics(gram=gram[kept_d][:, kept_d], cross=gram[kept_d] @ eff_d.T,
                               y_square=float(((eff_d @ gram) * eff_d).sum()), y_sum=eff_d @ stats.column_sum,
                               tokens=stats.tokens)
        if refit:
            folded = solve_ridge(sums.gram, sums.cross, alpha).cpu()
        error = sums.relative_error(folded, mlp.b_out)
    fused.w_out = (folded / sizes[None, :]).to(mlp.w_out.dtype)
    fused.scale = sizes.to(torch.float32)
    fused.stats = {"protected": int(protected.numel()), "cluster_sizes": size_histogram(torch.bincount(labels, minlength=k)),
                   "refit": bool(refit and k < width), "backend": None, "relative_error": error,
                   "grouping": "select"}
    return fused


def size_histogram(sizes: torch.Tensor) -> dict[int, int]:
    """Cluster-size histogram ``{size: number of clusters of that size}`` (sizes present only, ascending)."""
    histogram = torch.bincount(sizes.round().long())
    return {int(s): int(n) for s, n in enumerate(histogram.tolist()) if n and s}


def calibrated_prune(mlp: MLPWeights, k: int, x, activation, *, refit: bool = True,
                     alpha: float = 1e-3, device=None) -> MLPWeights:
    """Structured pruning on calibration inputs ``x`` ([tokens, p] or chunks): keep the ``k`` neurons
    of highest :func:`importance` (in their original order), then :func:`ridge_refit` the output weight.

    ``k == I`` returns the original function exactly. Raises InputError for ``k`` outside ``1..I``
    or a bad ``x``.
    """
    width = mlp.width
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise InputError(f"the pruned width k must be an integer between 1 and {width}, got {k!r}")
    score = importance(mlp, activation_statistics(mlp, x, activation, device=device))
    keep = torch.argsort(-score, stable=True)[:k].sort().values
    pruned = mlp.map_neurons(lambda t: t[keep].clone(), lambda w: w[:, keep].clone())
    pruned.scale = None if mlp.scale is None else mlp.scale[keep].clone()
    if refit and k < width:
        pruned = ridge_refit(pruned, mlp, x, activation, alpha, device=device)
        error = pruned.stats["relative_error"]
    else:
        error = 0.0 if k == width else output_error(pruned, mlp, x, activation, device=device)
    pruned.stats = {"kept_importance": float(score[keep].sum() / score.sum().clamp_min(1e-300)),
                    "refit": bool(refit and k < width), "relative_error": error}
    return pruned


def _whitening(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with ``L L^T`` = ``gram`` (float64), damped by 1e-6 of its mean diagonal so that it is
    positive definite even for too few tokens or dead inputs."""
    gram = gram.double()
    damp = 1e-6 * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    lower = torch.linalg.cholesky(gram + damp * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device))
    return lower, torch.linalg.solve_triangular(lower, torch.eye(gram.shape[0], dtype=torch.float64,
                                                                   device=gram.device), upper=False)


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware rank-``rank`` factors (A [r, in], B [out, r]) of ``weight`` [out, in] (float64, CPU).

    SVD-LLM style (Wang et al. 2024): with ``L`` the Cholesky factor of the inputs' Gram ``gram`` =
    ``X^T X`` [in, in], ``B A`` minimises ``||X W^T - X (B A)^T||`` over rank-r matrices: the SVD of
    ``W L`` truncated to ``r``, multiplied back by ``L^-1``.
    """
    lower, inverse = _whitening(gram)
    u, s, vh = torch.linalg.svd(weight.double().to(lower.device) @ lower, full_matrices=False)
    root = s[:rank].sqrt()
    return ((root[:, None] * vh[:rank]) @ inverse).cpu(), (u[:, :rank] * root).cpu()


def calibrated_svd(mlp: MLPWeights, rank: int, x, activation, *, alpha: float = 1e-3, device=None) -> MLPWeights:
    """Activation-aware truncated SVD of every projection on calibration inputs ``x`` ([tokens, p] or chunks).

    The input-side weights (up, gate) are factorised by :func:`whitened_factors` on the inputs'
    Gram; then the output weight is fitted on the *compressed* activations ``h'`` (ridge, as
    :func:`ridge_refit`) to the original output, and that fit is factorised on ``h'``'s Gram
    (reduced-rank regression). Biases stay. ``stats["rank"]`` holds ``rank``. Raises InputError for
    a bad ``x``.
    """
    stats = activation_statistics(mlp, x, activation, device=device, input_gram=True)
    factors, dense = {}, {}
    for name in ("w_gate", "w_in"):
        weight = getattr(mlp, name)
        if weight is not None:
            first, second = whitened_factors(weight, stats.input_gram, rank)
            factors[name], dense[name] = (first.to(weight.dtype), second.to(weight.dtype)), (second @ first).to(weight.dtype)
    squeezed = replace(mlp, **dense, scale=None, low_rank={})
    stats = refit_statistics(squeezed, mlp, x, activation, device=device)
    effective = solve_ridge(stats.gram, stats.cross, alpha)  # the output weight on h' (effective: no P)
    first, second = whitened_factors(effective, stats.gram, rank)
    factors["w_out"] = (first.to(mlp.w_out.dtype), second.to(mlp.w_out.dtype))
    dense["w_out"] = (second @ first).to(mlp.w_out.dtype)
    error = stats.relative_error(second.double() @ first.double(), mlp.b_out)
    return replace(mlp, **dense, scale=None, stats={"rank": rank, "refit": True, "relative_error": error},
                   low_rank=factors)


def _check_inputs(mlp: MLPWeights, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != mlp.hidden or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"calibration inputs must be [tokens, {mlp.hidden}], got {shape}")
