"""Instruction (chat) data for ``finetune --task causal-lm``: loss on the responses only.

A data file is read as one of three formats, decided by its columns (names from the settings):

- ``messages``: each row a conversation, a list of ``{"role": ..., "content": ...}`` (JSONL);
- ``prompt`` + ``response``: each row one exchange, taken as the conversation
  ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]``;
- otherwise plain text (the text column), trained on every token as before (``finetune.encode_table``).

A conversation becomes tokens segment by segment:

- with a chat template (``tokenizer.chat_template``): for each assistant message ``i`` the template
  renders ``messages[:i]`` with the generation prompt (the *prompt* text) and ``messages[:i + 1]``
  (the text through the answer); the answer's segment is what the second adds to the first (its
  content and the template's end-of-turn text), the prompt's what the first adds to the text before;
- without one, a plain format: each non-assistant message's content followed by a newline, each
  assistant message's content followed by the EOS token (when the tokenizer has one), the whole led
  by the BOS token when the tokenizer adds one (``evaluate.bos_id``). A prompt/response row is so
  ``prompt + "\\n" + response + EOS``.

Each segment is tokenised on its own without special tokens, as a model meets the prompt at
inference (the prompt's tokens, then its own answer). Labels are the token ids on answer segments
and -100 elsewhere (the model shifts them: position t's logits predict label t + 1); messages after
the last assistant message are dropped. Rows are cut to ``max_length`` tokens; a row left without
a predicted answer token is dropped (counted in the report). ``packing`` joins whole rows, in order,
into sequences of at most ``max_length`` tokens (no attention mask between them: the simple packing
of most trainers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlpfuse.errors import InputError

TEXT, MESSAGES, PAIRS = "text", "messages", "prompt-response"
IGNORE = -100  # the label transformers' causal-LM loss skips
EVAL_BATCH = 8  # rows per forward in response_perplexity (full-vocabulary logits: keep them small)


def data_format(table, settings) -> str:
    """``"messages"``, ``"prompt-response"`` or ``"text"`` for a table, from the columns present.

    Raises InputError when only one of the prompt and response columns is there, or when no
    format's columns are.
    """
    columns = table.columns
    if settings.messages_column in columns:
        return MESSAGES
    has_prompt, has_response = settings.prompt_column in columns, settings.response_column in columns
    if has_prompt and has_response:
        return PAIRS
    if settings.text_column in columns:
        return TEXT
    if has_prompt or has_response:
        missing = settings.response_column if has_prompt else settings.prompt_column
        raise InputError(f"{table.path} has a {settings.prompt_column if has_prompt else settings.response_column!r} "
                         f"column but no {missing!r} column; instruction data needs both (or a "
                         f"{settings.messages_column!r} column)")
    raise InputError(f"{table.path} has no column {settings.text_column!r} (plain text), "
                     f"{settings.messages_column!r} (chat messages) or {settings.prompt_column!r} + "
                     f"{settings.response_column!r} (instruction pairs); columns: {', '.join(columns) or 'none'}")


def conversations(table, settings) -> list[list[dict]]:
    """The table's rows as conversations (lists of ``{"role", "content"}`` with string values).

    Raises InputError for a row that is not a list of such messages or holds no assistant message.
    """
    fmt = data_format(table, settings)
    if fmt == PAIRS:
        prompts, responses = table.column(settings.prompt_column), table.column(settings.response_column)
        rows = []
        for number, (prompt, response) in enumerate(zip(prompts, responses), start=1):
            if prompt is None or response is None:
                raise InputError(f"{table.path}: row {number} has no {settings.prompt_column!r} or "
                                 f"{settings.response_column!r} value")
            rows.append([{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}])
        return rows
    if fmt != MESSAGES:
        raise InputError(f"{table.path} holds plain text, not instruction data")
    rows = []
    for number, row in enumerate(table.column(settings.messages_column), start=1):
        where = f"{table.path}: row {number}, column {settings.messages_column!r}"
        if not isinstance(row, list) or not row:
            raise InputError(f"{where} is not a non-empty list of {{role, content}} messages")
        for message in row:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise InputError(f"{where}: each message needs string 'role' and 'content', got {str(message)[:80]!r}")
        if not any(m["role"] == "assistant" for m in row):
            raise InputError(f"{where} has no assistant message (nothing to learn from)")
        rows.append([{"role": m["role"], "content": m["content"]} for m in row])
    return rows


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja templates raise their own errors (e.g. roles must alternate)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the tokenizer's chat template refuses a conversation: {message}") from None


def segments(tokenizer, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """A conversation as (token ids, is_answer) segments, in order (see the module docstring).

    Raises InputError when the chat template does not render conversations incrementally (the
    text of ``messages[:i]`` is not the start of that of ``messages[:i + 1]``).
    """
    from mlpfuse.train.evaluate import bos_id

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[:last + 1]

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    parts: list[tuple[list[int], bool]] = []
    if getattr(tokenizer, "chat_template", None):
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _render(tokenizer, messages[:i], True)
            full = _render(tokenizer, messages[:i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise InputError("the tokenizer's chat template does not render a conversation as its earlier turns "
                                 "followed by the new one; the answer tokens cannot be located")
            parts += [(ids(prompt[len(done):]), False), (ids(full[len(prompt):]), True)]
            done = full
        return [(p, answer) for p, answer in parts if p]
    bos = bos_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is not None:
        parts.append(([bos], False))
    for message in messages:
        if message["role"] == "assistant":
            parts.append((ids(message["content"]) + ([eos] if eos is not None else []), True))
        else:
            parts.append((ids(message["content"] + "\n"), False))
    return [(p, answer) for p, answer in parts if p]


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation cut to ``max_length``: labels are the ids on answer
    tokens and -100 on every other token."""
    input_ids, labels = [], []
    for ids, answer in segments(tokenizer, messages):
        input_ids += ids
        labels += ids if answer else [IGNORE] * len(ids)
    return input_ids[:max_length], labels[:max_length]


class InstructDataset(torch.utils.data.Dataset):
    """Encoded rows (``input_ids``, ``attention_mask``, ``labels`` lists); ``dropped``: rows left out
    because no answer token was left to predict after the cut to ``max_length``."""

    def __init__(self, features: list[dict], dropped: int):
        self.features, self.dropped = features, dropped

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def encode_instructions(table, tokenizer, settings, packing: bool | None = None) -> InstructDataset:
    """The table's conversations as training rows (cut to ``settings.max_length``; packed when
    ``packing``, default ``settings.packing``). Raises InputError when no row keeps an answer token."""
    rows, dropped = [], 0
    for messages in conversations(table, settings):
        input_ids, labels = encode_conversation(tokenizer, messages, settings.max_length)
        if all(label == IGNORE for label in labels[1:]):  # position 0 is never predicted
            dropped += 1
            continue
        rows.append((input_ids, labels))
    if not rows:
        raise InputError(f"{table.path}: no row keeps an answer token within --max-length {settings.max_length}")
    if settings.packing if packing is None else packing:
        rows = pack(rows, settings.max_length)
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in rows]
    return InstructDataset(features, dropped)


def pack(rows: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Join whole (input_ids, labels) rows in order into sequences of at most ``max_length`` tokens
    (a row that does not fit starts the next sequence; no row is split)."""
    packed: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for row_ids, row_labels in rows:
        if ids and len(ids) + len(row_ids) > max_length:
            packed.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + row_ids, labels + row_labels
    if ids:
        packed.append((ids, labels))
    return packed


@dataclass
class Collator:
    """Pads rows to the batch's longest on the right: ``pad_id`` in ``input_ids``, 0 in the mask and
    -100 in the labels. A row without labels (plain text) gets its input ids as labels."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            labels = list(f["labels"]) if "labels" in f else list(ids)
            pad = length - len(ids)
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            batch["attention_mask"].append(list(f.get("attention_mask", [1] * len(ids))) + [0] * pad)
            batch["labels"].append(labels + [IGNORE] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def collator(tokenizer) -> Collator:
    """The :class:`Collator` for ``tokenizer`` (its pad token, else 0)."""
    pad = tokenizer.pad_token_id
    return Collator(0 if pad is None else int(pad))


def response_perplexity(model, tokenizer, table, settings) -> dict:
    """Held-out perplexity of the answer tokens only: ``exp(mean NLL)`` over every answer token.

    ``model``: a causal LM (a PEFT model too) whose ``logits`` are [batch, tokens, vocab]; run in
    eval mode without gradients, ``EVAL_BATCH`` rows at a time, right-padded. ``table``: instruction
    data (messages or prompt/response), each row encoded as for training (:func:`encode_instructions`,
    cut to ``settings.max_length``, never packed). The NLL is the natural-log cross-entropy in
    float32 of each answer token given the tokens before it (position t's logits, label t + 1).

    Returns ``response_perplexity``, ``response_mean_nll``, ``response_tokens`` (tokens scored),
    ``eval_rows`` and ``eval_rows_dropped`` (rows without an answer token after the cut). Raises
    InputError for a table that is not instruction data or keeps no answer token.
    """
    data = encode_instructions(table, tokenizer, settings, packing=False)
    collate = collator(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), EVAL_BATCH):
            batch = {k: v.to(device) for k, v in collate(data.features[start:start + EVAL_BATCH]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       ignore_index=IGNORE, reduction="sum").item()
            count += int((targets != IGNORE).sum())
    model.train(was_training)
    mean = total / count
    return {"response_perplexity": math.exp(mean) if mean < 700 else math.inf, "response_mean_nll": mean,
            "response_tokens": count, "eval_rows": len(data), "eval_rows_dropped": data.dropped}
