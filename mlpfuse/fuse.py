"""The ``fuse`` pipeline: one streaming pass, layer by layer, from a checkpoint to a fused one.

Also :func:`fuse_model`, the same maths applied in place to a model already in memory (used by
ntk-check, tune and the tests).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import __version__
from .arch import MLPSite, find_prefix, lookup, resolve_sites
from .arch.io import module_specs, read_mlp, site_width, tensor_names, write_mlp, written_layouts
from .arch.moe import expert_keys, expert_width, parse_experts, shared_keys
from .card import model_card
from .checkpoint import CheckpointReader, ShardedWriter, parse_size, read_config, write_json
from .distributed import gather_in_order, is_worker, rank_device, serve
from .errors import InputError
from .format import SCALE_BUFFER, fuse_section
from .fuse_moe import expert_parameter_count, fuse_moe_layer, layer_report_fields
from .kmeans import check_init, resolve_backend
from .calibration import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_GROUPING, DEFAULT_PROTECT, DEFAULT_RIDGE
from .methods import MethodOptions, check_can_write, get_method
from .mlp import MLPWeights
from .modeling import verify_checkpoint
from .options import check_seed
from .plan import LayerPlan, parse_layers, plan_layers
from .remote.modeling_mlpfuse import (
    apply_fusion_layout,
    fused_config_dict,
    fused_model_class,
    write_remote_code,
)
from .runtime import InBackground, dtype_name, torch_dtype
from .source import resolve_model
from .output import carry_side_files, check_free_space, claim_output, guarded_outputs, staging_directory
from .tied import absent_paths, carry_merge_layout, fusable_input, sites_touching
from .validate import check_checkpoint
RECIPE_FILE = "mlpfuse_recipe.yaml"


@dataclass
class FuseSettings:
    """Everything that decides the output of ``fuse`` (a YAML recipe holds the same fields)."""

    layers: str | list = "all"
    dim: int | None = None
    ratio: float | None = None
    method: str = "fusion"
    backend: str = "auto"
    device: str | None = None
    seed: int = 0
    dtype: str = "auto"
    per_layer: dict = field(default_factory=dict)
    max_shard_size: str = "5GB"
    allow_full_width: bool = False
    multiple_of: int = 1  # every fused width rounded down to a multiple of this (never below 1 or above the original)
    experts: str | list | None = None  # MoE: experts to fuse in each chosen sparse layer (None = all)
    kmeans_init: str = "kmeans-parallel"  # k-means seeding: kmeans-parallel (k-means||) or greedy (k-means++)
    # --calibration: the data-aware form of the method, on calibration text run layer by layer (calibration.py)
    calibration: str | None = None  # text table (as read_table reads it); None = data-free
    # sequences (an int) or "N tokens"; None: 128 sequences for decoders, 512 for encoders
    calibration_limit: int | str | None = None
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per calibration sequence (shortened to the model's positions)
    calibration_batch_size: int = DEFAULT_BATCH_SIZE  # sequences per mini-batch of the layer-by-layer pass
    text_column: str = "sentence"
    protect: float = DEFAULT_PROTECT  # protected neurons per layer: fraction of the fused width, or a count >= 1
    ridge: float = DEFAULT_RIDGE  # ridge strength alpha of the output refit
    grouping: str = DEFAULT_GROUPING  # calibrated fusion/cluster: "select" or "kmeans" (methods.calibrated)


@dataclass
class LayerReport:
    index: int
    label: str
    original_width: int
    width: int
    params_before: int
    params_after: int
    inertia: float | None
    kmeans_seconds: float | None
    seconds: float
    backend: str | None
    experts: list = field(default_factory=list)  # MoE layers: one entry per fused expert
    rank: int | None = None  # low-rank methods (svd): the rank; the width stays the original
    cluster_sizes: dict | None = None  # k-means methods: {cluster size: number of clusters}
    protected: int | None = None  # calibrated k-means methods: neurons kept as singleton clusters
    relative_error: float | None = None  # --calibration: ||y_fused - y|| / ||y|| of this MLP on the calibration batch

    @property
    def singletons(self) -> int | None:
        """Clusters holding one neuron (None for methods that do not cluster)."""
        return None if self.cluster_sizes is None else int(self.cluster_sizes.get(1, 0))

    @property
    def largest_cluster(self) -> int | None:
        return None if not self.cluster_sizes else max(int(size) for size in self.cluster_sizes)


@dataclass
class FuseReport:
    source: str
    source_path: str
    output: str | None
    model_type: str
    method: str
    seed: int
    backend: str
    layers: list[LayerReport]
    parameters: dict
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    calibration: dict | None = None  # --calibration: settings, data sha256, hidden_state_error
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, layer in zip(data["layers"], self.layers):
            entry.update(singletons=layer.singletons, largest_cluster=layer.largest_cluster)
        data["version"] = __version__
        data["source_name"] = Path(self.source).name or self.source
        return data


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the output, for provenance."""
    versions = {"mlpfuse": __version__}
    for name in ("torch", "transformers", "safetensors", "faiss-cpu", "faiss-gpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _site_widths(sites: list[MLPSite], shape_of: Callable[[str], tuple], prefix: str, keys) -> dict[int, int]:
    return {site.index: expert_width(site, prefix, keys, shape_of) if site.experts
            else site_width(site, tensor_names(site, prefix, keys), shape_of) for site in sites}


def compress_layer(plan: LayerPlan, mlp: MLPWeights, method: str, options: MethodOptions) -> tuple[MLPWeights, LayerReport]:
    """Run ``method`` on one layer and describe what happened."""
    start = time.perf_counter()
    compressed = get_method(method)(mlp, plan.width, options)
    seconds = time.perf_counter() - start
    stats = compressed.stats
    report = LayerReport(
        index=plan.site.index,
        label=plan.site.label,
        original_width=plan.original_width,
        width=compressed.width,
        params_before=mlp.num_parameters(),
        params_after=compressed.num_parameters(),
        inertia=stats.get("inertia"),
        kmeans_seconds=stats.get("kmeans_seconds"),
        seconds=seconds,
        backend=stats.get("backend"),
        rank=stats.get("rank"),
        cluster_sizes=stats.get("cluster_sizes"),
        protected=stats.get("protected"),
        relative_error=stats.get("relative_error"),
    )
    return compressed, report


SINGLETON_WARNING = 0.9  # share of one-neuron clusters above which k-means is called degenerate
ERROR_WARNING = 0.5  # a layer's calibration relative error above which fuse warns


def layer_warnings(layers: list[LayerReport]) -> list[str]:
    """One line per layer whose k-means is degenerate or whose calibration error explodes."""
    lines = []
    for layer in layers:
        if layer.cluster_sizes and layer.width > 1 and layer.singletons > SINGLETON_WARNING * layer.width:
            lines.append(f"layer {layer.label}: degenerate k-means, {layer.singletons} of {layer.width} clusters "
                         f"hold one neuron and the largest holds {layer.largest_cluster} of {layer.original_width}")
        if layer.relative_error is not None and not layer.relative_error <= ERROR_WARNING:
            lines.append(f"layer {layer.label}: the fused MLP's output is off by {layer.relative_error:.3g} "
                         f"(relative) on the calibration text (above {ERROR_WARNING})")
    return lines


@dataclass
class FusedLayer:
    """One compressed site: its new tensors (checkpoint names), the source names they replace,
    the module specs that rebuild it, and its report."""

    tensors: dict
    consumed: set
    specs: list
    report: LayerReport
    compressed: MLPWeights | None = None  # dense sites: the compressed MLP (the calibration pass runs it)


def fuse_layer(plan: LayerPlan, settings: FuseSettings, options: MethodOptions, prefix: str, keys,
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


def _check_plans(settings: FuseSettings, plans: list[LayerPlan]) -> None:
    if settings.experts is not None and not any(plan.site.experts for plan in plans):
        raise InputError("--experts applies to Mixture-of-Experts layers, and none of the chosen layers has experts")
    needs: dict[str, str] = {}
    for plan in plans:  # the method must be able to write every layout it will touch (before any work)
        units = parse_experts(settings.experts, plan.site) if plan.site.experts else None
        for layout in written_layouts(plan.site, units):
            needs.setdefault(layout, plan.site.label)
    check_can_write(settings.method, needs)


def estimated_output_bytes(plans: list[LayerPlan], reader: CheckpointReader, prefix: str, keys,
                           dtype: torch.dtype | None) -> int:
    """A lower bound of the weight bytes ``fuse`` writes, from the plan and the headers (no tensor read).

    Every tensor counts at its output dtype (``_cast``'s rule); those of a planned site (its MLP, or
    its routed and shared experts) shrink by the site's ``width / original_width``. A bound from
    below, so a refusal is never wrong: the scale buffers P, an output bias kept whole, experts left
    out by ``--experts`` and the low-rank factors of ``svd`` all make the real output larger.
    """
    shrink: dict[str, float] = {}
    for plan in plans:
        site = plan.site
        names = (expert_keys(site, prefix, keys) | shared_keys(site, prefix, keys) if site.experts
                 else set(tensor_names(site, prefix, keys).values()))
        shrink.update(dict.fromkeys(names, plan.width / plan.original_width))
    total = 0
    for key in keys:
        cast = dtype is not None and reader.is_floating(key) and not key.endswith(f".{SCALE_BUFFER}")
        total += int(reader.nbytes(key, dtype if cast else None) * shrink.get(key, 1.0))
    return total


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, name: str = "") -> torch.Tensor:
    if name.endswith(f".{SCALE_BUFFER}"):  # P keeps its exact float32 values in every output dtype
        return tensor
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _section(report: FuseReport, settings: FuseSettings, modules: list, source_sha256: str, dtype: str) -> dict:
    return fuse_section(version=__version__, method=report.method, layers=report.layers, seed=settings.seed,
                        backend=report.backend, dtype=dtype, source=report.source, source_sha256=source_sha256,
                        parameters=report.parameters, packages=package_versions(), modules=modules)


@guarded_outputs
def fuse_checkpoint(
    model: str,
    output: str | Path,
    settings: FuseSettings,
    overwrite: bool = False,
    on_layer: Callable[[LayerReport], None] | None = None,
    on_start: Callable[[list[LayerPlan]], None] | None = None,
) -> FuseReport | None:
    """Fuse the chosen MLPs of checkpoint ``model`` and write a loadable checkpoint to ``output``.

    Streams: reads one layer's tensors at a time from memory-mapped files and writes shards as
    they fill; the output appears only when complete (temporary directory + rename). Under
    torchrun the layers are split over the ranks (mlpfuse/distributed.py); ranks > 0 return None.
    """
    start = time.perf_counter()
    check_seed(settings.seed)
    source_dir = resolve_model(model)
    config = read_config(source_dir)
    config, merged_layout = fusable_input(config, model)  # a merged checkpoint: tied/dropped MLPs are skipped
    spec = lookup(config.get("model_type"))
    get_method(settings.method)  # an unknown method fails before any work
    check_init(settings.kmeans_init)
    backend = resolve_backend(settings.backend, settings.device)
    settings.dtype = dtype_name(settings.dtype, allow_auto=True)  # one vocabulary: bf16 is bfloat16
    dtype = torch_dtype(settings.dtype, allow_auto=True)
    max_shard = parse_size(settings.max_shard_size)
    if settings.calibration is not None:
        _check_calibration(settings, config, merged_layout)
    # checks, lock, staging: before any work (under torchrun only rank 0, the writer, claims the output)
    target = None if is_worker() else claim_output(output, [source_dir], overwrite).target

    reader = CheckpointReader(source_dir)
    keys = set(reader.keys())
    sites = resolve_sites(spec, config)
    absent = sites_touching(sites, absent_paths(merged_layout))
    prefix = next((p for p in (find_prefix(keys, s) for s in sites if s.index not in absent) if p is not None), None)
    if prefix is None:
        raise InputError(f"{model}: no MLP tensors where a {config.get('model_type')} checkpoint keeps them "
                         f"(e.g. {sites[0].module_path('up') if sites else '?'}.weight)")
    check_checkpoint(config, reader, spec, sites, prefix, absent_paths(merged_layout))  # before any work
    widths = _site_widths([s for s in sites if s.index not in absent], reader.shape, prefix, keys)
    chosen = [i for i in parse_layers(settings.layers, len(sites)) if i not in absent] if absent else settings.layers
    plans = plan_layers(sites, widths, chosen, settings.dim, settings.ratio,
                        settings.per_layer, settings.allow_full_width, settings.multiple_of)
    _check_plans(settings, plans)
    if target is not None:  # a disk too small for the output is found now, not after the k-means
        check_free_space(target, estimated_output_bytes(plans, reader, prefix, keys, dtype))
    options = MethodOptions(seed=settings.seed, backend=settings.backend, device=rank_device(settings.device),
                            kmeans_init=settings.kmeans_init)
    calibration = None
    if settings.calibration is not None:
        moe = next((plan.site.label for plan in plans if plan.site.experts), None)
        if moe is not None:
            raise InputError(f"--calibration does not support Mixture-of-Experts layers yet (layer {moe}); "
                             f"fuse them without --calibration")
        calibration = _calibration_data(settings, source_dir, spec)
    compute = lambda plan: fuse_layer(plan, settings, options, prefix, keys, reader.get, dtype)  # noqa: E731
    if is_worker():  # torchrun: ranks > 0 compress their share of the layers for rank 0, which writes
        serve(plans, compute)
        return None
    if on_start:
        on_start(plans)
    source_sha256 = InBackground(reader.sha256)  # a second full read of the source, overlapping the fusing


    params_before = sum(_numel(reader.shape(k)) for k in keys if _is_float_param(reader, k))
    layers: list[LayerReport] = []
    modules: list[dict] = []
    with staging_directory(target, overwrite) as staging:
        # shard writes overlap the fusing; a failure stops the writer before the staging folder goes
        with ShardedWriter(staging, max_shard, background=True) as writer:
            fused_keys: set[str] = set()

            def take(layer: FusedLayer) -> None:  # write one compressed site as soon as it comes
                nonlocal fused_keys
                for name, tensor in layer.tensors.items():
                    writer.add(name, tensor)
                fused_keys |= layer.consumed
                modules.extend(layer.specs)
                layers.append(layer.report)
                if on_layer:
                    on_layer(layer.report)

            calibrated = None
            if calibration is None:
                for layer in gather_in_order(plans, compute):
                    take(layer)
            else:
                calibrated = _run_calibration(settings, source_dir, reader, prefix, sites, plans, keys, options,
                                              calibration, dtype, take)
            for key in reader.keys():
                if key not in fused_keys:
                    writer.add(key, _cast(reader.get(key), dtype, key))
            files = writer.close()

        saved = sum(layer.params_before - layer.params_after for layer in layers)
        report = FuseReport(
            source=model, source_path=str(source_dir), output=str(target), model_type=config["model_type"],
            method=settings.method, seed=settings.seed,
            backend=layers[0].backend if layers and layers[0].backend else backend,
            layers=layers, parameters={"before": params_before, "after": params_before - saved}, files=files,
        )
        if any(site.experts for site in sites):
            in_experts = expert_parameter_count(sites, prefix, keys, reader.shape)
            report.parameters.update(_expert_share(in_experts, saved, params_before))
        report.warnings = layer_warnings(layers)
        if calibrated is not None:
            report.calibration = _calibration_record(settings, calibration, calibrated)
            if not calibrated.hidden_state_error <= ERROR_WARNING:
                report.warnings.append(f"the final hidden state is off by {calibrated.hidden_state_error:.3g} "
                                       f"(relative) on the calibration text (above {ERROR_WARNING})")
        out_config = dict(config)
        if dtype is not None:
            out_config["dtype"] = settings.dtype
            out_config.pop("torch_dtype", None)
        section = carry_merge_layout(_section(report, settings, modules, source_sha256.result(), settings.dtype), merged_layout)
        if report.calibration is not None:
            section["calibration"] = report.calibration
        write_json(staging / "config.json", fused_config_dict(out_config, section))
        write_remote_code(staging)
        carry_side_files(source_dir, staging)  # tokenizer, generation config, sentence-transformers modules
        recipe = {"model": model, **{k: v for k, v in asdict(settings).items() if k != "allow_full_width"
                                     and (settings.calibration is not None or k not in CALIBRATION_FIELDS)}}
        (staging / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=True), encoding="utf-8")
        report.seconds = time.perf_counter() - start
        (staging / "README.md").write_text(model_card(report.to_dict()), encoding="utf-8")
        verify_checkpoint(staging)
    report.files = sorted(p.name for p in target.iterdir())
    return report


CALIBRATION_FIELDS = ("calibration", "calibration_limit", "max_length", "calibration_batch_size", "text_column",
                      "protect", "ridge", "grouping")


def _check_calibration(settings: FuseSettings, config: dict, merged_layout) -> None:
    """Refuse what ``--calibration`` cannot do, before any work (one-line InputErrors)."""
    from .calibration import check_settings
    from .distributed import active
    from .format import is_fused_config
    from .methods import check_calibrated

    check_settings(settings.calibration_limit, settings.max_length, settings.protect, settings.ridge,
                   settings.text_column, settings.calibration_batch_size, settings.grouping)
    check_calibrated(settings.method)
    if active():
        raise InputError("--calibration runs the model layer by layer in one process: run it without torchrun")
    if merged_layout or is_fused_config(config):
        raise InputError("--calibration needs an original (unfused, unmerged) checkpoint as input")
    if config.get("is_encoder_decoder"):
        raise InputError("--calibration does not support encoder-decoder models yet; fuse them without --calibration")


def _calibration_data(settings: FuseSettings, source_dir: Path, spec):
    """The tokenised calibration batch (decoder LMs: packed windows of newline-joined text)."""
    from .calibration import DEFAULT_ENCODER_LIMIT, DEFAULT_LIMIT, read_calibration
    from .runtime import check_window, load_tokenizer

    # sequences must fit the model's positions (the default adapts to them)
    settings.max_length = check_window(settings.max_length, read_config(source_dir), default=DEFAULT_MAX_LENGTH)
    if settings.calibration_limit is None:
        settings.calibration_limit = DEFAULT_LIMIT if spec.causal_lm else DEFAULT_ENCODER_LIMIT
    tokenizer = load_tokenizer(source_dir)
    return read_calibration(settings.calibration, tokenizer, limit=settings.calibration_limit,
                            max_length=settings.max_length, text_column=settings.text_column, packed=spec.causal_lm)


def _run_calibration(settings, source_dir, reader, prefix, sites, plans, keys, options, data, dtype, emit):
    """The layer-by-layer calibration pass (mlpfuse/calibration.py); each compressed site goes to ``emit``."""
    from .calibration import StreamingModel, run_calibrated
    from .runtime import resolve_device

    stream = StreamingModel(source_dir, reader, prefix, sites, resolve_device(settings.device))

    def compress(plan, mlp, layer_options):
        names = tensor_names(plan.site, prefix, keys)
        layer = compress_dense(plan, mlp, settings.method, layer_options, prefix, set(names.values()), dtype)
        return layer.compressed, layer

    return run_calibrated(stream, data, plans, keys, options, settings.protect, settings.ridge, compress, emit,
                          settings.calibration_batch_size, grouping=settings.grouping)


def _calibration_record(settings: FuseSettings, data, result) -> dict:
    """The calibration settings, data provenance and whole-model error (config section, report, recipe)."""
    return {"file": data.file, "sha256": data.sha256, "texts": data.texts, "tokens": result.tokens,
            "sequences": result.sequences, "packed": data.packed, "calibration_limit": settings.calibration_limit,
            "max_length": settings.max_length, "text_column": settings.text_column, "protect": settings.protect,
            "ridge": settings.ridge, "grouping": settings.grouping, "hidden_state_error": result.hidden_state_error,
            "batch_size": result.batch_size, "device": result.device, "cache": result.cache,
            "layer_seconds": result.layer_seconds}


def _numel(shape: tuple) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _is_float_param(reader: CheckpointReader, key: str) -> bool:
    return key.rsplit(".", 1)[-1] != "fusion_scale" and reader.is_floating(key)


def _expert_share(in_experts: int, saved: int, params_before: int) -> dict:
    """Parameters in (routed + shared) experts before/after, and their share of the model."""
    after = in_experts - saved
    return {"experts_before": in_experts, "experts_after": after,
            "expert_share_before": in_experts / params_before, "expert_share_after": after / (params_before - saved)}


def fuse_model(model: torch.nn.Module, settings: FuseSettings) -> FuseReport:
    """Fuse the chosen MLPs of an in-memory transformers model in place; returns the report.

    The model's class becomes the fused subclass of its own class, so ``save_pretrained`` writes
    an mlpfuse checkpoint and ``mlpfuse.load`` reads it back. Data-free only: ``settings.calibration``
    raises InputError (the calibration pass streams a checkpoint: :func:`fuse_checkpoint`).
    """
    if settings.calibration is not None:
        raise InputError("calibration runs on a checkpoint: use fuse_checkpoint (mlpfuse fuse --calibration)")
    config = model.config.to_dict()
    spec = lookup(config.get("model_type"))
    base = model.base_model
    state = base.state_dict()
    keys = set(state)
    sites = resolve_sites(spec, config)
    widths = _site_widths(sites, lambda k: tuple(state[k].shape), "", keys)
    plans = plan_layers(sites, widths, settings.layers, settings.dim, settings.ratio,
                        settings.per_layer, settings.allow_full_width, settings.multiple_of)
    _check_plans(settings, plans)
    backend = resolve_backend(settings.backend, settings.device)
    options = MethodOptions(seed=settings.seed, backend=settings.backend, device=settings.device,
                            kmeans_init=settings.kmeans_init)
    params_before = sum(p.numel() for p in model.parameters())
    layers, modules = [], []
    for plan in plans:
        layer = fuse_layer(plan, settings, options, "", keys, lambda k: state[k].detach(), None)
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
        report.parameters.update(_expert_share(in_experts, saved, params_before))
    previous = getattr(model.config, "mlpfuse", None) or {}
    model.config.mlpfuse = {
        "version": __version__, "method": settings.method, "seed": settings.seed, "backend": backend,
        "layers": sorted(set(previous.get("layers", [])) | {layer.index for layer in layers}),
        "widths": {**previous.get("widths", {}), **{str(layer.index): layer.width for layer in layers}},
        "modules": previous.get("modules", []) + modules,
    }
    model.__class__ = fused_model_class(type(model))  # also registers what the class can record
    return report

