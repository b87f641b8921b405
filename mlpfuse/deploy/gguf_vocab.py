"""The tokenizer of a checkpoint as GGUF metadata (``tokenizer.ggml.*``), from its ``tokenizer.json``.

Two kinds, as llama.cpp knows them:

* byte-level BPE (GPT-2, SmolLM, Qwen, Llama 3, StarCoder...): ``tokenizer.ggml.model = "gpt2"``,
  tokens and merges as in tokenizer.json (the gguf package's ``BpeVocab`` and ``SpecialVocab``), and a
  pre-tokenizer name (``tokenizer.ggml.pre``) chosen from the tokenizer.json pre-tokenizer: llama.cpp
  splits text with a fixed regex per name (``llama-vocab.cpp``), so only layouts whose regex is known to
  match are named; any other gets ``default`` and :attr:`GgufVocab.pre_known` is False (the export then
  compares llama.cpp's tokens with transformers' when llama_cpp is installed).
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma): ``tokenizer.ggml.model =
  "llama"``; llama.cpp merges the pair whose merged token has the highest score, so each token's score
  is minus the rank of the merge that makes it (the order transformers merges in); ``<0xNN>`` tokens
  are BYTE tokens.

Special token ids, whether BOS/EOS are added, and the chat template come from the gguf package's
``SpecialVocab`` (tokenizer.json, tokenizer_config.json, chat_template.jinja). Rows of the embedding
past the tokenizer's size are written as unused ``[PAD{i}]`` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlpfuse.errors import InputError

# tokenizer.json Split regexes (as transformers stores them) whose llama.cpp pre-tokenizer is known
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


@dataclass
class GgufVocab:
    """Tokenizer facts to write: ``model`` (gpt2 | llama), ``pre`` (pre-tokenizer name or None),
    ``tokens`` (bytes, id order), ``scores``, ``types`` (gguf.TokenType values), the gguf package's
    ``SpecialVocab`` (merges, special ids, chat template) and ``pre_known`` (False: ``pre`` is a guess)."""

    model: str
    tokens: list
    scores: list
    types: list
    special: object
    pre: str | None = None
    pre_known: bool = True
    padded: int = 0
    add_space_prefix: bool | None = None  # llama-style only: whether "▁" goes before the text
    notes: list = field(default_factory=list)

    def add_to(self, writer) -> None:
        """Write the ``tokenizer.ggml.*`` keys (and chat template) into a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def _pre_name(pre_tokenizer: dict | None) -> tuple[str, bool]:
    """llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json pre-tokenizer; (name, known)."""
    if not pre_tokenizer:
        return "default", False
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2", True
    if kind == "Sequence":
        parts = pre_tokenizer.get("pretokenizers") or []
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm", True
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            pattern = (parts[0].get("pattern") or {}).get("Regex")
            if pattern in _SPLIT_PRE:
                return _SPLIT_PRE[pattern], True
    return "default", False


def load_vocab(directory: Path, n_vocab: int) -> GgufVocab:
    """The tokenizer in ``directory`` (its tokenizer.json) as GGUF vocab facts, padded to ``n_vocab`` tokens.

    Raises InputError when there is no tokenizer.json, when its model is neither byte-level BPE nor
    byte-fallback BPE, or when it has more tokens than the embedding has rows.
    """
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{directory} has no tokenizer.json; a GGUF carries the tokenizer: copy the base model's "
                         "tokenizer files (tokenizer.json, tokenizer_config.json) into it and run again")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    decoder = data.get("decoder") or {}
    added = {item["id"]: item for item in data.get("added_tokens") or []}
    byte_fallback = model.get("type") == "BPE" and model.get("byte_fallback", False)
    if model.get("type") == "BPE" and not byte_fallback and decoder.get("type") == "ByteLevel":
        vocab = BpeVocab(Path(directory))
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
            scores.append(score)
            types.append(kind)
        for index in range(len(tokens)):  # added tokens that are not special are user-defined, not control
            item = added.get(index)
            if item is not None and not item.get("special", False):
                types[index] = gguf.TokenType.USER_DEFINED
            elif item is not None:
                types[index] = gguf.TokenType.CONTROL
        pre, known = _pre_name(data.get("pre_tokenizer"))
        result = GgufVocab("gpt2", tokens, scores, types, SpecialVocab(Path(directory), load_merges=True,
                                                                     n_vocab=n_vocab), pre, known)
    elif byte_fallback:
        result = _llama_vocab(data, Path(directory), n_vocab)
    else:
        raise InputError(f"the tokenizer in {directory} is {model.get('type')} (decoder {decoder.get('type')}); "
                         "GGUF export supports byte-level BPE (gpt2-style) and byte-fallback BPE (llama-style) tokenizers")
    if len(result.tokens) > n_vocab:
        raise InputError(f"the tokenizer has {len(result.tokens)} tokens but the model's embedding only {n_vocab} rows")
    while len(result.tokens) < n_vocab:  # embedding rows past the tokenizer: unused tokens (as llama.cpp expects)
        result.tokens.append(f"[PAD{len(result.tokens)}]".encode())
        result.scores.append(-1000.0)
        result.types.append(gguf.TokenType.UNUSED)
        result.padded += 1
    return result


def _llama_vocab(data: dict, directory: Path, n_vocab: int) -> GgufVocab:
    """A byte-fallback BPE tokenizer.json as llama.cpp's SentencePiece vocabulary (scores from merge ranks)."""
    import gguf
    from gguf.vocab import SpecialVocab

    model = data["model"]
    by_id = {index: text for text, index in model["vocab"].items()}
    added = {item["id"]: item for item in data.get("added_tokens") or []}
    for index, item in added.items():
        by_id.setdefault(index, item["content"])
    size = max(by_id) + 1 if by_id else 0
    rank = {}
    for position, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, position)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for index in range(size):
        text = by_id.get(index)
        if text is None:
            text = f"[PAD{index}]"
            kind = gguf.TokenType.UNUSED
        elif text == unk:
            kind = gguf.TokenType.UNKNOWN
        elif index in added and added[index].get("special", False):
            kind = gguf.TokenType.CONTROL
        elif index in added:
            kind = gguf.TokenType.USER_DEFINED
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(text.encode("utf-8"))
        if kind != gguf.TokenType.NORMAL or (text not in rank and len(text) == 1):
            scores.append(0.0)
        else:  # a token no merge makes is never merged into (lowest priority)
            scores.append(-float(rank.get(text, len(rank) + 1)))
        types.append(kind)
    special = SpecialVocab(directory, load_merges=False, n_vocab=n_vocab)
    result = GgufVocab("llama", tokens, scores, types, special, pre="default")
    result.add_space_prefix = _prepends_space(data)
    return result


def _prepends_space(data: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2: yes, Gemma: no)."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                return True
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") in ("always", "first"):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(data.get("normalizer")) or walk(data.get("pre_tokenizer"))
