"""ntk-check: exact cases, the sign kernel against plain autograd, the command and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from mlpfuse import FuseSettings, fuse_checkpoint, fuse_model
from mlpfuse.analysis.ntk import ScalarOutput, chosen_site, ntk_check_model, probe
from mlpfuse.cli import app

from .conftest import build_tiny, slow_kernels, tiny_config

DISTINCT, REPEAT = 5, 3
REPO = Path(__file__).resolve().parents[1]
SST2_DEV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"  # ../shared/data relative to the repository root
needs_sst2 = pytest.mark.skipif(not SST2_DEV.is_file(), reason=f"real data {SST2_DEV} not present")


def tokens(batch=6, length=7, vocab=50, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    mask[2, -1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert(intermediate: int, repeated: bool = False) -> transformers.BertModel:
    """tests/conftest.py's tiny BERT (base model: ntk-check's random head) at MLP width ``intermediate``."""
    config = tiny_config("bert", intermediate_size=intermediate)
    torch.manual_seed(0)
    model = transformers.BertModel(config).double().eval()
    if repeated:  # layer 0: DISTINCT neurons, each REPEAT times
        layer = model.encoder.layer[0]
        with torch.no_grad():
            for module, dim in ((layer.intermediate.dense, 0), (layer.output.dense, 1)):
                distinct = module.weight.narrow(dim, 0, DISTINCT).clone() * 4
                module.weight.copy_(distinct.repeat_interleave(REPEAT, dim))
            bias = layer.intermediate.dense.bias
            bias.copy_(bias[:DISTINCT].clone().repeat_interleave(REPEAT))
    return model


def by_label(report) -> dict:
    return {summary.label: summary.mean for summary in report.methods}


def test_duplicated_neurons_fusion_keeps_the_adam_ntk_clustering_does_not():
    model = bert(DISTINCT * REPEAT, repeated=True)
    report = ntk_check_model(model, tokens(), layer=0, dim=DISTINCT, methods=["fusion", "cluster"], seeds=1,
                             backend="torch")
    fusion, cluster = by_label(report)["fusion"], by_label(report)["cluster"]
    assert fusion["ntk_error_rel"] < 1e-9 and fusion["output_error_rel"] < 1e-9 and fusion["hidden_error_rel"] < 1e-9
    assert cluster["ntk_error_rel"] > 1e-3 and cluster["output_error_rel"] > 1e-3
    assert fusion["sgd_ntk_error_rel"] > 1e-3  # P enters the SGD kernel squared: not preserved


def test_full_width_gives_zero_errors_for_fusion_and_cluster():
    report = ntk_check_model(bert(12), tokens(), layer=1, dim=12, methods=["fusion", "cluster"], seeds=2,
                             backend="torch")
    assert report.original_width == 12 and report.samples == 6
    for label, mean in by_label(report).items():
        for metric, value in mean.items():
            assert value < 1e-10, (label, metric, value)


def test_sign_kernel_matches_plain_autograd_on_low_rank_modules():
    """svd's two-factor modules; every family's fused modules: tests/test_registry.py."""
    model, _ = build_tiny("bert")
    model = model.double()
    fuse_model(model, FuseSettings(layers=[0], dim=8, method="svd", backend="torch"))
    inputs = tokens(batch=5, vocab=99)
    site = chosen_site(model, 0)
    scalar = ScalarOutput(model, seed=3)
    fast = probe(model, site, [{k: v[:3] for k, v in inputs.items()}, {k: v[3:] for k, v in inputs.items()}], scalar)
    for p in model.parameters():
        p.requires_grad_(True)
    adam, sgd = slow_kernels(model, site, inputs, scalar)
    assert fast.adam.abs().max() > 0
    assert torch.allclose(fast.adam, adam, rtol=1e-8, atol=1e-12 * adam.abs().max())
    assert torch.allclose(fast.sgd, sgd, rtol=1e-8, atol=1e-12 * sgd.abs().max())
    assert not torch.allclose(fast.adam, fast.adam.T)  # the Adam kernel is not symmetric


def test_model_with_its_own_head_uses_it():
    config = tiny_config("bert", num_hidden_layers=1, intermediate_size=12, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    inputs = tokens()
    report = ntk_check_model(model, inputs, layer=0, dim=6, methods=["prune"], seeds=1)
    assert "own head" in report.scalar and report.methods[0].mean["ntk_error"] > 0
    # by hand: f = softmax(own logits)[class 0] per sample; Adam kernel K[i, j] = g_i . sign(g_j) over the MLP's parameters
    mlp = model.bert.encoder.layer[0]
    params = [*mlp.intermediate.dense.parameters(), *mlp.output.dense.parameters()]
    rows = []
    for i in range(inputs["input_ids"].shape[0]):
        f = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits.softmax(-1)[0, 0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)]))
    g = torch.stack(rows)
    expected = g @ g.sign().T
    for seed in (0, 7):  # the own head does not depend on the random-head seed
        kernel = probe(model, chosen_site(model, 0), [inputs], ScalarOutput(model, seed=seed)).adam
        assert torch.allclose(kernel, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()))


def run_cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@needs_sst2
def test_command_on_minilm_with_json_plot_and_a_fused_checkpoint(tmp_path):
    fused = tmp_path / "svd"
    fuse_checkpoint("minilm", fused, FuseSettings(layers="2", dim=384, method="svd"))
    out = tmp_path / "report.json"
    code, text = run_cli("ntk-check", "minilm", "--data", str(SST2_DEV), "--samples", "6", "--max-length", "16",
                         "--layer", "2", "--dim", "384", "--methods", "svd,sketch", "--seeds", "2",
                         "--compare", str(fused), "--json", str(out), "--plot", str(tmp_path / "errors.png"))
    assert code == 0, text
    report = json.loads(out.read_text())
    labels = [m["label"] for m in report["methods"]]
    assert labels == ["svd", "sketch", "svd"] and report["samples"] == 6 and report["layer"] == 2
    in_memory, checkpoint = report["methods"][0], report["methods"][2]
    assert in_memory["std"]["ntk_error"] == 0  # deterministic method
    for metric in ("output_error", "ntk_error", "hidden_error"):  # the written checkpoint = the in-memory svd
        assert checkpoint["mean"][metric] == pytest.approx(in_memory["mean"][metric], rel=1e-3)
    assert report["methods"][1]["std"]["ntk_error"] > 0
    assert (tmp_path / "errors.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent.tsv"], "not found"),
    (["--data", "SST2", "--text-column", "text"], "no column 'text'"),
    (["--data", "SST2", "--layer", "6"], "out of range"),
    (["--data", "SST2", "--methods", "magic"], "unknown method"),
    (["--data", "SST2", "--dim", "5000"], "--dim must be between"),
])
def test_bad_input_is_one_line(args, message):
    if "SST2" in args:
        if not SST2_DEV.is_file():
            pytest.skip(f"real data {SST2_DEV} not present")
        args = [str(SST2_DEV) if a == "SST2" else a for a in args]
    code, text = run_cli("ntk-check", "minilm", "--samples", "2", "--dim", "384", *args)
    if "--dim" in args:
        code, text = run_cli("ntk-check", "minilm", "--samples", "2", *args)
    assert code == 2, text
    assert message in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
