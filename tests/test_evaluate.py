"""Perplexity evaluation (``mlpfuse eval``): the protocol's value, and bad input as one line, exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from typer.testing import CliRunner

from mlpfuse.cli import app
from mlpfuse.train.evaluate import evaluate_checkpoint, perplexity

from .conftest import build_tiny

WORDS = [f"w{i}" for i in range(40)]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LLaMA saved with a word-level tokenizer, and a TSV of sentences."""
    directory = tmp_path_factory.mktemp("eval")
    model, _ = build_tiny("llama", seed=3)
    checkpoint = directory / "llama"
    model.save_pretrained(checkpoint)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(0)
    rows = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=generator))
            for n in torch.randint(3, 12, (30,), generator=generator)]
    data = directory / "text.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{row}\t0\n" for row in rows))
    return checkpoint, model, rows, data


def _reference(model, tokenizer, rows, max_length, limit):
    """Mean NLL from transformers' own shifted loss per window, weighted by predicted tokens."""
    ids = tokenizer("\n".join(rows), add_special_tokens=False)["input_ids"][:limit]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), max_length):
            window = torch.tensor([ids[start:start + max_length]])
            if window.shape[1] < 2:
                continue
            loss = model(input_ids=window, labels=window).loss.item()
            total += loss * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return total / count, count


@pytest.mark.parametrize("max_length,limit", [(16, 100), (7, 57), (32, 10_000)])
def test_perplexity_equals_transformers_loss_over_windows(llama, max_length, limit):
    checkpoint, model, rows, _ = llama
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    result = perplexity(model, tokenizer, rows, max_length=max_length, limit_tokens=limit)
    expected, count = _reference(model, tokenizer, rows, max_length, limit)
    assert result.predicted_tokens == count
    assert result.mean_nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    # a random 99-token model is near uniform: the value must be in a sane range, not 0 or inf
    assert 10 < result.perplexity < 1000


def test_limit_tokens_cuts_the_text_and_windows_do_not_overlap(llama):
    checkpoint, model, rows, _ = llama
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    result = perplexity(model, tokenizer, rows, max_length=20, limit_tokens=81)
    # 81 tokens: windows of 20, 20, 20, 20 and a single trailing token that predicts nothing
    assert (result.tokens, result.windows, result.predicted_tokens) == (80, 4, 76)


def test_checkpoint_evaluation_and_cli_json_agree(llama, tmp_path):
    checkpoint, model, rows, data = llama
    report = evaluate_checkpoint(str(checkpoint), str(data), max_length=16, limit_tokens=100, device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    expected, _ = _reference(model, tokenizer, rows, 16, 100)
    assert report["mean_nll"] == pytest.approx(expected, rel=1e-5)
    out = tmp_path / "ppl.json"
    result = run("eval", checkpoint, "--data", data, "--max-length", 16, "--limit-tokens", 100, "--device", "cpu",
                 "--json", out)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["perplexity"] == pytest.approx(report["perplexity"], rel=1e-6)
    assert written["predicted_tokens"] == report["predicted_tokens"]


def _one_line(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment.lower() in lines[0].lower(), lines[0]


def test_an_encoder_is_refused_saying_perplexity_needs_a_causal_lm(llama):
    _one_line(run("eval", "minilm", "--data", llama[3]), "perplexity needs a causal LM")


@pytest.mark.parametrize("args,fragment", [
    (["--max-length", "1"], "--max-length must be"),
    (["--limit-tokens", "0"], "--limit-tokens must be"),
    (["--text-column", "text"], "no column 'text'"),
])
def test_bad_values_are_one_line_errors(llama, args, fragment):
    _one_line(run("eval", llama[0], "--data", llama[3], *args), fragment)


def test_a_text_too_short_is_a_one_line_error(llama, tmp_path):
    data = tmp_path / "short.tsv"
    data.write_text("sentence\nw1\n")
    _one_line(run("eval", llama[0], "--data", data), "at least 2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_exits_3(llama):
    result = run("eval", llama[0], "--data", llama[3], "--device", "cuda")
    assert result.exit_code == 3, result.output
    assert "no CUDA GPU is available here" in result.stderr and "Traceback" not in result.output


def test_token_ids_without_a_limit_reads_every_row(llama):
    """``limit_tokens=None`` means the whole text: before, only the first 64 rows were tokenised."""
    from mlpfuse.train.evaluate import token_ids

    checkpoint, _, rows, _ = llama
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    many = [rows[i % len(rows)] for i in range(150)]
    assert token_ids(tokenizer, many, None) == tokenizer("\n".join(many), add_special_tokens=False)["input_ids"]


def test_windows_longer_than_the_models_positions_are_refused_in_one_line(llama):
    """Before: an IndexError deep in the model (exit 1) on models with a position table (GPT-2, GPT-J)."""
    checkpoint, _, _, data = llama
    limit = transformers.AutoConfig.from_pretrained(str(checkpoint)).max_position_embeddings
    result = run("eval", checkpoint, "--data", data, "--max-length", limit + 1, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert f"longer than the model's {limit} positions" in result.output
    fused = checkpoint.parent / "fused-positions"
    assert run("fuse", checkpoint, "--layers", "0", "--ratio", "0.5", "-o", fused, "--overwrite").exit_code == 0
    for command in (["tune", fused, "--teacher", checkpoint, "--data", data],
                    ["fuse", checkpoint, "--layers", "0", "--ratio", "0.5", "--calibration", data]):
        out = checkpoint.parent / "refused"
        result = run(*command, "-o", out, "--max-length", limit + 1, "--device", "cpu")
        assert result.exit_code == 2 and not out.exists(), result.output
        assert f"longer than the model's {limit} positions" in result.output
