"""`finetune --lora` (PEFT): merged output == unmerged adapter on its base, export to a plain class, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.compress.fuse import FuseSettings, fuse_model

from .conftest import tiny_config, tree_digest
from .test_finetune import write_keyword_texts
from .test_instruct import CHAT_TEMPLATE, CONVERSATION, byte_tokenizer, write_jsonl

peft = pytest.importorskip("peft")

FAST = ["--epochs", "2", "--batch-size", "8", "--max-length", "24", "--lr", "1e-2", "--seed", "3"]
CLASS_TASK = "sequence-classification"


def _checkpoint(directory, family: str, method: str = "fusion"):
    """A tiny fused decoder (``family`` llama or gpt2) with a byte-level tokenizer that has a chat template."""
    tokenizer = byte_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(0)
    extra = {"pad_token_id": tokenizer.pad_token_id}
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tokenizer), **extra))
    width = model.config.to_dict().get("intermediate_size") or 4 * model.config.n_embd
    fuse_model(model, FuseSettings(layers="all", dim=width // 3, seed=0, method=method))
    path = directory / f"{family}-{method}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    keywords = {"forty": "pos", "brief": "neg"}
    chat = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}] * 6
    pairs = [{"prompt": "how are you", "response": "fine, thanks"}, {"prompt": "the answer?", "response": "forty two"}]
    return {"dir": directory, "llama": _checkpoint(directory, "llama"), "gpt2": _checkpoint(directory, "gpt2"),
            "train": write_keyword_texts(directory / "train.tsv", rows=24, seed=1, targets=keywords),
            "eval": write_keyword_texts(directory / "eval.tsv", rows=8, seed=2, targets=keywords),
            "chat": write_jsonl(directory / "chat.jsonl", chat), "pairs": write_jsonl(directory / "pairs.jsonl", pairs * 3)}


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["finetune", *args, "--json", "-"])
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def _inputs(tokenizer_dir) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return dict(tokenizer(["how are you forty", "be brief"], padding=True, return_tensors="pt"))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _adapter_moved(adapter) -> None:
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b), "training must move every adapter (B starts at 0)"


def _check_merged_equals_unmerged(base, merged, adapter, task: str, tmp_path, plain_class: str, **load_kwargs):
    """The bar: merged == base + adapter (PEFT) on the same inputs; export gives a plain class with the same outputs."""
    inputs = _inputs(merged)
    from_merged = mlpfuse.load(merged, task=task)
    assert from_merged.config.mlpfuse["modules"]  # still a fused checkpoint
    unmerged = peft.PeftModel.from_pretrained(mlpfuse.load(base, task=task, **load_kwargs), str(adapter))
    expected = _logits(unmerged, inputs)
    with unmerged.disable_adapter():
        assert (_logits(unmerged, inputs) - expected).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(_logits(from_merged, inputs), expected, rtol=1e-4, atol=1e-5)
    plain = tmp_path / "plain"
    result = CliRunner().invoke(app, ["export", str(merged), "-o", str(plain)])
    assert result.exit_code == 0, result.output[-2000:]
    auto = transformers.AutoModelForSequenceClassification if task == CLASS_TASK else transformers.AutoModelForCausalLM
    exported = auto.from_pretrained(str(plain))
    assert type(exported).__name__ == plain_class and "mlpfuse" not in exported.config.to_dict()
    torch.testing.assert_close(_logits(exported, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, plain_class", [("llama", "LlamaForSequenceClassification"),
                                                 ("gpt2", "GPT2ForSequenceClassification")])
def test_classifier_merged_equals_unmerged_and_exports(data, tmp_path, family, plain_class):
    base = data[family]
    before = tree_digest(base)
    common = [str(base), "--lora", "--train", str(data["train"]), "--eval", str(data["eval"]), *FAST]
    merged_report = _run([*common, "-o", str(tmp_path / "merged")])
    adapter_report = _run([*common, "-o", str(tmp_path / "adapter"), "--no-merge"])
    assert tree_digest(base) == before
    for report, merged in ((merged_report, True), (adapter_report, False)):
        metrics = report["metrics"]
        assert metrics["merged"] is merged and report["lora"]["merged"] is merged
        assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] / 2
        assert report["lora"]["modules_to_save"] == ["score"]  # the new head trains
        assert set(report["lora"]["targets"]) >= ({"q_proj", "down_proj"} if family == "llama" else {"c_attn", "c_fc"})
    assert merged_report["metrics"]["accuracy"] == adapter_report["metrics"]["accuracy"]  # same seed, same run
    adapter = tmp_path / "adapter"
    assert not (adapter / "model.safetensors").exists() and (adapter / "tokenizer.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert adapter_report["base"] == str(base.resolve())
    _adapter_moved(adapter)
    _check_merged_equals_unmerged(base, tmp_path / "merged", adapter, CLASS_TASK, tmp_path, plain_class,
                                  num_labels=2)


@pytest.mark.parametrize("family, data_file", [("llama", "chat"), ("gpt2", "pairs")])
def test_instruction_lora_merged_equals_unmerged_and_exports(data, tmp_path, family, data_file):
    base = data[family]
    common = [str(base), "--lora", "--task", "causal-lm", "--train", str(data[data_file]), "--eval",
              str(data[data_file]), *FAST]
    merged_report = _run([*common, "-o", str(tmp_path / "merged")])
    _run([*common, "-o", str(tmp_path / "adapter"), "--no-merge"])
    metrics = merged_report["metrics"]
    assert metrics["response_tokens"] > 0 and 1 < metrics["response_perplexity"] < float("inf")
    assert merged_report["lora"]["modules_to_save"] == []  # a causal LM's head stays frozen
    # the metric was measured on the unmerged model in memory: the saved merged model gives it again
    from mlpfuse.data import read_table
    from mlpfuse.train.finetune import FinetuneSettings
    from mlpfuse.train.instruct import response_perplexity

    again = response_perplexity(mlpfuse.load(tmp_path / "merged", task="causal-lm"),
                                transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged")),
                                read_table(str(data[data_file])), FinetuneSettings(task="causal-lm", max_length=24))
    assert again["response_perplexity"] == pytest.approx(metrics["response_perplexity"], rel=1e-4)
    _adapter_moved(tmp_path / "adapter")
    plain = "LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel"
    _check_merged_equals_unmerged(base, tmp_path / "merged", tmp_path / "adapter", "causal-lm", tmp_path, plain)
    # the unmerged adapter, merged by `export BASE --adapter`, is the merged output's export
    result = CliRunner().invoke(app, ["export", str(base), "--adapter", str(tmp_path / "adapter"), "-o",
                                      str(tmp_path / "plain-from-adapter")])
    assert result.exit_code == 0, result.output[-2000:]
    inputs = _inputs(base)
    torch.testing.assert_close(_logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain-from-adapter")), inputs),
                               _logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")), inputs),
                               rtol=1e-4, atol=1e-5)


def test_svd_checkpoint_takes_lora_on_its_factors(data, tmp_path):
    base = _checkpoint(tmp_path, "llama", method="svd")
    text = tmp_path / "text.tsv"
    text.write_text("sentence\n" + "how are you fine thanks\nthe answer is forty two\n" * 6, encoding="utf-8")
    common = [str(base), "--lora", "--task", "causal-lm", "--train", str(text), *FAST]
    report = _run([*common, "-o", str(tmp_path / "merged")])
    assert {"lowrank_a", "lowrank_b"} <= set(report["lora"]["targets"])
    _run([*common, "-o", str(tmp_path / "adapter"), "--no-merge"])
    inputs = _inputs(base)
    unmerged = peft.PeftModel.from_pretrained(mlpfuse.load(base, task="causal-lm"), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(mlpfuse.load(tmp_path / "merged", task="causal-lm"), inputs),
                               _logits(unmerged, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["unknown-target", "norm-target", "svd-projection", "no-merge-alone", "eval-only",
                                  "rank", "missing-response", "messages-not-a-list"])
def test_bad_lora_input_is_one_line_exit_2(data, tmp_path, case):
    base, train, extra = data["llama"], data["train"], ["--lora"]
    if case == "unknown-target":
        extra += ["--lora-targets", "q_proj,nonexistent_proj"]
        expected = "no module named 'nonexistent_proj'"
    elif case == "norm-target":
        extra += ["--lora-targets", "input_layernorm"]
        expected = "cannot put LoRA there"
    elif case == "svd-projection":
        base = _checkpoint(tmp_path, "llama", method="svd")
        extra += ["--lora-targets", "down_proj", "--task", "causal-lm"]
        train = data["pairs"]
        expected = "low-rank (svd) projection"
    elif case == "no-merge-alone":
        extra = ["--no-merge"]
        expected = "--no-merge applies to --lora only"
    elif case == "eval-only":
        extra += ["--eval-only", "--eval", str(data["eval"])]
        expected = "drop --eval-only"
    elif case == "rank":
        extra += ["--lora-rank", "0"]
        expected = "--lora-rank"
    elif case == "missing-response":
        train = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
        extra += ["--task", "causal-lm"]
        expected = "no 'response' column"
    else:
        train = write_jsonl(tmp_path / "m.jsonl", [{"messages": "hi"}])
        extra += ["--task", "causal-lm"]
        expected = "not a non-empty list"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["finetune", str(base), "--train", str(train), "-o", str(out), *FAST, *extra])
    assert result.exit_code == 2, result.output[-2000:]
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


@pytest.mark.slow
def test_lora_on_two_cpu_ranks_matches_one_process(data, tmp_path):
    """torchrun as for full fine-tuning: 2 ranks at --batch-size 4 end where one process at 8 ends."""
    pytest.importorskip("torch.distributed.run")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlpfuse.train.finetune import FinetuneSettings, finetune

    root = Path(__file__).resolve().parent.parent
    base, single, multi = data["llama"], tmp_path / "single", tmp_path / "multi"
    finetune(str(base), str(data["train"]), None, single, FinetuneSettings(
        epochs=1, batch_size=8, max_length=16, lr=1e-2, lora=True, lora_dropout=0.0))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mlpfuse",
           "finetune", str(base), "--lora", "--lora-dropout", "0", "--train", str(data["train"]), "-o", str(multi),
           "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--lr", "1e-2"]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((multi / "mlpfuse_finetune.json").read_text())["metrics"]["train_steps"] == 3  # 24 rows / 8
    first, second = load_file(str(single / "model.safetensors")), load_file(str(multi / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:  # measured 3.4e-8 on tiny LLaMA (float32 gradient averaging order)
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-6, msg=name)
