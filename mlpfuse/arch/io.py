"""Moving one MLP between named tensors (checkpoint layout) and the standard ``MLPWeights`` form."""

from __future__ import annotations

from typing import Callable

import torch

from ..format import LOW_RANK_MODULE as LOW_RANK  # module type of a projection stored as two factors
from ..format import SCALE_BUFFER, SCALE_DTYPE  # P: float32 in every output dtype
from ..mlp import MLPWeights
from .spec import CONV1D, MLPSite

# MLPWeights fields (weight, bias) held by each projection role.
ROLE_FIELDS = {"up": ("w_in", "b_in"), "gate": ("w_gate", "b_gate"), "down": ("w_out", "b_out")}


def _weight_to_standard(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight.T if layout == CONV1D else weight


def tensor_names(site: MLPSite, prefix: str, keys) -> dict[str, str]:
    """Checkpoint names of this site's tensors, by field of ``MLPWeights`` (biases only if present)."""
    names = {}
    for role in site.roles:
        weight_field, bias_field = ROLE_FIELDS[role]
        base = f"{prefix}{site.module_path(role)}"
        names[weight_field] = f"{base}.weight"
        if f"{base}.bias" in keys:
            names[bias_field] = f"{base}.bias"
    return names


def read_mlp(site: MLPSite, names: dict[str, str], get: Callable[[str], torch.Tensor]) -> MLPWeights:
    """Gather one site's tensors into the standard form (transposing Conv1D weights)."""
    values = {}
    for field_name, key in names.items():
        tensor = get(key)
        values[field_name] = _weight_to_standard(tensor, site.layout) if field_name.startswith("w_") else tensor
    return MLPWeights(**values)


def write_mlp(site: MLPSite, mlp: MLPWeights, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Named tensors of a compressed MLP in the checkpoint's layout, cast to ``dtype``."""
    out = {}
    for role in site.roles:
        weight_field, bias_field = ROLE_FIELDS[role]
        base = f"{prefix}{site.module_path(role)}"
        bias = getattr(mlp, bias_field)
        if weight_field in mlp.low_rank:  # LowRankLinear (svd): factors as nn.Linear weights, any layout
            first, second = mlp.low_rank[weight_field]
            out[f"{base}.lowrank_a.weight"] = first.to(dtype).contiguous()
            out[f"{base}.lowrank_b.weight"] = second.to(dtype).contiguous()
            if bias is not None:
                out[f"{base}.lowrank_b.bias"] = bias.to(dtype).contiguous()
            continue
        weight = getattr(mlp, weight_field)
        weight = weight.T if site.layout == CONV1D else weight
        out[f"{base}.weight"] = weight.to(dtype).contiguous()
        if bias is not None:
            out[f"{base}.bias"] = bias.to(dtype).contiguous()
    if mlp.scale is not None:
        out[f"{prefix}{site.module_path('down')}.{SCALE_BUFFER}"] = mlp.scale.to(SCALE_DTYPE).contiguous()  # P exact
    return out


def module_specs(site: MLPSite, mlp: MLPWeights) -> list[dict]:
    """Entries of the checkpoint's ``mlpfuse.modules`` list that rebuild this site's modules."""
    k, p = mlp.width, mlp.hidden
    specs = []
    for role in site.roles:
        weight_field, bias_field = ROLE_FIELDS[role]
        is_down = role == "down"
        specs.append({
            "path": site.module_path(role),
            "type": site.layout,
            "in_features": k if is_down else p,
            "out_features": p if is_down else k,
            "bias": getattr(mlp, bias_field) is not None,
            "scaled": bool(is_down and mlp.scale is not None),
        })
        if weight_field in mlp.low_rank:
            specs[-1].update(type=LOW_RANK, rank=int(mlp.low_rank[weight_field][0].shape[0]))
    return specs
