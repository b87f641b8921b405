"""``fuse``, step 1: check the inputs and plan the work, before anything is computed or written.

:func:`check_source` reads what the output claim needs (the source directory) and refuses bad
settings; :func:`plan_fuse` finds the MLP sites, validates the checkpoint against its config, decides
each chosen site's width (mlpfuse/compress/plan.py), checks that the method can write every layout it
touches and bounds the output's size from below (fuse.py checks the free space against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mlpfuse.arch import MLPSite, find_prefix, lookup, resolve_sites
from mlpfuse.arch.io import SCALE_BUFFER
from mlpfuse.arch.moe import needed_layouts, site_keys, site_widths
from mlpfuse.checkpoints.tensors import CheckpointReader, parse_size, read_config
from mlpfuse.compress.kmeans import check_init, resolve_backend
from mlpfuse.compress.plan import LayerPlan, parse_layers, plan_layers
from mlpfuse.errors import InputError
from mlpfuse.methods import MethodOptions, check_can_write, get_method
from mlpfuse.runtime import dtype_name, torch_dtype


@dataclass
class FuseSource:
    """The checked input of a fuse run: its directory, config (a merged checkpoint's tied/dropped
    layout split off as ``merged_layout``), architecture entry, output dtype (None keeps the
    source's), k-means backend and largest shard in bytes."""

    model: str
    directory: Path
    config: dict
    merged_layout: dict | None
    spec: Any
    dtype: torch.dtype | None
    backend: str
    max_shard: int


@dataclass
class FusePlan:
    """What a fuse run will do: the sites of the source, the prefix of their tensors, one
    :class:`~mlpfuse.compress.plan.LayerPlan` per chosen site, the method's options and the calibration
    batch (None: data-free)."""

    source: FuseSource
    reader: CheckpointReader
    keys: set
    sites: list[MLPSite]
    prefix: str
    plans: list[LayerPlan]
    options: MethodOptions
    output_bytes: int = 0  # a lower bound of the weight bytes the output will hold
    calibration: Any = None  # the calibration batch (read after the free-space check), None: data-free


def check_source(model: str, settings, resolve: Callable[[str], Path]) -> FuseSource:
    """Resolve ``model`` (``resolve``: name -> directory) and refuse bad ``settings`` (InputError),
    before the output is claimed. Normalises ``settings.dtype`` (bf16 -> bfloat16)."""
    from mlpfuse.checkpoints.tied import fusable_input

    directory = resolve(model)
    config, merged_layout = fusable_input(read_config(directory), model)  # a merged checkpoint: tied/dropped MLPs are skipped
    spec = lookup(config.get("model_type"))
    get_method(settings.method)  # an unknown method fails before any work
    check_init(settings.kmeans_init)
    backend = resolve_backend(settings.backend, settings.device)
    settings.dtype = dtype_name(settings.dtype, allow_auto=True)  # one vocabulary: bf16 is bfloat16
    dtype = torch_dtype(settings.dtype, allow_auto=True)
    max_shard = parse_size(settings.max_shard_size)
    if settings.calibration is not None:
        from mlpfuse.compress.fuse_calibration import check_calibration

        check_calibration(settings, config, merged_layout)
    return FuseSource(model, directory, config, merged_layout, spec, dtype, backend, max_shard)


def plan_fuse(source: FuseSource, settings, device) -> FusePlan:
    """Plan the run on ``source`` (``device``: where the method computes). Raises InputError for a
    checkpoint that does not fit its config, bad layer or width choices, a method that cannot write
    a layout, or ``--calibration`` on Mixture-of-Experts layers."""
    from mlpfuse.checkpoints.tied import absent_paths, sites_touching
    from mlpfuse.checkpoints.validate import check_checkpoint

    config, layout = source.config, source.merged_layout
    reader = CheckpointReader(source.directory)
    keys = set(reader.keys())
    sites = resolve_sites(source.spec, config)
    absent = sites_touching(sites, absent_paths(layout))
    prefix = next((p for p in (find_prefix(keys, s) for s in sites if s.index not in absent) if p is not None), None)
    if prefix is None:
        raise InputError(f"{source.model}: no MLP tensors where a {config.get('model_type')} checkpoint keeps them "
                         f"(e.g. {sites[0].module_path('up') if sites else '?'}.weight)")
    check_checkpoint(config, reader, source.spec, sites, prefix, absent_paths(layout))  # before any work
    widths = site_widths([s for s in sites if s.index not in absent], reader.shape, prefix, keys)
    chosen = [i for i in parse_layers(settings.layers, len(sites)) if i not in absent] if absent else settings.layers
    plans = plan_layers(sites, widths, chosen, settings.dim, settings.ratio,
                        settings.per_layer, settings.allow_full_width, settings.multiple_of)
    check_plans(settings, plans)
    if settings.calibration is not None:
        moe = next((plan.site.label for plan in plans if plan.site.experts), None)
        if moe is not None:
            raise InputError(f"--calibration does not support Mixture-of-Experts layers yet (layer {moe}); "
                             f"fuse them without --calibration")
    options = MethodOptions(seed=settings.seed, backend=settings.backend, device=device,
                            kmeans_init=settings.kmeans_init)
    return FusePlan(source, reader, keys, sites, prefix, plans, options,
                    estimated_output_bytes(plans, reader, prefix, keys, source.dtype))


def check_plans(settings, plans: list[LayerPlan]) -> None:
    """Refuse ``--experts`` without MoE layers and a method that cannot write a layout it would touch."""
    if settings.experts is not None and not any(plan.site.experts for plan in plans):
        raise InputError("--experts applies to Mixture-of-Experts layers, and none of the chosen layers has experts")
    check_can_write(settings.method, needed_layouts([plan.site for plan in plans], settings.experts))


def estimated_output_bytes(plans: list[LayerPlan], reader: CheckpointReader, prefix: str, keys,
                           dtype: torch.dtype | None) -> int:
    """A lower bound of the weight bytes ``fuse`` writes, from the plan and the headers (no tensor read).

    Every tensor counts at its output dtype (:func:`mlpfuse.compress.fuse_layers.cast`'s rule); those of a
    planned site (its MLP, or its routed and shared experts) shrink by the site's
    ``width / original_width``. A bound from below, so a refusal is never wrong: the scale buffers
    P, an output bias kept whole, experts left out by ``--experts`` and the low-rank factors of
    ``svd`` all make the real output larger.
    """
    shrink: dict[str, float] = {}
    for plan in plans:
        shrink.update(dict.fromkeys(site_keys(plan.site, prefix, keys), plan.width / plan.original_width))
    total = 0
    for key in keys:
        cast = dtype is not None and reader.is_floating(key) and not key.endswith(f".{SCALE_BUFFER}")
        total += int(reader.nbytes(key, dtype if cast else None) * shrink.get(key, 1.0))
    return total
