"""`mlpfuse tune`: layer-wise tuning lowers the loss, trains only the fused MLPs, records itself, resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.runtime import file_sha256
from mlpfuse.train.tune import TuneSettings, layerwise_loss, state_directory, tune_checkpoint, tune_model

from .conftest import make_checkpoints, tree_digest, write_texts

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tune")
    original, fused = make_checkpoints(directory)
    return original, fused, write_texts(directory / "text.tsv")


def _loss_on(student, teacher, tokenizer, texts) -> float:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return layerwise_loss(student(**encoded, output_hidden_states=True).hidden_states,
                              teacher(**encoded, output_hidden_states=True).hidden_states,
                              encoded["attention_mask"]).item()


def test_tune_lowers_loss_and_trains_only_fused_mlps(tiny, tmp_path):
    original, fused, data = tiny
    before_input = tree_digest(fused)
    report = tune_checkpoint(str(fused), str(original), str(data), tmp_path / "tuned",
                             TuneSettings(lr=3e-3, batch_size=8, epochs=2, max_steps=12))
    assert tree_digest(fused) == before_input
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    texts = [line.split("\t")[0] for line in data.read_text().splitlines()[1:]]
    teacher = mlpfuse.load(original).eval()
    start, tuned = mlpfuse.load(fused).eval(), mlpfuse.load(tmp_path / "tuned").eval()
    assert _loss_on(tuned, teacher, tokenizer, texts) < _loss_on(start, teacher, tokenizer, texts)

    fused_paths = [spec["path"] for spec in start.config.mlpfuse["modules"]]
    before, after = start.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        if name.endswith("fusion_scale"):
            assert torch.equal(before[name], after[name]), name
        elif any(name.startswith(path + ".") for path in fused_paths):
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed but is not a fused MLP weight"

    record = json.loads((tmp_path / "tuned" / "config.json").read_text())["mlpfuse"]["tuning"]
    assert record["data_sha256"] == file_sha256(data)
    assert record["steps"] == report.steps == 12
    assert record["final_loss"] == pytest.approx(report.final_loss)
    assert not state_directory(tmp_path / "tuned").exists()


def test_interrupted_tuning_resumes_to_the_same_weights(tiny, tmp_path):
    original, fused, data = tiny
    settings = TuneSettings(lr=3e-3, batch_size=8, max_steps=6, save_every=0)
    tune_checkpoint(str(fused), str(original), str(data), tmp_path / "straight", settings)

    def interrupt(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_checkpoint(str(fused), str(original), str(data), tmp_path / "resumed", settings, on_step=interrupt)
    assert not (tmp_path / "resumed").exists()
    assert (state_directory(tmp_path / "resumed") / "state.json").is_file()
    report = tune_checkpoint(str(fused), str(original), str(data), tmp_path / "resumed", settings, resume=True)
    assert report.resumed_from == 3 and report.steps == 6
    straight, resumed = mlpfuse.load(tmp_path / "straight").state_dict(), mlpfuse.load(tmp_path / "resumed").state_dict()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)


def test_padding_does_not_count_in_the_layerwise_loss():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 4, generator=generator) for _ in range(3)]
    teacher = [torch.randn(2, 5, 4, generator=generator) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = [s.clone() for s in student]
    for s in changed:
        s[0, 3:] += 100.0
    assert layerwise_loss(changed, teacher, mask) == pytest.approx(layerwise_loss(student, teacher, mask).item())
    assert layerwise_loss(teacher, teacher, mask) == 0


def test_tune_model_in_memory_only_touches_fused_modules(tiny):
    original, fused, data = tiny
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    student, teacher = mlpfuse.load(fused), mlpfuse.load(original)
    frozen = {k: v.clone() for k, v in student.embeddings.state_dict().items()}
    result = tune_model(student, teacher, tokenizer, ["good movie", "bad plot"] * 4, TuneSettings(batch_size=4, lr=1e-3))
    assert result["steps"] == 2 and result["trainable_parameters"] > 0
    for name, value in student.embeddings.state_dict().items():
        assert torch.equal(value, frozen[name])


def test_cli_tune_writes_json_and_rejects_bad_input(tiny, tmp_path):
    original, fused, data = tiny
    runner = CliRunner()
    result = runner.invoke(app, ["tune", str(fused), "--teacher", str(original), "--data", str(data), "-o",
                                 str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "8", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["steps"] == 2 and Path(report["output"]).is_dir()

    bad = runner.invoke(app, ["tune", str(fused), "--teacher", str(fused), "--data", str(data), "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "teacher" in bad.output and "Traceback" not in bad.output
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    bad = runner.invoke(app, ["tune", str(fused), "--teacher", str(original), "--data", str(empty), "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "no data rows" in bad.output
    assert not (tmp_path / "b").exists()
