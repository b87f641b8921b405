"""``mlpfuse finetune``: fine-tune and evaluate an original or fused checkpoint (transformers Trainer)."""

from __future__ import annotations

import typer
from rich.table import Table

from mlpfuse.cli.common import check_inputs, check_json_path, log, results_console, write_json_report
from mlpfuse.cli.options import Options, command
from mlpfuse.errors import InputError
from mlpfuse.option_fields import FINETUNE_TASKS, LORA, OUTPUT, RUNTIME, TEXT, TRAINING

METRIC_NAMES = ("accuracy", "f1", "pearson", "spearman", "perplexity", "response_perplexity", "eval_loss")


def _progress_callback(every: int):
    """A Trainer callback printing one line per ``every`` optimizer steps with the running loss."""
    import transformers

    class StepLines(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and (state.global_step % max(every, 1) == 0
                                                or state.global_step == state.max_steps):
                log.print(f"finetune: step {state.global_step}/{state.max_steps} "
                          f"epoch {state.epoch or 0:.2f}", highlight=False)

    return StepLines()


@command(OUTPUT["output"], TEXT["text_column"], TEXT["pair_column"], TEXT["batch_size"].using(32),
         TEXT["max_length"].using(128), TRAINING["max_steps"], RUNTIME["seed"], TRAINING["log_every"].using(10),
         OUTPUT["overwrite"], OUTPUT["json_path"], LORA)
def finetune(
    model: str = typer.Argument(..., help="Checkpoint directory (original or fused), or 'minilm'."),
    train: str = typer.Option(None, "--train", help="Training file (.tsv/.csv/.jsonl) or hub:NAME."),
    eval_file: str = typer.Option(None, "--eval", help="Evaluation file, same format."),
    task: str = typer.Option("classification", "--task", help=f"One of: {', '.join(FINETUNE_TASKS)}."),
    label_column: str = typer.Option("label", "--label-column", help="Column with the label (classification/regression)."),
    epochs: float = typer.Option(3.0, "--epochs", help="Training epochs."),
    lr: float = typer.Option(2e-5, "--lr", help="AdamW peak learning rate (linear decay)."),
    warmup: float = typer.Option(0.06, "--warmup", help="Warm-up: a fraction of the steps (<1) or a step count."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    limit_train: int = typer.Option(None, "--limit-train", help="Use only the first N training rows."),
    limit_eval: int = typer.Option(None, "--limit-eval", help="Use only the first N evaluation rows."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 mixed precision (GPU)."),
    prompt_column: str = typer.Option("prompt", "--prompt-column", help="causal-lm instruction data: column with the prompt."),
    response_column: str = typer.Option("response", "--response-column", help="causal-lm instruction data: column with the answer (the only tokens with loss)."),
    messages_column: str = typer.Option("messages", "--messages-column", help="causal-lm chat data: column with a list of {role, content} messages."),
    packing: bool = typer.Option(False, "--packing", help="causal-lm instruction data: join rows into --max-length sequences."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="With --lora: merge the adapter into the model on save (--no-merge: write the adapter only)."),
    eval_only: bool = typer.Option(False, "--eval-only", help="Only evaluate MODEL (already fine-tuned) on --eval."),
    opts: Options = None,
):
    """Fine-tune (classification, regression, causal LM) and evaluate an original or fused checkpoint."""
    output, json_path = opts.output, opts.json_path
    if not merge and not opts.lora:
        raise InputError("--no-merge applies to --lora only (full fine-tuning writes the whole model)")
    if eval_only:
        if opts.lora:
            raise InputError("--lora trains adapters: drop --eval-only, or evaluate a LoRA output without --lora")
        if eval_file is None:
            raise InputError("--eval-only needs --eval FILE")
        train, output = None, None
    else:
        if train is None:
            raise InputError("no training file: pass --train FILE (or --eval-only to only evaluate)")
        if output is None:
            raise InputError("no output directory given: pass -o DIR (or --eval-only to only evaluate)")
    check_json_path(json_path, model, files=(train, eval_file))
    check_inputs(model, files=(train, eval_file))
    from mlpfuse.train.finetune import FinetuneSettings, finetune as run_finetune  # heavy: once the inputs are known to exist

    settings = FinetuneSettings(task=task, text_column=opts.text_column, pair_column=opts.pair_column,
                                label_column=label_column, epochs=epochs, lr=lr, batch_size=opts.batch_size,
                                max_length=opts.max_length, warmup=warmup, weight_decay=weight_decay,
                                max_steps=opts.max_steps, seed=opts.seed, limit_train=limit_train,
                                limit_eval=limit_eval, bf16=bf16, prompt_column=prompt_column,
                                response_column=response_column, messages_column=messages_column, packing=packing,
                                lora=opts.lora, lora_rank=opts.lora_rank, lora_alpha=opts.lora_alpha,
                                lora_dropout=opts.lora_dropout, lora_targets=opts.lora_targets, merge=merge)
    report = run_finetune(model, train, eval_file, output, settings, overwrite=opts.overwrite,
                          callbacks=[_progress_callback(opts.log_every)])
    out = results_console(json_path)
    metrics = report["metrics"]
    table = Table(title=f"{task} on {eval_file}" if eval_file else task)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in METRIC_NAMES:
        if name in metrics:
            table.add_row(name, f"{metrics[name]:.4f}")
    if "train_seconds" in metrics:
        table.add_row("train seconds", f"{metrics['train_seconds']:.1f}")
        table.add_row("train steps", str(metrics["train_steps"]))
    if "trainable_parameters" in metrics:
        table.add_row("trainable parameters", f"{metrics['trainable_parameters']:,} of {metrics['total_parameters']:,}")
        table.add_row("adapter", "merged" if metrics["merged"] else "saved unmerged")
    out.print(table)
    write_json_report(json_path, report)
