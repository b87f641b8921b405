"""``mlpfuse bench``: training-step time, inference time, peak memory and FLOPs, fused vs original."""

from __future__ import annotations

import typer
from rich.table import Table

from mlpfuse.arch.presets import PRESETS
from mlpfuse.cli.common import check_inputs, check_json_path, log, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.errors import InputError
from mlpfuse.option_fields import LORA, OUTPUT, RUNTIME, TEXT



@command(TEXT["batch_size"].using(8), RUNTIME["device"], RUNTIME["threads"], RUNTIME["seed"], OUTPUT["json_path"],
         LORA["lora"], LORA["lora_rank"], LORA["lora_dropout"])
def bench(
    models: list[str] = typer.Argument(None, help="ORIGINAL FUSED [FUSED...]: checkpoint directories (or 'minilm'); "
                                                  "ratios are against the first."),
    shape: str = typer.Option(None, "--shape", help=f"Instead of checkpoints, a preset with random weights: {', '.join(PRESETS)}."),
    layers: str = typer.Option(None, "--layers", help="With --shape: layers to fuse (default: the preset's, e.g. 4-11)."),
    dim: list[int] = typer.Option(None, "--dim", help="With --shape: fused width; repeat for several fused models."),
    assign: str = typer.Option("round-robin", "--assign", help="With --shape: round-robin (fast, same shapes) or kmeans (real fusion)."),
    steps: int = typer.Option(20, "--steps", help="Timed rounds (one training step and one forward per model each)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps per model first (compilation, allocator, caches)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence."),
    autocast: str = typer.Option("fp32", "--autocast", help="Precision of the timed steps: fp32, or bf16 / fp16 autocast (weights and AdamW stay fp32)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the forward(+loss) of every model."),
    compile_mode: str = typer.Option("default", "--compile-mode", help="default, reduce-overhead (CUDA graphs), max-autotune."),
    compile_scope: str = typer.Option("model", "--compile-scope", help="model (one graph) or layers (each block; compiles faster)."),
    adamw: str = typer.Option("auto", "--adamw", help="AdamW kernel: auto (fused on CUDA), fused, foreach, loop."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (CPU: one subprocess per model)."),
    inference: bool = typer.Option(True, "--inference/--no-inference", help="Also time the inference forward."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of times and ratios to this path."),
    opts: Options = None,
):
    """Measure training-step time, inference time, peak memory, parameters and FLOPs: fused vs original."""
    json_path = opts.json_path
    check_json_path(json_path, *(models or []))
    check_json_path(plot, *(models or []), what="--plot")
    if shape is not None and models:
        raise InputError("give either checkpoints or --shape, not both")
    if shape is None and (layers is not None or dim):
        raise InputError("--layers and --dim build fused models from a --shape preset; with checkpoints, fuse them first")
    if shape is None and len(models or []) >= 2:  # fewer: checkpoint_sources says what is missing
        check_inputs(*models)
    from mlpfuse.analysis.bench import BenchSettings, checkpoint_sources, plot_report, preset_sources, run_bench  # heavy (torch)

    if shape is not None:
        sources = preset_sources(shape, layers, dim, assign)
    else:
        sources = checkpoint_sources(list(models or []))
    settings = BenchSettings(steps=steps, warmup=warmup, batch_size=opts.batch_size, seq_len=seq_len, dtype=autocast, device=opts.device,
                             compile=compile, compile_mode=compile_mode, compile_scope=compile_scope, adamw=adamw, memory=memory, inference=inference,
                             seed=opts.seed, threads=opts.threads, lora=opts.lora, lora_rank=opts.lora_rank, lora_dropout=opts.lora_dropout)
    settings.validate()  # bad flags fail before any model is built
    report = run_bench(sources, settings, on_event=lambda text: log.print(text, highlight=False))
    out = results_console(json_path)
    out.print(report_table(report))
    for line in summary_lines(report):
        out.print(line, highlight=False, soft_wrap=True)
    if plot:
        log.print(f"plot: {plot_report(report, plot)}", highlight=False)
    write_json_report(json_path, report.to_dict())


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _ratio(model, name: str) -> str:
    value = model.ratios.get(name)
    return "" if value is None else f"\n{value:.3f}x"


def _time(timing) -> str:
    return "-" if timing is None else f"{timing.median * 1e3:,.1f} ms ±{100 * timing.spread / 2:.0f}%"


def report_table(report) -> Table:
    """One row per model; fused rows show their ratio to the original under each figure."""
    s = report.settings
    title = (f"bench: {s['dtype']}, batch {s['batch_size']} x seq {s['seq_len']}, {s['steps']} interleaved rounds "
             f"on {report.environment.get('gpu', report.environment.get('cpu'))} ({report.device})"
             + (f", compiled ({s['compile_mode']})" if s["compile"] else "")
             + (f", LoRA r={s['lora_rank']}" if s.get("lora") else ""))
    table = Table(title=title)
    columns = ["model", "params", "MFLOP/token\n(MLP)", "train step", "inference", "tokens/s\n(train)", "peak memory"]
    if s.get("lora"):
        columns.insert(2, "trainable\n(LoRA)")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in report.models:
        mlp = f" ({m.mlp_flops_per_token / 1e6:,.1f})" if m.mlp_flops_per_token is not None else ""
        cells = [
            m.label,
            f"{m.parameters / 1e6:,.2f}M" + _ratio(m, "parameters"),
            f"{m.flops_per_token / 1e6:,.1f}{mlp}" + _ratio(m, "flops"),
            _time(m.train_step) + _ratio(m, "train_step"),
            _time(m.inference) + _ratio(m, "inference"),
            f"{m.train_tokens_per_second:,.0f}",
            _bytes(m.peak_memory_bytes) + _ratio(m, "peak_memory"),
        ]
        if s.get("lora"):
            cells.insert(2, f"{m.trainable_parameters:,}" + _ratio(m, "trainable_parameters"))
        table.add_row(*cells)
    return table


def summary_lines(report) -> list[str]:
    """The headline ratios, one line per fused model, and how memory was measured."""
    lines = []
    for m in report.models[1:]:
        r = m.ratios
        parts = [f"train step {r['train_step']:.3f}x (per-round median {r['train_step_paired']:.3f}x)"]
        if r.get("inference") is not None:
            parts.append(f"inference {r['inference']:.3f}x (per-round {r['inference_paired']:.3f}x)")
        if r.get("peak_memory") is not None:
            parts.append(f"peak memory {r['peak_memory']:.3f}x")
        parts.append(f"FLOP bound {r['flops']:.3f}x")
        lines.append(f"{m.label} vs {report.models[0].label}: " + ", ".join(parts))
    if report.settings.get("lora"):
        first = report.models[0].lora
        counts = ", ".join(f"{m.label} {m.trainable_parameters:,}" for m in report.models)
        lines.append(f"LoRA (PEFT) r={first['rank']}, alpha {first['alpha']:g}, dropout {first['dropout']:g} on "
                     f"{','.join(first['targets'])}; trainable parameters: {counts}")
    if report.memory_method:
        lines.append(f"memory: {report.memory_method}")
    lines.append(f"± is half the interquartile range over the timed rounds; {report.seconds:.0f}s in all")
    return lines
