"""The ``mlpfuse fuse`` command: bad input, one-line errors, exit codes, nothing lost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlpfuse.cli import app
from mlpfuse.methods import MethodDeclaration, register, unregister

from .conftest import tree_digest

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code, fragment):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def bert_dir(tiny_checkpoint):
    return tiny_checkpoint("bert")[0]


def test_fuse_writes_a_complete_checkpoint_and_json_report(bert_dir, tmp_path):
    before = tree_digest(bert_dir)
    result = run("fuse", bert_dir, "--layers", "1", "--dim", "8", "-o", tmp_path / "out", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert tree_digest(bert_dir) == before
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_mlpfuse.py", "configuration_mlpfuse.py",
            "README.md", "mlpfuse_recipe.yaml"} <= files
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"][0]["width"] == 8 and report["parameters"]["after"] < report["parameters"]["before"]
    section = json.loads((tmp_path / "out" / "config.json").read_text())["mlpfuse"]
    assert section["layers"] == [1] and section["widths"] == {"1": 8}
    # the source hash (computed in a background thread while fusing) is that of the source's weight files
    assert section["source_sha256"] == hashlib.sha256((Path(bert_dir) / "model.safetensors").read_bytes()).hexdigest()
    assert "| 1 | 37 | 8 |" in (tmp_path / "out" / "README.md").read_text()


def test_json_to_stdout_is_parseable(bert_dir, tmp_path):
    result = run("fuse", bert_dir, "--ratio", "0.5", "-o", tmp_path / "out", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [layer["width"] for layer in report["layers"]] == [18, 18]  # round(37 * 0.5)


@pytest.mark.parametrize("args, fragment", [
    (["--dim", "37"], "nothing to compress"),
    (["--dim", "38"], "between 1 and the intermediate size 37"),
    (["--dim", "0"], "between 1 and the intermediate size"),
    (["--dim", "-3"], "between 1 and the intermediate size"),
    (["--ratio", "1.5"], "--ratio must be in"),
    (["--dim", "8", "--ratio", "0.5"], "exactly one of --dim or --ratio"),
    ([], "exactly one of --dim or --ratio"),
    (["--dim", "8", "--layers", "2"], "out of range"),
    (["--dim", "8", "--layers", "1-x"], "bad --layers"),
    (["--dim", "8", "--method", "magic"], "unknown method"),
    (["--dim", "8", "--backend", "magic"], "backend"),
    (["--dim", "8", "--device", "cuda"], "CUDA"),
    (["--dim", "8", "--dtype", "int8"], "unknown --dtype"),
    (["--dim", "8", "--experts", "0"], "--experts applies to Mixture-of-Experts"),
])
def test_bad_values_give_one_line_errors_and_touch_nothing(bert_dir, tmp_path, args, fragment):
    before = tree_digest(bert_dir)
    result = run("fuse", bert_dir, "-o", tmp_path / "out", *args)
    code = 3 if "--device" in args else 2
    assert result.exit_code == code, result.output
    assert fragment.lower() in result.stderr.lower(), result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()
    assert tree_digest(bert_dir) == before
    assert not list(tmp_path.glob(".out.mlpfuse-tmp-*"))


def test_missing_path_and_non_checkpoint(tmp_path):
    one_line_error(run("fuse", tmp_path / "nope", "--dim", "8", "-o", tmp_path / "o"), 2, "no such checkpoint directory")
    (tmp_path / "empty").mkdir()
    one_line_error(run("fuse", tmp_path / "empty", "--dim", "8", "-o", tmp_path / "o"), 2, "no config.json")
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text('{"model_type": "bert"}')
    one_line_error(run("fuse", tmp_path / "weightless", "--dim", "8", "-o", tmp_path / "o"), 2, "holds no model weights")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
    result = run("fuse", tmp_path / "vit", "--dim", "8", "-o", tmp_path / "o")
    one_line_error(result, 2, "unsupported model type 'vit'")
    assert "bert" in result.stderr and "llama" in result.stderr


def test_existing_output_is_refused_then_replaced_with_overwrite(bert_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    one_line_error(run("fuse", bert_dir, "--dim", "8", "-o", out), 2, "already exists")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only an earlier mlpfuse output, never a directory of the user's
    one_line_error(run("fuse", bert_dir, "--dim", "8", "-o", out, "--overwrite"), 2, "not an earlier mlpfuse output")
    assert (out / "keep.txt").read_text() == "precious"
    earlier = tmp_path / "earlier"
    assert run("fuse", bert_dir, "--dim", "8", "-o", earlier).exit_code == 0
    (earlier / "stale.txt").write_text("from the first run")
    result = run("fuse", bert_dir, "--dim", "9", "-o", earlier, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (earlier / "stale.txt").exists() and (earlier / "model.safetensors").is_file()
    assert json.loads((earlier / "config.json").read_text())["mlpfuse"]["widths"]["0"] == 9
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp, old or lock left


def test_output_equal_to_input_is_refused(bert_dir):
    before = tree_digest(bert_dir)
    one_line_error(run("fuse", bert_dir, "--dim", "8", "-o", bert_dir, "--overwrite"), 2, "must not be the input")
    assert tree_digest(bert_dir) == before


def test_a_failure_midway_leaves_no_output(bert_dir, tmp_path):
    @register(MethodDeclaration("fails-on-second-layer", help="fusion, then a crash on the second layer"))
    def failing(mlp, k, options, calls=[]):  # noqa: B006 - counts calls across layers
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        from mlpfuse.methods.fusion import fusion
        return fusion(mlp, k, options)

    result = run("fuse", bert_dir, "--dim", "8", "--method", "fails-on-second-layer", "-o", tmp_path / "out")
    unregister("fails-on-second-layer")
    assert result.exit_code == 1 and "internal error" in result.stderr and "simulated crash" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "mlpfuse-tmp" in p.name]


def test_debug_shows_the_traceback(tmp_path):
    result = run("fuse", tmp_path / "nope", "--dim", "8", "-o", tmp_path / "o", "--debug")
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)


def test_offline_hub_id_is_an_environment_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("fuse", "some-org/some-model-that-is-not-cached", "--dim", "8", "-o", tmp_path / "o")
    one_line_error(result, 3, "could not be downloaded")


def test_recipe_with_per_layer_overrides_and_flags_winning(bert_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(bert_dir), "output": str(tmp_path / "out"), "layers": "0-1",
                                      "dim": 10, "seed": 4, "per_layer": {1: {"dim": 5}}}))
    result = run("fuse", "--config", recipe, "--seed", "7", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["width"] for layer in report["layers"]] == [10, 5]
    assert report["seed"] == 7
    echoed = yaml.safe_load((tmp_path / "out" / "mlpfuse_recipe.yaml").read_text())
    assert echoed["seed"] == 7 and echoed["per_layer"] == {1: {"dim": 5}}


def test_bad_recipe_fields_are_refused(bert_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dimm: 5\n")
    one_line_error(run("fuse", bert_dir, "-o", tmp_path / "o", "--config", recipe), 2, "unknown field")
    recipe.write_text("per_layer: {7: {dim: 3}}\ndim: 8\nlayers: '0'\n")
    one_line_error(run("fuse", bert_dir, "-o", tmp_path / "o", "--config", recipe), 2, "not being fused")


def test_inspect_and_architectures(bert_dir, tmp_path):
    assert run("fuse", bert_dir, "--dim", "8", "-o", tmp_path / "out").exit_code == 0
    result = run("inspect", tmp_path / "out", "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["mlpfuse"]["widths"] == {"0": 8, "1": 8}
    listing = run("architectures")
    assert listing.exit_code == 0 and "gpt2" in listing.stdout and "t5" in listing.stdout


def test_already_fused_input_is_refused(bert_dir, tmp_path):
    assert run("fuse", bert_dir, "--dim", "8", "-o", tmp_path / "out").exit_code == 0
    one_line_error(run("fuse", tmp_path / "out", "--dim", "4", "-o", tmp_path / "o2"), 2, "already an mlpfuse checkpoint")
    assert Path(tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("args, widths", [
    (["--ratio", "0.5", "--multiple-of", "8"], [16, 16]),  # 22 -> 16
    (["--dim", "5", "--multiple-of", "8"], [8, 8]),  # below the first multiple: the first multiple
    (["--ratio", "0.9", "--multiple-of", "64"], None),  # the first multiple is above the original 44: refused
])
def test_multiple_of_rounds_every_width(args, widths, tiny_checkpoint, tmp_path):
    source, _, _ = tiny_checkpoint("llama")
    result = CliRunner().invoke(app, ["fuse", str(source), "-o", str(tmp_path / "out"), "--layers", "all", *args,
                                      "--json", str(tmp_path / "r.json")])
    if widths is None:  # rounding up to the original width compresses nothing: refused like --dim 44
        assert result.exit_code == 2 and "nothing to compress" in result.stderr, result.output
        return
    assert result.exit_code == 0, result.output
    assert [layer["width"] for layer in json.loads((tmp_path / "r.json").read_text())["layers"]] == widths


def test_multiple_of_must_be_a_positive_integer(tiny_checkpoint, tmp_path):
    source, _, _ = tiny_checkpoint("llama")
    result = CliRunner().invoke(app, ["fuse", str(source), "-o", str(tmp_path / "out"), "--ratio", "0.5",
                                      "--multiple-of", "0"])
    assert result.exit_code == 2 and "--multiple-of must be an integer >= 1" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def _table_header(output: str) -> list[str]:
    header = next(line for line in output.splitlines() if "┃ layer" in line)
    return [cell.strip() for cell in header.strip("┃ ").split("┃")]


@pytest.mark.parametrize("method, columns", [
    ("fusion", ["layer", "width", "params", "inertia", "k-means s", "backend", "singletons", "largest", "cluster sizes"]),
    ("prune", ["layer", "width", "params"]),
    ("svd", ["layer", "width", "params"]),
])
def test_the_summary_table_has_the_columns_of_the_report_fields_the_method_declares(bert_dir, tmp_path, method, columns):
    result = run("fuse", bert_dir, "--layers", "1", "--dim", "8", "--method", method, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert _table_header(result.stdout) == columns


def test_a_method_that_declares_no_report_fields_gets_the_three_plain_columns(bert_dir, tmp_path):
    @register(MethodDeclaration("first-k-table", help="keep the first k neurons", writes=("dense", "gated"),
                                report_fields=("inertia",)))
    def first(mlp, k, options):
        return mlp.map_neurons(lambda t: t[:k].clone(), lambda w: w[:, :k].clone())

    try:
        result = run("fuse", bert_dir, "--layers", "1", "--dim", "8", "--method", "first-k-table", "-o", tmp_path / "out")
    finally:
        unregister("first-k-table")
    assert result.exit_code == 0, result.output
    assert _table_header(result.stdout) == ["layer", "width", "params"]  # declared inertia, but never filled
