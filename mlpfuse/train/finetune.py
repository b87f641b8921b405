"""Fine-tuning and evaluation of original or fused checkpoints with the transformers Trainer.

Tasks: ``classification`` (accuracy, F1), ``regression`` (Pearson, Spearman) on single sentences or
pairs, and ``causal-lm`` (perplexity). The defaults are the MLP Fusion paper's recipe: AdamW,
linear decay with 6% warm-up, batch 32. Because the Trainer does the training loop,
``accelerate launch`` and ``torchrun`` run the same code on several GPUs.

:func:`finetune_model` works on a model in memory; :func:`finetune` loads a checkpoint (plain or
fused, via :func:`mlpfuse.load`), trains, evaluates and writes the fine-tuned checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mlpfuse.checkpoints.modeling import load
from mlpfuse.checkpoints.output import claim_output, guarded_outputs, resolve_target, staging_directory
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.checkpoints.validate import check_causal_lm
from mlpfuse.data import Table, read_table
from mlpfuse.errors import InputError
from mlpfuse.option_fields import FINETUNE_TASKS, LORA
from mlpfuse.options import check_optional_positive, check_positive, check_seed
from mlpfuse.runtime import load_tokenizer
from mlpfuse.train.instruct import TEXT, InstructDataset, data_format, encode_instructions, response_perplexity
from mlpfuse.train.instruct import collator as instruct_collator

REPORT_FILE = "mlpfuse_finetune.json"


@dataclass
class FinetuneSettings:
    """Everything that decides a fine-tuning run (paper defaults)."""

    task: str = "classification"
    text_column: str = "sentence"
    pair_column: str | None = None
    label_column: str = "label"
    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    warmup: float = 0.06
    weight_decay: float = 0.0
    max_steps: int | None = None
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    bf16: bool = False
    # instruction data (causal-lm; mlpfuse/train/instruct.py): format from the columns present
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    packing: bool = False
    # LoRA (PEFT; mlpfuse/train/lora.py)
    lora: bool = False
    lora_rank: int = LORA["lora_rank"].default
    lora_alpha: float = LORA["lora_alpha"].default
    lora_dropout: float = LORA["lora_dropout"].default
    lora_targets: tuple[str, ...] | None = None  # None: every linear projection of the layers
    merge: bool = True  # with lora: merge the adapter on save (else write the adapter beside the base)


def check_settings(settings: FinetuneSettings) -> None:
    """One-line InputErrors for values no run can use (unknown task, NaN --lr, --epochs <= 0, ...)."""
    if settings.task not in FINETUNE_TASKS:
        raise InputError(f"unknown --task {settings.task!r}; choose one of: {', '.join(FINETUNE_TASKS)}")
    check_positive(settings.lr, "--lr")
    check_positive(settings.epochs, "--epochs")
    check_positive(settings.warmup, "--warmup", allow_zero=True)
    check_positive(settings.weight_decay, "--weight-decay", allow_zero=True)
    check_positive(settings.batch_size, "--batch-size", integer=True)
    check_positive(settings.eval_batch_size, "--eval-batch-size", integer=True)
    if check_positive(settings.max_length, "--max-length", integer=True) < 2:
        raise InputError(f"--max-length must be at least 2, got {settings.max_length}")
    for value, flag in ((settings.max_steps, "--max-steps"), (settings.limit_train, "--limit-train"),
                        (settings.limit_eval, "--limit-eval")):
        check_optional_positive(value, flag)
    check_seed(settings.seed)
    check_lora_settings(settings)


def check_lora_settings(settings: FinetuneSettings) -> None:
    """One-line InputErrors for LoRA values no run can use (and LoRA-only flags without --lora)."""
    if not settings.lora:
        if not settings.merge:
            raise InputError("--no-merge applies to --lora only (full fine-tuning writes the whole model)")
        return
    from mlpfuse.train.lora import check_settings

    check_settings(settings)


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def label_mapping(values: list, configured: dict | None = None) -> dict[str, int]:
    """label -> id for classification: the model's own mapping if it has a real one, else the sorted
    distinct values (numerically when they all are integers, so '0'/'1' keep their meaning)."""
    if configured and not all(str(k).startswith("LABEL_") for k in configured):
        return {str(k): int(v) for k, v in configured.items()}
    distinct = sorted({str(v).strip() for v in values if v is not None and str(v).strip() != ""})
    if configured and all(_is_int(v) for v in distinct):  # unnamed head (LABEL_i): integer labels are the ids
        return {str(i): i for i in range(len(configured))}
    if all(_is_int(v) for v in distinct):
        distinct = sorted(distinct, key=lambda v: int(float(v)))
        distinct = [str(int(float(v))) for v in distinct]
    return {value: index for index, value in enumerate(dict.fromkeys(distinct))}


def _is_int(text: str) -> bool:
    try:
        return float(text) == int(float(text))
    except ValueError:
        return False


def _label_key(value) -> str:
    text = str(value).strip()
    return str(int(float(text))) if _is_int(text) else text


def encode_table(table: Table, tokenizer, settings: FinetuneSettings, label2id: dict | None) -> _Encoded:
    """Tokenize a table's rows into Trainer features; one-line InputErrors for bad labels.

    Causal-LM instruction data (messages, prompt/response) goes to :mod:`mlpfuse.train.instruct`."""
    if settings.task == "causal-lm" and data_format(table, settings) != TEXT:
        return encode_instructions(table, tokenizer, settings)
    texts = table.texts(settings.text_column, settings.pair_column)
    if settings.pair_column:
        first, second = (list(x) for x in zip(*texts))
        encoded = tokenizer(first, second, truncation=True, max_length=settings.max_length)
    else:
        encoded = tokenizer(texts, truncation=True, max_length=settings.max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    if settings.task == "causal-lm":
        return _Encoded(features)
    labels = table.column(settings.label_column)
    if settings.task == "regression":
        try:
            values = [float(v) for v in labels]
        except (TypeError, ValueError):
            bad = next(v for v in labels if not _is_float(v))
            raise InputError(f"{table.path}: label {bad!r} in column {settings.label_column!r} is not a number "
                             f"(--task regression needs numeric labels)") from None
        for feature, value in zip(features, values):
            feature["labels"] = value
    else:
        unknown = sorted({_label_key(v) for v in labels} - set(label2id))
        if unknown:
            raise InputError(f"{table.path}: unknown label value(s) {', '.join(map(repr, unknown[:5]))} in column "
                             f"{settings.label_column!r}; known labels: {', '.join(label2id)}")
        for feature, value in zip(features, labels):
            feature["labels"] = label2id[_label_key(value)]
    return _Encoded(features)


def _is_float(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def metric_function(task: str, num_labels: int = 2):
    """``compute_metrics`` for the Trainer: accuracy+F1, or Pearson+Spearman."""
    from scipy.stats import pearsonr, spearmanr

    def classification(prediction) -> dict:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted, labels = np.argmax(logits, axis=-1), prediction.label_ids
        return {"accuracy": float((predicted == labels).mean()), "f1": f1_score(labels, predicted, num_labels)}

    def regression(prediction) -> dict:
        values = np.asarray(prediction.predictions).reshape(-1)
        labels = np.asarray(prediction.label_ids).reshape(-1)
        if np.std(values) == 0 or np.std(labels) == 0:
            return {"pearson": float("nan"), "spearman": float("nan")}
        return {"pearson": float(pearsonr(values, labels)[0]), "spearman": float(spearmanr(values, labels)[0])}

    return classification if task == "classification" else regression


def f1_score(labels: np.ndarray, predicted: np.ndarray, num_labels: int) -> float:
    """F1 of class 1 for two classes (the GLUE convention), the macro average otherwise."""
    classes = [1] if num_labels == 2 else range(num_labels)
    scores = []
    for c in classes:
        true_pos = float(((predicted == c) & (labels == c)).sum())
        denominator = float((predicted == c).sum() + (labels == c).sum())
        scores.append(2 * true_pos / denominator if denominator else 0.0)
    return float(np.mean(scores))


def _collator(task: str, tokenizer):
    import transformers

    if task == "causal-lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return transformers.DataCollatorWithPadding(tokenizer)


def _training_arguments(settings: FinetuneSettings, output_dir: str):
    import transformers

    return transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size, learning_rate=settings.lr,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps if settings.max_steps else -1,
        lr_scheduler_type="linear", warmup_steps=settings.warmup, weight_decay=settings.weight_decay,
        optim="adamw_torch", seed=settings.seed, save_strategy="no", eval_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, bf16=settings.bf16, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        prediction_loss_only=settings.task == "causal-lm",
        # torchrun without GPUs: accelerate joins the ranks (gloo) only when told it runs on CPUs
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        **_loss_scaling(settings),
    )


def _loss_scaling(settings: FinetuneSettings) -> dict:
    """Only a causal LM's loss divides by the token count the Trainer gives it; for the other tasks
    the Trainer's multiplication by the number of ranks would scale the loss (and so the gradient
    clipping) away from one process. The option exists from transformers 4.46 (none before)."""
    import dataclasses

    import transformers

    if "average_tokens_across_devices" not in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
        return {}
    return {"average_tokens_across_devices": settings.task == "causal-lm"}


def finetune_model(model, tokenizer, train: Table | None, evaluation: Table | None, settings: FinetuneSettings,
                   label2id: dict | None = None, work_dir: str | None = None, callbacks=None) -> dict:
    """Train ``model`` on ``train`` (skipped when None) and evaluate on ``evaluation``; returns metrics.

    The returned dict has ``train_seconds``, ``train_steps``, ``train_loss`` and the eval metrics
    (``accuracy``/``f1``, ``pearson``/``spearman`` or ``perplexity``, plus ``eval_loss``); for
    causal-LM instruction eval data (:mod:`mlpfuse.train.instruct`) ``response_perplexity``,
    ``response_mean_nll`` and ``response_tokens`` instead of the Trainer's loss. ``model`` may be
    a PEFT model (``--lora``: :func:`mlpfuse.train.lora.attach`).
    """
    import transformers

    check_settings(settings)
    train_set = encode_table(train, tokenizer, settings, label2id) if train is not None else None
    # instruction eval data: the answer tokens' perplexity (instruct.response_perplexity), not the Trainer's loss
    instruct_eval = (evaluation is not None and settings.task == "causal-lm"
                     and data_format(evaluation, settings) != TEXT)
    eval_set = (encode_table(evaluation, tokenizer, settings, label2id)
                if evaluation is not None and not instruct_eval else None)
    collator = (instruct_collator(tokenizer) if isinstance(train_set, InstructDataset)
                else _collator(settings.task, tokenizer))
    with tempfile.TemporaryDirectory(prefix="mlpfuse-trainer-", dir=work_dir) as scratch:
        trainer = transformers.Trainer(
            model=model, args=_training_arguments(settings, scratch), train_dataset=train_set,
            eval_dataset=eval_set, data_collator=collator, processing_class=tokenizer,
            compute_metrics=None if settings.task == "causal-lm" else metric_function(settings.task, len(label2id or {})),
            callbacks=callbacks,
        )
        trainer.remove_callback(transformers.PrinterCallback)  # metrics are returned, not printed
        metrics: dict = {}
        if train_set is not None:
            start = time.perf_counter()
            result = trainer.train()
            metrics.update(train_seconds=time.perf_counter() - start, train_steps=result.global_step,
                           train_loss=result.training_loss, train_rows=len(train_set))
        if eval_set is not None:
            start = time.perf_counter()
            evaluated = trainer.evaluate()
            metrics["eval_seconds"] = time.perf_counter() - start
            metrics["eval_rows"] = len(eval_set)
            for key, value in evaluated.items():
                if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                    metrics[key[5:] if key != "eval_loss" else key] = value
            if settings.task == "causal-lm":
                metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
        if instruct_eval:
            start = time.perf_counter()
            metrics.update(response_perplexity(model, tokenizer, evaluation, settings))
            metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def _model_kwargs(settings: FinetuneSettings, label2id: dict | None) -> dict:
    if settings.task == "classification":
        id2label = {i: label for label, i in label2id.items()}
        return {"num_labels": len(label2id), "label2id": label2id, "id2label": id2label,
                "problem_type": "single_label_classification"}
    if settings.task == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    return {}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@guarded_outputs
def finetune(model: str, train: str | None, evaluation: str | None, output: str | Path | None,
             settings: FinetuneSettings, overwrite: bool = False, callbacks=None) -> dict:
    """Fine-tune checkpoint ``model`` (plain or fused) on file ``train``, evaluate on ``evaluation``.

    Without ``train`` it only evaluates (the model must already carry its task head). ``output``
    receives the fine-tuned checkpoint (fused format for fused inputs), its tokenizer and
    ``mlpfuse_finetune.json``; it appears only when complete. Returns the report dict.

    With ``settings.lora`` only LoRA adapters (and a new task head) train (:mod:`mlpfuse.train.lora`);
    ``settings.merge`` merges them before saving, else ``output`` holds the adapter (PEFT's files),
    the tokenizer and the report, whose ``base`` names the checkpoint it applies to.
    """
    import transformers

    if train is None and evaluation is None:
        raise InputError("nothing to do: give a training file, an eval file, or both")
    check_settings(settings)
    directory = resolve_model(model)
    target = resolve_target(output) if output is not None else None
    if target is not None and _is_main_process():  # checks, lock, staging: before any work
        inputs = [directory] + [p for p in (train, evaluation) if p is not None and not str(p).startswith("hub:")]
        target = claim_output(output, inputs, overwrite).target
    if settings.task not in FINETUNE_TASKS:
        raise InputError(f"unknown --task {settings.task!r}; choose one of: {', '.join(FINETUNE_TASKS)}")
    if settings.task == "causal-lm":
        check_causal_lm(directory, model)
    train_table = read_table(train, limit=settings.limit_train) if train is not None else None
    eval_table = read_table(evaluation, limit=settings.limit_eval) if evaluation is not None else None
    for table in (train_table, eval_table):
        if table is not None:
            if settings.task == "causal-lm":
                data_format(table, settings)  # fail early on missing columns (text or instruction data)
            else:
                table.texts(settings.text_column, settings.pair_column)  # fail early on a missing column
                table.column(settings.label_column)

    tokenizer = load_tokenizer(directory)
    label2id = None
    if settings.task == "classification":
        configured = None
        if train_table is None:
            configured = (transformers.AutoConfig.from_pretrained(str(directory)).to_dict().get("label2id"))
        label2id = label_mapping((train_table or eval_table).column(settings.label_column), configured)
        if len(label2id) < 2 and train_table is not None:
            raise InputError(f"{train}: column {settings.label_column!r} has fewer than two distinct labels")
    task_name = "causal-lm" if settings.task == "causal-lm" else "sequence-classification"
    transformers.set_seed(settings.seed)  # the new head's initialisation depends on the seed
    kwargs = _model_kwargs(settings, label2id) if train_table is not None else {}
    net = load(directory, task=task_name, **kwargs)
    if settings.lora:
        if train_table is None:
            raise InputError("--lora trains adapters: it needs --train (evaluate a LoRA output without --lora)")
        from mlpfuse.train import lora

        net = lora.attach(net, settings, trains_head=settings.task != "causal-lm")
    metrics = finetune_model(net, tokenizer, train_table, eval_table, settings, label2id, callbacks=callbacks)
    lora_report = None
    if settings.lora:
        lora_report = lora.summary(net, merged=settings.merge)
        metrics.update(trainable_parameters=lora_report["trainable_parameters"],
                       total_parameters=lora_report["total_parameters"], merged=settings.merge)
        if settings.merge:
            net = lora.merge(net)
    report = {"model": str(model), "train": train, "eval": evaluation, "output": str(target) if target else None,
              "task": settings.task, "settings": asdict(settings), "metrics": metrics,
              "label2id": label2id, "fused": bool(getattr(net.config, "mlpfuse", None)),
              "parameters": sum(p.numel() for p in net.parameters())}
    if lora_report is not None:
        report.update(lora=lora_report, base=str(directory))
    if target is not None and _is_main_process() and settings.lora and not settings.merge:
        _write_adapter(net, tokenizer, target, overwrite, directory, report,
                       lambda: load(directory, task=task_name, **kwargs))
        return report
    if target is not None and _is_main_process():
        from mlpfuse.checkpoints.writer import DerivedCheckpoint, write_derived

        write_derived(target, DerivedCheckpoint(
            source=directory, model=net, tokenizer=tokenizer, reference=net,
            files={REPORT_FILE: json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"}), overwrite)
    return report


def _write_adapter(net, tokenizer, target: Path, overwrite: bool, base: Path, report: dict, load_base) -> None:
    """``--lora --no-merge``: the adapter, the tokenizer and the report (naming the base) in ``target``."""
    from mlpfuse.train.lora import save_adapter

    with staging_directory(target, overwrite) as staging:
        save_adapter(net, staging, base, load_base)
        tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n",
                                           encoding="utf-8")
