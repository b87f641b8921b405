"""``mlpfuse inspect`` and ``mlpfuse architectures``: what a checkpoint holds, what is supported."""

from __future__ import annotations

import typer
from rich.table import Table

from ..arch import ARCHITECTURES
from .common import DebugOption, JsonOption, check_json_path, console, handle_errors, results_console, write_json_report


@handle_errors
def inspect(
    model: str = typer.Argument(..., help="Checkpoint directory (fused or not), hub id or 'minilm'."),
    json_path: str = JsonOption,
    debug: bool = DebugOption,
):
    """Show whether a checkpoint is fused, and how (method, layers, widths, provenance)."""
    from ..checkpoint import read_config  # heavy (torch): imported here so `architectures` starts light
    from ..remote.modeling_mlpfuse import FUSED_MODEL_TYPE
    from ..source import resolve_model
    check_json_path(json_path, model)

    directory = resolve_model(model)
    config = read_config(directory)
    fused = config.get("model_type") == FUSED_MODEL_TYPE
    section = config.get("mlpfuse") or {}
    out = results_console(json_path)
    if not fused:
        out.print(f"{directory}: a plain {config.get('model_type')} checkpoint (not fused)", highlight=False)
    else:
        table = Table(title=f"{directory}: {config.get('base_model_type')} fused with {section.get('method')}")
        table.add_column("layer", justify="right")
        table.add_column("width before", justify="right")
        table.add_column("width after", justify="right")
        for layer, label in zip(section.get("layers", []), section.get("layer_labels", section.get("layers", []))):
            key = str(layer)
            table.add_row(str(label), str(section.get("original_widths", {}).get(key, "?")), str(section["widths"][key]))
        out.print(table)
        params = section.get("parameters", {})
        out.print(f"parameters {params.get('before', '?'):,} -> {params.get('after', '?'):,}; seed {section.get('seed')}, "
                  f"backend {section.get('backend')}, source {section.get('source')} (sha256 {str(section.get('source_sha256'))[:12]}...)",
                  highlight=False)
    write_json_report(json_path, {"path": str(directory), "fused": fused, "model_type": config.get("model_type"),
                                  "mlpfuse": section})


@handle_errors
def architectures(debug: bool = DebugOption):
    """List the supported architectures and where their MLPs live."""
    table = Table(title="supported architectures")
    for column in ("family", "model_type", "MLP sites", "projections", "layout"):
        table.add_column(column)
    for spec in ARCHITECTURES:
        projections = spec.projections.describe() + (
            f" (gated: {spec.gated_projections.describe()})" if spec.gated_projections else "")
        table.add_row(spec.name, ", ".join(spec.model_types), "; ".join(s.path for s in spec.sites), projections, spec.layout)
    console.print(table)
