"""``mlpfuse fuse``: a checkpoint in, a fused checkpoint out."""

from __future__ import annotations

from contextlib import ExitStack

import typer
from rich.table import Table

from mlpfuse.cli.common import check_inputs, check_json_path, layer_progress, load_recipe, log, merge, results_console, write_json_report
from mlpfuse.cli.options import Options, command, merge_declared
from mlpfuse.errors import InputError
from mlpfuse.option_fields import CALIBRATION, FUSE_FIELDS, OUTPUT, recipe_types  # light: no torch


# What each recipe field may hold (YAML types), derived from the declarations (mlpfuse/option_fields.py): the
# fields of FuseSettings but allow_full_width, plus model, output and overwrite (tests/test_cli_start.py checks
# it against FuseSettings, not imported here: it pulls torch).
RECIPE_TYPES = {"model": (str,), **recipe_types(OUTPUT["output"], OUTPUT["overwrite"], *FUSE_FIELDS)}
RECIPE_FIELDS = set(RECIPE_TYPES)


# The declared options of fuse, in --help's order (model and --config are its own).
FUSE_OPTIONS = (OUTPUT["output"], *FUSE_FIELDS, OUTPUT["overwrite"], OUTPUT["json_path"])


@command(*FUSE_OPTIONS, recipe=True)
def fuse(
    model: str = typer.Argument(None, help="Checkpoint directory, hub id, or 'minilm' for the bundled all-MiniLM-L6-v2."),
    config: str = typer.Option(None, "--config", help="YAML recipe with the same fields (+ per_layer overrides); flags win."),
    opts: Options = None,
):
    """Fuse the MLPs of a Hugging Face checkpoint (MLP Fusion) and write a loadable checkpoint."""
    recipe = load_recipe(config, RECIPE_FIELDS, RECIPE_TYPES)
    model = merge(model, recipe, "model")
    if opts.dim is not None or opts.ratio is not None:  # a flag for the width replaces the recipe's width entirely
        recipe = {key: value for key, value in recipe.items() if key not in ("dim", "ratio")}
    values = merge_declared(opts, recipe, FUSE_OPTIONS)  # flags win over the recipe, the recipe over the defaults
    if model is None:
        raise InputError("no model given: pass a checkpoint directory, hub id or 'minilm' (or set model: in --config)")
    if values["output"] is None:
        raise InputError("no output directory given: pass -o DIR (or set output: in --config)")
    calibration = values["calibration"]
    check_json_path(opts.json_path, model, files=(calibration,) if calibration else ())
    given = [f for f in CALIBRATION if f.name != "calibration"
             and (getattr(opts, f.name) is not None or recipe.get(f.name) is not None)]
    if calibration is None and given:
        flag = given[0].flags[-1]
        raise InputError(f"{flag} applies to data-aware fusion: pass --calibration FILE too (or drop {flag})")
    check_inputs(model, files=(calibration,))
    from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint  # heavy (torch, transformers): once the inputs are known to exist

    settings = FuseSettings(**{f.name: values[f.name] for f in FUSE_FIELDS})
    output, overwrite, json_path = values["output"], bool(values["overwrite"]), opts.json_path

    with ExitStack() as stack:
        advance = []

        def on_start(plans):
            advance.append(stack.enter_context(layer_progress("fusing", len(plans))))

        def on_layer(layer):
            advance[0](f"layer {layer.label} {layer.original_width} -> {layer.width} ({layer.seconds:.2f}s)")

        report = fuse_checkpoint(model, output, settings, overwrite=overwrite, on_layer=on_layer, on_start=on_start)
    if report is None:  # a torchrun rank > 0: its layers went to rank 0, which writes and reports
        return
    out = results_console(json_path)
    out.print(_summary_table(report))
    before, after = report.parameters["before"], report.parameters["after"]
    out.print(f"parameters: {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer); "
              f"wrote {report.output} in {report.seconds:.1f}s", highlight=False)
    if "experts_before" in report.parameters:
        p = report.parameters
        out.print(f"in experts: {p['experts_before']:,} -> {p['experts_after']:,} "
                  f"({100 * p['expert_share_before']:.1f}% -> {100 * p['expert_share_after']:.1f}% of the model)", highlight=False)
    if report.calibration is not None:
        c = report.calibration
        out.print(f"calibration: {c['tokens']:,} tokens ({c['sequences']} sequences of {c['max_length']}, "
                  f"mini-batches of {c['batch_size']}) of {c['file']} on {c['device']} (cache: {c['cache']}); "
                  f"last layer's output off by {c['hidden_state_error']:.4g} (relative)", highlight=False)
    for line in report.warnings:
        log.print(f"warning: {line}", highlight=False, markup=False)
    write_json_report(json_path, report.to_dict())


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# report field (methods/catalog.REPORT_FIELDS) -> its columns: (title, text of one row's value); a row is a
# LayerReport or an expert's dict (MoE), read alike. "rank" shows in the width column.
_FIELD_COLUMNS = {
    "inertia": [("inertia", lambda row: _number(_get(row, "inertia"), ".4g"))],
    "kmeans_seconds": [("k-means s", lambda row: _number(_get(row, "kmeans_seconds"), ".2f"))],
    "backend": [("backend", lambda row: _get(row, "backend") or "-")],
    "cluster_sizes": [("singletons", lambda row: _number(_get(row, "singletons"), "d")),
                      ("largest", lambda row: _number(_get(row, "largest_cluster"), "d")),
                      ("cluster sizes", lambda row: compact_histogram(_get(row, "cluster_sizes") or {}) or "-")],
    "protected": [("protected", lambda row: _number(_get(row, "protected"), "d"))],
    "relative_error": [("rel. error", lambda row: _number(_get(row, "relative_error"), ".3g"))],
}
_LEFT = {"backend", "cluster sizes"}


def _get(row, name: str):
    return row.get(name) if isinstance(row, dict) else getattr(row, name, None)


def _summary_table(report) -> Table:
    """One row per compressed site (and per fused expert): the columns of the report fields the method
    declares (``MethodDeclaration.report_fields``) that this run filled."""
    from mlpfuse.methods import get_method

    declared = get_method(report.method).report_fields
    rows = [row for layer in report.layers for row in (layer, *(getattr(layer, "experts", None) or []))]
    fields = [f for f in declared if f in _FIELD_COLUMNS and any(_get(row, f) is not None for row in rows)]
    columns = [column for f in fields for column in _FIELD_COLUMNS[f]]
    table = Table(title=f"{report.method}: {report.source} -> {report.output}")
    for title in ["layer", "width", "params", *(title for title, _ in columns)]:
        table.add_column(title, justify="left" if title in _LEFT else "right", no_wrap=True)
    for layer in report.layers:
        for row in (layer, *(getattr(layer, "experts", None) or [])):
            expert = row is not layer
            rank = _get(row, "rank")
            table.add_row(
                f"  {row['expert']}" if expert else row.label,
                f"{_get(row, 'original_width')} -> {_get(row, 'width')}" + (f" rank {rank}" if rank else ""),
                f"{_get(row, 'params_before'):,} -> {_get(row, 'params_after'):,}",
                *(text(row) for _, text in columns))
    return table


def compact_histogram(sizes: dict) -> str:
    """Cluster sizes in power-of-two bins, e.g. ``1:754 2-3:10 512-1023:1`` (bin: number of clusters)."""
    bins: dict[int, int] = {}
    for size, count in sizes.items():
        low = 1 << (int(size).bit_length() - 1)
        bins[low] = bins.get(low, 0) + int(count)
    return " ".join(f"{low}:{n}" if low == 1 else f"{low}-{2 * low - 1}:{n}" for low, n in sorted(bins.items()))
