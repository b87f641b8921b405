"""``mlpfuse inspect`` and ``mlpfuse architectures``: what a checkpoint holds, what is supported."""

from __future__ import annotations

import typer
from rich.table import Table

from mlpfuse.arch import ARCHITECTURES
from mlpfuse.cli.common import check_json_path, console, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.option_fields import OUTPUT


@command(OUTPUT["json_path"])
def inspect(
    model: str = typer.Argument(..., help="Checkpoint directory (fused, exported or plain), hub id or 'minilm'."),
    flops: bool = typer.Option(None, "--flops/--no-flops", help="Count forward FLOPs per token (builds the model with "
                               "random weights).", show_default="when the model has at most 1e9 parameters"),
    opts: Options = None,
):
    """What to know before deploying: fused or exported, widths per layer, remote code, parameter and FLOP savings."""
    from mlpfuse.checkpoints.source import resolve_model

    json_path = opts.json_path
    check_json_path(json_path, model)
    if model.endswith(".gguf"):
        return _inspect_gguf(model, json_path)
    directory = resolve_model(model, quantised_ok=True)  # reported below; every other command refuses it
    from mlpfuse.checkpoints.tensors import read_config  # heavy (torch): once the model is found, so a mistyped path fails at once
    from mlpfuse.deploy.deployinfo import describe

    config = read_config(directory)
    facts = describe(directory, flops)
    section = config.get("mlpfuse") or {}
    out = results_console(json_path)
    kind, model_type = facts["kind"], facts["model_type"]
    if kind == "fused":
        table = Table(title=f"{directory}: {model_type} fused with {section.get('method')}")
        table.add_column("layer", justify="right")
        table.add_column("width before", justify="right")
        table.add_column("width after", justify="right")
        for layer in facts["layers"]:
            table.add_row(layer["label"], str(layer["before"] if layer["before"] is not None else "?"), str(layer["after"]))
        out.print(table)
        out.print("remote code: needed: load with mlpfuse.load(path) or transformers' AutoModel...from_pretrained(path, "
                  "trust_remote_code=True); `mlpfuse export` writes a plain checkpoint that needs none", highlight=False)
        out.print(f"seed {section.get('seed')}, backend {section.get('backend')}, source {section.get('source')} "
                  f"(sha256 {str(section.get('source_sha256'))[:12]}...)", highlight=False)
    elif kind == "exported":
        export = facts["export"] or {}
        out.print(f"{directory}: a plain {model_type} checkpoint exported by mlpfuse from {export.get('source')} "
                  f"(method {export.get('method')}{', zero-padded' if export.get('padded') else ''}"
                  f"{', adapter ' + str(export.get('adapter')) if export.get('adapter') else ''})", highlight=False)
        out.print("remote code: not needed (plain transformers loads it)", highlight=False)
    else:
        out.print(f"{directory}: a plain {model_type} checkpoint (not fused)", highlight=False)
        out.print("remote code: not needed", highlight=False)
    if facts["quantised"]:
        out.print(f"quantised ({facts['quantised']}): mlpfuse's other commands need the original or a dequantised copy",
                  highlight=False)
    if facts["width_fields"] and kind != "fused":
        out.print("MLP widths: " + ", ".join(f"{k}={v}" for k, v in facts["width_fields"].items()), highlight=False)
    params = facts["parameters"]
    if "before" in params and "after" in params:
        before, after = params["before"], params["after"]
        out.print(f"parameters {before:,} -> {after:,} ({_fewer(before, after)} fewer)", highlight=False)
    elif "after" in params:
        out.print(f"parameters {params['after']:,}", highlight=False)
    counts = facts.get("flops")
    if counts:
        after = counts["after"]
        line = f"forward FLOPs per token ({counts['sequence_length']}-token sequence): "
        if "before" in counts:
            before = counts["before"]
            line += (f"{before['flops_per_token']:,.0f} -> {after['flops_per_token']:,.0f} "
                     f"({_fewer(before['flops_per_token'], after['flops_per_token'])} fewer)")
            if before.get("mlp_flops_per_token"):
                line += (f"; in the MLPs {before['mlp_flops_per_token']:,.0f} -> {after['mlp_flops_per_token']:,.0f} "
                         f"({_fewer(before['mlp_flops_per_token'], after['mlp_flops_per_token'])} fewer)")
        else:
            line += f"{after['flops_per_token']:,.0f}"
        out.print(line, highlight=False)
    elif facts["kind"] == "fused":
        out.print("FLOPs: pass --flops to count them (builds the model)", highlight=False)
    _print_runtimes(out, facts["runtimes"])
    write_json_report(json_path, {"path": str(directory), "fused": kind == "fused", "model_type": config.get("model_type"),
                                  "mlpfuse": section, **facts})


def _print_runtimes(out, rows) -> None:
    for row in rows:
        mark = {True: "yes", False: "no", None: "?"}[row["loads"]]
        out.print(f"runtime {row['runtime']}: {mark}: {row['how']}{'' if row['tested'] else ' [untested]'}",
                  highlight=False)


def _inspect_gguf(model: str, json_path) -> None:
    from pathlib import Path

    from mlpfuse.errors import InputError

    path = Path(model).expanduser()
    if not path.is_file():
        raise InputError(f"no such GGUF file: {model}")
    from mlpfuse.deploy.deployinfo import describe_gguf

    try:
        facts = describe_gguf(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{model} is not a readable GGUF file: {exc}") from None
    out = results_console(json_path)
    widths = facts["widths"]
    out.print(f"{path}: GGUF, llama.cpp architecture {facts['model_type']}, {facts['tensors']} tensors, MLP widths "
              + (f"per layer {min(widths)}-{max(widths)}" if facts["per_layer"] else str(widths[0]))
              + (f"; written by mlpfuse from {facts['mlpfuse']}" if facts["mlpfuse"] else ""), highlight=False)
    _print_runtimes(out, facts["runtimes"])
    write_json_report(json_path, {"path": str(path), **facts})


def _fewer(before: float, after: float) -> str:
    return f"{100 * (before - after) / before:.1f}%" if before else "0%"


@command()
def architectures(opts: Options = None):
    """List the supported architectures and where their MLPs live."""
    table = Table(title="supported architectures")
    for column in ("family", "model_type", "MLP sites", "projections", "layout"):
        table.add_column(column)
    for spec in ARCHITECTURES:
        projections = spec.projections.describe() + (
            f" (gated: {spec.gated_projections.describe()})" if spec.gated_projections else "")
        table.add_row(spec.name, ", ".join(spec.model_types), "; ".join(s.path for s in spec.sites), projections, spec.layout)
    console.print(table)
