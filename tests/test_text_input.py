"""Text every command reads: a UTF-8 byte-order mark and the same values from every file format
(``mlpfuse/data.py``)."""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch
import transformers
from typer.testing import CliRunner

from mlpfuse.calibration import read_calibration
from mlpfuse.cli import app
from mlpfuse.data import read_table
from mlpfuse.evaluate import token_ids

from .conftest import build_tiny

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
BOM = "\ufeff"
# the same rows in every format; surrounding spaces must not make the formats differ
ROWS = ["  w1 w2 w3", "w4 w5 ", " w6 w7 w8 w9 w10 "]


def word_tokenizer(bos: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids below 44). ``bos``: "added" (a Llama/Gemma-style
    template puts ``<s>`` before every text it encodes), "unused" (GPT-2 style: a BOS token, the
    same as the EOS, that it never adds) or "none" (no BOS token at all)."""
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    names = {"unk_token": "<unk>", "pad_token": "<pad>"}
    if bos == "added":
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
        names.update(bos_token="<s>", eos_token="</s>")
    elif bos == "unused":
        names.update(bos_token="</s>", eos_token="</s>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **names)


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character, spaces included: any change to a value changes its token ids."""
    alphabet = sorted(set("".join(ROWS) + "\n"))
    vocab = {char: i for i, char in enumerate(["<unk>"] + alphabet)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def write_rows(path, rows, bom: bool = False):
    """``rows`` as a one-column .tsv/.csv (quoted) or .jsonl table with a ``sentence`` column and a label."""
    if path.suffix == ".jsonl":
        text = "".join(json.dumps({"sentence": row, "label": 0}) + "\n" for row in rows)
    elif path.suffix == ".csv":
        text = "sentence,label\n" + "".join(f'"{row}",0\n' for row in rows)
    else:
        text = "sentence\tlabel\n" + "".join(f"{row}\t0\n" for row in rows)
    path.write_text((BOM if bom else "") + text, encoding="utf-8")
    return path


# --- the byte-order mark and the same values from every format -------------------------------

@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(suffix, tmp_path):
    """Before: "no column 'sentence'; columns: \\ufeffsentence, label", and "line 1 is not JSON"."""
    table = read_table(str(write_rows(tmp_path / f"bom{suffix}", ["w1 w2", "w3"], bom=True)))
    assert list(table.columns) == ["sentence", "label"]
    assert table.texts("sentence") == ["w1 w2", "w3"]


def test_every_format_gives_the_same_values_and_the_same_calibration_tokens(tmp_path):
    """Before: the .jsonl reader kept surrounding spaces the .tsv reader strips (and refused a BOM)."""
    files = [write_rows(tmp_path / "rows.tsv", ROWS), write_rows(tmp_path / "rows.csv", ROWS, bom=True),
             write_rows(tmp_path / "rows.jsonl", ROWS, bom=True)]
    texts = [read_table(str(path)).texts("sentence") for path in files]
    assert texts[0] == [row.strip() for row in ROWS]
    assert texts[1] == texts[0] and texts[2] == texts[0]
    tokenizer = char_tokenizer()
    assert token_ids(tokenizer, texts[2], None) == token_ids(tokenizer, texts[0], None)
    calibration = [read_calibration(str(path), tokenizer, limit=10, max_length=8, text_column="sentence", packed=True)
                   for path in files]
    for data in calibration[1:]:
        assert torch.equal(data.input_ids, calibration[0].input_ids)
        assert torch.equal(data.attention_mask, calibration[0].attention_mask)


def test_eval_reads_a_file_with_a_byte_order_mark(bos_checkpoint, tmp_path):
    data = write_rows(tmp_path / "bom.tsv", [" ".join(WORDS[i:i + 5]) for i in range(0, 35, 5)], bom=True)
    result = CliRunner().invoke(app, ["eval", str(bos_checkpoint), "--data", str(data), "--max-length", "8",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory):
    """A tiny random LLaMA whose tokenizer adds a BOS to every text, like Gemma's and Llama 3's."""
    directory = tmp_path_factory.mktemp("bos") / "llama"
    model, _ = build_tiny("llama", seed=5)
    model.save_pretrained(directory)
    word_tokenizer("added").save_pretrained(directory)
    return directory
