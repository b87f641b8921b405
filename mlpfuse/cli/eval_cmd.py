"""``mlpfuse eval``: perplexity of a causal-LM checkpoint (original, fused or tuned) on a text file."""

from __future__ import annotations

import typer
from rich.table import Table

from .common import DebugOption, JsonOption, check_inputs, check_json_path, handle_errors, results_console, write_json_report
from .options import device_option, max_length_option, text_column_option


@handle_errors
def evaluate(
    model: str = typer.Argument(..., help="Causal-LM checkpoint directory (original, fused or tuned)."),
    data: str = typer.Option(..., "--data", help="Text file (.tsv/.csv/.jsonl) or hub:NAME."),
    text_column: str = text_column_option(),
    max_length: int = max_length_option(512),
    limit_tokens: int = typer.Option(4096, "--limit-tokens", help="Evaluate the first N tokens of the text."),
    device: str = device_option(),
    json_path: str = JsonOption,
    debug: bool = DebugOption,
):
    """Perplexity on a text file: one protocol (windows, no overlap, mean next-token NLL), see docs/llm.md.

    The text column's rows are joined with newlines; ``--max-length`` is the window length in tokens.
    """
    from ..evaluate import check_protocol, evaluate_checkpoint

    check_protocol(max_length, limit_tokens)
    check_json_path(json_path, model, files=(data,))
    check_inputs(model, files=(data,))
    report = evaluate_checkpoint(model, data, text_column, max_length, limit_tokens, device)
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
