"""The one home of tensor layouts: reading, writing and width of every MLP layout.

Layouts: ``nn.Linear`` ([out, in]), GPT-2 ``Conv1D`` ([in, out]), a packed ``gate_up`` module
([2I, H] = [gate; up], Phi-3), stacked experts (transformers v5 MoE: ``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) and per-expert modules (each one a dense site). Everything else
(fuse, merge-layers, ntk-check, flops, MoE) moves tensors through these functions, to and from the
standard ``MLPWeights`` form, and asks them for widths.
"""

from __future__ import annotations

from typing import Callable

import torch

from mlpfuse.arch.spec import CONV1D, MLPSite
from mlpfuse.checkpoints.format import LOW_RANK_MODULE as LOW_RANK  # module type of a projection stored as two factors
from mlpfuse.checkpoints.format import SCALE_BUFFER, SCALE_DTYPE  # P: float32 in every output dtype
from mlpfuse.compress.mlp import MLPWeights

STACKED = ("gate_up_proj", "down_proj")  # tensor names of stacked experts under their module

# MLPWeights fields (weight, bias) held by each projection role.
ROLE_FIELDS = {"up": ("w_in", "b_in"), "gate": ("w_gate", "b_gate"), "down": ("w_out", "b_out")}


def _weight_to_standard(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight.T if layout == CONV1D else weight


def _weight_to_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight.T if layout == CONV1D else weight


def tensor_names(site: MLPSite, prefix: str, keys) -> dict[str, str]:
    """Checkpoint names of this site's tensors, by field of ``MLPWeights`` (biases only if present).

    Fields held by one packed module (``w_gate`` and ``w_in`` of a ``gate_up_proj``) name the same tensor.
    """
    names = {}
    for module in site.modules:
        base = f"{prefix}{module.path}"
        for role in module.roles:
            weight_field, bias_field = ROLE_FIELDS[role]
            names[weight_field] = f"{base}.weight"
            if f"{base}.bias" in keys:
                names[bias_field] = f"{base}.bias"
    return names


def read_mlp(site: MLPSite, names: dict[str, str], get: Callable[[str], torch.Tensor]) -> MLPWeights:
    """Gather one site's tensors into the standard form.

    Conv1D weights ([in, out]) are transposed; a packed ``[gate; up]`` tensor is split in two halves
    along the neuron dimension. Raises ``KeyError`` (from ``get``) for a missing tensor.
    """
    values = {}
    for module in site.modules:
        for kind in (0, 1):  # weight, bias
            fields = [ROLE_FIELDS[role][kind] for role in module.roles]
            if fields[0] not in names:
                continue
            tensor = get(names[fields[0]])
            if kind == 0:
                tensor = _weight_to_standard(tensor, module.layout)
            parts = tensor.chunk(len(fields), 0) if module.packed else (tensor,)
            values.update(zip(fields, parts))
    return MLPWeights(**values)


def site_width(site: MLPSite, names: dict[str, str], shape_of: Callable[[str], tuple]) -> int:
    """Intermediate width of a dense site from its tensors' shapes (``names``: see :func:`tensor_names`)."""
    module = site.modules[0]  # the up side: gate, up or packed gate_up
    shape = shape_of(names[ROLE_FIELDS[module.roles[0]][0]])
    rows = shape[1] if module.layout == CONV1D else shape[0]
    return rows // len(module.roles)


def site_hidden(site: MLPSite, names: dict[str, str], shape_of: Callable[[str], tuple]) -> int:
    """Hidden (model) size of a dense site from its up-side tensor's shape."""
    module = site.modules[0]
    shape = shape_of(names[ROLE_FIELDS[module.roles[0]][0]])
    return shape[0] if module.layout == CONV1D else shape[1]


def module_paths(site: MLPSite) -> list[str]:
    """Paths (base-model relative) of the built modules holding ``site``'s MLP weights.

    A MoE layer: its stacked experts module (or each expert's modules) and its shared expert's modules.
    """
    if not site.experts:
        return [module.path for module in site.modules]
    routed = [site.stacked] if site.stacked else [m.path for expert in site.experts for m in expert.modules]
    return routed + ([m.path for m in site.shared.modules] if site.shared else [])


def module_width(base: torch.nn.Module, site: MLPSite) -> int:
    """Intermediate width of ``site`` in a built model (``base``: its ``base_model``), from the down module.

    Works for every module type a checkpoint may hold (Linear, Conv1D, scaled, low-rank, dropped,
    stacked experts, expert lists).
    """
    if site.experts:  # MoE layer: the routed experts' width (the widest, if a subset was fused narrower)
        if site.stacked is None:
            return max(module_width(base, expert) for expert in site.experts)
        experts = base.get_submodule(site.stacked)
        down = getattr(experts, STACKED[1], None)
        if isinstance(down, torch.Tensor):
            return int(stacked_width(tuple(down.shape)))
        return max(int(expert.down.in_features) for expert in experts)  # an expert_list module
    down = base.get_submodule(site.module_path("down"))
    if hasattr(down, "in_features"):
        return int(down.in_features)
    return int(down.weight.shape[0] if site.layout == CONV1D else down.weight.shape[1])


def write_mlp(site: MLPSite, mlp: MLPWeights, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Named tensors of a compressed MLP in the checkpoint's layout, cast to ``dtype``.

    Low-rank factors (svd) are written as a ``lowrank`` module; a packed module gets ``[gate; up]``.
    """
    out = {}
    for module in site.modules:
        base = f"{prefix}{module.path}"
        weights = [ROLE_FIELDS[role][0] for role in module.roles]
        biases = [getattr(mlp, ROLE_FIELDS[role][1]) for role in module.roles]
        bias = None if any(b is None for b in biases) else torch.cat(biases) if module.packed else biases[0]
        if weights[0] in mlp.low_rank:  # LowRankLinear (svd): factors as nn.Linear weights, any layout
            if module.packed:
                raise ValueError(f"{module.path}: a packed module cannot hold low-rank factors")
            first, second = mlp.low_rank[weights[0]]
            out[f"{base}.lowrank_a.weight"] = first.to(dtype).contiguous()
            out[f"{base}.lowrank_b.weight"] = second.to(dtype).contiguous()
            if bias is not None:
                out[f"{base}.lowrank_b.bias"] = bias.to(dtype).contiguous()
            continue
        weight = torch.cat([getattr(mlp, f) for f in weights]) if module.packed else getattr(mlp, weights[0])
        out[f"{base}.weight"] = _weight_to_layout(weight, module.layout).to(dtype).contiguous()
        if bias is not None:
            out[f"{base}.bias"] = bias.to(dtype).contiguous()
    if mlp.scale is not None:
        out[f"{prefix}{site.module_path('down')}.{SCALE_BUFFER}"] = mlp.scale.to(SCALE_DTYPE).contiguous()  # P exact
    return out


def module_specs(site: MLPSite, mlp: MLPWeights) -> list[dict]:
    """Entries of the checkpoint's ``mlpfuse.modules`` list that rebuild this site's modules."""
    k, p = mlp.width, mlp.hidden
    specs = []
    for module in site.modules:
        is_down = module.roles == ("down",)
        weight_field, bias_field = ROLE_FIELDS[module.roles[0]]
        specs.append({
            "path": module.path,
            "type": module.layout,
            "in_features": k if is_down else p,
            "out_features": p if is_down else k * len(module.roles),
            "bias": getattr(mlp, bias_field) is not None,
            "scaled": bool(is_down and mlp.scale is not None),
        })
        if weight_field in mlp.low_rank:
            specs[-1].update(type=LOW_RANK, rank=int(mlp.low_rank[weight_field][0].shape[0]))
    return specs


def stacked_names(site: MLPSite, prefix: str, keys) -> tuple[str, str] | None:
    """Names of a MoE layer's stacked expert tensors (gate_up, down), or None if stored per expert."""
    if site.stacked is None:
        return None
    gate_up, down = (f"{prefix}{site.stacked}.{name}" for name in STACKED)
    return (gate_up, down) if gate_up in keys and down in keys else None


def read_stacked(gate_up: torch.Tensor, down: torch.Tensor) -> list[MLPWeights]:
    """Each expert of stacked tensors in the standard form (``gate_up`` [E, 2I, H] = [gate; up] on dim 1)."""
    width = gate_up.shape[1] // 2
    return [MLPWeights(w_gate=gate_up[e, :width], w_in=gate_up[e, width:], w_out=down[e]) for e in range(gate_up.shape[0])]


def stacked_width(down_shape: tuple) -> int:
    """Expert width from the stacked ``down_proj`` shape [E, H, I]."""
    return down_shape[2]


def write_stacked(base: str, experts: list[MLPWeights], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stacked tensors (and the [E, k] scale if the experts carry one) of experts that share one width."""
    tensors = {
        f"{base}.{STACKED[0]}": torch.stack([torch.cat([m.w_gate, m.w_in], 0) for m in experts]).to(dtype).contiguous(),
        f"{base}.{STACKED[1]}": torch.stack([m.w_out for m in experts]).to(dtype).contiguous(),
    }
    if experts[0].scale is not None:
        tensors[f"{base}.{SCALE_BUFFER}"] = torch.stack([m.scale for m in experts]).to(SCALE_DTYPE).contiguous()
    return tensors


def written_layouts(site: MLPSite, units=None) -> set[str]:
    """Layouts (names of ``methods.LAYOUTS``) written when compressing ``site``.

    ``units``: the chosen experts of a MoE layer (indices and ``"shared"``, see ``arch.moe.parse_experts``);
    None means all.
    """
    if not site.experts:
        kinds = {"gated" if site.projections.gated else "dense"}
        if site.layout == CONV1D:
            kinds.add("conv1d")
        if site.packed:
            kinds.add("packed gate_up")
        return kinds
    kinds = set()
    routed = list(range(len(site.experts))) if units is None else [u for u in units if u != "shared"]
    if routed:
        kinds |= {"stacked experts"} if site.stacked else {"expert modules"} | written_layouts(site.experts[0])
    if site.shared is not None and (units is None or "shared" in units):
        kinds |= written_layouts(site.shared)
    return kinds
