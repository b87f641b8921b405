"""``mlpfuse ntk-check``: output and Adam-NTK errors of compression methods on one MLP layer."""

from __future__ import annotations

import typer
from rich.table import Table

from mlpfuse.cli.common import check_inputs, check_json_path, log, results_console, write_json_report
from mlpfuse.cli.options import METHODS_HELP, Options, command
from mlpfuse.methods.catalog import ntk_default_methods  # import-light: the declarations, not the maths
from mlpfuse.option_fields import COMPRESSION, OUTPUT, RUNTIME, TEXT

DEFAULT_METHODS = ntk_default_methods()


@command(TEXT["text_column"], TEXT["pair_column"].using(None, aliases=("--pair-column",)), TEXT["max_length"].using(64),
         COMPRESSION["backend"], RUNTIME["device"], TEXT["batch_size"].using(16), OUTPUT["json_path"])
def ntk_check_command(
    model: str = typer.Argument(..., help="Checkpoint directory, hub id, or 'minilm' for the bundled all-MiniLM-L6-v2."),
    data: str = typer.Option(..., "--data", help="Samples: a .tsv/.csv/.jsonl file (first --samples rows)."),
    samples: int = typer.Option(64, "--samples", help="Number of rows used (the NTK is samples x samples)."),
    layer: int = typer.Option(0, "--layer", help="The MLP layer compressed and measured."),
    dim: int = typer.Option(None, "--dim", help="Compressed width k (svd: the rank matching k's parameter count)."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods",
                                help=f"Comma-separated methods to compress with ('' for none): {METHODS_HELP}"),
    seeds: int = typer.Option(3, "--seeds", help="Seeds 0..N-1 per method; mean and std are reported."),
    compare: list[str] = typer.Option(None, "--compare",
                                      help="Already fused checkpoint(s) of MODEL to compare (repeat, or comma-separate)."),
    head_seed: int = typer.Option(0, "--head-seed", help="Seed of the random scalar head (models without their own)."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG bar chart of both relative errors per method."),
    opts: Options = None,
):
    """Compare compression methods by MLP output error and Adam-NTK error (paper Table 1)."""
    json_path = opts.json_path
    check_json_path(json_path, model, files=(data,))
    check_json_path(plot, model, files=(data,), what="--plot")
    check_inputs(model, files=(data,))
    from mlpfuse.analysis.ntk import ntk_check, plot_report  # heavy (torch, transformers): once the inputs are known to exist

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    compare_list = [p.strip() for entry in (compare or []) for p in entry.split(",") if p.strip()]
    if compare_list and methods == ",".join(DEFAULT_METHODS) and dim is None:
        method_list = []  # --compare alone: only the given checkpoints

    def on_run(run):
        seed = "" if run.seed is None else f" seed {run.seed}"
        log.print(f"{run.label}{seed}: output {run.metrics['output_error_rel']:.4f}, "
                  f"Adam NTK {run.metrics['ntk_error_rel']:.4f} (relative), {run.seconds:.1f}s", highlight=False)

    report = ntk_check(
        model, data, text_column=opts.text_column, pair_column=opts.pair_column, samples=samples,
        max_length=opts.max_length, layer=layer, dim=dim, methods=method_list, seeds=seeds, compare=compare_list,
        backend=opts.backend, device=opts.device, head_seed=head_seed, batch_size=opts.batch_size, on_run=on_run,
    )
    out = results_console(json_path)
    out.print(_table(report))
    out.print(f"f = {report.scalar}; {report.samples} samples, {report.tokens} tokens, {report.device}, "
              f"{report.seconds:.1f}s", highlight=False)
    if plot:
        plot_report(report, plot)
        out.print(f"wrote {plot}", highlight=False)
    write_json_report(json_path, report.to_dict())


def _cell(summary, metric: str, digits: str) -> str:
    mean, std = summary.mean[metric], summary.std[metric]
    return f"{mean:{digits}}" if len(summary.runs) == 1 else f"{mean:{digits}} ± {std:{digits}}"


def _table(report) -> Table:
    title = (f"{report.model}: layer {report.layer_label} MLP, {report.original_width} -> {report.dim} "
             f"({report.original_mlp_parameters:,} MLP parameters)")
    table = Table(title=title)
    columns = ("method", "MLP params", "output err", "output rel", "final hidden rel", "Adam NTK err", "Adam NTK rel",
               "SGD NTK rel")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for summary in report.methods:
        table.add_row(
            summary.label, f"{summary.mlp_parameters:,}", _cell(summary, "output_error", ".4g"),
            _cell(summary, "output_error_rel", ".4f"), _cell(summary, "hidden_error_rel", ".4f"),
            _cell(summary, "ntk_error", ".4g"), _cell(summary, "ntk_error_rel", ".4f"),
            _cell(summary, "sgd_ntk_error_rel", ".4g"),
        )
    return table
