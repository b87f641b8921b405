"""``mlpfuse export``: a fused checkpoint in, a plain base-architecture checkpoint out (no remote code)."""

from __future__ import annotations

import typer

from .common import DebugOption, JsonOption, check_inputs, check_json_path, handle_errors, results_console, write_json_report
from .options import max_shard_size_option, output_option, overwrite_option


@handle_errors
def export(
    model: str = typer.Argument(..., help="Fused checkpoint directory (written by mlpfuse fuse/tune/finetune)."),
    output: str = output_option(required=True),
    pad: bool = typer.Option(False, "--pad", help="Pad narrower MLPs with zero neurons when widths differ (exact; costs parameters)."),
    adapter: str = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory trained on the fused model: merged first."),
    max_shard_size: str = max_shard_size_option(),
    overwrite: bool = overwrite_option(),
    json_path: str = JsonOption,
    debug: bool = DebugOption,
):
    """Fold P into the weights and write the base architecture (llama, bert, gpt2...): loads with plain transformers."""
    check_json_path(json_path, model)
    check_inputs(model)
    from ..export import export_checkpoint  # heavy (torch, transformers): once the inputs are known to exist

    report = export_checkpoint(model, output, pad=pad, adapter=adapter, overwrite=overwrite, max_shard_size=max_shard_size)
    out = results_console(json_path)
    widths = ", ".join(f"{name}={width}" for name, width in report.widths.items()) or "unchanged"
    out.print(f"exported {report.source} -> {report.output}: plain {report.model_type} ({report.architecture}), "
              f"{widths}; loads with transformers' AutoModel, no trust_remote_code", highlight=False)
    params = report.parameters
    cost = sum(p.get("parameters", 0) for p in report.padding.values() if isinstance(p, dict))
    out.print(f"parameters: fused {params['fused']:,} -> exported {params['exported']:,}"
              + (f" (zero-neuron padding: +{cost:,})" if cost else "")
              + (f"; merged adapter {report.adapter}" if report.adapter else "")
              + f"; max |export - fused| on probe tokens {report.max_abs_diff:.2g}; {report.seconds:.1f}s", highlight=False)
    write_json_report(json_path, report.to_dict())
