"""``fuse_model``: the fuse pipeline applied in place to a transformers model held in memory (data-free).

Used by ntk-check, bench, tune and the tests; the same planning (mlpfuse/compress/plan.py) and per-site
compression (:func:`mlpfuse.compress.fuse_layers.fuse_layer`) as ``fuse``, with the model's own state as
the source and its modules swapped for the fused ones instead of a checkpoint written.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from mlpfuse.arch import lookup, resolve_sites
from mlpfuse.arch.moe import site_widths
from mlpfuse.checkpoints.format import memory_section
from mlpfuse.compress.fuse_layers import fuse_layer
from mlpfuse.compress.fuse_moe import expert_parameter_count
from mlpfuse.compress.fuse_plan import check_plans
from mlpfuse.compress.fuse_report import FuseReport, expert_share
from mlpfuse.compress.kmeans import resolve_backend
from mlpfuse.compress.plan import LayerPlan, plan_layers
from mlpfuse.errors import InputError
from mlpfuse.methods import MethodOptions, get_method
from mlpfuse.remote.modeling_mlpfuse import apply_fusion_layout, fused_model_class


def fuse_model(model: torch.nn.Module, settings, clustering: Callable[[LayerPlan], object] | None = None) -> FuseReport:
    """Fuse the chosen MLPs of an in-memory transformers model in place; returns the report.

    ``settings``: a :class:`mlpfuse.compress.fuse.FuseSettings`. The model's class becomes the fused subclass
    of its own class, so ``save_pretrained`` writes an mlpfuse checkpoint and ``mlpfuse.load`` reads it
    back. ``clustering``: for a method that clusters (its declaration's ``clusters``), a function
    from a dense site's plan to the :class:`~mlpfuse.compress.kmeans.KMeansResult` to use instead of k-means
    (``labels`` of length ``plan.original_width`` in ``0..plan.width-1``; bench's round-robin
    assignment); Mixture-of-Experts sites run their own k-means. Data-free only:
    ``settings.calibration`` raises InputError (the calibration pass streams a checkpoint:
    :func:`mlpfuse.compress.fuse.fuse_checkpoint`); a ``clustering`` for a method that does not cluster
    raises ValueError.
    """
    if settings.calibration is not None:
        raise InputError("calibration runs on a checkpoint: use fuse_checkpoint (mlpfuse fuse --calibration)")
    if clustering is not None and not get_method(settings.method).clusters:
        raise ValueError(f"method {settings.method!r} does not cluster: it takes no clustering")
    config = model.config.to_dict()
    spec = lookup(config.get("model_type"))
    base = model.base_model
    state = base.state_dict()
    keys = set(state)
    sites = resolve_sites(spec, config)
    widths = site_widths(sites, lambda k: tuple(state[k].shape), "", keys)
    plans = plan_layers(sites, widths, settings.layers, settings.dim, settings.ratio,
                        settings.per_layer, settings.allow_full_width, settings.multiple_of)
    check_plans(settings, plans)
    backend = resolve_backend(settings.backend, settings.device)
    options = MethodOptions(seed=settings.seed, backend=settings.backend, device=settings.device,
                            kmeans_init=settings.kmeans_init)
    params_before = sum(p.numel() for p in model.parameters())
    layers, modules = [], []
    for plan in plans:
        site_options = options if clustering is None or plan.site.experts else replace(options, clustering=clustering(plan))
        layer = fuse_layer(plan, settings, site_options, "", keys, lambda k: state[k].detach(), None)
        apply_fusion_layout(base, layer.specs)
        loaded = base.load_state_dict(layer.tensors, strict=False)
        if loaded.unexpected_keys:
            raise RuntimeError(f"fused tensors did not match the new modules: {loaded.unexpected_keys}")
        modules.extend(layer.specs)
        layers.append(layer.report)
    report = FuseReport(
        source=getattr(model.config, "_name_or_path", "") or "<in-memory>", source_path="", output=None,
        model_type=config["model_type"], method=settings.method, seed=settings.seed, backend=backend,
        layers=layers, parameters={"before": params_before, "after": sum(p.numel() for p in model.parameters())},
    )
    if any(site.experts for site in sites):
        in_experts = expert_parameter_count(sites, "", keys, lambda k: tuple(state[k].shape))
        saved = params_before - report.parameters["after"]
        report.parameters.update(expert_share(in_experts, saved, params_before))
    model.config.mlpfuse = memory_section(getattr(model.config, "mlpfuse", None) or {}, method=settings.method,
                                          seed=settings.seed, backend=backend, layers=layers, modules=modules)
    model.__class__ = fused_model_class(type(model))  # also registers what the class can record
    return report
