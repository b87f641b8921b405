"""Written checkpoints keep the sentence-transformers pipeline of their source (modules, Normalize, max_seq_length)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlpfuse.checkpoints.output import carry_side_files
from mlpfuse.checkpoints.source import bundled_model_path
from mlpfuse.cli import app

from .conftest import tree_digest
from .conftest import make_checkpoints, write_texts

sentence_transformers = pytest.importorskip("sentence_transformers")

SENTENCES = ["a good movie", "the plot was dull and far too long", "great"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pipeline(directory: Path):
    """The SentenceTransformer a user gets from ``directory`` (the fused loader is remote code)."""
    return sentence_transformers.SentenceTransformer(str(directory), device="cpu", trust_remote_code=True)


def by_hand(directory: Path, texts: list[str], max_length: int) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of the checkpoint loaded by mlpfuse."""
    import torch
    import transformers

    import mlpfuse

    model = mlpfuse.load(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def module_types(model) -> list[str]:
    return [type(module).__name__ for module in model]


@pytest.mark.slow
def test_fused_minilm_keeps_pooling_normalize_and_max_seq_length(tmp_path):
    source = bundled_model_path()
    before = tree_digest(source)
    out = tmp_path / "fused"
    result = run("fuse", "minilm", "--layers", "0", "--dim", "384", "-o", out)
    assert result.exit_code == 0, result.output
    assert tree_digest(source) == before

    original, fused = pipeline(source), pipeline(out)
    assert module_types(fused) == module_types(original) == ["Transformer", "Pooling", "Normalize"]
    assert fused.max_seq_length == original.max_seq_length == 256
    assert fused[1].get_config_dict() == original[1].get_config_dict()  # mean pooling, dimension 384
    texts = SENTENCES + ["word " * 400]  # longer than 256 tokens: truncated where the source truncates
    embeddings = fused.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, by_hand(out, texts, 256), atol=1e-5)  # Transformer -> mean -> Normalize
    assert (out / "README.md").read_text() != (source / "README.md").read_text()  # our model card, not theirs
    assert "mlpfuse" in (out / "README.md").read_text()


@pytest.fixture(scope="module")
def st_sources(tmp_path_factory):
    """A tiny BERT saved as a sentence-transformers model (mean pooling, Normalize, max_seq_length 48)."""
    directory = tmp_path_factory.mktemp("st")
    original, _ = make_checkpoints(directory)
    bundled = bundled_model_path()
    for name in ("modules.json", "config_sentence_transformers.json"):
        shutil.copyfile(bundled / name, original / name)
    (original / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    pooling = json.loads((bundled / "1_Pooling" / "config.json").read_text())
    (original / "1_Pooling").mkdir()
    (original / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": 32}))
    (original / "README.md").write_text("the source's own model card\n")
    return original, write_texts(directory / "text.tsv", rows=8)


@pytest.mark.slow
def test_every_writer_carries_the_pipeline(st_sources, tmp_path):
    original, data = st_sources
    before = tree_digest(original)
    outputs = {"fuse": tmp_path / "fused", "merge-layers": tmp_path / "merged", "tune": tmp_path / "tuned",
               "finetune": tmp_path / "finetuned"}
    commands = {
        "fuse": ["fuse", original, "--dim", "16", "-o", outputs["fuse"]],
        "merge-layers": ["merge-layers", original, "--layers", "0-1", "--no-permute", "-o", outputs["merge-layers"]],
        "tune": ["tune", outputs["fuse"], "--teacher", original, "--data", data, "--max-steps", "1", "--batch-size", "4",
                 "--max-length", "16", "-o", outputs["tune"]],
        "finetune": ["finetune", original, "--train", data, "--max-steps", "1", "--batch-size", "4", "--max-length", "16",
                     "-o", outputs["finetune"]],
    }
    for writer, command in commands.items():
        result = run(*command)
        assert result.exit_code == 0, (writer, result.output)
        model = pipeline(outputs[writer])
        assert module_types(model) == ["Transformer", "Pooling", "Normalize"], writer
        assert model.max_seq_length == 48, writer
        np.testing.assert_allclose(np.linalg.norm(model.encode(SENTENCES), axis=1), 1.0, atol=1e-5)
        card = outputs[writer] / "README.md"
        assert not card.exists() or "the source's own model card" not in card.read_text(), writer
    assert tree_digest(original) == before


def test_carrying_points_a_sub_folder_transformer_at_the_written_weights(tmp_path):
    source, staging = tmp_path / "src", tmp_path / "out"
    (source / "0_Transformer").mkdir(parents=True)
    (source / "0_Transformer" / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    (source / "0_Transformer" / "model.safetensors").write_text("old weights")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "../outside", "type": "sentence_transformers.models.Dense"},
    ]
    (source / "modules.json").write_text(json.dumps(modules))
    (source / "README.md").write_text("theirs")
    (source / "config.json").write_text("{}")
    staging.mkdir()
    (staging / "config.json").write_text('{"mine": true}')

    carry_side_files(source, staging)
    written = json.loads((staging / "modules.json").read_text())
    assert [m["path"] for m in written] == ["", "1_Pooling", "../outside"]
    assert json.loads((staging / "sentence_bert_config.json").read_text()) == {"max_seq_length": 128}
    assert (staging / "1_Pooling" / "config.json").is_file()
    assert not (staging / "0_Transformer").exists()  # the old weights stay behind
    assert list((tmp_path / "outside").iterdir()) == []  # nothing copied to or from outside the checkpoint
    assert sorted(p.name for p in staging.iterdir()) == ["1_Pooling", "config.json", "modules.json",
                                                          "sentence_bert_config.json"]
    assert json.loads((staging / "config.json").read_text()) == {"mine": True}
