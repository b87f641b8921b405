"""A fused copy for ``bench --shape``: MLP Fusion, or the cheap round-robin assignment with the same shapes.

Round-robin: neuron i joins cluster i mod k, then the cluster averages and the P buffer exactly as
in MLP Fusion (``methods/fusion.py``), so the modules, shapes and P are those of a real fusion
without the k-means cost. Timing does not depend on the values.
"""

from __future__ import annotations

import torch


def fuse_in_memory(model: torch.nn.Module, layers: str, dim: int, assign: str = "round-robin", seed: int = 0) -> None:
    """Fuse ``model``'s MLPs in place: real MLP Fusion (``kmeans``) or the cheap ``round-robin`` assignment."""
    from .fuse import FuseSettings, fuse_model

    if assign == "kmeans":
        fuse_model(model, FuseSettings(layers=layers, dim=dim, seed=seed))
        return
    from .arch import lookup, resolve_sites
    from .arch.io import module_specs, read_mlp, tensor_names, write_mlp
    from .methods.fusion import cluster_average
    from .plan import plan_layers
    from .remote.modeling_mlpfuse import apply_fusion_layout

    base = model.base_model
    state = {k: v.detach() for k, v in base.state_dict().items()}
    sites = resolve_sites(lookup(model.config.model_type), model.config.to_dict())
    mlps = {site.index: read_mlp(site, tensor_names(site, "", state), state.__getitem__) for site in sites}
    plans = plan_layers(sites, {i: mlp.width for i, mlp in mlps.items()}, layers, dim, None)
    for plan in plans:
        mlp, k = mlps[plan.site.index], plan.width
        labels = torch.arange(plan.original_width) % k
        fused = mlp.map_neurons(lambda t: cluster_average(t, labels, k, 0), lambda w: cluster_average(w, labels, k, 1))
        fused.scale = torch.bincount(labels, minlength=k).float()
        apply_fusion_layout(base, module_specs(plan.site, fused))
        base.load_state_dict(write_mlp(plan.site, fused, "", mlp.w_in.dtype), strict=False)
