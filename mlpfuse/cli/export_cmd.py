"""``mlpfuse export``: a fused checkpoint in, a plain base-architecture checkpoint (no remote code) or a GGUF out."""

from __future__ import annotations

import typer

from mlpfuse.cli.common import check_inputs, check_json_path, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.errors import InputError
from mlpfuse.option_fields import OUTPUT, RUNTIME


@command(OUTPUT["output"].using(required=True), RUNTIME["max_shard_size"], OUTPUT["overwrite"], OUTPUT["json_path"])
def export(
    model: str = typer.Argument(..., help="Fused checkpoint directory (written by mlpfuse fuse/tune/finetune)."),
    fmt: str = typer.Option("transformers", "--format", help="transformers (a checkpoint directory) or gguf (one "
                               "file for llama.cpp; -o is then the .gguf file)."),
    outtype: str = typer.Option(None, "--outtype", help="GGUF weight type: f32, f16, bf16 or q8_0.", show_default="f16"),
    pad: bool = typer.Option(False, "--pad", help="Pad narrower MLPs with zero neurons when widths differ (exact; costs parameters)."),
    adapter: str = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory trained on the fused model: merged first."),
    opts: Options = None,
):
    """Fold P into the weights and write the base architecture (llama, bert, gpt2...): loads with plain transformers."""
    output, overwrite, json_path = opts.output, opts.overwrite, opts.json_path
    check_json_path(json_path, model)
    check_inputs(model)
    if fmt not in ("transformers", "gguf"):
        raise InputError(f"--format {fmt!r} is not one of transformers, gguf")
    if fmt == "gguf":
        return _export_gguf(model, output, outtype or "f16", pad, adapter, overwrite, json_path)
    if outtype is not None:
        raise InputError("--outtype applies to --format gguf only")
    from mlpfuse.deploy.export import export_checkpoint  # heavy (torch, transformers): once the inputs are known to exist

    report = export_checkpoint(model, output, pad=pad, adapter=adapter, overwrite=overwrite,
                               max_shard_size=opts.max_shard_size)
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


def _export_gguf(model, output, outtype, pad, adapter, overwrite, json_path):
    from mlpfuse.deploy.gguf_export import export_gguf  # heavy (torch, transformers, gguf)

    report = export_gguf(model, output, outtype=outtype, pad=pad, adapter=adapter, overwrite=overwrite)
    out = results_console(json_path)
    widths = (f"per-layer MLP widths {min(report.widths)}-{max(report.widths)}" if report.per_layer
              else f"MLP width {report.widths[0]}") + (" (zero-padded)" if report.padded else "")
    out.print(f"exported {report.source} -> {report.output}: GGUF {report.arch} ({report.model_type}), {report.outtype}, "
              f"{widths}, {report.tensors} tensors, {report.bytes / 2**20:.1f} MiB; read back with gguf.GGUFReader",
              highlight=False)
    tokenizer = report.tokenizer
    out.print(f"tokenizer: {tokenizer['model']} ({tokenizer['tokens']} tokens, pre-tokenizer {tokenizer['pre']}"
              f"{'' if tokenizer['pre_known'] else ' (a guess)'}), chat template "
              f"{'carried' if tokenizer['chat_template'] else 'none'}", highlight=False)
    check = report.check
    if check is None:
        out.print("llama.cpp: not run (llama-cpp-python is not installed: pip install 'mlpfuse[gguf]')", highlight=False)
    else:
        agree = {None: "", True: "; tokenizes the prompts as transformers does",
                 False: "; tokenizes the prompts differently from transformers"}[check["tokens_agree"]]
        out.print(f"llama.cpp ({check['runtime']}): top-1 next token equal on {sum(check['top1_equal'])}/{check['prompts']} "
                  f"prompts, max relative logit difference {check['max_relative_diff']:.2g}{agree}; {report.seconds:.1f}s",
                  highlight=False)
    write_json_report(json_path, report.to_dict())
