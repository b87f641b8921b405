"""``mlpfuse export``: fused checkpoint -> plain base-architecture checkpoint, equal logits (docs/deploy.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.checkpoints.tensors import CheckpointReader
from mlpfuse.cli import app
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.deploy.export import export_checkpoint
from mlpfuse.errors import InputError

from .conftest import TINY, build_tiny, model_inputs, outputs_of, tree_digest

AUTO = mlpfuse.TASKS  # task -> transformers Auto class name


# BLOOM's MLP is always 4 x hidden: no config field can hold a fused width, so export refuses it.
FIXED_WIDTH = {"bloom"}
FAMILIES = sorted(set(TINY) - FIXED_WIDTH)
# The quick run (-m "not slow") exports one of each layout: encoder, Conv1D, gated, stacked experts.
QUICK_FAMILIES = {"bert", "gpt2", "llama", "mixtral"}


def _build(name: str):
    return build_tiny(name)


def _inputs(name: str, model) -> dict:
    if name in TINY:
        return model_inputs(name)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family (built on first use): source, fused and exported directories, task, probe inputs."""
    made = {}

    def make(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            model, task = _build(name)
            model.save_pretrained(root / "src")
            fuse_checkpoint(str(root / "src"), root / "fused", FuseSettings(ratio=0.5, backend="torch", seed=0))
            report = export_checkpoint(str(root / "fused"), root / "plain")
            made[name] = {"root": root, "task": task, "report": report, "inputs": _inputs(name, model)}
        return made[name]

    return make


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in QUICK_FAMILIES else pytest.mark.slow)
                                  for name in FAMILIES])
def test_export_is_the_plain_architecture_with_the_fused_logits(name, exported):
    item = exported(name)
    root, task, inputs = item["root"], item["task"], item["inputs"]
    config = json.loads((root / "plain" / "config.json").read_text())
    base_type = json.loads((root / "src" / "config.json").read_text())["model_type"]
    assert config["model_type"] == base_type and "auto_map" not in config and "mlpfuse" not in config
    assert not list((root / "plain").glob("*.py")), "an export must not need remote code"
    assert not any("fusion_scale" in k or "lowrank" in k for k in CheckpointReader(root / "plain").keys())
    fused = mlpfuse.load(root / "fused", task=task).eval()
    plain, info = getattr(transformers, AUTO[task]).from_pretrained(str(root / "plain"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(plain).__name__ == type(fused).__name__
    assert (outputs_of(plain.eval(), inputs) - outputs_of(fused, inputs)).abs().max() < 1e-5
    # the fused widths are what the plain config says (smaller than the source's)
    source = json.loads((root / "src" / "config.json").read_text())
    assert any(config.get(k) != source.get(k) for k in item["report"].widths)


@pytest.mark.slow
def test_exports_load_with_plain_transformers_in_a_fresh_process(exported, tmp_path):
    """Every family in one fresh process that imports only transformers (no trust_remote_code)."""
    jobs = []
    for name in FAMILIES:
        item = exported(name)
        fused = mlpfuse.load(item["root"] / "fused", task=item["task"]).eval()
        torch.save({"inputs": item["inputs"], "logits": outputs_of(fused, item["inputs"])}, tmp_path / f"{name}.pt")
        jobs.append((name, str(item["root"] / "plain"), AUTO[item["task"]], str(tmp_path / f"{name}.pt")))
    code = (
        "import json, sys, torch, transformers\n"
        "assert 'mlpfuse' not in sys.modules\n"
        "for name, path, auto, ref in json.loads(sys.argv[1]):\n"
        "    data = torch.load(ref)\n"
        "    model = getattr(transformers, auto).from_pretrained(path).eval()\n"
        "    with torch.no_grad():\n"
        "        diff = (model(**data['inputs']).logits - data['logits']).abs().max().item()\n"
        "    print(name, diff)\n"
        "    assert diff < 1e-5, (name, diff)\n"
        "assert 'mlpfuse' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], check=False, cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == len(FAMILIES)


@pytest.fixture
def gpt2_mixed(tmp_path):
    """A tiny GPT-2 fused to different widths per layer (20 and 30 of 128)."""
    model, _ = build_tiny("gpt2")
    model.save_pretrained(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "fused",
                    FuseSettings(dim=20, per_layer={1: {"dim": 30}}, backend="torch"))
    return tmp_path / "fused"


def test_mixed_widths_are_refused_without_pad_and_exact_with_it(gpt2_mixed, tmp_path):
    before = tree_digest(gpt2_mixed)
    result = CliRunner().invoke(app, ["export", str(gpt2_mixed), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--pad" in result.output and "20, 30" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["export", str(gpt2_mixed), "-o", str(tmp_path / "out"), "--pad",
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    hidden, added = 32, 10  # layer 0 padded from 20 to 30 neurons: c_fc weight + bias, c_proj weight
    assert report["widths"] == {"n_inner": 30}
    assert report["padding"]["n_inner"]["parameters"] == added * (2 * hidden + 1)
    assert report["parameters"]["exported"] - report["parameters"]["fused"] == added * (2 * hidden + 1)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    fused = mlpfuse.load(gpt2_mixed, task="causal-lm").eval()
    inputs = model_inputs("gpt2")
    assert (outputs_of(plain, inputs) - outputs_of(fused, inputs)).abs().max() < 1e-5
    assert tree_digest(gpt2_mixed) == before


def test_low_rank_factors_are_multiplied_out(tmp_path):
    model, _ = build_tiny("llama")
    model.save_pretrained(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "svd", FuseSettings(method="svd", dim=8, backend="torch"))
    report = export_checkpoint(str(tmp_path / "svd"), tmp_path / "plain")
    assert report.max_abs_diff < 1e-5
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    fused = mlpfuse.load(tmp_path / "svd", task="causal-lm").eval()
    inputs = model_inputs("llama")
    assert (outputs_of(plain, inputs) - outputs_of(fused, inputs)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["tie", "drop"])
def test_merge_layers_outputs_export_tied_modules_as_copies_and_dropped_ones_as_zero_neurons(tmp_path, mode):
    from .conftest import WORDS, save_tokenizer

    model, _ = build_tiny("llama")
    model.save_pretrained(tmp_path / "src")
    save_tokenizer(tmp_path / "src")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{' '.join(WORDS[i:i + 6])}\t1\n" for i in range(20)))
    flags = ["--calibration", str(tmp_path / "train.tsv")] if mode == "tie" else ["--drop"]
    result = CliRunner().invoke(app, ["merge-layers", str(tmp_path / "src"), "--layers", "0-1", "-o", str(tmp_path / "merged"),
                                      *flags])
    assert result.exit_code == 0, result.output
    merged = mlpfuse.load(tmp_path / "merged", task="causal-lm").eval()
    if mode == "tie":
        assert merged.model.layers[0].mlp.up_proj is merged.model.layers[1].mlp.up_proj
    else:  # a dropped sublayer has width 0 beside full-width ones: only --pad can express it
        with pytest.raises(InputError, match="--pad"):
            export_checkpoint(str(tmp_path / "merged"), tmp_path / "plain")
    export_checkpoint(str(tmp_path / "merged"), tmp_path / "plain", pad=mode == "drop")
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    inputs = model_inputs("llama")
    assert (outputs_of(plain, inputs) - outputs_of(merged, inputs)).abs().max() < 1e-5


def test_adapter_is_merged_first(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = build_tiny("llama")
    model.save_pretrained(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "fused", FuseSettings(dim=16, backend="torch"))
    lora = peft.get_peft_model(mlpfuse.load(tmp_path / "fused", task="causal-lm"),
                               peft.LoraConfig(r=4, target_modules=["up_proj", "down_proj", "gate_proj"]))
    inputs = model_inputs("llama")
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        lora(**inputs).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    expected = outputs_of(lora, inputs)
    lora.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "fused"), "-o", str(tmp_path / "plain"),
                                      "--adapter", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    fused_alone = outputs_of(mlpfuse.load(tmp_path / "fused", task="causal-lm").eval(), inputs)
    assert (expected - fused_alone).abs().max() > 1e-2  # the adapter matters
    assert (outputs_of(plain, inputs) - expected).abs().max() < 1e-5


def test_bad_inputs_are_one_line_errors(tmp_path, gpt2_mixed):
    model, _ = build_tiny("bert")
    model.save_pretrained(tmp_path / "plain-bert")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "plain-bert"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not an mlpfuse checkpoint" in result.output
    result = runner.invoke(app, ["export", str(gpt2_mixed), "-o", str(gpt2_mixed / "inside"), "--pad"])
    assert result.exit_code == 2 and not (gpt2_mixed / "inside").exists()
    (tmp_path / "not-an-adapter").mkdir()
    result = runner.invoke(app, ["export", str(gpt2_mixed), "-o", str(tmp_path / "y"), "--pad", "--adapter",
                                 str(tmp_path / "not-an-adapter")])
    assert result.exit_code == 2 and "adapter" in result.output
    with pytest.raises(InputError):
        export_checkpoint(str(tmp_path / "missing"), tmp_path / "z")


def test_experts_of_differing_widths_need_pad(tmp_path):
    model, _ = _build("mixtral")
    model.save_pretrained(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "fused", FuseSettings(dim=8, experts="0,1", backend="torch"))
    with pytest.raises(InputError, match="--pad"):
        export_checkpoint(str(tmp_path / "fused"), tmp_path / "plain")
    report = export_checkpoint(str(tmp_path / "fused"), tmp_path / "plain", pad=True)
    assert report.padded and report.max_abs_diff < 1e-5
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    fused = mlpfuse.load(tmp_path / "fused", task="causal-lm").eval()
    inputs = _inputs("mixtral", model)
    assert (outputs_of(plain, inputs) - outputs_of(fused, inputs)).abs().max() < 1e-5


def test_inspect_says_what_deployment_needs(gpt2_mixed, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(gpt2_mixed), "--json", "-"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["kind"] == "fused" and facts["remote_code"] is True and facts["model_type"] == "gpt2"
    assert [(layer["before"], layer["after"]) for layer in facts["layers"]] == [(128, 20), (128, 30)]
    flops = facts["flops"]
    hidden = 32  # GPT-2 MLP: 2 products of hidden x width per token, 2 FLOPs per multiply-add
    assert flops["before"]["mlp_flops_per_token"] == 4 * hidden * (128 + 128)
    assert flops["after"]["mlp_flops_per_token"] == 4 * hidden * (20 + 30)
    assert flops["before"]["parameters"] - flops["after"]["parameters"] == (
        facts["parameters"]["before"] - facts["parameters"]["after"])
    assert runner.invoke(app, ["export", str(gpt2_mixed), "-o", str(tmp_path / "plain"), "--pad"]).exit_code == 0
    result = runner.invoke(app, ["inspect", str(tmp_path / "plain"), "--json", "-"])
    facts = json.loads(result.stdout)
    assert facts["kind"] == "exported" and facts["remote_code"] is False
    assert facts["width_fields"] == {"n_inner": 30} and facts["export"]["padded"] is True
    text = runner.invoke(app, ["inspect", str(tmp_path / "plain")]).output
    assert "exported by mlpfuse" in text and "remote code: not needed" in text


def test_overwrite_replaces_only_an_earlier_mlpfuse_output(gpt2_mixed, tmp_path):
    runner = CliRunner()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", str(gpt2_mixed), "-o", str(stranger), "--pad", "--overwrite"])
    assert result.exit_code == 2 and (stranger / "notes.txt").read_text() == "keep me"
    assert runner.invoke(app, ["export", str(gpt2_mixed), "-o", str(tmp_path / "plain"), "--pad"]).exit_code == 0
    again = runner.invoke(app, ["export", str(gpt2_mixed), "-o", str(tmp_path / "plain"), "--pad", "--overwrite"])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("name", sorted(FIXED_WIDTH))
def test_a_family_whose_config_cannot_hold_the_width_is_refused(name, tmp_path):
    model, _ = build_tiny(name)
    model.save_pretrained(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "fused", FuseSettings(ratio=0.5, backend="torch", seed=0))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "fused"), "-o", str(tmp_path / "plain")])
    assert result.exit_code == 2 and "config cannot hold these widths" in result.output, result.output
    assert not (tmp_path / "plain").exists()
