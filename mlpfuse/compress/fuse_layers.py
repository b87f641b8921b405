"""``fuse``, step 2: compress the planned sites, one at a time, and stream the new tensors out.

:func:`fuse_layer` compresses one site (a dense MLP, or a Mixture-of-Experts layer's experts:
mlpfuse/compress/fuse_moe.py) read from a checkpoint; :func:`execute` runs every planned site (data-free:
spread over torchrun's ranks; ``--calibration``: the layer-by-layer pass of mlpfuse/compress/calibration.py)
and streams the compressed tensors, then every untouched tensor of the source, to the writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mlpfuse.arch.io import module_specs, read_mlp, tensor_names, write_mlp
from mlpfuse.checkpoints.format import SCALE_BUFFER
from mlpfuse.compress.fuse_moe import fuse_moe_layer, layer_report_fields
from mlpfuse.compress.fuse_report import LayerReport
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.compress.plan import LayerPlan
from mlpfuse.methods import REPORT_FIELDS, MethodOptions, get_method
from mlpfuse.runtime import InBackground
from mlpfuse.train.distributed import gather_in_order


@dataclass
class FusedLayer:
    """One compressed site: its new tensors (checkpoint names), the source names they replace,
    the module specs that rebuild it, and its report."""

    tensors: dict
    consumed: set
    specs: list
    report: LayerReport
    compressed: MLPWeights | None = None  # dense sites: the compressed MLP (the calibration pass runs it)


@dataclass
class Executed:
    """What :func:`execute` did: the layers' reports and module specs, in the order written, the
    calibration pass's result (None: data-free), the source's sha256 and the weight files."""

    layers: list[LayerReport] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)
    calibrated: Any = None
    source_sha256: str = ""
    files: list[str] = field(default_factory=list)


def compress_layer(plan: LayerPlan, mlp: MLPWeights, method: str, options: MethodOptions) -> tuple[MLPWeights, LayerReport]:
    """Run ``method`` on one layer and describe what happened (the report fields the method declares)."""
    start = time.perf_counter()
    declared = get_method(method)
    compressed = declared(mlp, plan.width, options)
    seconds = time.perf_counter() - start
    fields = dict.fromkeys(REPORT_FIELDS)
    fields.update({name: compressed.stats.get(name) for name in declared.report_fields})
    report = LayerReport(
        index=plan.site.index,
        label=plan.site.label,
        original_width=plan.original_width,
        width=compressed.width,
        params_before=mlp.num_parameters(),
        params_after=compressed.num_parameters(),
        seconds=seconds,
        **fields,
    )
    return compressed, report


def fuse_layer(plan: LayerPlan, settings, options: MethodOptions, prefix: str, keys,
               get: Callable[[str], torch.Tensor], dtype: torch.dtype | None) -> FusedLayer:
    """Compress one planned site, a dense MLP or a MoE layer's experts; ``dtype`` None keeps the source's."""
    if plan.site.experts:
        result = fuse_moe_layer(plan, settings.experts, settings.ratio, settings.method, options,
                                prefix, keys, get, dtype)
        return FusedLayer(result.tensors, result.consumed, result.specs, LayerReport(**layer_report_fields(plan, result)))
    names = tensor_names(plan.site, prefix, keys)
    return compress_dense(plan, read_mlp(plan.site, names, get), settings.method, options, prefix, set(names.values()), dtype)


def compress_dense(plan: LayerPlan, mlp: MLPWeights, method: str, options: MethodOptions, prefix: str, consumed: set,
                   dtype: torch.dtype | None) -> FusedLayer:
    """Compress one dense site read as ``mlp`` and name its new tensors (``consumed``: the source names)."""
    compressed, report = compress_layer(plan, mlp, method, options)
    tensors = write_mlp(plan.site, compressed, prefix, dtype or mlp.w_in.dtype)
    return FusedLayer(tensors, consumed, module_specs(plan.site, compressed), report, compressed)


def cast(tensor: torch.Tensor, dtype: torch.dtype | None, name: str = "") -> torch.Tensor:
    """``tensor`` in the output ``dtype`` (None: unchanged); the scale buffers P keep float32."""
    if name.endswith(f".{SCALE_BUFFER}"):  # P keeps its exact float32 values in every output dtype
        return tensor
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def layer_computer(plan, settings) -> Callable[[LayerPlan], FusedLayer]:
    """The function that compresses one site of ``plan`` (a :class:`~mlpfuse.compress.fuse_plan.FusePlan`),
    reading its tensors from the source (what torchrun's ranks run)."""
    return lambda layer: fuse_layer(layer, settings, plan.options, plan.prefix, plan.keys, plan.reader.get,
                                    plan.source.dtype)


def execute(plan, settings, add: Callable[[str, torch.Tensor], None],
            on_layer: Callable[[LayerReport], None] | None = None) -> Executed:
    """Compress every site of ``plan`` and stream the tensors of the output to ``add`` (name, tensor):
    each site's as soon as it is compressed, then the source's untouched ones, cast to the output
    dtype. The source's sha256 is read meanwhile (a second full read, overlapping the work)."""
    source_sha256 = InBackground(plan.reader.sha256)
    done = Executed()
    fused_keys: set[str] = set()

    def take(layer: FusedLayer) -> None:  # write one compressed site as soon as it comes
        for name, tensor in layer.tensors.items():
            add(name, tensor)
        fused_keys.update(layer.consumed)
        done.modules.extend(layer.specs)
        done.layers.append(layer.report)
        if on_layer:
            on_layer(layer.report)

    if plan.calibration is None:
        for layer in gather_in_order(plan.plans, layer_computer(plan, settings)):
            take(layer)
    else:
        from mlpfuse.compress.fuse_calibration import run_calibration

        done.calibrated = run_calibration(settings, plan, take)
    for key in plan.reader.keys():
        if key not in fused_keys:
            add(key, cast(plan.reader.get(key), plan.source.dtype, key))
    done.source_sha256 = source_sha256.result()
    return done
