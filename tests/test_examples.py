"""The files in examples/ run as written, on tiny local models (so the examples never rot)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.cli.common import load_recipe
from mlpfuse.cli.fuse_cmd import RECIPE_FIELDS, RECIPE_TYPES

from .conftest import WORDS, build_tiny, save_tokenizer, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml"))
CHECK = EXAMPLES / "ci" / "check_report.py"
WORKFLOW = EXAMPLES / "ci" / "fuse-and-check.yml"


def _tiny_roberta_12():
    """RoBERTa-base's depth (12 layers) and a width above 768, at toy size, for the 4-11 -> 768 recipe."""
    torch.manual_seed(0)
    config = tiny_config("roberta", num_hidden_layers=12, intermediate_size=800)
    return transformers.AutoModelForMaskedLM.from_config(config).eval(), "masked-lm"


# recipe file -> a tiny local model of the family it is written for
LOCAL_MODEL = {
    "roberta-base-4-11.yaml": _tiny_roberta_12,
    "llama-calibration.yaml": lambda: build_tiny("llama"),
    "mixtral-experts.yaml": lambda: build_tiny("mixtral"),
}


def test_every_recipe_has_a_local_model_and_only_known_fields():
    assert {p.name for p in RECIPES} == set(LOCAL_MODEL)
    for recipe in RECIPES:
        load_recipe(str(recipe), RECIPE_FIELDS, RECIPE_TYPES)  # the loader `fuse --config` uses: names and types
        # a field a comment suggests (`#   name: value`) must exist too
        suggested = set(re.findall(r"^#\s+([a-z_]+):\s", recipe.read_text(), flags=re.MULTILINE))
        assert suggested <= RECIPE_FIELDS, (recipe.name, suggested - RECIPE_FIELDS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_fuses_and_exports_a_local_model(recipe, tmp_path):
    model, task = LOCAL_MODEL[recipe.name]()
    model.save_pretrained(tmp_path / "src")
    recipe_data = yaml.safe_load(recipe.read_text())
    flags = []
    if recipe_data.get("calibration"):  # the recipe's text, as a few rows of the tiny tokenizer's words
        save_tokenizer(tmp_path / "src")
        rows = [" ".join(WORDS[i:i + 12]) for i in range(0, 48, 4)]
        (tmp_path / "cal.tsv").write_text("sentence\n" + "\n".join(rows) + "\n")
        flags = ["--calibration", str(tmp_path / "cal.tsv")]
    result = CliRunner().invoke(app, ["fuse", str(tmp_path / "src"), "--config", str(recipe), "-o", str(tmp_path / "fused"),
                                      "--json", str(tmp_path / "report.json"), *flags])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert (report["calibration"] is not None) == bool(flags)
    if "dim" in recipe_data:
        assert {layer["width"] for layer in report["layers"]} == {recipe_data["dim"]}
    result = CliRunner().invoke(app, ["export", str(tmp_path / "fused"), "-o", str(tmp_path / "plain"), "--pad"])
    assert result.exit_code == 0, result.output
    auto = {"masked-lm": transformers.AutoModelForMaskedLM, "causal-lm": transformers.AutoModelForCausalLM}[task]
    plain = auto.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32).eval()
    fused = mlpfuse.load(tmp_path / "fused", task=task, dtype=torch.float32).eval()
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - fused(input_ids=ids).logits).abs().max().item()
    # bfloat16 recipes: P folded into bf16 weights rounds differently from P applied at run time
    tolerance = 1e-5 if recipe_data.get("dtype", "auto") == "auto" else 0.05
    assert diff < tolerance


def _check(report: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(report), *flags], check=False, capture_output=True, text=True)


def test_check_report_passes_fails_and_refuses(tmp_path):
    model, _ = build_tiny("bert")
    model.save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["fuse", str(tmp_path / "src"), "--dim", "12", "-o", str(tmp_path / "fused"),
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    saved = (report["parameters"]["before"] - report["parameters"]["after"]) / report["parameters"]["before"]
    worst = max(layer["inertia"] for layer in report["layers"])
    ok = _check(tmp_path / "r.json", "--min-saved", str(saved - 0.01), "--max-inertia", str(worst * 1.01))
    assert ok.returncode == 0 and ok.stdout.count("PASS") == 2, ok.stdout + ok.stderr
    too_greedy = _check(tmp_path / "r.json", "--min-saved", str(saved + 0.01))
    assert too_greedy.returncode == 1 and "FAIL parameters saved" in too_greedy.stdout
    too_strict = _check(tmp_path / "r.json", "--max-inertia", str(worst * 0.99))
    assert too_strict.returncode == 1 and "FAIL largest inertia" in too_strict.stdout
    no_ppl = _check(tmp_path / "r.json", "--max-perplexity", "10")
    assert no_ppl.returncode == 2 and "no perplexity" in no_ppl.stderr
    (tmp_path / "ppl.json").write_text(json.dumps({"metrics": {"perplexity": 12.5}}))
    assert _check(tmp_path / "ppl.json", "--max-perplexity", "13").returncode == 0
    assert _check(tmp_path / "ppl.json", "--max-perplexity", "12").returncode == 1
    assert _check(tmp_path / "missing.json", "--min-saved", "0.1").returncode == 2


def _shim(directory: Path) -> dict:
    """PATH with ``mlpfuse`` and ``python`` meaning this interpreter and this checkout."""
    directory.mkdir()
    for name, target in (("mlpfuse", f'"{sys.executable}" -m mlpfuse'), ("python", f'"{sys.executable}"')):
        path = directory / name
        path.write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
        path.chmod(0o755)
    root = str(EXAMPLES.parent)
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}


@pytest.mark.slow
def test_ci_workflow_steps_run_on_a_local_model(tmp_path):
    """The workflow's run steps, in order, as bash runs them on GitHub (install steps skipped)."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["fuse"]
    steps = job["steps"]
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and "fused/" in uploads[0]["with"]["path"] and "exported/" in uploads[0]["with"]["path"]
    model, _ = _tiny_roberta_12()
    model.save_pretrained(tmp_path / "src")
    work = tmp_path / "job"
    work.mkdir()
    (work / "examples").symlink_to(EXAMPLES)
    # the job's thresholds are for RoBERTa-base (22.6% saved); the toy model saves about 2.5%
    env = {**_shim(tmp_path / "bin"), **{k: str(v) for k, v in job["env"].items()}, "MODEL": str(tmp_path / "src"),
           "MIN_SAVED": "0.01"}
    ran = []
    for step in steps:
        if "run" not in step or step.get("name") == "Install":
            continue
        if step.get("if") == "env.EVAL_TEXT != ''" and not env["EVAL_TEXT"]:
            continue
        result = subprocess.run(["bash", "-e", "-c", step["run"]], check=False, cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (step["name"], result.stdout[-2000:], result.stderr[-2000:])
        ran.append(step["name"])
    assert len(ran) == 4
    assert (work / "fused" / "config.json").is_file() and (work / "exported" / "config.json").is_file()
    assert json.loads((work / "inspect-report.json").read_text())["kind"] == "fused"
    # a threshold that fails makes the check step (and so the job) fail
    check = next(s for s in steps if s.get("name") == "Check thresholds")
    strict = {**env, "MIN_SAVED": "0.99"}
    result = subprocess.run(["bash", "-e", "-c", check["run"]], check=False, cwd=work, env=strict, capture_output=True, text=True)
    assert result.returncode == 1 and "FAIL" in result.stdout


@pytest.mark.slow
def test_api_script_runs_fuse_tune_finetune_export(tmp_path):
    """The Python API example on the bundled MiniLM and a few SST-2 rows (the real data)."""
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
    if not (data / "train.tsv").is_file():
        pytest.skip("SST-2 data not present")
    for name, rows in (("train.tsv", 40), ("dev.tsv", 20)):
        lines = (data / name).read_text(encoding="utf-8").splitlines()[: rows + 1]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = [sys.executable, str(EXAMPLES / "fuse_tune_finetune_export.py"), "--train", str(tmp_path / "train.tsv"),
               "--eval", str(tmp_path / "dev.tsv"), "--out", str(tmp_path / "run"), "--limit", "16", "--steps", "1"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=_shim(tmp_path / "bin"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain transformers load: BertForSequenceClassification" in result.stdout, shlex.join(command)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "run" / "exported")).eval()
    assert json.loads((tmp_path / "run" / "exported" / "config.json").read_text())["model_type"] == "bert"
    assert plain.config.intermediate_size == 384
