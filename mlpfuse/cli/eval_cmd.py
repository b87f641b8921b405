"""``mlpfuse eval``: perplexity of a causal-LM checkpoint (original, fused or tuned) on a text file."""

from __future__ import annotations

import typer
from rich.table import Table

from mlpfuse.cli.common import check_inputs, check_json_path, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.option_fields import OUTPUT, RUNTIME, TEXT


@command(TEXT["text_column"], TEXT["max_length"].using(512), RUNTIME["device"], OUTPUT["json_path"])
def evaluate(
    model: str = typer.Argument(..., help="Causal-LM checkpoint directory (original, fused or tuned)."),
    data: str = typer.Option(..., "--data", help="Text file (.tsv/.csv/.jsonl) or hub:NAME."),
    limit_tokens: int = typer.Option(4096, "--limit-tokens", help="Evaluate the first N tokens of the text."),
    opts: Options = None,
):
    """Perplexity on a text file: one protocol (windows, no overlap, mean next-token NLL), see docs/llm.md.

    The text column's rows are joined with newlines; ``--max-length`` is the window length in tokens.
    """
    from mlpfuse.train.evaluate import check_protocol, evaluate_checkpoint

    max_length, json_path = opts.max_length, opts.json_path
    check_protocol(max_length, limit_tokens)
    check_json_path(json_path, model, files=(data,))
    check_inputs(model, files=(data,))
    report = evaluate_checkpoint(model, data, opts.text_column, max_length, limit_tokens, opts.device)
    table = Table(title=f"perplexity of {model} on {data}")
    table.add_column("perplexity", justify="right")
    table.add_column("mean NLL", justify="right")
    table.add_column("predicted tokens", justify="right")
    table.add_column("windows", justify="right")
    table.add_column("seconds", justify="right")
    windows = f"{report['windows']} x {report['max_length']}" + (", BOS first" if report["bos"] else "")
    table.add_row(f"{report['perplexity']:.4g}", f"{report['mean_nll']:.4f}", str(report["predicted_tokens"]),
                  windows, f"{report['seconds']:.1f}")
    results_console(json_path).print(table)
    write_json_report(json_path, report)
