"""Parameters and FLOPs per token of a transformers model, with the MLP share split out.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of one
sequence, with scaled-dot-product attention forced to its math backend so that the attention
matmuls are counted on every device. Only matrix products count (2 FLOPs per multiply-add);
element-wise work (activations, norms, softmax, the fused scale ``W * P``) does not. For a
BERT/RoBERTa encoder of L layers, hidden h, sequence s and MLP width w_l in layer l, that gives,
per token of the forward pass::

    total = sum_l (8 h^2 + 4 h w_l + 4 s h) + 2 h^2 / s      (the last term: the pooler, once per sequence)
    mlp   = sum_l 4 h w_l                                     (gated MLPs: 6 h w_l)

A training step costs about 3x the forward (the backward pass does two products per forward
product), so the ratio fused/original is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mlpfuse.arch import MLPSite, lookup, resolve_sites
from mlpfuse.arch.io import module_paths, module_width
from mlpfuse.errors import InputError


@dataclass
class ModelCounts:
    """Counts for one model: trainable parameters and forward FLOPs per token."""

    parameters: int
    mlp_parameters: int | None
    flops_per_token: float
    mlp_flops_per_token: float | None
    mlp_widths: list[int] | None


def mlp_sites(model: torch.nn.Module) -> list[MLPSite] | None:
    """The MLP sites of ``model``'s architecture (None when the registry does not know it)."""
    try:
        spec = lookup(model.config.model_type)
    except InputError:
        return None
    return resolve_sites(spec, model.config.to_dict())


def _site_modules(model: torch.nn.Module, sites: list[MLPSite]) -> dict[str, torch.nn.Module]:
    base = model.base_model
    return {path: base.get_submodule(path) for site in sites for path in module_paths(site)}


def _eager_experts(model: torch.nn.Module) -> str | None:
    """Switch stacked MoE experts to their eager forward (grouped-matmul kernels escape the FLOP counter).

    Returns the implementation to restore, or None when the model has no switchable experts.
    """
    current = getattr(model.config, "_experts_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_experts_implementation"):
        return None
    model.set_experts_implementation("eager")
    return current


def count_model(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ModelCounts:
    """Parameters and forward FLOPs per token of ``model`` on ``batch`` (one sequence is enough)."""
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sites = mlp_sites(model)
    modules = _site_modules(model, sites) if sites else {}
    tokens = batch["input_ids"].numel()
    was_training = model.training
    model.eval()
    experts = _eager_experts(model)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(**batch)
    finally:
        model.train(was_training)
        if experts is not None:
            model.set_experts_implementation(experts)
    total = counter.get_total_flops() / tokens
    if not sites:
        return ModelCounts(parameters, None, total, None, None)
    by_module = counter.get_flop_counts()
    mlp_flops = 0
    for path in modules:
        key = next((k for k in by_module if k.endswith("." + path)), None)
        mlp_flops += sum(by_module[key].values()) if key else 0
    mlp_params = sum(p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad)
    widths = [module_width(model.base_model, site) for site in sites]
    return ModelCounts(parameters, mlp_params, total, mlp_flops / tokens, widths)

