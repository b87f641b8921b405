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
from mlpfuse.errors import InputError
from mlpfuse.export import export_checkpoint
from mlpfuse.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.gguf_export import PROMPTS, export_gguf

from .conftest import TINY, build_tiny

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
FAMILIES = sorted(GGUF_FAMILIES)


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
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    plain, ours = _plain_logits(tmp_path / "plain", prompts), _llama_cpp_logits(tmp_path / "out.gguf", prompts)
    for reference, got in zip(plain, ours):
        assert int(got.argmax()) == int(reference.argmax())
        assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-2
