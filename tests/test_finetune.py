"""`mlpfuse finetune`: end to end on tiny models and files, same metrics after save, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import transformers
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.finetune import FinetuneSettings, finetune, label_mapping

from .conftest import tree_digest
from .test_tune import make_checkpoints, write_texts

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "16", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("finetune")
    original, fused = make_checkpoints(directory)
    return {
        "dir": directory, "original": original, "fused": fused,
        "train": write_texts(directory / "train.tsv", rows=32, seed=1),
        "eval": write_texts(directory / "eval.tsv", rows=16, seed=2),
    }


def _json(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_finetune_fused_end_to_end_then_eval_only_matches_a_saved_copy(files, tmp_path):
    runner = CliRunner()
    before = tree_digest(files["fused"])
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(files["fused"]), "--train", str(files["train"]), "--eval",
                                 str(files["eval"]), "-o", str(out), *FAST, "--json", "-"])
    assert result.exit_code == 0, result.output
    assert tree_digest(files["fused"]) == before
    report = _json(result)
    metrics = report["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
    assert metrics["train_steps"] == 4 and metrics["train_seconds"] > 0
    assert report["label2id"] == {"neg": 0, "pos": 1} and report["fused"]
    assert json.loads((out / "mlpfuse_finetune.json").read_text())["metrics"]["accuracy"] == metrics["accuracy"]

    model = mlpfuse.load(out, task="sequence-classification")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.mlpfuse["modules"]
    copy = tmp_path / "copy"
    model.save_pretrained(copy)
    transformers.AutoTokenizer.from_pretrained(str(out)).save_pretrained(copy)
    first = runner.invoke(app, ["finetune", str(out), "--eval", str(files["eval"]), "--eval-only", "--json", "-"])
    second = runner.invoke(app, ["finetune", str(copy), "--eval", str(files["eval"]), "--eval-only", "--json", "-"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = _json(first)["metrics"], _json(second)["metrics"]
    assert a["accuracy"] == b["accuracy"] == metrics["accuracy"]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6)


def test_regression_on_sentence_pairs_reports_correlations(tmp_path, files):
    train = write_texts(tmp_path / "train.tsv", rows=24, seed=3, labels=(0.5, 1.5, 2.0, 4.25), pair=True)
    settings = FinetuneSettings(task="regression", pair_column="sentence2", epochs=1, batch_size=8, max_length=16)
    report = finetune(str(files["original"]), str(train), str(train), None, settings)
    metrics = report["metrics"]
    for key in ("pearson", "spearman"):
        assert math.isnan(metrics[key]) or -1.0 <= metrics[key] <= 1.0
    assert report["label2id"] is None and metrics["train_steps"] == 3


def test_causal_lm_reports_perplexity(tmp_path):
    original, fused = make_checkpoints(tmp_path, kind="llama")
    text = write_texts(tmp_path / "lm.tsv", rows=16, seed=4)
    settings = FinetuneSettings(task="causal-lm", epochs=1, batch_size=8, max_length=16, lr=1e-3)
    report = finetune(str(fused), str(text), str(text), tmp_path / "lm", settings)
    metrics = report["metrics"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1.0
    assert mlpfuse.load(tmp_path / "lm", task="causal-lm").config.mlpfuse["modules"]


def test_label_mapping_is_numeric_when_labels_are_integers():
    assert label_mapping(["10", "2", "1", "2"]) == {"1": 0, "2": 1, "10": 2}
    assert label_mapping(["pos", "neg", "pos"]) == {"neg": 0, "pos": 1}
    assert label_mapping(["0"], {"negative": 0, "positive": 1}) == {"negative": 0, "positive": 1}
    assert label_mapping(["1", "1"], {"LABEL_0": 0, "LABEL_1": 1}) == {"0": 0, "1": 1}


@pytest.mark.parametrize("case", ["unknown-label", "missing-column", "empty", "not-a-number", "no-output"])
def test_bad_input_is_one_line_error(files, tmp_path, case):
    train, args = files["train"], []
    if case == "unknown-label":
        bad = write_texts(tmp_path / "eval.tsv", rows=4, labels=("pos", "meh"), seed=5)
        args = ["--train", str(train), "--eval", str(bad), "-o", str(tmp_path / "o")]
        expected = "unknown label"
    elif case == "missing-column":
        args = ["--train", str(train), "--label-column", "score", "-o", str(tmp_path / "o")]
        expected = "no column 'score'"
    elif case == "empty":
        empty = tmp_path / "empty.csv"
        empty.write_text("sentence,label\n")
        args = ["--train", str(empty), "-o", str(tmp_path / "o")]
        expected = "no data rows"
    elif case == "not-a-number":
        args = ["--train", str(train), "--task", "regression", "-o", str(tmp_path / "o")]
        expected = "is not a number"
    else:
        args = ["--train", str(train)]
        expected = "-o"
    result = CliRunner().invoke(app, ["finetune", str(files["fused"]), *args, *FAST])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
