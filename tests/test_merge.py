"""``merge-layers``: alignment maths, tied checkpoints, baselines, fuse interplay, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.compress.merge_window import align, merge_aligned, permute_mlp
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.remote.modeling_mlpfuse import ZeroProjection

from .conftest import WORDS, random_mlp, save_tokenizer, tiny_config, tree_digest

GELU = torch.nn.functional.gelu


def pre_acts(mlp: MLPWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    up = torch.nn.functional.linear(x, mlp.w_in, mlp.b_in)
    return up, None if mlp.w_gate is None else torch.nn.functional.linear(x, mlp.w_gate)


@pytest.mark.parametrize("gated", [False, True])
def test_permuting_neurons_keeps_the_output_and_alignment_recovers_a_planted_permutation(gated):
    mlp = random_mlp(24, 8, gated)
    x = torch.randn(200, mlp.hidden, dtype=torch.float64)
    planted = torch.randperm(mlp.width, generator=torch.Generator().manual_seed(3))
    shuffled = permute_mlp(mlp, planted)
    assert torch.allclose(shuffled.forward(x, GELU), mlp.forward(x, GELU))
    assert not torch.equal(shuffled.w_in, mlp.w_in)
    perm, before, after = align(*pre_acts(mlp, x)[:1], *pre_acts(shuffled, x)[:1],
                                pre_acts(mlp, x)[1], pre_acts(shuffled, x)[1])
    assert torch.equal(planted[perm], torch.arange(mlp.width))  # exactly the inverse of the plant
    assert after == pytest.approx(1.0) and before < 0.5
    assert torch.equal(permute_mlp(shuffled, perm).w_in, mlp.w_in)


@pytest.mark.parametrize("gated", [False, True])
def test_merging_permuted_copies_gives_back_the_mlp(gated):
    mlp = random_mlp(24, 8, gated, seed=1)
    x = torch.randn(300, mlp.hidden, dtype=torch.float64)
    copies = [mlp] + [permute_mlp(mlp, torch.randperm(mlp.width, generator=torch.Generator().manual_seed(s))) for s in (5, 6)]
    anchor_up, anchor_gate = pre_acts(copies[0], x)
    perms = [None] + [align(anchor_up, pre_acts(c, x)[0], anchor_gate, pre_acts(c, x)[1])[0] for c in copies[1:]]
    merged = merge_aligned(copies, perms)
    assert torch.allclose(merged.w_in, mlp.w_in) and torch.allclose(merged.w_out, mlp.w_out)
    assert torch.allclose(merged.forward(x, GELU), mlp.forward(x, GELU))
    plain = merge_aligned(copies, [None] * 3)  # the plain average of permuted copies is not the MLP
    assert not torch.allclose(plain.forward(x, GELU), mlp.forward(x, GELU), atol=1e-3)


# ------------------------------------------------------------------ checkpoints

# tests/conftest.py's tiny models; bert and gpt2 with three layers (windows 0-1 and 1-2)
LAYERS = {"bert": dict(num_hidden_layers=3), "gpt2": dict(n_layer=3), "llama": {}, "t5-gated": {}}
BERT = tiny_config("bert", **LAYERS["bert"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def make(kind: str) -> Path:
        if kind not in made:
            directory = tmp_path_factory.mktemp(kind)
            torch.manual_seed(0)
            model = transformers.AutoModel.from_config(tiny_config(kind, **LAYERS[kind]))
            model.save_pretrained(directory)
            save_tokenizer(directory)
            made[kind] = directory
        return made[kind]

    return make


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("texts")
    g = torch.Generator().manual_seed(0)
    rows = ["sentence\tlabel"] + [" ".join(WORDS[i] for i in torch.randint(0, 60, (9,), generator=g)) + "\t1" for _ in range(24)]
    (directory / "train.tsv").write_text("\n".join(rows) + "\n")
    (directory / "nocol.tsv").write_text("text\tlabel\nw1 w2\t0\n")
    return directory


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _mlp_keys(path: Path, layer_fragment: str) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return [k for k in f.keys() if layer_fragment in k]


@pytest.mark.slow
def test_merged_bert_checkpoint_ties_one_module_stores_it_once_and_round_trips(checkpoints, texts, tmp_path):
    source = checkpoints("bert")
    before = tree_digest(source)
    out = tmp_path / "merged"
    result = run("merge-layers", source, "--layers", "1-2", "--calibration", texts / "train.tsv", "-o", out,
                 "--json", tmp_path / "r.json", "--plot", tmp_path / "sim.png")
    assert result.exit_code == 0, result.output
    assert tree_digest(source) == before and (tmp_path / "sim.png").stat().st_size > 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["window"] == [1, 2] and len(report["similarity"]) == 3
    one_mlp = 2 * BERT.hidden_size * BERT.intermediate_size + BERT.intermediate_size + BERT.hidden_size
    assert report["parameters"]["before"] - report["parameters"]["after"] == one_mlp
    assert report["alignment"][1]["correlation_after"] >= report["alignment"][1]["correlation_before"]
    # stored once: layer 2's MLP tensors are absent, the file is one MLP (float32) smaller
    assert _mlp_keys(out, "layer.2.intermediate") == [] and _mlp_keys(out, "layer.2.output.dense") == []
    shrink = (source / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert abs(shrink - 4 * one_mlp) < 1024  # header bytes differ a little
    model = mlpfuse.load(out)
    layers = model.encoder.layer
    assert layers[1].intermediate.dense is layers[2].intermediate.dense
    assert layers[1].output.dense is layers[2].output.dense and layers[1].output.LayerNorm is not layers[2].output.LayerNorm
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    ids = torch.randint(5, 65, (2, 7))
    expected = model(input_ids=ids).last_hidden_state
    # (a merged checkpoint loads tied through trust_remote_code without mlpfuse: tests/test_registry.py)
    # a save/load round trip keeps the tie and still stores the shared tensors once
    model.save_pretrained(tmp_path / "resaved")
    assert _mlp_keys(tmp_path / "resaved", "layer.2.intermediate") == []
    again = mlpfuse.load(tmp_path / "resaved")
    assert again.encoder.layer[1].intermediate.dense is again.encoder.layer[2].intermediate.dense
    assert torch.allclose(again(input_ids=ids).last_hidden_state, expected)


def test_drop_baseline_removes_the_sublayer(checkpoints, tmp_path):
    source = checkpoints("bert")
    out = tmp_path / "dropped"
    assert run("merge-layers", source, "--layers", "1-2", "--drop", "-o", out).exit_code == 0
    model = mlpfuse.load(out)
    assert isinstance(model.encoder.layer[2].output.dense, ZeroProjection)
    original = transformers.AutoModel.from_pretrained(source).eval()
    with torch.no_grad():  # dropping = the sublayer adds nothing to the residual stream
        original.encoder.layer[2].output.dense.weight.zero_()
        original.encoder.layer[2].output.dense.bias.zero_()
    ids = torch.randint(5, 65, (2, 6))
    assert torch.allclose(model(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state, atol=1e-6)


def test_window_search_on_a_decoder_uses_perplexity_and_keeps_the_best(checkpoints, texts, tmp_path):
    source = checkpoints("gpt2")
    result = run("merge-layers", source, "--count", "2", "--calibration", texts / "train.tsv", "--eval", texts / "train.tsv",
                 "--no-permute", "-o", tmp_path / "out", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["objective"] == "perplexity" and [c["layers"] for c in report["candidates"]] == [[0, 1], [1, 2]]
    best = min(report["candidates"], key=lambda c: c["loss"])
    assert report["window"] == best["layers"] and report["original_loss"] > 1
    model = mlpfuse.load(tmp_path / "out")
    a, b = report["window"]
    assert model.h[a].mlp.c_fc is model.h[b].mlp.c_fc


@pytest.mark.parametrize("kind, window, path", [("llama", "0-1", "layers.{}.mlp.gate_proj"),
                                                ("t5-gated", "0-1", "encoder.block.{}.layer.1.DenseReluDense.wi_0")])
def test_gated_families_merge_and_load_tied(checkpoints, texts, tmp_path, kind, window, path):
    out = tmp_path / "out"
    result = run("merge-layers", checkpoints(kind), "--layers", window, "--calibration", texts / "train.tsv", "-o", out)
    assert result.exit_code == 0, result.output
    model = mlpfuse.load(out)
    assert model.get_submodule(path.format(0)) is model.get_submodule(path.format(1))


def test_merged_checkpoint_can_be_fused_and_fused_can_be_merged(checkpoints, texts, tmp_path):
    source = checkpoints("bert")
    assert run("merge-layers", source, "--layers", "0-1", "--no-permute", "-o", tmp_path / "m").exit_code == 0
    result = run("fuse", tmp_path / "m", "--dim", "8", "-o", tmp_path / "mf")
    assert result.exit_code == 0, result.output
    section = json.loads((tmp_path / "mf" / "config.json").read_text())["mlpfuse"]
    assert section["layers"] == [0, 2] and section["tied"]
    model = mlpfuse.load(tmp_path / "mf")
    shared = model.encoder.layer[0].output.dense
    assert shared is model.encoder.layer[1].output.dense and shared.weight.shape == (BERT.hidden_size, 8) and hasattr(shared, "fusion_scale")
    assert run("fuse", source, "--dim", "8", "-o", tmp_path / "f").exit_code == 0
    result = run("merge-layers", tmp_path / "f", "--layers", "1-2", "--calibration", texts / "train.tsv", "-o", tmp_path / "fm")
    assert result.exit_code == 0, result.output
    merged = mlpfuse.load(tmp_path / "fm")
    assert merged.encoder.layer[1].intermediate.dense is merged.encoder.layer[2].intermediate.dense
    assert merged.encoder.layer[1].intermediate.dense.weight.shape == (8, BERT.hidden_size)


@pytest.mark.parametrize("args, fragment", [
    (["--layers", "1"], "at least 2 adjacent"),
    (["--layers", "0,2"], "not adjacent"),
    (["--count", "4", "--eval", "{train}"], "larger than the number of layers"),
    (["--layers", "0-1", "--count", "2"], "not both"),
    (["--layers", "0-1", "--calibration", "{nocol}"], "no column 'sentence'"),
    (["--layers", "0-1"], "needs calibration text"),
])
def test_bad_input_is_one_line_and_writes_nothing(checkpoints, texts, tmp_path, args, fragment):
    args = [a.format(train=texts / "train.tsv", nocol=texts / "nocol.tsv") for a in args]
    result = run("merge-layers", checkpoints("bert"), *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [["--no-permute"], ["--drop"]])
def test_a_checkpoint_without_tokenizer_merges_when_no_text_is_read(mode, tiny_checkpoint, texts, tmp_path):
    source = tiny_checkpoint("bert")[0]  # config and weights only, as fuse accepts
    assert not list(source.glob("tokenizer*")) and not list(source.glob("vocab*"))
    result = run("merge-layers", source, "--layers", "0-1", *mode, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert mlpfuse.load(tmp_path / "out").encoder.layer[0].output.dense is not None
    result = run("merge-layers", source, "--layers", "0-1", *mode, "--eval", texts / "train.tsv", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "no tokenizer files" in result.stderr and not (tmp_path / "x").exists()
