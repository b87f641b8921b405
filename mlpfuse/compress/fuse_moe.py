"""Expert-wise fusion of one Mixture-of-Experts layer (used by ``fuse_checkpoint`` and ``fuse_model``).

Each chosen expert (and the shared expert, if any) is compressed on its own by the chosen method,
one k-means per expert; the router is left alone. See docs/moe.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from mlpfuse.arch.io import module_specs, read_mlp, tensor_names, write_mlp
from mlpfuse.arch.moe import SHARED, expert_keys, parse_experts, read_experts, shared_keys, unit_label, write_experts
from mlpfuse.compress.kmeans import kmeans_batched
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.compress.plan import LayerPlan, target_width
from mlpfuse.methods import MethodOptions, get_method


@dataclass
class MoELayerResult:
    """What fusing one sparse layer produced: tensors to write, module specs, input names replaced."""

    tensors: dict
    specs: list
    consumed: set
    experts: list = field(default_factory=list)  # one dict per fused expert (see ExpertReport)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0


@dataclass
class ExpertReport:
    expert: str
    original_width: int
    width: int
    params_before: int
    params_after: int
    inertia: float | None
    kmeans_seconds: float | None
    backend: str | None


def _compress(mlp: MLPWeights, k: int, label: str, method: str, options: MethodOptions) -> tuple[MLPWeights, ExpertReport]:
    compressed = get_method(method)(mlp, k, options)
    stats = compressed.stats
    return compressed, ExpertReport(label, mlp.width, k, mlp.num_parameters(), compressed.num_parameters(),
                                    stats.get("inertia"), stats.get("kmeans_seconds"), stats.get("backend"))


def shared_width(plan: LayerPlan, original: int, ratio: float | None) -> int:
    """Width of the shared expert: the layer's ratio under ``--ratio``, else ``--dim`` (capped at its size)."""
    if ratio is not None:
        return target_width(original, None, plan.width / plan.original_width)
    return min(plan.width, original)


BATCH_BYTES = 2 << 30  # features per kmeans_batched call; larger layers are split into chunks of experts


def batched_clusterings(mlps: list[MLPWeights], k: int, method: str, options: MethodOptions) -> list:
    """One k-means per expert, run together by ``kmeans_batched`` (torch) in chunks of experts.

    Measured faster than a loop on CPU and on GPU (docs/moe.md). Used when the method clusters
    neurons and the experts share one width, unless ``--backend faiss`` was asked for explicitly;
    otherwise a list of None, and each expert runs its own k-means.
    """
    fallback = [None] * len(mlps)
    same_width = len({m.width for m in mlps}) == 1
    if (len(mlps) < 2 or not same_width or options.backend == "faiss"
            or not get_method(method).clusters):
        return fallback
    features = [m.neuron_features() for m in mlps]
    per_expert = features[0].numel() * 4
    chunk = max(1, BATCH_BYTES // per_expert)
    results = []
    for first in range(0, len(features), chunk):
        batch = torch.stack(features[first:first + chunk])
        results.extend(kmeans_batched(batch, k, seed=options.seed, device=options.device, init=options.kmeans_init))
    return results


def fuse_moe_layer(plan: LayerPlan, experts_spec, ratio: float | None, method: str, options: MethodOptions,
                   prefix: str, keys, get, dtype: torch.dtype | None) -> MoELayerResult:
    """Fuse the chosen experts of sparse layer ``plan.site`` to ``plan.width``; everything else untouched."""
    start = time.perf_counter()
    site = plan.site
    chosen = parse_experts(experts_spec, site)
    routed = read_experts(site, prefix, keys, get)
    out_dtype = dtype or routed[0].w_out.dtype
    result = MoELayerResult(tensors={}, specs=[], consumed=set())
    fused_idx = set()
    routed_ids = [u for u in chosen if u != SHARED]
    clusterings = batched_clusterings([routed[e] for e in routed_ids], plan.width, method, options)
    for e, clustering in zip(routed_ids, clusterings):
        expert_options = replace(options, clustering=clustering) if clustering is not None else options
        routed[e], report = _compress(routed[e], plan.width, unit_label(site, e), method, expert_options)
        fused_idx.add(e)
        result.experts.append(asdict(report))
    if fused_idx:
        tensors, specs = write_experts(site, routed, fused_idx, prefix, out_dtype)
        result.tensors.update(tensors)
        result.specs.extend(specs)
        if site.stacked is None:
            result.consumed |= {n for e in fused_idx for n in tensor_names(site.experts[e], prefix, keys).values()}
        else:
            result.consumed |= expert_keys(site, prefix, keys)
    if SHARED in chosen:
        names = tensor_names(site.shared, prefix, keys)
        mlp = read_mlp(site.shared, names, get)
        compressed, report = _compress(mlp, shared_width(plan, mlp.width, ratio), site.shared.label, method, options)
        result.tensors.update(write_mlp(site.shared, compressed, prefix, dtype or mlp.w_out.dtype))
        result.specs.extend(module_specs(site.shared, compressed))
        result.consumed |= set(names.values())
        result.experts.append(asdict(report))
    result.params_before = sum(r["params_before"] for r in result.experts)
    result.params_after = sum(r["params_after"] for r in result.experts)
    result.seconds = time.perf_counter() - start
    return result


def layer_report_fields(plan: LayerPlan, result: MoELayerResult) -> dict:
    """Fields of the layer's ``LayerReport``: sums over its experts, plus the per-expert list."""
    inertias = [r["inertia"] for r in result.experts if r["inertia"] is not None]
    times = [r["kmeans_seconds"] for r in result.experts if r["kmeans_seconds"] is not None]
    backends = {r["backend"] for r in result.experts if r["backend"]}
    return dict(
        index=plan.site.index, label=plan.site.label, original_width=plan.original_width, width=plan.width,
        params_before=result.params_before, params_after=result.params_after,
        inertia=sum(inertias) if inertias else None, kmeans_seconds=sum(times) if times else None,
        seconds=result.seconds, backend=next(iter(backends)) if len(backends) == 1 else None,
        experts=result.experts,
    )


def expert_parameter_count(sites, prefix: str, keys, shape_of) -> int:
    """Parameters held by routed and shared experts across all sparse layers (from shapes)."""
    total = 0
    for site in sites:
        if site.experts:
            for key in expert_keys(site, prefix, keys) | shared_keys(site, prefix, keys):
                size = 1
                for dim in shape_of(key):
                    size *= dim
                total += size
    return total
