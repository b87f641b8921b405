"""Bad input is a one-line error (exit 2; 3 for the environment), never a traceback or a silently wrong model.

Every case runs through the CLI and checks: the exit code, exactly one line on stderr (``error: ...``)
saying what is wrong, no traceback, and no output directory (nor a staging leftover) written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mlpfuse.arch import find_prefix, lookup, resolve_sites
from mlpfuse.checkpoints.source import bundled_model_path
from mlpfuse.checkpoints.tensors import CheckpointReader, parse_size, read_config
from mlpfuse.checkpoints.validate import check_checkpoint
from mlpfuse.cli import app
from mlpfuse.errors import EnvironmentProblem, InputError
from mlpfuse.runtime import dtype_name, resolve_device

from .conftest import DENSE_FAMILIES, build_tiny, save_tokenizer, tiny_config, tree_digest
from .conftest import make_checkpoints, write_texts

runner = CliRunner()
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
MLP_UP = "bert.encoder.layer.1.intermediate.dense.weight"  # tiny BERT: [37, 32]
QUERY = "bert.encoder.layer.0.attention.self.query.weight"  # [32, 32]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, fragment: str, output: Path | None = None) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output
    if output is not None:
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}.mlpfuse-*"))


# --- checkpoints that do not fit their config ---------------------------------------------------

def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _shard(directory: Path) -> Path:
    """Re-save the checkpoint in several shards; returns the index file."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(directory))
    shutil.rmtree(directory)
    model.save_pretrained(directory, max_shard_size="20KB")
    return directory / "model.safetensors.index.json"


def _set(key, value):
    def edit(config):
        config[key] = value
        return config
    return edit


CHECKPOINT_CASES = {
    "integer MLP tensor": (lambda d: _edit_weights(d, lambda t: t.update({MLP_UP: (t[MLP_UP] * 100).to(torch.int32)})),
                           "not floating point"),
    "config intermediate_size disagrees": (lambda d: _edit_config(d, _set("intermediate_size", 40)),
                                           "intermediate_size=40"),
    "MLP tensor of the wrong shape": (lambda d: _edit_weights(d, lambda t: t.update({MLP_UP: torch.zeros(36, 32)})),
                                      "has shape [36, 32] but config.json implies [37, 32]"),
    "MLP tensor transposed": (lambda d: _edit_weights(d, lambda t: t.update({MLP_UP: t[MLP_UP].T.contiguous()})),
                              "transposed"),
    "MLP tensor missing": (lambda d: _edit_weights(d, lambda t: t.pop(MLP_UP)), MLP_UP),
    "attention tensor of the wrong shape": (lambda d: _edit_weights(d, lambda t: t.update({QUERY: torch.zeros(32, 16)})),
                                            QUERY),
    "attention tensor missing": (lambda d: _edit_weights(d, lambda t: t.pop(QUERY)), QUERY),
    "config has more layers than the tensors": (lambda d: _edit_config(d, _set("num_hidden_layers", 3)),
                                                "num_hidden_layers=3"),
    "config has fewer layers than the tensors": (lambda d: _edit_config(d, _set("num_hidden_layers", 1)),
                                                 "num_hidden_layers=1"),
    "config.json holds a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "not an object"),
    "shard index is invalid JSON": (lambda d: _shard(d).write_text("{not json"), "shard index"),
    "shard index has no weight_map": (lambda d: _shard(d).write_text('{"metadata": {}}'), "no weight_map"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_checkpoint_that_does_not_fit_its_config_is_refused(case, tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("bert")[0]
    damage, fragment = CHECKPOINT_CASES[case]
    damage(directory)
    before = tree_digest(directory)
    output = tmp_path / "out"
    assert_one_line_error(run("fuse", directory, "--dim", "8", "-o", output), 2, fragment, output)
    assert tree_digest(directory) == before


@pytest.mark.parametrize("case", ["MLP tensor of the wrong shape", "attention tensor missing",
                                  "config intermediate_size disagrees"])
def test_merge_layers_checks_the_checkpoint_too(case, tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("bert")[0]
    transformers.AutoTokenizer.from_pretrained(str(bundled_model_path())).save_pretrained(directory)
    damage, fragment = CHECKPOINT_CASES[case]
    damage(directory)
    output = tmp_path / "out"
    result = run("merge-layers", directory, "--layers", "0-1", "--no-permute", "-o", output)
    assert_one_line_error(result, 2, fragment, output)


def _check(directory: Path) -> int:
    config = read_config(directory)
    spec = lookup(config["model_type"])
    sites = resolve_sites(spec, config)
    reader = CheckpointReader(directory)
    return check_checkpoint(config, reader, spec, sites, find_prefix(set(reader.keys()), sites[0]))


@pytest.mark.parametrize("name", sorted(DENSE_FAMILIES))
def test_every_tiny_architecture_passes_the_check_and_a_wrong_mlp_width_is_refused(name, tmp_path):
    model, _ = build_tiny(name)
    model.save_pretrained(tmp_path / name)
    config = read_config(tmp_path / name)
    sites = resolve_sites(lookup(config["model_type"]), config)
    assert _check(tmp_path / name) >= 2 * len(sites)  # at least every MLP's two weights compared
    path = tmp_path / name / "model.safetensors"
    tensors = load_file(str(path))
    down = next(k for k in sorted(tensors) if k.endswith(f"{sites[-1].module_path('down')}.weight"))
    tensors[down] = torch.zeros(tensors[down].shape[0] + 1, tensors[down].shape[1])  # a wrong MLP shape
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match="config.json implies"):
        _check(tmp_path / name)


def test_the_bundled_model_passes_the_check():
    assert _check(bundled_model_path()) > 6 * 4  # 6 layers, every MLP and attention tensor compared


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "switch_transformers"])
def test_moe_checkpoints_pass_the_check_and_a_bad_expert_is_refused(family, tmp_path):
    from .test_moe import _model

    _model(family).save_pretrained(tmp_path / family)
    assert _check(tmp_path / family) > 0
    path = tmp_path / family / "model.safetensors"
    tensors = load_file(str(path))
    expert = next(k for k in sorted(tensors) if ".experts." in k and k.endswith(".weight"))
    original = tensors[expert]
    tensors[expert] = original.to(torch.int8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match="not floating point"):
        _check(tmp_path / family)
    tensors[expert] = torch.zeros(original.shape[0] + 1, original.shape[1])  # one neuron too many
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match="config.json implies"):
        _check(tmp_path / family)


# --- option and recipe values of fuse ----------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-1"], "--seed must be an integer from 0"),
    (["--seed", str(2**32)], "--seed must be an integer from 0"),
    (["--max-shard-size", "-5GB"], "bad size"),
    (["--max-shard-size", "0MB"], "bad size"),
    (["--layers", "0-1,"], "empty item"),
    (["--dtype", "int8"], "unknown --dtype"),
])
def test_bad_fuse_options(args, fragment, tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("bert")[0]
    output = tmp_path / "out"
    assert_one_line_error(run("fuse", directory, "--dim", "8", "-o", output, *args), 2, fragment, output)


@pytest.mark.parametrize("recipe, fragment", [
    ('dim: "8"', "field dim must be an integer"),
    ('dim: 8\nseed: "0"', "field seed must be an integer"),
    ('ratio: "x"', "field ratio must be a number"),
    ("dim: 8\nper_layer: [1, 2]", "field per_layer must be a mapping"),
    ("dim: true", "field dim must be an integer"),
    ("dim: 8\nper_layer: {x: {dim: 4}}", "per_layer key 'x'"),
    ("dim: 8\nper_layer: {1: 4}", "per_layer value for layer 1"),
    ("dim: 8\nmax_shard_size: -3", "bad size"),
])
def test_recipe_values_of_the_wrong_type(recipe, fragment, tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("bert")[0]
    output = tmp_path / "out"
    (tmp_path / "recipe.yaml").write_text(f"model: {directory}\noutput: {output}\n{recipe}\n")
    assert_one_line_error(run("fuse", "--config", tmp_path / "recipe.yaml"), 2, fragment, output)


def test_recipe_model_as_a_list(tmp_path):
    (tmp_path / "recipe.yaml").write_text(f"model: [a, b]\noutput: {tmp_path / 'out'}\ndim: 8\n")
    assert_one_line_error(run("fuse", "--config", tmp_path / "recipe.yaml"), 2, "field model must be text",
                          tmp_path / "out")


def test_one_dtype_vocabulary(tiny_checkpoint, tmp_path):
    assert [dtype_name(x) for x in ("fp32", "FLOAT32", "bf16", "bfloat16", "fp16", "float16")] == \
        ["float32", "float32", "bfloat16", "bfloat16", "float16", "float16"]
    directory = tiny_checkpoint("bert")[0]
    result = run("fuse", directory, "--dim", "8", "--dtype", "bf16", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlpfuse"]["dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for name, t in tensors.items() if t.is_floating_point() and not name.endswith("fusion_scale")} \
        == {torch.bfloat16}
    assert {t.dtype for name, t in tensors.items() if name.endswith("fusion_scale")} == {torch.float32}  # P stays exact


def test_sizes_must_be_positive():
    assert parse_size("2GiB") == 2**31
    for bad in ("-5GB", "0MB", -1, 0, True, "nanGB", "infMB"):
        with pytest.raises(InputError):
            parse_size(bad)


# --- tune and finetune -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT and its fused copy (with tokenizers), a teacher of another width, and a TSV."""
    directory = tmp_path_factory.mktemp("bad-input")
    original, fused = make_checkpoints(directory)
    wide = directory / "wide"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(original))
    transformers.BertModel(tiny_config("bert", vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64)
                           ).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    bare = directory / "bare"  # weights and config, no tokenizer files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(original / name, bare / name)
    return {"original": original, "fused": fused, "wide": wide, "bare": bare, "dir": directory,
            "text": write_texts(directory / "text.tsv", rows=16, labels=(0, 1)),
            "eval2": write_texts(directory / "eval2.tsv", rows=4, labels=(1, 2), seed=3)}


def _tune_args(files, output, *extra):
    return ["tune", files["fused"], "--teacher", files["original"], "--data", files["text"], "-o", output,
            "--batch-size", "8", "--max-steps", "1", *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--lr", "nan"], "--lr must be a number > 0"),
    (["--lr", "inf"], "--lr must be a number > 0"),
    (["--lr", "0"], "--lr must be a number > 0"),
    (["--epochs", "-1"], "--epochs must be an integer > 0"),
    (["--seed", "-3"], "--seed must be an integer from 0"),
    (["--resume"], "no saved state"),
])
def test_bad_tune_options(extra, fragment, trained, tmp_path):
    output = tmp_path / "tuned"
    assert_one_line_error(run(*_tune_args(trained, output, *extra)), 2, fragment, output)


def test_tune_teacher_of_another_width(trained, tmp_path):
    output = tmp_path / "tuned"
    args = _tune_args(trained, output)
    args[args.index("--teacher") + 1] = trained["wide"]
    assert_one_line_error(run(*args), 2, "hidden_size 48 vs 32", output)


def test_tune_teacher_of_another_architecture(trained, tmp_path):
    llama, _ = make_checkpoints(tmp_path, kind="llama")
    output = tmp_path / "tuned"
    args = _tune_args(trained, output)
    args[args.index("--teacher") + 1] = llama
    assert_one_line_error(run(*args), 2, "is a llama model", output)


@pytest.mark.parametrize("extra, fragment", [
    (["--lr", "nan"], "--lr must be a number > 0"),
    (["--epochs", "-1"], "--epochs must be a number > 0"),
    (["--task", "causal-lm"], "needs a decoder language model"),
])
def test_bad_finetune_options(extra, fragment, trained, tmp_path):
    output = tmp_path / "tuned"
    result = run("finetune", trained["fused"], "--train", trained["text"], "-o", output, "--batch-size", "8",
                 "--max-length", "16", *extra)
    assert_one_line_error(result, 2, fragment, output)


def test_finetune_eval_label_the_training_data_never_had(trained, tmp_path):
    output = tmp_path / "tuned"
    result = run("finetune", trained["fused"], "--train", trained["text"], "--eval", trained["eval2"], "-o", output,
                 "--batch-size", "8", "--max-length", "16", "--max-steps", "1")
    assert_one_line_error(result, 2, "unknown label value(s) '2'", output)


def test_a_checkpoint_without_tokenizer_files_says_what_is_missing(trained, tmp_path):
    output = tmp_path / "tuned"
    result = run("finetune", trained["bare"], "--train", trained["text"], "-o", output, "--max-steps", "1")
    assert_one_line_error(result, 2, "no tokenizer files", output)
    assert "tokenizer.json" in result.stderr and "vocab.txt" in result.stderr


# --- one device resolution: CUDA without a GPU is the environment (exit 3) everywhere ----------

@NO_GPU
def test_cuda_without_a_gpu_exits_3_in_every_command(trained, tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("bert")[0]
    commands = {
        "fuse": ["fuse", directory, "--dim", "8", "-o", tmp_path / "fused", "--device", "cuda"],
        "tune": _tune_args(trained, tmp_path / "tuned", "--device", "cuda"),
        "ntk-check": ["ntk-check", trained["original"], "--data", trained["text"], "--samples", "4", "--dim", "8",
                      "--device", "cuda"],
        "bench": ["bench", "--shape", "tiny", "--device", "cuda:1"],
    }
    for name, args in commands.items():
        result = run(*args)
        assert_one_line_error(result, 3, "no CUDA GPU is available here")
    assert not (tmp_path / "fused").exists() and not (tmp_path / "tuned").exists()


def test_ntk_check_head_seed_out_of_range(trained):
    result = run("ntk-check", trained["original"], "--data", trained["text"], "--samples", "4", "--dim", "8",
                 "--head-seed", str(2**64))
    assert_one_line_error(result, 2, "--head-seed must be an integer from 0")


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(InputError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(EnvironmentProblem):
            resolve_device("cuda:0")


# --- width 1: the smallest width is a valid width ----------------------------------------------

@pytest.mark.parametrize("family, width_args", [("bert", ["--dim", "1"]), ("bert", ["--ratio", "0.001"]),
                                                ("llama", ["--dim", "1"])])
def test_fusing_to_width_one_writes_a_checkpoint_that_reloads(family, width_args, tiny_checkpoint, tmp_path):
    import mlpfuse

    directory = tiny_checkpoint(family)[0]
    output = tmp_path / "out"
    result = run("fuse", directory, *width_args, "-o", output)  # --ratio 0.001 rounds to 0: never below 1
    assert result.exit_code == 0, result.output
    section = json.loads((output / "config.json").read_text())["mlpfuse"]
    assert set(section["widths"].values()) == {1}
    model = mlpfuse.load(output)  # (fuse checked that it loads clean before the rename)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state).all()


# --- quantised checkpoints: refused up front, for that reason, by every command ------------------

def _quantise(directory: Path, tensors_of, config: dict | None) -> None:
    """Replace every linear weight of the layer blocks by ``tensors_of(name, weight)``; set quantization_config."""
    def edit(tensors):
        for name in [k for k in tensors if ".layers." in k and k.endswith("_proj.weight")]:
            tensors.update(tensors_of(name, tensors.pop(name)))
    _edit_weights(directory, edit)
    if config is not None:
        _edit_config(directory, _set("quantization_config", config))


def _gptq(name, w):
    base, (out, inp) = name[: -len(".weight")], w.shape
    return {f"{base}.qweight": torch.zeros(inp // 8, out, dtype=torch.int32),
            f"{base}.qzeros": torch.zeros(1, out // 4, dtype=torch.int32),
            f"{base}.scales": torch.ones(1, out, dtype=torch.float16), f"{base}.g_idx": torch.zeros(inp, dtype=torch.int32)}


def _nf4(name, w):
    return {name: torch.zeros(w.numel() // 2, 1, dtype=torch.uint8), f"{name}.absmax": torch.ones(w.numel() // 64),
            f"{name}.quant_map": torch.linspace(-1, 1, 16),
            f"{name}.quant_state.bitsandbytes__nf4": torch.zeros(40, dtype=torch.uint8)}


def _int8(name, w):
    return {name: w.to(torch.int8), f"{name[: -len('.weight')]}.SCB": torch.ones(w.shape[0])}


def _fp8(name, w):
    return {name: w.to(torch.float8_e4m3fn), f"{name}_scale": torch.ones(w.shape[0], 1)}


def _w4a16(name, w):
    base = name[: -len(".weight")]
    return {f"{base}.weight_packed": torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int32),
            f"{base}.weight_scale": torch.ones(w.shape[0], 1, dtype=torch.float16),
            f"{base}.weight_shape": torch.tensor(list(w.shape))}


QUANTISED = {  # case: (tensors, quantization_config, what the message names)
    "gptq": (_gptq, {"quant_method": "gptq", "bits": 4, "group_size": -1}, "quantised (gptq"),
    "gptq tensors, no config": (_gptq, None, "quantised (gptq: it holds tensor model.layers.0"),
    "bitsandbytes nf4": (_nf4, {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                         "quantised (bitsandbytes"),
    "bitsandbytes nf4 tensors, no config": (_nf4, None, "quantised (bitsandbytes"),
    "bitsandbytes int8, old config": (_int8, {"load_in_8bit": True}, "quantised (bitsandbytes"),
    "bitsandbytes int8 tensors, no config": (_int8, None, "quantised (bitsandbytes"),
    "compressed-tensors fp8": (_fp8, {"quant_method": "compressed-tensors", "format": "float-quantized"},
                               "quantised (compressed-tensors"),
    "compressed-tensors w4a16": (_w4a16, {"quant_method": "compressed-tensors", "format": "pack-quantized"},
                                 "quantised (compressed-tensors"),
    "compressed-tensors w4a16 tensors, no config": (_w4a16, None, "quantised (compressed-tensors"),
    "bare F8_E4M3 tensors": (lambda name, w: {name: w.to(torch.float8_e4m3fn)}, None, "is F8_E4M3"),
    "float weights, stale gptq config": (lambda name, w: {name: w}, {"quant_method": "gptq", "bits": 4},
                                         "quantised (gptq, says config.json's quantization_config)"),
}


@pytest.fixture
def quantised(tiny_checkpoint):
    """Factory: a tiny LLaMA checkpoint quantised as QUANTISED[case] says; returns its directory and fragment."""
    def make(case: str):
        directory = tiny_checkpoint("llama")[0]
        tensors_of, config, fragment = QUANTISED[case]
        _quantise(directory, tensors_of, config)
        return directory, fragment
    return make


@pytest.mark.parametrize("case", sorted(QUANTISED))
def test_a_quantised_checkpoint_is_refused_for_being_quantised(case, quantised, tmp_path):
    directory, fragment = quantised(case)
    before = tree_digest(directory)
    output = tmp_path / "out"
    result = run("fuse", directory, "--ratio", "0.5", "-o", output)
    assert_one_line_error(result, 2, fragment, output)
    assert "the original or a dequantised copy" in result.stderr and "fusing" not in result.stderr  # before any work
    assert tree_digest(directory) == before


def test_every_command_that_reads_a_checkpoint_refuses_a_quantised_one_and_inspect_reports_it(quantised, trained,
                                                                                             tmp_path):
    directory, _ = quantised("float weights, stale gptq config")
    save_tokenizer(directory)
    text = trained["text"]
    commands = {
        "merge-layers": ["merge-layers", directory, "--layers", "0-1", "--no-permute", "-o", tmp_path / "out"],
        "tune": ["tune", trained["fused"], "--teacher", directory, "--data", text, "-o", tmp_path / "out"],
        "finetune": ["finetune", directory, "--train", text, "-o", tmp_path / "out", "--max-steps", "1"],
        "export": ["export", directory, "-o", tmp_path / "out"],
        "eval": ["eval", directory, "--data", text],
        "ntk-check": ["ntk-check", directory, "--data", text, "--samples", "4", "--dim", "8"],
    }
    for name, args in commands.items():
        assert_one_line_error(run(*args), 2, "this checkpoint is quantised (gptq", tmp_path / "out")
    result = run("inspect", directory, "--no-flops", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "quantised (gptq" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["quantised"].startswith("gptq")
