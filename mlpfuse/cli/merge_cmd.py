"""``mlpfuse merge-layers``: adjacent FF sublayers aligned, averaged and tied into one shared MLP."""

from __future__ import annotations

import typer
from rich.table import Table

from mlpfuse.cli.common import check_inputs, check_json_path, log, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.errors import InputError
from mlpfuse.option_fields import OUTPUT, RUNTIME, TEXT


@command(OUTPUT["output"].using(required=True), TEXT["text_column"].using("sentence", aliases=("--column",)),
         TEXT["pair_column"], TEXT["max_length"].using(128), TEXT["batch_size"].using(32), RUNTIME["seed"],
         RUNTIME["max_shard_size"], OUTPUT["overwrite"], OUTPUT["json_path"])
def merge_layers(
    model: str = typer.Argument(..., help="Checkpoint directory (plain or mlpfuse), hub id, or 'minilm'."),
    layers: str = typer.Option(None, "--layers", help="Adjacent MLP layers to merge, e.g. 2-3 (first = anchor)."),
    count: int = typer.Option(None, "--count", help="Instead of --layers: try every window of this many adjacent layers, keep the best on --eval."),
    calibration: str = typer.Option(None, "--calibration", help="Text file (.tsv/.csv/.jsonl) whose activations align the neurons."),
    eval_path: str = typer.Option(None, "--eval", help="Text file for the validation loss (perplexity for decoders, hidden-state MSE for encoders)."),
    calibration_limit: int = typer.Option(300, "--calibration-limit", help="Rows read from --calibration."),
    eval_limit: int = typer.Option(200, "--eval-limit", help="Rows read from --eval."),
    max_tokens: int = typer.Option(10_000, "--max-tokens", help="Calibration tokens kept per layer."),
    permute: bool = typer.Option(True, "--permute/--no-permute", help="Align neurons before averaging (--no-permute: plain average baseline)."),
    drop: bool = typer.Option(False, "--drop", help="Baseline: drop all but the first FF sublayer of the window instead of merging."),
    plot: str = typer.Option(None, "--plot", help="Write a layer-by-layer activation similarity heat map (PNG) here."),
    opts: Options = None,
):
    """Merge adjacent feed-forward sublayers into one shared (tied) MLP and write a loadable checkpoint."""
    output, json_path = opts.output, opts.json_path
    if count is not None and layers is not None:
        raise InputError("give either --layers or --count, not both")
    if plot is not None and calibration is None:
        raise InputError("--plot needs activations: pass --calibration FILE")
    check_json_path(json_path, model, files=(calibration, eval_path))
    check_json_path(plot, model, files=(calibration, eval_path), what="--plot")
    check_inputs(model, files=(calibration, eval_path))
    from mlpfuse.compress.merge import MergeSettings, merge_checkpoint, plot_similarity  # heavy: once the inputs are known to exist

    settings = MergeSettings(
        layers=layers, count=count, mode="drop" if drop else "permute" if permute else "average",
        calibration=calibration, eval=eval_path, column=opts.text_column, pair_column=opts.pair_column,
        calibration_limit=calibration_limit, eval_limit=eval_limit, max_length=opts.max_length, max_tokens=max_tokens,
        batch_size=opts.batch_size, seed=opts.seed, max_shard_size=opts.max_shard_size,
    )

    def on_candidate(candidate):
        loss = "-" if candidate.loss is None else f"{candidate.loss:.6g}"
        log.print(f"window {'-'.join(candidate.labels)}: loss {loss}", highlight=False)

    report = merge_checkpoint(model, output, settings, overwrite=opts.overwrite, on_candidate=on_candidate)
    if plot is not None:
        plot_similarity(report, plot)
    out = results_console(json_path)
    out.print(_candidate_table(report))
    if report.alignment:
        out.print(_alignment_table(report))
    before, after = report.parameters["before"], report.parameters["after"]
    out.print(f"{report.mode}: layers {', '.join(report.window_labels)} -> one shared MLP"
              if report.mode != "drop" else f"drop: FF sublayers {', '.join(report.window_labels[1:])} removed",
              highlight=False)
    out.print(f"parameters: {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer); "
              f"wrote {report.output} in {report.seconds:.1f}s" + (f"; plot {plot}" if plot else ""), highlight=False)
    write_json_report(json_path, report.to_dict())


def _candidate_table(report) -> Table:
    original = "" if report.original_loss is None else f" (original model: {report.original_loss:.6g})"
    table = Table(title=f"candidate windows, {report.objective}{original}")
    table.add_column("window")
    table.add_column("loss", justify="right")
    table.add_column("chosen", justify="center")
    for candidate in report.candidates:
        table.add_row("-".join(candidate.labels), "-" if candidate.loss is None else f"{candidate.loss:.6g}",
                      "*" if candidate.layers == report.window else "")
    return table


def _alignment_table(report) -> Table:
    table = Table(title="neuron correlation with the anchor layer (calibration pre-activations)")
    for column in ("layer", "before alignment", "after alignment"):
        table.add_column(column, justify="right")
    for row in report.alignment:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(row.label, fmt(row.correlation_before), fmt(row.correlation_after))
    return table
