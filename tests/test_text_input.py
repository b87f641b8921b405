"""Text every command reads: a UTF-8 byte-order mark, the same values from every file format
(``mlpfuse/data.py``), and the BOS token at the start of each decoder window (``mlpfuse/train/evaluate.py``)."""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch
import transformers
from typer.testing import CliRunner

from mlpfuse.cli import app
from mlpfuse.compress.calibration import read_calibration
from mlpfuse.data import read_table
from mlpfuse.train.evaluate import bos_id, evaluate_checkpoint, packed_windows, padded_batch, token_ids, windows_of
from mlpfuse.train.tune import pack_texts

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


# --- the BOS token at the start of each window ------------------------------------------------

def _llama_tokenizer(add_bos_token: bool):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "▁a": 5}
    return transformers.LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=add_bos_token)


@pytest.mark.parametrize("make,expected", [
    (lambda: word_tokenizer("added"), 2),
    (lambda: _llama_tokenizer(True), 1),  # transformers' own class, BOS from add_bos_token
    (lambda: _llama_tokenizer(False), None),
    (lambda: word_tokenizer("unused"), None),  # GPT-2 style: a BOS (= EOS) it never adds
    (lambda: transformers.GPT2Tokenizer(vocab={"<|endoftext|>": 0, "a": 1}, merges=[]), None),
    (lambda: word_tokenizer("none"), None),
])
def test_bos_id_follows_what_the_tokenizer_adds(make, expected):
    assert bos_id(make()) == expected


def test_windows_start_with_the_bos_the_tokenizer_adds_and_keep_their_length():
    rows = [" ".join(WORDS[(7 * i + j) % 40] for j in range(i % 5 + 2)) for i in range(40)]
    tokenizer = word_tokenizer("added")
    text = token_ids(tokenizer, rows, None)
    windows = packed_windows(tokenizer, rows, 16)
    assert all(window[0] == 2 for window in windows)
    assert all(len(window) == 16 for window in windows[:-1]) and 2 <= len(windows[-1]) <= 16
    assert [i for window in windows for i in window[1:]] == text  # every text token once, in order
    assert 2 not in text


def test_windows_have_no_bos_when_the_tokenizer_adds_none():
    rows = [" ".join(WORDS[i:i + 4]) for i in range(30)]
    for kind in ("unused", "none"):
        tokenizer = word_tokenizer(kind)
        windows = packed_windows(tokenizer, rows, 16)
        assert windows == windows_of(token_ids(tokenizer, rows, None), 16)
        assert all(len(window) == 16 for window in windows[:-1])
        assert not any(i in (2, 3) for window in windows for i in window)


def test_a_window_with_bos_keeps_a_single_trailing_token():
    """With a BOS, a last text token still has its BOS to be predicted from; without one it predicts nothing."""
    assert windows_of([5, 6, 7, 8], 3, bos=2) == [[2, 5, 6], [2, 7, 8]]
    assert windows_of([5, 6, 7, 8, 9], 3, bos=2) == [[2, 5, 6], [2, 7, 8], [2, 9]]
    assert windows_of([5, 6, 7], 2) == [[5, 6]]
    assert windows_of([5, 6, 7], 1, bos=2) == []


def test_tune_and_calibration_take_the_same_windows(tmp_path):
    rows = [" ".join(WORDS[i:i + 6]) for i in range(30)]
    data = write_rows(tmp_path / "rows.tsv", rows)
    tokenizer = word_tokenizer("added")
    expected = packed_windows(tokenizer, rows, 12)
    assert pack_texts(tokenizer, rows, 12) == expected
    calibration = read_calibration(str(data), tokenizer, limit=100, max_length=12, text_column="sentence", packed=True)
    ids, mask = padded_batch(expected, tokenizer.pad_token_id)
    assert torch.equal(calibration.input_ids, ids) and torch.equal(calibration.attention_mask, mask)
    assert (calibration.input_ids[:, 0] == 2).all()


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory):
    """A tiny random LLaMA whose tokenizer adds a BOS to every text, like Gemma's and Llama 3's."""
    directory = tmp_path_factory.mktemp("bos") / "llama"
    model, _ = build_tiny("llama", seed=5)
    model.save_pretrained(directory)
    word_tokenizer("added").save_pretrained(directory)
    return directory


def _reference(model, windows):
    """Mean NLL from transformers' own shifted loss per window, weighted by predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            total += model(input_ids=ids, labels=ids).loss.item() * (len(window) - 1)
            count += len(window) - 1
    return total / count, count


def test_eval_puts_the_bos_first_in_every_window_and_says_so(bos_checkpoint, tmp_path):
    rows = [" ".join(WORDS[(3 * i + j) % 40] for j in range(i % 7 + 3)) for i in range(30)]
    data = write_rows(tmp_path / "text.tsv", rows)
    report = evaluate_checkpoint(str(bos_checkpoint), str(data), max_length=16, limit_tokens=100, device="cpu")
    text = token_ids(word_tokenizer("added"), rows, 100)
    windows = [[2] + text[start:start + 15] for start in range(0, 100, 15)]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(bos_checkpoint))
    expected, count = _reference(model, windows)
    assert report["bos"] is True
    assert (report["windows"], report["tokens"], report["predicted_tokens"]) == (7, 107, 100) == (
        len(windows), 100 + len(windows), count)
    assert report["mean_nll"] == pytest.approx(expected, rel=1e-5)
    result = CliRunner().invoke(app, ["eval", str(bos_checkpoint), "--data", str(data), "--max-length", "16",
                                      "--limit-tokens", "100", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["bos"] is True
    assert "BOS first" in result.output


def test_eval_without_a_bos_says_so(bos_checkpoint, tmp_path):
    directory = tmp_path / "gpt2-style"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(bos_checkpoint))
    model.save_pretrained(directory)
    word_tokenizer("unused").save_pretrained(directory)
    data = write_rows(tmp_path / "text.tsv", [" ".join(WORDS[i:i + 5]) for i in range(30)])
    report = evaluate_checkpoint(str(directory), str(data), max_length=16, limit_tokens=100, device="cpu")
    assert report["bos"] is False
    assert (report["windows"], report["tokens"], report["predicted_tokens"]) == (7, 100, 100 - 7)
