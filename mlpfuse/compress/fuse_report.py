"""What a ``fuse`` run reports and records: one :class:`LayerReport` per compressed site, the
:class:`FuseReport` of a run, the warnings drawn from them (degenerate k-means, a calibration error
that explodes), and the :class:`~mlpfuse.checkpoints.writer.DerivedCheckpoint` that records the run in the
output (config section, recipe, model card)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlpfuse import __version__
from mlpfuse.checkpoints.card import model_card
from mlpfuse.checkpoints.format import fuse_section
from mlpfuse.checkpoints.tied import carry_merge_layout
from mlpfuse.checkpoints.writer import DerivedCheckpoint
from mlpfuse.compress.fuse_calibration import CALIBRATION_FIELDS, calibration_record
from mlpfuse.compress.fuse_moe import expert_parameter_count


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


def hidden_state_warning(hidden_state_error: float) -> list[str]:
    """The warning for a whole-model calibration error above :data:`ERROR_WARNING` (else none)."""
    if hidden_state_error <= ERROR_WARNING:
        return []
    return [f"the final hidden state is off by {hidden_state_error:.3g} (relative) on the calibration text "
            f"(above {ERROR_WARNING})"]


def expert_share(in_experts: int, saved: int, params_before: int) -> dict:
    """Parameters in (routed + shared) experts before/after, and their share of the model."""
    after = in_experts - saved
    return {"experts_before": in_experts, "experts_after": after,
            "expert_share_before": in_experts / params_before, "expert_share_after": after / (params_before - saved)}


def fuse_report(plan, settings, done, output: str) -> FuseReport:
    """The report of a fuse run (``plan``: its :class:`~mlpfuse.compress.fuse_plan.FusePlan`, ``done``: what
    :func:`mlpfuse.compress.fuse_layers.execute` did): per-layer reports, parameters before/after (MoE: the
    experts' share), calibration record and warnings."""
    reader, keys = plan.reader, plan.keys
    before = sum(_numel(reader.shape(k)) for k in keys if k.rsplit(".", 1)[-1] != "fusion_scale" and reader.is_floating(k))
    saved = sum(layer.params_before - layer.params_after for layer in done.layers)
    layers, source = done.layers, plan.source
    report = FuseReport(
        source=source.model, source_path=str(source.directory), output=output, model_type=source.config["model_type"],
        method=settings.method, seed=settings.seed, backend=layers[0].backend if layers and layers[0].backend
        else source.backend, layers=layers, parameters={"before": before, "after": before - saved}, files=done.files,
    )
    if any(site.experts for site in plan.sites):
        report.parameters.update(expert_share(expert_parameter_count(plan.sites, plan.prefix, keys, reader.shape),
                                              saved, before))
    report.warnings = layer_warnings(layers)
    if done.calibrated is not None:
        report.calibration = calibration_record(settings, plan.calibration, done.calibrated)
        report.warnings += hidden_state_warning(done.calibrated.hidden_state_error)
    return report


def derived_checkpoint(plan, settings, report: FuseReport, done) -> DerivedCheckpoint:
    """What the writer writes besides the tensors: config (output dtype), the ``mlpfuse`` section
    (a merged input's tied/dropped layout carried on), recipe and model card."""

    config = dict(plan.source.config)
    if plan.source.dtype is not None:
        config["dtype"] = settings.dtype
        config.pop("torch_dtype", None)
    section = fuse_section(method=report.method, layers=report.layers, seed=settings.seed, backend=report.backend,
                           dtype=settings.dtype, source=report.source, source_sha256=done.source_sha256,
                           parameters=report.parameters, modules=done.modules)
    section = carry_merge_layout(section, plan.source.merged_layout)
    if report.calibration is not None:
        section["calibration"] = report.calibration
    recipe = {"model": report.source, **{k: v for k, v in asdict(settings).items() if k != "allow_full_width"
                                         and (settings.calibration is not None or k not in CALIBRATION_FIELDS)}}
    return DerivedCheckpoint(source=plan.source.directory, config=config, section=section, recipe=recipe,
                             card=model_card(report.to_dict()))


def _numel(shape: tuple) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
