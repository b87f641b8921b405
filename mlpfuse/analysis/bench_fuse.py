"""A fused copy for ``bench --shape``: MLP Fusion, or the cheap round-robin assignment with the same shapes.

Both go through the fuse pipeline (``fuse.fuse_model``); round-robin only replaces the k-means
clustering (neuron i joins cluster i mod k), so the modules, shapes and P are those of a real
fusion without the k-means cost. Timing does not depend on the values.
"""

from __future__ import annotations

import torch


def fuse_in_memory(model: torch.nn.Module, layers: str, dim: int, assign: str = "round-robin", seed: int = 0) -> None:
    """Fuse ``model``'s MLPs in place with MLP Fusion through the fuse pipeline
    (:func:`mlpfuse.compress.fuse.fuse_model`): its k-means (``kmeans``), or the cheap ``round-robin``
    assignment (:func:`round_robin`) as the clustering."""
    from mlpfuse.compress.fuse import FuseSettings, fuse_model

    settings = FuseSettings(layers=layers, dim=dim, seed=seed, method="fusion")
    if assign == "kmeans":
        fuse_model(model, settings)
    else:
        settings.backend = "torch"  # no k-means runs: nothing to probe for
        fuse_model(model, settings, clustering=round_robin)


def round_robin(plan):
    """Neuron i joins cluster i mod k (k = ``plan.width``): MLP Fusion's shapes and P buffers without
    the k-means cost. A :class:`~mlpfuse.compress.kmeans.KMeansResult` without centroids (the method averages
    the members itself); inertia None: not measured."""
    from mlpfuse.compress.kmeans import KMeansResult

    labels = torch.arange(plan.original_width) % plan.width
    return KMeansResult(labels=labels, centroids=None, inertia=None, seconds=0.0, backend="round-robin", iterations=0)
