"""`mlpfuse finetune`: end to end on tiny models and files, same metrics after save, one-line errors."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.train.finetune import FinetuneSettings, finetune, label_mapping

from .conftest import tree_digest
from .conftest import TEXT_WORDS as WORDS
from .conftest import make_checkpoints, write_texts

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "16", "--lr", "1e-3"]


def write_keyword_texts(path, rows: int, seed: int, targets: dict, pair: bool = False):
    """A learnable toy task: each sentence holds one keyword among filler words; its target is ``targets[keyword]``."""
    rng = random.Random(seed)
    lines = ["\t".join(["sentence", "label"] + (["sentence2"] if pair else []))]
    keywords = list(targets)
    for i in range(rows):
        keyword = keywords[i % len(keywords)]  # balanced
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), keyword)
        row = [" ".join(words), str(targets[keyword])]
        if pair:
            row.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))))
        lines.append("\t".join(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def predictions(directory, path, task: str, pair: bool = False) -> tuple[np.ndarray, list[str]]:
    """The saved model's outputs on a file, computed here (not by the Trainer): logits or values, and the labels."""
    model = mlpfuse.load(directory, task=task).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    outputs = []
    with torch.no_grad():
        for row in rows:
            encoded = tokenizer(row[0], row[2] if pair else None, truncation=True, max_length=16, return_tensors="pt")
            outputs.append(model(**encoded).logits[0].numpy())
    return np.stack(outputs), [row[1] for row in rows]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("finetune")
    original, fused = make_checkpoints(directory)
    keywords = {"excellent": "pos", "terrible": "neg"}
    return {
        "dir": directory, "original": original, "fused": fused,
        "train": write_keyword_texts(directory / "train.tsv", rows=32, seed=1, targets=keywords),
        "eval": write_keyword_texts(directory / "eval.tsv", rows=16, seed=2, targets=keywords),
    }


def _json(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_finetune_fused_end_to_end_then_eval_only_matches_a_saved_copy(files, tmp_path):
    runner = CliRunner()
    before = tree_digest(files["fused"])
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(files["fused"]), "--train", str(files["train"]), "--eval",
                                 str(files["eval"]), "-o", str(out), *FAST, "--epochs", "12", "--lr", "5e-3", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert tree_digest(files["fused"]) == before
    report = _json(result)
    metrics = report["metrics"]
    assert metrics["train_steps"] == 48 and metrics["train_seconds"] > 0
    assert report["label2id"] == {"neg": 0, "pos": 1} and report["fused"]
    assert json.loads((out / "mlpfuse_finetune.json").read_text())["metrics"]["accuracy"] == metrics["accuracy"]
    # the keyword decides the label: a working fine-tune beats chance (0.5) by far, and the reported
    # metrics are those of the saved model's own predictions
    logits, labels = predictions(out, files["eval"], "sequence-classification")
    truth = np.array([report["label2id"][label] for label in labels])
    predicted = logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx(float((predicted == truth).mean())) and metrics["accuracy"] > 0.8
    true_pos = float(((predicted == 1) & (truth == 1)).sum())
    assert metrics["f1"] == pytest.approx(2 * true_pos / float((predicted == 1).sum() + (truth == 1).sum()))

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


def test_regression_on_sentence_pairs_learns_a_learnable_target(tmp_path, files):
    targets = {"excellent": 1.25, "okay": 0.0, "terrible": -1.0}
    train = write_keyword_texts(tmp_path / "train.tsv", rows=24, seed=3, targets=targets, pair=True)
    evaluation = write_keyword_texts(tmp_path / "eval.tsv", rows=18, seed=4, targets=targets, pair=True)
    settings = FinetuneSettings(task="regression", pair_column="sentence2", epochs=16, batch_size=8, max_length=16,
                                lr=1e-2)
    report = finetune(str(files["original"]), str(train), str(evaluation), tmp_path / "reg", settings)
    metrics = report["metrics"]
    assert report["label2id"] is None and metrics["train_steps"] == 48
    values, labels = predictions(tmp_path / "reg", evaluation, "sequence-classification", pair=True)
    values, labels = values.reshape(-1), np.array([float(label) for label in labels])
    assert metrics["pearson"] == pytest.approx(float(np.corrcoef(values, labels)[0, 1]), abs=1e-5)
    # the keyword decides the target: a model that learns correlates well (0.81 / 0.73 measured), one that does
    # not (head untrained, labels misread) stays near 0
    assert metrics["pearson"] > 0.6 and metrics["spearman"] > 0.5


def test_causal_lm_reports_perplexity(tmp_path):
    original, fused = make_checkpoints(tmp_path, kind="llama")
    text = write_texts(tmp_path / "lm.tsv", rows=16, seed=4)
    settings = FinetuneSettings(task="causal-lm", epochs=1, batch_size=8, max_length=16, lr=1e-3)
    report = finetune(str(fused), str(text), str(text), tmp_path / "lm", settings)
    metrics = report["metrics"]
    model = mlpfuse.load(tmp_path / "lm", task="causal-lm").eval()
    assert model.config.mlpfuse["modules"]
    # perplexity from the saved model's logits, computed here: exp of the mean next-token NLL over all tokens
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "lm"))
    total, count = 0.0, 0
    with torch.no_grad():
        for line in text.read_text(encoding="utf-8").splitlines()[1:]:
            ids = tokenizer(line.split("\t")[0], truncation=True, max_length=16, return_tensors="pt")["input_ids"]
            log_probs = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            total -= float(log_probs.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


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
