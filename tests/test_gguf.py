"""``mlpfuse export --format gguf``: fused checkpoint -> one GGUF, read back, run in llama.cpp (docs/deploy.md).

Each family llama.cpp supports is fused (tiny config, a small byte-level BPE tokenizer made here), exported
to GGUF and, when llama-cpp-python is installed, run: its next-token logits must match transformers'
(the export checks that itself; the test then compares with the plain transformers export too).
Without llama_cpp those tests skip; the read-back and refusal tests run everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from mlpfuse.arch.gguf_table import GGUF_FAMILIES
from typer.testing import CliRunner

from mlpfuse.cli import app
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.deploy.export import export_checkpoint
from mlpfuse.deploy.gguf_export import PROMPTS, export_gguf, plain_cpu_buffers
from mlpfuse.errors import InputError, MlpfuseError
from mlpfuse.runtime import load_tokenizer

from .conftest import build_tiny, tree_digest

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed (pip install 'mlpfuse[gguf]')")

VOCAB = 128  # the tiny tokenizer's 101 tokens, the rest unused rows
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
# transformers model_type -> the TINY entry that builds it
TINY_NAME = {"gemma3_text": "gemma3_text"}
# the quick run (-m "not slow") runs LLaMA (norm rotary) and GPT-2 (Conv1D) here; Qwen2 (biases) runs quick as deci
QUICK = {"llama", "gpt2"}
FAMILIES = [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in sorted(GGUF_FAMILIES)]


def save_bpe_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer (GPT-2 style: printable ASCII, space, newline, a few merges) into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # byte-level: space -> G-dot, newline -> C-dot
    merges = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he")]
    vocab = {token: i for i, token in enumerate(specials + alphabet + ["".join(m) for m in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


# config values the tiny defaults leave at the real models' (head_dim 256) but llama.cpp takes from head_dim
OVERRIDES = {"gemma2": dict(query_pre_attn_scalar=8), "gemma3_text": dict(query_pre_attn_scalar=8)}


def tiny_source(root, name: str, seed: int = 0):
    """A tiny checkpoint of family ``name`` with the BPE tokenizer; larger init so logits are far from ties.

    Directories are named ``src``/``fused``: llama.cpp reads the GGUF's general.name (the directory name)
    and applies per-model tokenizer quirks by it (a name with "phi3" wants Phi-3's special tokens).
    """
    model, _ = build_tiny(name, seed, vocab_size=VOCAB, initializer_range=0.2, **OVERRIDES.get(name, {}))
    directory = root / "src"
    model.save_pretrained(directory)
    save_bpe_tokenizer(directory)
    return directory


def fused_source(root, name: str, **settings):
    source = tiny_source(root, name)
    fused = root / "fused"
    fuse_checkpoint(str(source), fused, FuseSettings(**{"ratio": 0.5, "backend": "torch", "seed": 0, **settings}))
    return fused


def _reader_fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.t")}


def test_llama_gguf_read_back_metadata_and_tokenizer(tmp_path):
    fused = fused_source(tmp_path, "llama")
    report = export_gguf(str(fused), tmp_path / "out.gguf", outtype="f32")
    reader, fields = _reader_fields(tmp_path / "out.gguf")
    config = json.loads((fused / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.feed_forward_length"] == report.widths[0] == 22  # 44 neurons fused at ratio 0.5
    assert fields["llama.embedding_length"] == 32 and fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.context_length"] == 64
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_up.weight"] == (32, 22) and shapes["blk.1.ffn_down.weight"] == (22, 32)
    assert "output.weight" in shapes or config.get("tie_word_embeddings")
    assert not list(tmp_path.glob(".out.gguf*"))  # no temporary left


def _plain_logits(directory, prompts):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, -1].numpy() for ids in prompts]


def _llama_cpp_logits(path, prompts):
    with plain_cpu_buffers(llama_cpp):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[len(ids) - 1], dtype=np.float32))  # a copy: scores is reused
    llm.close()
    return out


@needs_llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_in_llama_cpp_like_the_transformers_export(tmp_path, family):
    fused = fused_source(tmp_path, TINY_NAME.get(family, family))
    report = export_gguf(str(fused), tmp_path / "out.gguf", outtype="f32")
    assert report.check is not None and all(report.check["top1_equal"]) and report.check["tokens_agree"]
    export_checkpoint(str(fused), tmp_path / "plain")
    tokenizer = load_tokenizer(fused)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    plain, ours = _plain_logits(tmp_path / "plain", prompts), _llama_cpp_logits(tmp_path / "out.gguf", prompts)
    for reference, got in zip(plain, ours):
        assert int(got.argmax()) == int(reference.argmax())
        assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-2


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_per_layer_widths_without_padding_run_as_deci(tmp_path, family):
    fused = fused_source(tmp_path, family, layers="0")  # layer 0 fused to 22 neurons, layer 1 keeps 44
    report = export_gguf(str(fused), tmp_path / "out.gguf", outtype="f32")
    assert report.per_layer and report.widths == [22, 44] and not report.padded and report.arch == "deci"
    reader, fields = _reader_fields(tmp_path / "out.gguf")
    assert list(fields["deci.feed_forward_length"]) == [22, 44]
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_gate.weight"] == (32, 22) and shapes["blk.1.ffn_gate.weight"] == (32, 44)
    assert all(report.check["top1_equal"]) and report.check["max_relative_diff"] < 1e-2


def test_per_layer_widths_refused_where_llama_cpp_reads_one_width_and_padded_with_pad(tmp_path):
    fused = fused_source(tmp_path, "gpt2", layers="0")
    with pytest.raises(InputError, match="--pad"):
        export_gguf(str(fused), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    report = export_gguf(str(fused), tmp_path / "out.gguf", pad=True, outtype="f32")
    assert report.padded and not report.per_layer and report.widths == [128]
    assert gguf.GGUFReader(str(tmp_path / "out.gguf")).fields["gpt2.feed_forward_length"].contents() == 128


def test_unsupported_family_refused_naming_the_supported(tmp_path):
    source = tmp_path / "src"
    build_tiny("bert")[0].save_pretrained(source)
    fuse_checkpoint(str(source), tmp_path / "fused", FuseSettings(ratio=0.5, backend="torch", seed=0))
    with pytest.raises(InputError, match="supported: .*llama.*qwen2"):
        export_gguf(str(tmp_path / "fused"), tmp_path / "out.gguf")


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_outtypes_run_and_agree(tmp_path, outtype):
    fused = fused_source(tmp_path, "llama")
    report = export_gguf(str(fused), tmp_path / "out.gguf", outtype=outtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    assert kinds["blk.0.ffn_up.weight"] == {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    # rows of 22 (the fused width) do not fill 32-value Q8_0 blocks: that tensor is f16
    assert kinds["blk.0.ffn_down.weight"] == {"f16": "F16", "bf16": "BF16", "q8_0": "F16"}[outtype]
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert report.check["max_relative_diff"] < {"f16": 1e-2, "bf16": 5e-2, "q8_0": 2e-1}[outtype]


def test_failed_check_leaves_no_output_and_inputs_untouched(tmp_path, monkeypatch):
    import mlpfuse.deploy.gguf_export as module

    fused = fused_source(tmp_path, "llama")
    before = tree_digest(fused)

    def fail(*args, **kwargs):
        raise MlpfuseError("llama.cpp disagrees")

    monkeypatch.setattr(module, "llama_cpp_check", fail)
    with pytest.raises(MlpfuseError):
        export_gguf(str(fused), tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out" / "model.gguf").exists() and not list((tmp_path / "out").glob(".*"))
    assert tree_digest(fused) == before


def test_stale_temporary_of_a_killed_run_is_removed(tmp_path):
    fused = fused_source(tmp_path, "llama")
    dead = 2 ** 22 + 12345  # above Linux's pid_max default: no such process
    stale = tmp_path / f".out.gguf.mlpfuse-incomplete-{dead}-0"
    stale.write_bytes(b"half a file")
    export_gguf(str(fused), tmp_path / "out.gguf", outtype="f32")
    assert not stale.exists() and (tmp_path / "out.gguf").is_file()


def test_cli_gguf_json_overwrite_and_bad_flags(tmp_path):
    fused = fused_source(tmp_path, "llama")
    out, report = tmp_path / "m.gguf", tmp_path / "r.json"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(fused), "--format", "gguf", "--outtype", "f32", "-o", str(out),
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["arch"] == "llama" and data["widths"] == [22] and data["tokenizer"]["chat_template"]
    again = runner.invoke(app, ["export", str(fused), "--format", "gguf", "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, ["export", str(fused), "--format", "gguf", "-o", str(out), "--overwrite"]).exit_code == 0
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not mine")
    refused = runner.invoke(app, ["export", str(fused), "--format", "gguf", "-o", str(other), "--overwrite"])
    assert refused.exit_code == 2 and other.read_bytes() == b"not mine"
    bad = runner.invoke(app, ["export", str(fused), "--outtype", "f16", "-o", str(tmp_path / "plain")])
    assert bad.exit_code == 2 and "--format gguf" in bad.output
    bad = runner.invoke(app, ["export", str(fused), "--format", "onnx", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "gguf" in bad.output


def test_inspect_reports_runtimes_for_fused_exported_and_gguf(tmp_path):
    runner = CliRunner()
    llama = fused_source(tmp_path / "a", "llama", layers="0")  # per-layer widths 22, 44
    result = runner.invoke(app, ["inspect", str(llama), "--no-flops", "--json", "-"])
    rows = {row["runtime"]: row for row in json.loads(result.stdout)["runtimes"]}
    assert rows["transformers"]["loads"] and "trust_remote_code" in rows["transformers"]["how"]
    assert rows["vLLM"]["loads"] is False and not rows["vLLM"]["tested"]
    assert rows["llama.cpp"]["loads"] and "deci" in rows["llama.cpp"]["how"] and "22-44" in rows["llama.cpp"]["how"]
    gpt2 = fused_source(tmp_path / "b", "gpt2", layers="0")
    result = runner.invoke(app, ["inspect", str(gpt2), "--no-flops", "--json", "-"])
    rows = {row["runtime"]: row for row in json.loads(result.stdout)["runtimes"]}
    assert "--pad" in rows["llama.cpp"]["how"]
    export_gguf(str(llama), tmp_path / "m.gguf", outtype="f32")
    result = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0 and "deci" in result.output and "per layer 22-44" in result.output
    assert "runtime llama.cpp: yes" in result.output
    export_checkpoint(str(llama), tmp_path / "plain", pad=True)
    result = runner.invoke(app, ["inspect", str(tmp_path / "plain"), "--no-flops", "--json", "-"])
    rows = {row["runtime"]: row for row in json.loads(result.stdout)["runtimes"]}
    assert rows["vLLM"]["loads"] and not rows["vLLM"]["tested"] and rows["transformers"]["tested"]


def save_spm_tokenizer(directory) -> None:
    """A byte-fallback BPE tokenizer (Llama 2 / SentencePiece style: "\u2581" for spaces, <0xNN> bytes)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz")
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "a")]
    vocab = {piece: i for i, piece in enumerate(pieces + ["".join(m) for m in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(directory)


@needs_llama_cpp
def test_sentencepiece_style_tokenizer_is_carried_and_tokenizes_like_transformers(tmp_path):
    model, _ = build_tiny("mistral", 0, vocab_size=320, initializer_range=0.2, pad_token_id=0)
    model.save_pretrained(tmp_path / "src")
    save_spm_tokenizer(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "fused", FuseSettings(ratio=0.5, backend="torch", seed=0))
    report = export_gguf(str(tmp_path / "fused"), tmp_path / "out.gguf", outtype="f32")
    assert report.tokenizer["model"] == "llama" and report.check["tokens_agree"] and all(report.check["top1_equal"])
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    types = list(fields["tokenizer.ggml.token_type"].contents())
    assert types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.UNKNOWN
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True


@needs_llama_cpp
def test_the_llama_cpp_check_catches_a_layout_mistake(tmp_path, monkeypatch):
    import mlpfuse.deploy.gguf_export as module

    fused = fused_source(tmp_path, "llama")
    monkeypatch.setattr(module, "_permute_rope", lambda tensor, heads: tensor)  # q/k rows left in transformers' order
    with pytest.raises(MlpfuseError, match="differ"):
        export_gguf(str(fused), tmp_path / "out.gguf", outtype="f32")
    assert not (tmp_path / "out.gguf").exists()


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_runs_like_transformers(tmp_path, rope):
    model, _ = build_tiny("llama", 0, vocab_size=VOCAB, initializer_range=0.2, rope_parameters=rope)
    model.save_pretrained(tmp_path / "src")
    save_bpe_tokenizer(tmp_path / "src")
    fuse_checkpoint(str(tmp_path / "src"), tmp_path / "fused", FuseSettings(ratio=0.5, backend="torch", seed=0))
    report = export_gguf(str(tmp_path / "fused"), tmp_path / "out.gguf", outtype="f32")
    assert all(report.check["top1_equal"]) and report.check["max_relative_diff"] < 1e-2
