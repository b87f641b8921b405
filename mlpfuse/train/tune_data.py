"""``tune``: the text it tunes and reports on: batches of rows or packed windows, the held-out rows and
the before/after metrics on them (perplexity for causal LMs by the ``mlpfuse.train.evaluate`` protocol,
the hidden-state error otherwise)."""

from __future__ import annotations

from mlpfuse.arch import max_positions
from mlpfuse.checkpoints.modeling import is_causal_lm_model
from mlpfuse.data import encode_texts, read_table
from mlpfuse.train.evaluate import packed_windows, padded_batch, perplexity


def held_out_metrics(student, teacher, tokenizer, texts: list, settings, reference: bool = False) -> dict:
    """What :func:`mlpfuse.train.tune.tune_checkpoint` reports before and after tuning, on held-out ``texts``.

    Causal LMs: ``{"perplexity", "mean_nll", "tokens"}`` by the ``mlpfuse.train.evaluate`` protocol (rows
    joined by newlines, 512-token windows, the first 4,096 tokens) of ``student`` (of ``teacher``
    with ``reference=True``); other models: ``{"hidden_error"}`` (:func:`mlpfuse.train.tune.hidden_error`).
    """
    from mlpfuse.train.tune import hidden_error

    model = teacher if reference else student
    was_training = model.training
    try:
        if is_causal_lm_model(student):
            window = min(512, max_positions(model.config) or 512)  # the eval protocol's windows, as long as the model allows
            result = perplexity(model, tokenizer, [t if isinstance(t, str) else " ".join(t) for t in texts], window)
            return {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "tokens": result.tokens}
        return {"hidden_error": hidden_error(student, teacher, tokenizer, texts, settings.max_length,
                                             settings.batch_size)}
    finally:
        model.train(was_training)


def held_out_texts(data: str, settings) -> tuple[list, dict]:
    """The held-out rows for the before/after report, and where they came from.

    ``settings.eval_data`` given: its first ``eval_rows`` rows. Otherwise the rows of ``data``
    after the first ``limit`` (rows tuning does not see); when tuning uses the whole file, its last
    ``eval_rows`` rows, marked ``held_out: False`` (seen in training). ``eval_rows`` 0: no report.
    """
    rows = settings.eval_rows
    if not rows:
        return [], {"rows": 0}
    if settings.eval_data:
        table = read_table(settings.eval_data, limit=rows)
        return table.texts(settings.text_column, settings.pair_column), {
            "data": str(settings.eval_data), "rows": len(table), "held_out": True}
    limit = settings.limit
    table = read_table(data, limit=None if limit is None else limit + rows)
    texts = table.texts(settings.text_column, settings.pair_column)
    if limit is not None and len(texts) > limit:
        return texts[limit:], {"data": str(data), "first_row": limit, "rows": len(texts) - limit, "held_out": True}
    tail = texts[-rows:]
    return tail, {"data": str(data), "first_row": len(texts) - len(tail), "rows": len(tail), "held_out": False}


def pack_texts(tokenizer, texts: list, max_length: int) -> list[list[int]]:
    """The rows joined with newlines, tokenised without special tokens and cut into consecutive
    windows of ``max_length`` token ids, each led by the tokenizer's BOS when it adds one (the
    ``mlpfuse.train.evaluate`` protocol's windows; a last window of one token is dropped). Packed
    windows train a decoder on the long contexts it is evaluated and used on, with one attention
    sink per window, and without padding."""
    return packed_windows(tokenizer, [t if isinstance(t, str) else " ".join(t) for t in texts], max_length)


def _encode(tokenizer, texts: list, max_length: int, device) -> dict:
    if texts and isinstance(texts[0], list):  # packed windows of token ids: right-pad the shorter last one
        input_ids, mask = padded_batch(texts, tokenizer.pad_token_id)
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    encoded = encode_texts(tokenizer, texts, max_length)
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def training_texts(data: str, settings) -> tuple[int, list]:
    """The rows tuning trains on: the first ``settings.limit`` rows of ``data`` (all with None) as
    texts or (text, pair) tuples; returns (rows read, texts). Raises InputError for a bad file or column."""
    table = read_table(data, limit=settings.limit)
    return len(table), table.texts(settings.text_column, settings.pair_column)
