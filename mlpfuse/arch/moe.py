"""Mixture-of-Experts sites: which layers are sparse, and moving experts between tensors and MLPWeights.

A sparse layer is an ``MLPSite`` with ``experts`` (one dense-like site per expert, named as
checkpoints on the hub name them, e.g. ``layers.3.block_sparse_moe.experts.5.w1``) and, for the
transformers v5 families that keep experts stacked in memory, ``stacked`` (the module holding
``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]). Readers accept both forms.

Fused experts are written in the form the model loads back with its own MoE forward:
- experts that are real modules (Switch): one scaled ``nn.Linear`` per fused expert, as for dense MLPs;
- stacked experts, all of one width: narrowed stacked tensors plus ``fusion_scale`` [E, k]
  (module type ``stacked_experts`` in the shipped remote code);
- stacked experts of differing widths (``--experts`` subset): one small module per expert
  (``expert_list``), named ``{stacked}.{e}.gate|up|down`` so transformers' weight converters leave
  them alone.
The router is never read or written here: it is copied byte for byte like any other tensor.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mlpfuse.arch.io import (SCALE_BUFFER, STACKED, module_specs, read_mlp, read_stacked, site_width, stacked_names, stacked_width,
                 tensor_names, write_mlp, write_stacked)
from mlpfuse.arch.spec import ExpertTemplate, MLPSite, Projections
from mlpfuse.checkpoints.format import EXPERT_LIST_MODULE, SCALE_DTYPE, STACKED_EXPERTS_MODULE
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.compress.plan import parse_ranges
from mlpfuse.errors import InputError

SHARED = "shared"


def expert_count(template: ExpertTemplate, config: dict) -> int:
    """Number of experts; ``template.count`` may name alternatives (configs renamed the field)."""
    names = (template.count,) if isinstance(template.count, str) else template.count
    return next((int(config[n]) for n in names if config.get(n) is not None), 0)


def is_sparse(template: ExpertTemplate, config: dict, i: int, depth: int) -> bool:
    """Whether layer ``i`` is a sparse (MoE) layer, following the family's own modeling code."""
    if template.sparse == "all":
        return True
    if template.sparse == "qwen":
        step = int(config.get(template.step or "decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        return i not in dense and expert_count(template, config) > 0 and (i + 1) % step == 0
    if template.sparse == "switch":
        step = config.get(template.step)
        if step is None:  # derived the way SwitchTransformersConfig derives it
            sparse = int(config.get(template.sparse_count) or 0)
            step = depth // sparse if sparse > 0 else depth
        step = int(step)
        return step > 0 and (i % step == 1 or step == 1)
    raise ValueError(f"unknown sparse rule {template.sparse!r}")


def moe_site(dense: MLPSite, template: ExpertTemplate, config: dict, i: int, depth: int,
             shared_projections: Projections) -> MLPSite:
    """The site of layer ``i``: ``dense`` unchanged if the layer is dense, else an expert group."""
    if not is_sparse(template, config, i, depth):
        return dense
    count = expert_count(template, config)
    experts = tuple(
        MLPSite(dense.index, f"{dense.label}.e{e}", template.path.format(i=i, e=e), template.projections, dense.layout)
        for e in range(count)
    )
    shared = None
    if template.shared:
        shared = MLPSite(dense.index, f"{dense.label}.{SHARED}", template.shared.format(i=i), shared_projections, dense.layout)
    return replace(dense, experts=experts,
                   stacked=template.stacked.format(i=i) if template.stacked else None, shared=shared)


def parse_experts(spec, site: MLPSite) -> list:
    """Expert indices (and ``"shared"``) chosen by ``--experts`` (``None``/``all``: every one)."""
    count = len(site.experts)
    every = list(range(count)) + ([SHARED] if site.shared else [])
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return every
    parts = [str(p) for p in spec] if isinstance(spec, (list, tuple)) else str(spec).split(",")
    lowered = [str(p).strip().lower() for p in parts]
    if SHARED in lowered and not site.shared:
        raise InputError("--experts names 'shared' but this model has no shared expert")
    chosen: set = parse_ranges([p for p in lowered if p != SHARED], "--experts", "0,3 or 0-7 or 0-7,shared or all")
    if SHARED in lowered:
        chosen.add(SHARED)
    bad = sorted(e for e in chosen if e != SHARED and not 0 <= e < count)
    if bad:
        raise InputError(f"expert(s) {bad} out of range: layer {site.label} has {count} experts (0-{count - 1})")
    return [e for e in every if e in chosen]


def expert_keys(site: MLPSite, prefix: str, keys) -> set[str]:
    """Every input tensor name that holds this layer's routed experts."""
    stacked = stacked_names(site, prefix, keys)
    found = set(stacked or ())
    for expert in site.experts:
        found.update(tensor_names(expert, prefix, keys).values())
    return found & set(keys)


def shared_keys(site: MLPSite, prefix: str, keys) -> set[str]:
    return set(tensor_names(site.shared, prefix, keys).values()) & set(keys) if site.shared else set()


def read_experts(site: MLPSite, prefix: str, keys, get) -> list[MLPWeights]:
    """Each routed expert of the layer in the standard form, from per-expert or stacked tensors."""
    stacked = stacked_names(site, prefix, keys)
    if stacked is None:
        return [read_mlp(expert, tensor_names(expert, prefix, keys), get) for expert in site.experts]
    return read_stacked(get(stacked[0]), get(stacked[1]))


def expert_width(site: MLPSite, prefix: str, keys, shape_of) -> int:
    """Intermediate size of the layer's routed experts (from shapes only)."""
    stacked = stacked_names(site, prefix, keys)
    if stacked is not None:
        return stacked_width(shape_of(stacked[1]))
    return site_width(site.experts[0], tensor_names(site.experts[0], prefix, keys), shape_of)


def unit_label(site: MLPSite, unit) -> str:
    return site.shared.label if unit == SHARED else site.experts[unit].label


def write_experts(site: MLPSite, experts: list[MLPWeights], fused: set, prefix: str, dtype: torch.dtype) -> tuple[dict, list[dict]]:
    """Named tensors and module specs for a layer's routed experts after fusion.

    ``experts``: every routed expert (fused or untouched), ``fused``: the indices that were fused.
    Real expert modules (no ``stacked``) write only the fused experts; stacked families rewrite the
    whole layer (stacked if all widths and scales agree, one module per expert otherwise).
    """
    if site.stacked is None:
        tensors, specs = {}, []
        for e in sorted(fused):
            tensors.update(write_mlp(site.experts[e], experts[e], prefix, dtype))
            specs.extend(module_specs(site.experts[e], experts[e]))
        return tensors, specs
    widths = {mlp.width for mlp in experts}
    scaled = {mlp.scale is not None for mlp in experts}
    base = f"{prefix}{site.stacked}"
    if len(widths) == 1 and len(scaled) == 1:
        k, hidden = experts[0].width, experts[0].hidden
        tensors = write_stacked(base, experts, dtype)
        spec = {"path": site.stacked, "type": STACKED_EXPERTS_MODULE, "experts": len(experts), "width": k,
                "hidden": hidden, "scaled": experts[0].scale is not None, "tensors": list(STACKED)}
        return tensors, [spec]
    tensors = {}
    for e, mlp in enumerate(experts):
        for field_name, role in (("w_gate", "gate"), ("w_in", "up"), ("w_out", "down")):
            tensors[f"{base}.{e}.{role}.weight"] = getattr(mlp, field_name).to(dtype).contiguous()
        if mlp.scale is not None:
            tensors[f"{base}.{e}.down.{SCALE_BUFFER}"] = mlp.scale.to(SCALE_DTYPE).contiguous()
    spec = {"path": site.stacked, "type": EXPERT_LIST_MODULE, "widths": [m.width for m in experts],
            "hidden": experts[0].hidden, "scaled": [m.scale is not None for m in experts],
            "tensors": [f"{e}.down.weight" for e in range(len(experts))]}
    return tensors, [spec]


def site_widths(sites: list[MLPSite], shape_of, prefix: str, keys) -> dict[int, int]:
    """Each site's MLP width (a MoE layer's: its routed experts'), from tensor shapes alone."""
    return {site.index: expert_width(site, prefix, keys, shape_of) if site.experts
            else site_width(site, tensor_names(site, prefix, keys), shape_of) for site in sites}


def site_keys(site: MLPSite, prefix: str, keys) -> set[str]:
    """Every tensor name of ``site``: its MLP's, or a MoE layer's routed and shared experts'."""
    if site.experts:
        return expert_keys(site, prefix, keys) | shared_keys(site, prefix, keys)
    return set(tensor_names(site, prefix, keys).values())


def needed_layouts(sites: list[MLPSite], experts=None) -> dict[str, str]:
    """Layout -> label of the first site that needs it: what a method must be able to write to
    compress ``sites`` (``experts``: the ``--experts`` choice for MoE layers)."""
    from mlpfuse.arch.io import written_layouts

    needs: dict[str, str] = {}
    for site in sites:
        units = parse_experts(experts, site) if site.experts else None
        for layout in written_layouts(site, units):
            needs.setdefault(layout, site.label)
    return needs
