"""``mlpfuse bench --lora``: the timed step trains only the LoRA adapters of ``finetune --lora``, on
original, fused and svd models, in the timed run and in the memory probe alike; bad values exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlpfuse import FuseSettings, fuse_checkpoint
from mlpfuse.analysis.bench import BenchSettings, preset_sources, run_bench
from mlpfuse.cli import app

from .conftest import tiny_config
from .test_bench import QUICK, SHAPE, H, I, K, L

pytest.importorskip("peft")
RANK = 3
runner = CliRunner()


def hand_lora(rank: int, projections: list[tuple[int, int]]) -> int:
    """LoRA adds A (rank x in) and B (out x rank) per adapted projection: rank * (in + out) parameters."""
    return sum(rank * (n_in + n_out) for n_in, n_out in projections)


def bert_projections(hidden: int, widths: list[int]) -> list[tuple[int, int]]:
    """(in, out) of every linear of BERT's layers: query, key, value, attention output; MLP in and out."""
    return [p for w in widths for p in [(hidden, hidden)] * 4 + [(hidden, w), (w, hidden)]]


def llama_projections(hidden: int, kv: int, widths: list[int]) -> list[tuple[int, int]]:
    """q, k, v, o of grouped-query attention (k and v project to ``kv``), then gate, up, down."""
    return [p for w in widths for p in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                        (hidden, w), (hidden, w), (w, hidden)]]


def test_lora_step_trains_only_the_adapters():
    report = run_bench(preset_sources(SHAPE, layers="1", dims=[K], label="tiny"),
                       BenchSettings(**QUICK, memory=False, lora=True, lora_rank=RANK))
    assert report.settings["lora"] is True and report.settings["lora_rank"] == RANK
    full = run_bench(preset_sources(SHAPE, layers="1", dims=[K], label="tiny"), BenchSettings(**QUICK, memory=False))
    for model, widths, plain in zip(report.models, ([I] * L, [I, K]), full.models):
        assert model.trainable_parameters == hand_lora(RANK, bert_projections(H, widths))
        assert model.trainable_parameters < model.parameters
        assert plain.trainable_parameters == plain.parameters and plain.lora is None
        assert model.parameters == plain.parameters  # the base model's count, adapters not included
        assert model.lora["rank"] == RANK and model.lora["trainable_parameters"] == model.trainable_parameters
        assert set(model.lora["targets"]) == {"query", "key", "value", "output.dense", "intermediate.dense"}
        assert len(model.train_step.samples) == QUICK["steps"] and all(t > 0 for t in model.train_step.samples)
        assert len(model.inference.samples) == QUICK["steps"]
        # weights + buffers + (grad + two AdamW moments) of the adapters only: far below full training's
        assert model.state_bytes < plain.state_bytes / 2
    fused = report.models[1]
    assert fused.ratios["trainable_parameters"] == pytest.approx(
        fused.trainable_parameters / report.models[0].trainable_parameters)
    assert fused.ratios["train_step_paired"] > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["models"][1]["lora"]["trainable_parameters"] == fused.trainable_parameters


@pytest.mark.parametrize("family, method", [("bert", "fusion"), ("llama", "fusion"), ("llama", "svd")])
def test_cli_benches_a_fused_checkpoint_with_lora(family, method, tiny_checkpoint, tmp_path):
    source_dir, _, _ = tiny_checkpoint(family)
    fused_dir = tmp_path / "fused"
    fuse_checkpoint(str(source_dir), fused_dir, FuseSettings(layers="0", dim=5, method=method))
    json_path = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(source_dir), str(fused_dir), "--lora", "--lora-rank", str(RANK),
                                 "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "8",
                                 "--no-memory", "--threads", "1", "--json", str(json_path)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "LoRA (PEFT) r=3" in result.stdout and f"LoRA r={RANK}" in result.stdout
    data = json.loads(json_path.read_text())
    original, fused = data["models"]
    assert data["settings"]["lora"] is True and data["settings"]["lora_rank"] == RANK
    assert fused["fused"] and not original["fused"]
    for model in (original, fused):
        assert 0 < model["trainable_parameters"] < model["parameters"]
        assert model["train_step"]["median"] > 0
    assert fused["ratios"]["train_step_paired"] > 0
    config = tiny_config(family)
    width = config.intermediate_size
    if method == "svd":  # LoRA on the two factors of each low-rank projection
        assert {"lowrank_a", "lowrank_b"} <= set(fused["lora"]["targets"])
        return
    widths = [5] + [width] * (config.num_hidden_layers - 1)
    if family == "bert":
        projections = lambda ws: bert_projections(config.hidden_size, ws)  # noqa: E731
    else:
        kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
        projections = lambda ws: llama_projections(config.hidden_size, kv, ws)  # noqa: E731
    assert original["trainable_parameters"] == hand_lora(RANK, projections([width] * config.num_hidden_layers))
    assert fused["trainable_parameters"] == hand_lora(RANK, projections(widths))


@pytest.mark.slow
def test_memory_probe_trains_the_same_adapters():
    """The CPU memory probe (a subprocess per model) wraps the model as the timed run does: run_bench
    refuses a probe whose trainable count differs, so a finished run with figures is the check."""
    report = run_bench(preset_sources(SHAPE, layers="1", dims=[K], label="tiny"),
                       BenchSettings(**QUICK, memory=True, inference=False, lora=True, lora_rank=RANK))
    for model in report.models:
        assert model.peak_memory_bytes > 0 and model.peak_rss_bytes > model.peak_memory_bytes
        assert model.trainable_parameters < model.parameters
    assert report.models[1].ratios["peak_memory"] > 0


@pytest.mark.parametrize("args, fragment", [
    (["--lora", "--lora-rank", "0"], "--lora-rank must be an integer > 0"),
    (["--lora", "--lora-rank", "-2"], "--lora-rank"),
    (["--lora-rank", "0"], "--lora-rank"),  # a bad value is refused with or without --lora
    (["--lora", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
])
def test_bad_lora_values_give_one_line_errors(args, fragment):
    result = runner.invoke(app, ["bench", "--shape", "tiny", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr


def test_settings_refuse_a_bad_rank_in_the_library():
    from mlpfuse.errors import InputError

    with pytest.raises(InputError, match="--lora-rank"):
        BenchSettings(lora=True, lora_rank=1.5).validate()
    with pytest.raises(InputError, match="--lora-targets"):
        BenchSettings(lora=True, lora_targets=()).validate()
