"""``mlpfuse tune``: layer-wise task-specific tuning of a fused checkpoint against its original."""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlpfuse.cli.common import check_inputs, check_json_path, interruption_message, log, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.option_fields import OUTPUT, RUNTIME, TEXT, TRAINING, TUNING


@contextmanager
def step_progress(description: str, every: int):
    """A bar with the running loss on a terminal; one line per ``every`` steps otherwise.

    Yields ``advance(step, total, loss)``.
    """
    running: list[float] = []

    def smoothed(loss: float) -> float:
        running.append(loss)
        tail = running[-20:]
        return sum(tail) / len(tail)

    if log.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=log, transient=True) as progress:
            task = progress.add_task(description, total=None)

            def advance(step: int, total: int, loss: float) -> None:
                progress.update(task, completed=step, total=total, description=f"{description} loss {smoothed(loss):.4f}")

            yield advance
    else:
        def advance(step: int, total: int, loss: float) -> None:
            value = smoothed(loss)
            if step % max(every, 1) == 0 or step == total:
                log.print(f"{description}: step {step}/{total} loss {value:.4f}", highlight=False)

        yield advance


@command(OUTPUT["output"].using(required=True), TEXT["text_column"], TEXT["pair_column"], TEXT["batch_size"].using(32),
         TEXT["max_length"].using(128), TRAINING["max_steps"], RUNTIME["seed"], RUNTIME["device"],
         TRAINING["log_every"].using(10), OUTPUT["overwrite"], OUTPUT["json_path"], TUNING)
def tune(
    fused: str = typer.Argument(..., help="Fused checkpoint directory (output of `mlpfuse fuse`)."),
    teacher: str = typer.Option(..., "--teacher", help="The original checkpoint the fused one came from ('minilm' for the bundled model)."),
    data: str = typer.Option(..., "--data", help="Task text: .tsv/.csv/.jsonl file (labels not needed), or hub:NAME."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the data."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N rows of --data."),
    save_every: int = typer.Option(100, "--save-every", help="Save resumable state every N steps (0: only on Ctrl-C)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUTPUT.tune-state/."),
    layer_loss: str = typer.Option(None, "--layer-loss",
                                   help="variance: per-layer MSE / the teacher's variance of that layer, averaged; mse: the paper's summed MSE (default: variance for causal LMs, mse otherwise)."),
    kl_weight: float = typer.Option(None, "--kl-weight",
                                    help="Add this times the KL divergence of the next-token distributions (default: 1 for causal LMs, 0 otherwise; 0: the LM head is never run)."),
    eval_data: str = typer.Option(None, "--eval-data",
                                  help="Held-out text for the before/after report (default: the rows of --data after --limit)."),
    pack: bool = typer.Option(None, "--pack/--no-pack",
                              help="Join the rows into windows of --max-length tokens (default: on for causal LMs; encoders: off)."),
    opts: Options = None,
):
    """Tune the fused MLPs so each layer's hidden states match the original model's (paper Sec. 4.4)."""
    output, json_path = opts.output, opts.json_path
    check_json_path(json_path, fused, teacher, files=(data,) + ((eval_data,) if eval_data else ()))
    check_inputs(fused, teacher, files=(data, eval_data))
    from mlpfuse.train.tune import TuneSettings, state_directory, tune_checkpoint  # heavy: once the inputs are known to exist

    settings = TuneSettings(text_column=opts.text_column, pair_column=opts.pair_column, lr=opts.lr, batch_size=opts.batch_size,
                            max_length=opts.max_length, epochs=epochs, max_steps=opts.max_steps, seed=opts.seed,
                            limit=limit, save_every=save_every, device=opts.device, layer_loss=layer_loss,
                            first_token_weight=opts.first_token_weight, kl_weight=kl_weight, kl_temperature=opts.kl_temperature,
                            eval_data=eval_data, eval_rows=opts.eval_rows, pack=pack)
    try:
        with step_progress("tuning", opts.log_every) as advance:
            report = tune_checkpoint(fused, teacher, data, output, settings, overwrite=opts.overwrite, resume=resume,
                                     on_step=advance)
    except KeyboardInterrupt:
        state = state_directory(output)
        kept = (f"state kept in {state} - rerun the same command with --resume to continue"
                if (state / "state.json").is_file() else "no state to resume from yet")
        log.print(f"[bold red]interrupted[/]: {interruption_message()}; {kept}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if report is None:  # a torchrun rank > 0: rank 0 writes and reports
        return
    out = results_console(json_path)
    resumed = f" (resumed at step {report.resumed_from})" if report.resumed_from else ""
    out.print(f"tuned {report.trainable_parameters:,} MLP parameters for {report.steps} steps{resumed}: "
              f"layer-wise loss {report.initial_loss:.4f} -> {report.final_loss:.4f}; wrote {report.output} "
              f"in {report.seconds:.1f}s", highlight=False)
    if report.before is not None and report.after is not None:
        out.print(held_out_line(report), highlight=False)
    data_out = report.to_dict()
    data_out.pop("losses")
    write_json_report(json_path, data_out)


def held_out_line(report) -> str:
    """One line: the held-out metric before -> after tuning (and the teacher's perplexity)."""
    source = report.evaluation or {}
    where = f"{source.get('rows')} {'held-out' if source.get('held_out') else 'training (not held-out)'} rows"
    if "perplexity" in report.before:
        teacher = f" (original {report.reference['perplexity']:,.2f})" if report.reference else ""
        return (f"perplexity on {where}: {report.before['perplexity']:,.2f} -> {report.after['perplexity']:,.2f}"
                f"{teacher}")
    return (f"hidden-state relative error vs the original on {where}: {report.before['hidden_error']:.4f} -> "
            f"{report.after['hidden_error']:.4f}")
