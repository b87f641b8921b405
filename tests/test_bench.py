"""``mlpfuse bench``: every field on tiny models, counts against hand formulas, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mlpfuse import FuseSettings, fuse_checkpoint
from mlpfuse.analysis.bench import BenchSettings, checkpoint_sources, preset_sources, run_bench
from mlpfuse.cli import app

from .conftest import tiny_config, tiny_config_dict

SHAPE = tiny_config_dict("bert")  # tests/conftest.py's tiny BERT, as a --shape config
_BERT = tiny_config("bert")
H, L, I, V, POS = _BERT.hidden_size, _BERT.num_hidden_layers, _BERT.intermediate_size, _BERT.vocab_size, _BERT.max_position_embeddings
K, SEQ = 12, 8  # layer 1's fused width; the benchmarked sequence length
QUICK = dict(steps=3, warmup=1, batch_size=2, seq_len=SEQ, threads=1)
runner = CliRunner()


def hand_parameters(widths: list[int]) -> int:
    """BERT: embeddings (words, positions, token types, LayerNorm), per layer attention + LayerNorms + MLP of
    width w, pooler."""
    embeddings = V * H + POS * H + _BERT.type_vocab_size * H + 2 * H
    attention = 4 * (H * H + H) + 2 * H
    mlp = lambda w: H * w + w + w * H + H  # noqa: E731
    return embeddings + sum(attention + mlp(w) + 2 * H for w in widths) + H * H + H


def hand_flops_per_token(widths: list[int], s: int) -> tuple[float, float]:
    """Forward matmul FLOPs per token: 8h^2 + 4hw + 4sh per layer, the pooler 2h^2 once per sequence."""
    mlp = sum(4 * H * w for w in widths)
    return sum(8 * H * H + 4 * H * w + 4 * s * H for w in widths) + 2 * H * H / s, mlp


@pytest.fixture(scope="module")
def report():
    """Original and a model with layer 1 fused to K, with the CPU memory probes (subprocesses)."""
    return run_bench(preset_sources(SHAPE, layers="1", dims=[K], label="tiny"), BenchSettings(**QUICK, memory=True))


@pytest.mark.slow
def test_every_field_is_measured_and_ratios_refer_to_the_original(report):
    original, fused = report.models
    data = json.loads(json.dumps(report.to_dict()))
    assert data["device"] == "cpu" and data["environment"]["torch"] == torch.__version__
    for model in (original, fused):
        for timing in (model.train_step, model.inference):
            assert len(timing.samples) == QUICK["steps"] and all(t > 0 for t in timing.samples)
        assert model.peak_memory_bytes > 0 and model.peak_rss_bytes > model.peak_memory_bytes
        assert model.state_bytes > 0 and model.train_tokens_per_second > 0
    assert not original.fused and fused.fused and original.ratios == {}
    assert set(fused.ratios) >= {"train_step", "inference", "peak_memory", "parameters", "flops", "mlp_flops"}
    assert all(value is not None and value > 0 for value in fused.ratios.values())
    assert fused.ratios["train_step"] == pytest.approx(fused.train_step.median / original.train_step.median)
    per_round = sorted(f / o for f, o in zip(fused.inference.samples, original.inference.samples))
    assert fused.ratios["inference_paired"] == pytest.approx(per_round[len(per_round) // 2])


@pytest.mark.slow
def test_parameter_and_flop_counts_match_the_hand_computation(report):
    original, fused = report.models
    for model, widths in ((original, [I, I]), (fused, [I, K])):
        assert model.mlp_widths == widths
        assert model.parameters == hand_parameters(widths)
        assert model.mlp_parameters == sum(2 * H * w + w + H for w in widths)
        total, mlp = hand_flops_per_token(widths, SEQ)
        assert model.flops_per_token == pytest.approx(total)
        assert model.mlp_flops_per_token == pytest.approx(mlp)
    # AdamW state: weights + gradients + two moments of every trainable parameter (+ buffers)
    assert fused.state_bytes >= 4 * 4 * fused.parameters
    assert fused.ratios["flops"] == pytest.approx(hand_flops_per_token([I, K], SEQ)[0] / hand_flops_per_token([I, I], SEQ)[0])


def test_checkpoints_bench_including_a_fused_one(tiny_checkpoint, tmp_path):
    source_dir, _, _ = tiny_checkpoint("bert")
    fused_dir = tmp_path / "fused"
    fuse_checkpoint(str(source_dir), fused_dir, FuseSettings(layers="0", dim=5))
    result = run_bench(checkpoint_sources([str(source_dir), str(fused_dir)]),
                       BenchSettings(**QUICK, memory=False, dtype="bf16"))
    original, fused = result.models
    assert fused.fused and not original.fused
    assert fused.mlp_widths[0] == 5 and fused.mlp_widths[1] == original.mlp_widths[1]
    assert fused.parameters < original.parameters and fused.peak_memory_bytes is None


def test_cli_writes_json_and_plot(tmp_path):
    json_path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = runner.invoke(app, ["bench", "--shape", "tiny", "--dim", "32", "--dim", "16", "--steps", "2", "--warmup", "1",
                                 "--batch-size", "2", "--seq-len", "8", "--no-memory", "--threads", "1",
                                 "--json", str(json_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert [m["mlp_widths"] for m in data["models"]] == [[256, 256], [32, 32], [16, 16]]
    assert "FLOP bound" in result.stdout and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, fragment", [
    (["--shape", "tiny", "--steps", "0"], "--steps must be a positive integer"),
    (["--shape", "tiny", "--warmup", "-1"], "--warmup"),
    (["--shape", "tiny", "--autocast", "fp8"], "unknown --autocast 'fp8'"),
    (["--shape", "tiny", "--compile-mode", "fast"], "--compile-mode"),
    (["--shape", "nope"], "unknown --shape"),
    (["--shape", "tiny", "--seq-len", "500", "--no-memory"], "longer than"),
    (["only-one-model"], "at least one fused"),
    (["a", "b", "--dim", "3"], "--shape"),
])
def test_bad_arguments_give_one_line_errors(args, fragment):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error():
    result = runner.invoke(app, ["bench", "--shape", "tiny", "--device", "cuda"])
    assert result.exit_code == 3  # the environment, as in every command
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: --device cuda asked for, but no CUDA GPU is available here; use --device cpu"]
