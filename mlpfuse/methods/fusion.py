"""MLP Fusion and its clustering baseline (Wei et al., ICML 2023, Sec. 4).

Both cluster the sub-MLPs with k-means and average each cluster (``C_bar``). ``fusion`` keeps the
cluster sizes ``P`` as a constant scale applied to the output weight, so the backward pass
carries P and the Adam NTK stays close to the original. ``cluster`` folds ``sqrt(P)`` into the
input and output layers instead: a similar output, a different NTK.

Declared in ``catalog.BUILTIN`` (help line, layouts, report fields, what the calibrated forms do);
registered here with their data-free and calibrated forms.
"""

from __future__ import annotations

import time

import torch

from mlpfuse.compress.kmeans import kmeans
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, register
from mlpfuse.methods.calibrated import calibrated_fusion, output_error, selected_fusion, size_histogram


def cluster_average(tensor: torch.Tensor, labels: torch.Tensor, k: int, dim: int = 0) -> torch.Tensor:
    """Mean of ``tensor``'s slices along ``dim`` within each cluster (``C_bar`` applied).

    Sums exact for repeated neurons: float32 for 16-bit inputs (8-11 significant bits, so a sum of
    up to 2**13 copies is exact and any rounding is far below the output's), float64 otherwise.
    One contiguous conversion of the input and ``index_put_(accumulate=True)`` (several times
    faster than ``index_add_`` on CPU, summing in the same order).
    """
    acc = torch.float32 if tensor.element_size() <= 2 and tensor.is_floating_point() else torch.float64
    moved = tensor.movedim(dim, 0).to(dtype=acc, memory_format=torch.contiguous_format)
    labels = labels.to(moved.device)
    sums = torch.zeros((k,) + moved.shape[1:], dtype=acc, device=moved.device)
    sums.index_put_((labels,), moved, accumulate=True)
    counts = torch.bincount(labels, minlength=k).to(acc).reshape((k,) + (1,) * (moved.dim() - 1))
    return sums.div_(counts).to(tensor.dtype).movedim(0, dim)


def _from_centroids(mlp: MLPWeights, centroids, k: int) -> MLPWeights | None:
    """The averaged MLP read off k-means' centroids (the exact float64 member means of the neuron
    features, stored as float32), split back into weights; None when they cannot stand in for
    :func:`cluster_average` (float64 weights, or centroids of another shape)."""
    parts = [t for t in (mlp.w_gate, mlp.b_gate, mlp.w_in, mlp.b_in, mlp.w_out) if t is not None]
    width = sum(1 if t.dim() == 1 else t.shape[1] for t in parts[:-1]) + mlp.w_out.shape[0]
    if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (k, width) \
            or any(t.dtype == torch.float64 for t in parts):
        return None
    fields, start = {}, 0
    for name in ("w_gate", "b_gate", "w_in", "b_in"):
        t = getattr(mlp, name)
        if t is None:
            continue
        size = 1 if t.dim() == 1 else t.shape[1]
        block = centroids[:, start:start + size]
        fields[name] = (block[:, 0] if t.dim() == 1 else block).to(t.device, t.dtype)
        start += size
    fields["w_out"] = centroids[:, start:].T.to(mlp.w_out.device, mlp.w_out.dtype)
    return MLPWeights(w_in=fields["w_in"], w_out=fields["w_out"], b_in=fields.get("b_in"),
                      w_gate=fields.get("w_gate"), b_gate=fields.get("b_gate"), b_out=mlp.b_out)


def centroid_mlp(mlp: MLPWeights, k: int, options: MethodOptions) -> tuple[MLPWeights, torch.Tensor]:
    """Cluster the sub-MLPs and return the averaged (k-wide) MLP and the cluster sizes P."""
    result = options.clustering or kmeans(mlp.neuron_features(), k, seed=options.seed, backend=options.backend,
                                          device=options.device, init=options.kmeans_init)
    labels = result.labels
    averaged = _from_centroids(mlp, result.centroids, k)
    if averaged is None:
        averaged = mlp.map_neurons(
            lambda t: cluster_average(t, labels, k, dim=0),
            lambda w: cluster_average(w, labels, k, dim=1),
        )
    averaged.stats = {
        "inertia": result.inertia,
        "kmeans_seconds": result.seconds,
        "backend": result.backend,
        "iterations": result.iterations,
    }
    sizes = torch.bincount(labels, minlength=k).to(torch.float32)
    averaged.stats["cluster_sizes"] = size_histogram(sizes)
    return averaged, sizes


def _data_aware(mlp: MLPWeights, k: int, options: MethodOptions, refit: bool) -> MLPWeights:
    """Calibrated fusion (``calibration.grouping``: selected representatives or importance-weighted
    k-means; protected neurons; ridge refit with ``refit``)."""
    calibration = options.calibration
    start = time.perf_counter()
    if calibration.grouping == "select":
        fused = selected_fusion(mlp, k, calibration.inputs, calibration.activation,
                                protect=calibration.protected_count(k, mlp.width), refit=refit,
                                alpha=calibration.ridge, device=calibration.device)
        fused.stats.update(kmeans_seconds=time.perf_counter() - start)
        return fused
    fused = calibrated_fusion(mlp, k, calibration.inputs, calibration.activation,
                              protect=calibration.protected_count(k, mlp.width), refit=refit,
                              alpha=calibration.ridge, seed=options.seed, backend=options.backend,
                              device=calibration.device, init=options.kmeans_init)
    fused.stats.update(kmeans_seconds=time.perf_counter() - start)
    return fused


def calibrated_fusion_form(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Calibrated fusion: ``_data_aware`` with the ridge refit (``fuse --calibration``)."""
    return _data_aware(mlp, k, options, refit=True)


@register("fusion", calibrated=calibrated_fusion_form)
def fusion(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """MLP Fusion: centroids plus the standalone constant scale P."""
    fused, sizes = centroid_mlp(mlp, k, options)
    fused.scale = sizes
    return fused


def _fold_root(fused: MLPWeights, sizes: torch.Tensor) -> MLPWeights:
    """``fused`` with sqrt(P) folded into its input and output layers (in place; no scale left)."""
    root = sizes.sqrt()
    fused.scale = None
    fused.w_in = fused.w_in * root[:, None].to(fused.w_in.dtype)
    if fused.b_in is not None:
        fused.b_in = fused.b_in * root.to(fused.b_in.dtype)
    fused.w_out = fused.w_out * root[None, :].to(fused.w_out.dtype)
    return fused


def calibrated_cluster_form(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """The importance-weighted clustering of calibrated fusion (protected neurons included), no
    refit, sqrt(P) folded in as :func:`cluster` does; reports the folded MLP's own error."""
    calibration = options.calibration
    fused = _data_aware(mlp, k, options, refit=False)
    fused = _fold_root(fused, fused.scale)
    if k < mlp.width:  # the folded MLP's own error on the calibration tokens
        fused.stats["relative_error"] = output_error(fused, mlp, calibration.inputs, calibration.activation,
                                                     device=calibration.device)
    return fused


@register("cluster", calibrated=calibrated_cluster_form)
def cluster(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Clustering baseline: centroids with sqrt(P) folded into the input and output layers."""
    fused, sizes = centroid_mlp(mlp, k, options)
    return _fold_root(fused, sizes)
