"""``mlpfuse fuse``: a checkpoint in, a fused checkpoint out."""

from __future__ import annotations

from contextlib import ExitStack

import typer
from rich.table import Table

from ..errors import InputError
from ..option_fields import FUSE_FIELDS, OUTPUT, recipe_types  # light: no torch
from ..options import CALIBRATION_DEFAULTS  # light: no torch
from .common import (DebugOption, JsonOption, check_inputs, check_json_path, handle_errors, layer_progress, load_recipe, log,
                     merge, results_console, write_json_report)
from .options import (METHODS_HELP, backend_option, device_option, max_shard_size_option,
                      optional_max_length_option, optional_text_column_option, output_option, overwrite_option,
                      seed_option)


# What each recipe field may hold (YAML types), derived from the declarations (mlpfuse/option_fields.py): the
# fields of FuseSettings but allow_full_width, plus model, output and overwrite (tests/test_cli_start.py checks
# it against FuseSettings, not imported here: it pulls torch).
RECIPE_TYPES = {"model": (str,), **recipe_types(OUTPUT["output"], OUTPUT["overwrite"], *FUSE_FIELDS)}
RECIPE_FIELDS = set(RECIPE_TYPES)


@handle_errors
def fuse(
    model: str = typer.Argument(None, help="Checkpoint directory, hub id, or 'minilm' for the bundled all-MiniLM-L6-v2."),
    output: str = output_option(),
    layers: str = typer.Option(None, "--layers", help="MLP layers to fuse: 4-11, 0,2,4 or all.", show_default="all"),
    dim: int = typer.Option(None, "--dim", help="Fused intermediate width k."),
    ratio: float = typer.Option(None, "--ratio", help="Fused width as a fraction of the original (instead of --dim)."),
    multiple_of: int = typer.Option(None, "--multiple-of", help="Round every fused width down to a multiple of N (tensor cores, GGUF blocks); never below N's first multiple or above the original.", show_default="1"),
    method: str = typer.Option(None, "--method", help=f"Compression method: {METHODS_HELP}", show_default="fusion"),
    backend: str = backend_option(None),
    kmeans_init: str = typer.Option(None, "--kmeans-init", help="k-means seeding: kmeans-parallel (k-means||) or greedy (k-means++).", show_default="kmeans-parallel"),
    device: str = device_option(),
    seed: int = seed_option(None),
    experts: str = typer.Option(None, "--experts", help="MoE models: experts to fuse in each chosen sparse layer, e.g. 0,3 or 0-7,shared.", show_default="all"),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype: auto (keep), float32, bfloat16, float16."),
    max_shard_size: str = max_shard_size_option(None),
    calibration: str = typer.Option(None, "--calibration", help="Text file (.tsv/.csv/.jsonl): data-aware fusion/prune/svd, the model run layer by layer on it (docs/llm.md)."),
    calibration_limit: str = typer.Option(None, "--calibration-limit", help="With --calibration: sequences to use (128), or tokens ('65536 tokens', '64k tokens').", show_default="128 sequences (decoders), 512 (encoders)"),
    max_length: int = optional_max_length_option(CALIBRATION_DEFAULTS["max_length"]),
    calibration_batch_size: int = typer.Option(None, "--calibration-batch-size", help="With --calibration: sequences per mini-batch of the layer-by-layer pass.", show_default=str(CALIBRATION_DEFAULTS["calibration_batch_size"])),
    text_column: str = optional_text_column_option(),
    protect: float = typer.Option(None, "--protect", help="With --calibration: neurons per layer kept unmerged, the most important; a fraction of the fused width, or a count >= 1.", show_default=str(CALIBRATION_DEFAULTS["protect"])),
    ridge: float = typer.Option(None, "--ridge", help="With --calibration: ridge strength alpha of the output-weight refit (scale-free).", show_default=str(CALIBRATION_DEFAULTS["ridge"])),
    grouping: str = typer.Option(None, "--grouping", help="With --calibration, fusion/cluster: how neurons form clusters: select (representatives by output-aware pivoted Cholesky on the activation Gram, the others folded into the one they correlate with most) or kmeans (importance-weighted k-means of the weights, centroids averaged).", show_default=CALIBRATION_DEFAULTS["grouping"]),
    overwrite: bool = overwrite_option(None),
    config: str = typer.Option(None, "--config", help="YAML recipe with the same fields (+ per_layer overrides); flags win."),
    json_path: str = JsonOption,
    debug: bool = DebugOption,
):
    """Fuse the MLPs of a Hugging Face checkpoint (MLP Fusion) and write a loadable checkpoint."""
    recipe = load_recipe(config, RECIPE_FIELDS, RECIPE_TYPES)
    model = merge(model, recipe, "model")
    output = merge(output, recipe, "output")
    if model is None:
        raise InputError("no model given: pass a checkpoint directory, hub id or 'minilm' (or set model: in --config)")
    if output is None:
        raise InputError("no output directory given: pass -o DIR (or set output: in --config)")
    calibration = merge(calibration, recipe, "calibration")
    check_json_path(json_path, model, files=(calibration,) if calibration else ())
    extra = {name: merge(value, recipe, name) for name, value in (
        ("calibration_limit", _limit(calibration_limit)), ("max_length", max_length),
        ("calibration_batch_size", calibration_batch_size), ("text_column", text_column),
        ("protect", protect), ("ridge", ridge), ("grouping", grouping))}
    if calibration is None and any(v is not None for v in extra.values()):
        flag = next(name for name, v in extra.items() if v is not None).replace("_", "-")
        raise InputError(f"--{flag} applies to data-aware fusion: pass --calibration FILE too (or drop --{flag})")
    check_inputs(model, files=(calibration,))
    from ..fuse import FuseSettings, fuse_checkpoint  # heavy (torch, transformers): once the inputs are known to exist

    if dim is not None or ratio is not None:  # a flag for the width replaces the recipe's width entirely
        recipe.pop("dim", None)
        recipe.pop("ratio", None)
    settings = FuseSettings(
        layers=merge(layers, recipe, "layers", "all"),
        dim=merge(dim, recipe, "dim"),
        ratio=merge(ratio, recipe, "ratio"),
        multiple_of=merge(multiple_of, recipe, "multiple_of", 1),
        method=merge(method, recipe, "method", "fusion"),
        backend=merge(backend, recipe, "backend", "auto"),
        kmeans_init=merge(kmeans_init, recipe, "kmeans_init", "kmeans-parallel"),
        device=merge(device, recipe, "device"),
        seed=merge(seed, recipe, "seed", 0),
        experts=merge(experts, recipe, "experts"),
        dtype=merge(dtype, recipe, "dtype", "auto"),
        per_layer=recipe.get("per_layer") or {},
        max_shard_size=merge(max_shard_size, recipe, "max_shard_size", "5GB"),
        calibration=calibration,
        **{name: CALIBRATION_DEFAULTS[name] if value is None else value for name, value in extra.items()},
    )
    overwrite = bool(merge(overwrite, recipe, "overwrite", False))

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


def _limit(value: str | None):
    """``--calibration-limit`` as given: a plain count stays an integer (sequences)."""
    return int(value) if value is not None and value.strip().isdigit() else value


def _summary_table(report) -> Table:
    table = Table(title=f"{report.method}: {report.source} -> {report.output}")
    clustered = any(layer.cluster_sizes for layer in report.layers)
    calibrated = report.calibration is not None
    columns = ["layer", "width", "params", "inertia", "k-means s", "backend"]
    columns += ["singletons", "largest", "cluster sizes"] if clustered else []
    columns += ["rel. error"] if calibrated else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("backend", "cluster sizes") else "right", no_wrap=True)
    for layer in report.layers:
        extra = [str(layer.singletons), str(layer.largest_cluster), compact_histogram(layer.cluster_sizes)] \
            if layer.cluster_sizes else ["-"] * 3
        table.add_row(
            layer.label, f"{layer.original_width} -> {layer.width}" + (f" rank {layer.rank}" if layer.rank else ""),
            f"{layer.params_before:,} -> {layer.params_after:,}",
            "-" if layer.inertia is None else f"{layer.inertia:.4g}",
            "-" if layer.kmeans_seconds is None else f"{layer.kmeans_seconds:.2f}", layer.backend or "-",
            *(extra if clustered else []),
            *([f"{layer.relative_error:.3g}" if layer.relative_error is not None else "-"] if calibrated else []),
        )
        for expert in getattr(layer, "experts", None) or []:  # MoE: one row per fused expert
            table.add_row(
                f"  {expert['expert']}", f"{expert['original_width']} -> {expert['width']}",
                f"{expert['params_before']:,} -> {expert['params_after']:,}",
                "-" if expert["inertia"] is None else f"{expert['inertia']:.4g}",
                "-" if expert["kmeans_seconds"] is None else f"{expert['kmeans_seconds']:.2f}", expert["backend"] or "-",
                *(["-"] * (len(columns) - 6)),
            )
    return table


def compact_histogram(sizes: dict) -> str:
    """Cluster sizes in power-of-two bins, e.g. ``1:754 2-3:10 512-1023:1`` (bin: number of clusters)."""
    bins: dict[int, int] = {}
    for size, count in sizes.items():
        low = 1 << (int(size).bit_length() - 1)
        bins[low] = bins.get(low, 0) + int(count)
    return " ".join(f"{low}:{n}" if low == 1 else f"{low}-{2 * low - 1}:{n}" for low, n in sorted(bins.items()))
