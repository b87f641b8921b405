"""Perplexity of a causal language model on a text file: the one protocol every command uses.

Protocol (``mlpfuse eval``, and the numbers in ``docs/llm.md``):

1. the text column's rows are joined with newlines into one text;
2. the text is tokenised without special tokens and cut to its first ``limit_tokens`` tokens;
3. those tokens are split into consecutive, non-overlapping windows of ``max_length`` tokens (the
   last one may be shorter; a final window of a single token predicts nothing and is dropped).
   When the model's tokenizer puts a BOS token before the text it encodes (:func:`bos_id`: Gemma,
   Llama 3, ...), each window is that BOS followed by the next ``max_length - 1`` text tokens, as
   the model saw every sequence start in training; a tokenizer that adds none (GPT-2, SmolLM2)
   gets windows of text tokens only. No EOS is ever added;
4. each window is run on its own (batch 1, no padding, no context carried over) and every position
   but the last predicts the next token: the mean negative log-likelihood (natural log, computed
   in float32) over all predicted tokens is ``mean_nll`` and the perplexity is ``exp(mean_nll)``.

With 4,096 tokens and 512-token windows that is 8 windows and 8 x 511 = 4,088 predicted tokens
without a BOS; with one, 9 windows (8 x 511 text tokens, then 8) and every one of the 4,096 text
tokens predicted once (the BOS predicts the first).

``tune`` (packed windows) and ``fuse --calibration`` (decoder LMs) take their windows from
:func:`packed_windows`, so they read text exactly as ``eval`` does, BOS included.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from mlpfuse.errors import InputError

GROW_MARGIN = 64  # extra tokens tokenised past the limit, so the cut never falls on a row's partial tokenisation
BOS_PROBE = "a"  # a short text encoded with and without special tokens to see whether the tokenizer adds a BOS


@dataclass
class Perplexity:
    """The result of :func:`perplexity`: ``exp(mean_nll)`` over ``predicted_tokens`` tokens."""

    perplexity: float
    mean_nll: float
    tokens: int  # tokens fed to the model (the text after the limit, plus one BOS per window when ``bos``)
    predicted_tokens: int
    windows: int
    max_length: int
    bos: bool  # each window starts with the tokenizer's BOS token (see :func:`bos_id`)

    def as_dict(self) -> dict:
        return asdict(self)


WINDOW = 512  # tokens per window unless --max-length says otherwise (capped at the model's positions)


def check_protocol(max_length: int, limit_tokens: int | None) -> None:
    """Refuse window and limit values the protocol cannot use. Raises InputError (exit 2)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InputError(f"--max-length must be an integer >= 2 (a window predicts max_length - 1 tokens), "
                         f"got {max_length!r}")
    if limit_tokens is not None and (isinstance(limit_tokens, bool) or not isinstance(limit_tokens, int)
                                     or limit_tokens < 2):
        raise InputError(f"--limit-tokens must be an integer >= 2, got {limit_tokens!r}")


def token_ids(tokenizer, texts: list[str], limit_tokens: int | None) -> list[int]:
    """The token ids of ``texts`` joined with newlines, cut to ``limit_tokens`` (all when None).

    Only as many rows as the limit needs are tokenised (doubling the row count until there are
    ``GROW_MARGIN`` tokens to spare), so a large file costs no more than its first few rows.
    """
    rows = len(texts) if limit_tokens is None else max(1, min(len(texts), 64))
    while True:
        ids = tokenizer("\n".join(texts[:rows]), add_special_tokens=False)["input_ids"]
        if limit_tokens is None or rows >= len(texts) or len(ids) >= limit_tokens + GROW_MARGIN:
            return list(ids if limit_tokens is None else ids[:limit_tokens])
        rows = min(len(texts), rows * 2)


def bos_id(tokenizer) -> int | None:
    """The id of the BOS token ``tokenizer`` puts before a text it encodes, or None when it adds none.

    Decided by what the tokenizer does, not by its settings: a short probe is encoded with and
    without special tokens, and the BOS counts only when the first adds it in front. So a slow or
    fast tokenizer that adds one (Gemma, Llama 2 and 3, whichever of ``add_bos_token`` or a
    post-processor template does it) gives its id, and one that has a BOS token it never adds
    (GPT-2's, the same token as its EOS) or no BOS at all (BERT-style) gives None.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    special = list(tokenizer(BOS_PROBE)["input_ids"])
    plain = list(tokenizer(BOS_PROBE, add_special_tokens=False)["input_ids"])
    return bos if special[:1] == [bos] and plain[:1] != [bos] else None


def packed_windows(tokenizer, texts: list[str], max_length: int, limit_tokens: int | None = None) -> list[list[int]]:
    """The protocol's windows of ``texts``: :func:`token_ids` cut by :func:`windows_of`, each window
    starting with the tokenizer's BOS when it adds one (:func:`bos_id`). The one place a causal
    LM's text becomes windows: ``eval``, tune's packing and ``fuse --calibration`` all call it.

    Returns lists of at most ``max_length`` ids (all but the last exactly ``max_length``), each of
    at least 2 ids; none when the text is too short.
    """
    return windows_of(token_ids(tokenizer, texts, limit_tokens), max_length, bos_id(tokenizer))


def padded_batch(windows: list[list[int]], pad_id: int | None):
    """(input_ids, attention_mask), both [windows, longest window] int64: windows right-padded with
    ``pad_id`` (0 when the tokenizer has none), the mask 1 on real tokens."""
    import torch

    length = max(len(window) for window in windows)
    pad = 0 if pad_id is None else pad_id
    ids = torch.tensor([w + [pad] * (length - len(w)) for w in windows], dtype=torch.long)
    mask = torch.tensor([[1] * len(w) + [0] * (length - len(w)) for w in windows], dtype=torch.long)
    return ids, mask


def windows_of(ids: list[int], max_length: int, bos: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``max_length`` ids; a trailing 1-id window is dropped.

    With ``bos``, each window is ``bos`` followed by the next ``max_length - 1`` ids (still
    ``max_length`` long). A ``max_length`` below 2 gives no windows (nothing to predict).
    """
    if max_length < 2:
        return []
    head = [] if bos is None else [bos]
    step = max_length - len(head)
    chunks = [head + ids[start:start + step] for start in range(0, len(ids), step)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


def perplexity(model, tokenizer, texts: list[str], max_length: int = WINDOW, limit_tokens: int | None = 4096,
               device=None) -> Perplexity:
    """Perplexity of an in-memory causal LM on ``texts`` with the module's protocol.

    ``model``: a transformers causal LM (its ``logits`` are [1, window, vocab]); it is put in eval
    mode and run without gradients on ``device`` (default: where its parameters are). ``texts``: the
    rows of the text column; the windows are :func:`packed_windows` (BOS first when the tokenizer
    adds one). Raises InputError when the text gives fewer than 2 tokens.
    """
    import torch

    from mlpfuse.runtime import check_window

    check_protocol(max_length, limit_tokens)
    max_length = check_window(max_length, model.config, default=WINDOW)  # the default fits the model
    windows = packed_windows(tokenizer, [str(t) for t in texts], max_length, limit_tokens)
    if not windows:
        raise InputError("the text gives fewer than 2 tokens (a BOS included); perplexity needs at least 2")
    device = device or next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            input_ids = torch.tensor([window], dtype=torch.long, device=device)
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            targets = input_ids[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    mean_nll = total / count
    return Perplexity(perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf, mean_nll=mean_nll,
                      tokens=sum(len(w) for w in windows), predicted_tokens=count, windows=len(windows),
                      max_length=max_length, bos=bos_id(tokenizer) is not None)


def require_causal_lm(directory) -> None:
    """Refuse a checkpoint whose config records no causal-LM class (an encoder, a seq2seq model).

    Raises InputError (exit 2) naming the recorded class.
    """
    from mlpfuse.arch import is_causal_lm
    from mlpfuse.checkpoints.tensors import read_config
    from mlpfuse.checkpoints.format import base_config_dict, checkpoint_task

    config = base_config_dict(read_config(directory))
    if not is_causal_lm(config) or checkpoint_task(config) != "causal-lm":  # the family, and the head saved
        recorded = ", ".join(config.get("architectures") or []) or "no architecture"
        raise InputError(f"{directory} is not a causal language model ({recorded}); perplexity needs a causal LM "
                         f"(a *ForCausalLM / *LMHeadModel checkpoint)")


def evaluate_checkpoint(model: str, data: str, text_column: str = "sentence", max_length: int = WINDOW,
                        limit_tokens: int | None = 4096, device: str | None = None) -> dict:
    """Perplexity of the checkpoint ``model`` (original, fused or tuned) on the text file ``data``.

    Loads the model in float32 as its causal-LM class and its tokenizer from the same directory;
    returns a JSON-able report: the :class:`Perplexity` fields (``bos`` among them) plus ``model``,
    ``data``, ``text_column``, ``limit_tokens``, ``device`` and ``seconds``. Raises InputError for a bad
    file, column, value or a checkpoint that is not a causal LM, EnvironmentProblem for a device
    that is not there.
    """
    import torch

    from mlpfuse.data import read_table
    from mlpfuse.checkpoints.modeling import load
    from mlpfuse.runtime import load_tokenizer, resolve_device
    from mlpfuse.checkpoints.source import resolve_model

    check_protocol(max_length, limit_tokens)
    target = resolve_device(device)
    texts = read_table(data).texts(text_column)
    directory = resolve_model(model)
    require_causal_lm(directory)
    tokenizer = load_tokenizer(directory)
    started = time.perf_counter()
    network = load(directory, task="causal-lm", dtype=torch.float32).to(target)
    result = perplexity(network, tokenizer, texts, max_length, limit_tokens, device=target)
    report = {"model": str(model), "data": str(data), "text_column": text_column, "limit_tokens": limit_tokens,
              "device": str(target), "seconds": round(time.perf_counter() - started, 3)}
    report.update(result.as_dict())
    return report
