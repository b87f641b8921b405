"""``fuse --calibration``: the layer-by-layer calibration pass and the data-aware methods behind it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from mlpfuse.arch import find_prefix, lookup, resolve_sites
from mlpfuse.arch.io import read_mlp, tensor_names
from mlpfuse.checkpoints.modeling import load
from mlpfuse.checkpoints.tensors import CheckpointReader, read_config
from mlpfuse.cli import app
from mlpfuse.compress.calibration import StreamingModel, read_calibration, relative_error, run_calibrated
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.compress.fuse_layers import compress_dense
from mlpfuse.compress.plan import plan_layers
from mlpfuse.methods import Calibration, MethodOptions, get_method
from mlpfuse.runtime import load_tokenizer

from .conftest import TINY, WORDS, build_tiny
from .test_bad_input import assert_one_line_error

runner = CliRunner()
# Gemma 3 with one sliding-window layer (window 4) and one global layer: the masks must differ per layer.
OVERRIDES = {"gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4),
             "gemma2": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)}


def write_calibration(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """A TSV of ``rows`` short texts made of the tiny tokenizer's words."""
    generator = torch.Generator().manual_seed(seed)
    lines = ["sentence\tlabel"]
    for row in range(rows):
        words = torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=generator)),), generator=generator)
        lines.append(" ".join(WORDS[i] for i in words.tolist()) + f"\t{row % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def save_word_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (conftest's WordPiece one maps every word to [UNK]
    under transformers 5, which would make every calibration token the same)."""
    import tokenizers

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]").save_pretrained(directory)


def checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    model, _ = build_tiny(name, seed, **OVERRIDES.get(name, {}))
    if name in ("llama", "qwen3", "gemma2", "gemma3_text"):  # random tiny weights are nearly linear: make them bite
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.mul_(8)
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    return directory


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _stream(directory: Path, calibration: Path, k: int, method: str = "fusion", batch_size: int = 8):
    """Run the streaming pass with every layer fused to width ``k``; returns (inputs seen per layer,
    compressed MLP per layer, result, data, sites)."""
    config = read_config(directory)
    spec = lookup(config["model_type"])
    reader = CheckpointReader(directory)
    keys = set(reader.keys())
    sites = resolve_sites(spec, config)
    prefix = find_prefix(keys, sites[0])
    widths = {s.index: TINY[config["model_type"]][2] for s in sites}
    plans = plan_layers(sites, widths, "all", k, None, allow_full_width=True)
    data = read_calibration(str(calibration), load_tokenizer(directory), limit=48, max_length=24,
                            text_column="sentence", packed=spec.causal_lm)
    seen, compressed, emitted = {}, {}, []

    def compress(plan, mlp, options):
        seen[plan.site.index] = torch.cat(list(options.calibration.inputs))
        names = tensor_names(plan.site, prefix, keys)
        layer = compress_dense(plan, mlp, method, options, prefix, set(names.values()), None)
        compressed[plan.site.index] = layer.compressed
        return layer.compressed, layer

    stream = StreamingModel(directory, reader, prefix, sites)
    result = run_calibrated(stream, data, plans, keys, MethodOptions(), 0.1, 1e-3, compress, emitted.append,
                            batch_size=batch_size)
    assert [layer.report.index for layer in emitted] == [plan.site.index for plan in plans]
    return seen, compressed, result, data, sites


@pytest.mark.parametrize("name, batch_size", [("llama", 1), ("llama", 4), ("gemma3_text", 3), ("gemma3_text", 100)])
def test_the_streaming_pass_sees_what_an_in_memory_model_with_the_earlier_layers_fused_sees(name, batch_size, tmp_path):
    """One mini-batch, several, and one sequence at a time: the same inputs as one in-memory forward."""
    directory = checkpoint(name, tmp_path / name)
    seen, compressed, result, data, sites = _stream(directory, write_calibration(tmp_path / "cal.tsv"), 22,
                                                    batch_size=batch_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    mask = data.attention_mask.bool()
    activation = torch.nn.functional.silu if name == "llama" else transformers.activations.ACT2FN["gelu_pytorch_tanh"]
    captured, plain = {}, {}
    for site in sites:  # capture each MLP's input (the unfused model's first)
        mlp = model.base_model.get_submodule(site.path)
        mlp.register_forward_pre_hook(lambda m, args, i=site.index: captured.__setitem__(i, args[0][mask]))
    with torch.no_grad():
        model.base_model(input_ids=data.input_ids, attention_mask=data.attention_mask)
        plain.update(captured)
        for site in sites:  # reference: each MLP's output replaced by its fused form's
            model.base_model.get_submodule(site.path).register_forward_hook(
                lambda m, args, out, i=site.index: compressed[i].forward(args[0], activation))
        model.base_model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    assert len(seen) == len(sites) == 2
    for index in seen:
        torch.testing.assert_close(seen[index], captured[index], rtol=1e-5, atol=1e-6)
    # the check has teeth: layer 1's inputs in the fused model differ from the unfused model's
    assert relative_error(plain[1], captured[1]) > 100 * relative_error(seen[1], captured[1])
    assert result.hidden_state_error > 0


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3_text", "qwen3", "gpt2", "bert"])
def test_fuse_with_calibration_at_full_width_is_exact_and_loads_clean(name, tmp_path):
    directory = checkpoint(name, tmp_path / name)
    width = TINY[name][2]
    settings = FuseSettings(dim=width, allow_full_width=True, calibration=str(write_calibration(tmp_path / "cal.tsv")),
                            max_length=24)
    report = fuse_checkpoint(str(directory), tmp_path / "out", settings)  # ends with verify_checkpoint
    task = TINY[name][1]
    original, fused = load(directory, task=task).eval(), load(tmp_path / "out", task=task).eval()
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert all(layer.relative_error < 1e-5 for layer in report.layers)
    assert report.calibration["hidden_state_error"] < 1e-5
    section = json.loads((tmp_path / "out" / "config.json").read_text())["mlpfuse"]
    assert section["calibration"]["sha256"] == report.calibration["sha256"] and section["calibration"]["tokens"] > 0


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_fuse_with_calibration_at_half_width_writes_a_checkpoint_that_loads(name, tmp_path):
    directory = checkpoint(name, tmp_path / name)
    result = cli("fuse", directory, "--ratio", "0.5", "--calibration", write_calibration(tmp_path / "cal.tsv"),
                 "--max-length", "24", "-o", tmp_path / "out", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    width = TINY[name][2]
    for layer in report["layers"]:
        assert layer["width"] == round(width * 0.5) and 0 < layer["relative_error"] < 1
        assert sum(int(size) * count for size, count in layer["cluster_sizes"].items()) == width  # JSON keys are text
        assert layer["largest_cluster"] == max(int(size) for size in layer["cluster_sizes"])
    recipe = (tmp_path / "out" / "mlpfuse_recipe.yaml").read_text()
    assert "calibration:" in recipe and "ridge:" in recipe


@pytest.mark.parametrize("grouping", ["select", "kmeans"])
def test_p_stays_the_cluster_sizes_with_calibration(grouping, tmp_path):
    directory = checkpoint("llama", tmp_path / "llama")
    result = cli("fuse", directory, "--dim", "10", "--calibration", write_calibration(tmp_path / "cal.tsv"),
                 "--grouping", grouping, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    scales = [t for name, t in tensors.items() if name.endswith("fusion_scale")]
    assert len(scales) == 2
    for scale in scales:
        assert scale.shape == (10,) and scale.min() >= 1 and torch.isfinite(scale).all()
        if grouping == "kmeans":  # cluster sizes; select: the members' coefficients summed (tests/test_calibrated.py)
            assert torch.equal(scale, scale.round()) and int(scale.sum()) == 44


def _layer_zero(tmp_path):
    """Tiny LLaMA's layer-0 MLP, its calibration inputs and a held-out set, from the in-memory model."""
    directory = checkpoint("llama", tmp_path / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = load_tokenizer(directory)
    inputs = []
    for seed in (0, 1):
        data = read_calibration(str(write_calibration(tmp_path / f"c{seed}.tsv", seed=seed)), tokenizer, limit=48,
                                max_length=24, text_column="sentence", packed=True)
        seen = []
        handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            model.model(input_ids=data.input_ids, attention_mask=data.attention_mask)
        handle.remove()
        inputs.append(seen[0][data.attention_mask.bool()])
    config = read_config(directory)
    site = resolve_sites(lookup("llama"), config)[0]
    mlp = read_mlp(site, tensor_names(site, "model.", set(CheckpointReader(directory).keys())), CheckpointReader(directory).get)
    return mlp, inputs[0], inputs[1]


@pytest.mark.parametrize("method", ["fusion", "prune", "svd"])
def test_the_data_aware_form_has_a_lower_calibration_error_than_the_data_free_one(method, tmp_path):
    mlp, x, held_out = _layer_zero(tmp_path)
    act = torch.nn.functional.silu
    calibrated = get_method(method)(mlp, 16, MethodOptions(calibration=Calibration(x, act, protect=2, ridge=1e-3)))
    free = get_method(method)(mlp, 16, MethodOptions())
    exact = mlp.forward(x, act)
    assert relative_error(calibrated.forward(x, act), exact) < relative_error(free.forward(x, act), exact)
    exact = mlp.forward(held_out, act)  # and on text it never saw
    assert relative_error(calibrated.forward(held_out, act), exact) < relative_error(free.forward(held_out, act), exact)
    assert calibrated.num_parameters() <= free.num_parameters()


@pytest.mark.parametrize("grouping", ["select", "kmeans"])
def test_data_aware_cluster_folds_sqrt_p_and_computes_the_unrefitted_fusion_function(grouping, tmp_path):
    mlp, x, _ = _layer_zero(tmp_path)
    act = torch.nn.functional.silu
    options = MethodOptions(calibration=Calibration(x, act, protect=2, grouping=grouping))
    clustered = get_method("cluster")(mlp, 16, options)
    assert clustered.scale is None
    from mlpfuse.methods.calibrated import calibrated_fusion, selected_fusion

    unrefit = selected_fusion if grouping == "select" else calibrated_fusion
    unrefitted = unrefit(mlp, 16, x, act, protect=2, refit=False)
    torch.testing.assert_close(clustered.forward(x, act), unrefitted.forward(x, act), rtol=1e-4, atol=1e-6)


def test_same_seed_same_bytes(tmp_path):
    directory = checkpoint("llama", tmp_path / "llama")
    calibration = write_calibration(tmp_path / "cal.tsv")
    for out in ("a", "b"):
        result = cli("fuse", directory, "--ratio", "0.5", "--calibration", calibration, "-o", tmp_path / out, "--seed", "3")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_the_report_warns_about_degenerate_k_means_and_exploding_errors(tmp_path):
    from mlpfuse.compress.fuse_report import LayerReport, layer_warnings

    def layer(sizes, error):
        return LayerReport(index=0, label="0", original_width=20, width=sum(sizes.values()), params_before=1,
                           params_after=1, inertia=None, kmeans_seconds=None, seconds=0.0, backend=None,
                           cluster_sizes=sizes, relative_error=error)

    assert layer_warnings([layer({1: 9, 11: 1}, 0.1)]) == []
    lines = layer_warnings([layer({1: 19, 1000: 1}, 0.9)])
    assert len(lines) == 2 and "degenerate" in lines[0] and "0.9" in lines[1]


# --- bad values: one line, exit 2, nothing written ----------------------------------------------

@pytest.mark.parametrize("extra, fragment", [
    (["--calibration", "MISSING.tsv"], "not found"),
    (["--calibration", "CAL", "--text-column", "nope"], "no column 'nope'"),
    (["--calibration", "CAL", "--calibration-limit", "0"], "--calibration-limit must be at least 1"),
    (["--calibration", "CAL", "--max-length", "0"], "--max-length must be an integer > 0"),
    (["--calibration", "CAL", "--protect", "-1"], "--protect must be"),
    (["--calibration", "CAL", "--protect", "2.5"], "--protect must be"),
    (["--calibration", "CAL", "--ridge", "-0.1"], "--ridge must be"),
    (["--calibration", "CAL", "--method", "sketch"], "no data-aware form"),
    (["--calibration", "CAL", "--grouping", "nope"], "--grouping must be one of select, kmeans"),
    (["--grouping", "kmeans"], "pass --calibration"),
    (["--calibration", "EMPTY"], "is empty"),
    (["--max-length", "64"], "pass --calibration"),
])
def test_bad_calibration_values(extra, fragment, tmp_path):
    directory = checkpoint("llama", tmp_path / "llama")
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\nw1 w2\t0\n\t1\n")
    files = {"CAL": str(write_calibration(tmp_path / "cal.tsv")), "EMPTY": str(empty),
             "MISSING.tsv": str(tmp_path / "missing.tsv")}
    output = tmp_path / "out"
    result = cli("fuse", directory, "--ratio", "0.5", "-o", output, *[files.get(a, a) for a in extra])
    assert_one_line_error(result, 2, fragment, output)


@pytest.mark.parametrize("name, fragment", [("mixtral", "Mixture-of-Experts"), ("t5", "encoder-decoder")])
def test_calibration_refuses_moe_layers_and_encoder_decoder_models(name, fragment, tmp_path):
    model, _ = build_tiny(name)
    model.save_pretrained(tmp_path / name)
    save_word_tokenizer(tmp_path / name)
    output = tmp_path / "out"
    result = cli("fuse", tmp_path / name, "--ratio", "0.5", "--calibration", write_calibration(tmp_path / "cal.tsv"),
                 "-o", output)
    assert_one_line_error(result, 2, fragment, output)


def test_calibration_refuses_torchrun(tmp_path, monkeypatch):
    directory = checkpoint("llama", tmp_path / "llama")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    output = tmp_path / "out"
    result = cli("fuse", directory, "--ratio", "0.5", "--calibration", write_calibration(tmp_path / "cal.tsv"), "-o", output)
    assert_one_line_error(result, 2, "without torchrun", output)


def test_the_in_memory_fuse_refuses_calibration_rather_than_ignoring_it():
    from mlpfuse.errors import InputError
    from mlpfuse.compress.fuse import fuse_model

    model, _ = build_tiny("llama")
    with pytest.raises(InputError, match="fuse_checkpoint"):
        fuse_model(model, FuseSettings(ratio=0.5, calibration="x.tsv"))
