"""Shared fixtures: tiny random models of every registered architecture, saved as checkpoints.

``TINY`` is the one table of tiny configs (name -> (config factory, task, MLP or expert width)); every
test that needs a tiny model builds it from here (``build_tiny``, ``tiny_config``), and
tests/test_registry.py runs every command on every entry. Adding an architecture: one registry
entry in mlpfuse/arch/registry.py and one line here (docs/adding-an-architecture.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 99


def _common(**extra):
    return dict(vocab_size=VOCAB, **extra)


def _decoder(**extra):
    """A two-layer LLaMA-shaped decoder config (hidden 32, MLP width 44)."""
    return _common(hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


# model_type -> (config factory, task used to build and load it, intermediate size)
TINY = {
    "bert": (lambda: transformers.BertConfig(**_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=37, max_position_embeddings=64)), "masked-lm", 37),
    "roberta": (lambda: transformers.RobertaConfig(**_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                             intermediate_size=40, max_position_embeddings=70,
                                                             pad_token_id=1)), "sequence-classification", 40),
    "gpt2": (lambda: transformers.GPT2Config(**_common(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                       bos_token_id=0, eos_token_id=0)), "causal-lm", 128),
    "llama": (lambda: transformers.LlamaConfig(**_common(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2)), "causal-lm", 44),
    "mistral": (lambda: transformers.MistralConfig(**_common(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                                             num_attention_heads=4, num_key_value_heads=2)), "causal-lm", 44),
    "qwen2": (lambda: transformers.Qwen2Config(**_common(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2)), "causal-lm", 44),
    "qwen3": (lambda: transformers.Qwen3Config(**_common(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
              "causal-lm", 44),
    "gemma": (lambda: transformers.GemmaConfig(**_common(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
              "causal-lm", 44),
    **{name: (lambda cls=cls, extra=extra: cls(**_decoder(**extra)), "causal-lm", 44) for name, cls, extra in (
        ("gemma2", transformers.Gemma2Config, dict(head_dim=8)),
        ("gemma3_text", transformers.Gemma3TextConfig, dict(head_dim=8)),
        ("olmo", transformers.OlmoConfig, {}),
        ("olmo2", transformers.Olmo2Config, {}),
        ("olmo3", transformers.Olmo3Config, {}),
        ("granite", transformers.GraniteConfig, {}),
        ("stablelm", transformers.StableLmConfig, {}),
        ("cohere", transformers.CohereConfig, {}),
        ("cohere2", transformers.Cohere2Config, {}),
        ("helium", transformers.HeliumConfig, dict(head_dim=8)),
        ("smollm3", transformers.SmolLM3Config, {}),
        ("ministral", transformers.MinistralConfig, dict(head_dim=8)),
        ("exaone4", transformers.Exaone4Config, {}),
        ("seed_oss", transformers.SeedOssConfig, dict(head_dim=8)),
        ("nemotron", transformers.NemotronConfig, {}),
        ("arcee", transformers.ArceeConfig, {}),
        ("apertus", transformers.ApertusConfig, {}),
        ("phi3", transformers.Phi3Config, {}),
        ("glm", transformers.GlmConfig, dict(head_dim=8)),
        ("phi", transformers.PhiConfig, {}),
        ("gpt_neox", transformers.GPTNeoXConfig, {}),
        ("persimmon", transformers.PersimmonConfig, {}),
        ("starcoder2", transformers.Starcoder2Config, {}),
    )},
    "falcon": (lambda: transformers.FalconConfig(**_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           ffn_hidden_size=44)), "causal-lm", 44),
    "bloom": (lambda: transformers.BloomConfig(**_common(hidden_size=32, n_layer=2, n_head=4)), "causal-lm", 128),
    "opt": (lambda: transformers.OPTConfig(**_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=44,
                                                     word_embed_proj_dim=32, max_position_embeddings=64)), "causal-lm", 44),
    "gptj": (lambda: transformers.GPTJConfig(**_common(n_embd=32, n_layer=2, n_head=4, n_inner=44, rotary_dim=4,
                                                       n_positions=64)), "causal-lm", 44),
    "codegen": (lambda: transformers.CodeGenConfig(**_common(n_embd=32, n_layer=2, n_head=4, n_inner=44, rotary_dim=4,
                                                             n_positions=64, n_ctx=64)), "causal-lm", 44),
    "gpt_neo": (lambda: transformers.GPTNeoConfig(**_common(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=44,
                                                            attention_types=[[["global", "local"], 1]], window_size=8,
                                                            max_position_embeddings=64)), "causal-lm", 44),
    "t5": (lambda: transformers.T5Config(**_common(d_model=32, d_kv=8, d_ff=36, num_layers=2, num_decoder_layers=2,
                                                   num_heads=4, feed_forward_proj="relu")), "seq2seq-lm", 36),
    "t5-gated": (lambda: transformers.T5Config(**_common(d_model=32, d_kv=8, d_ff=36, num_layers=2, num_decoder_layers=2,
                                                         num_heads=4, feed_forward_proj="gated-gelu")), "seq2seq-lm", 36),
}


# Mixture-of-Experts families: hidden MOE_H, expert width MOE_I, MOE_E experts (tests/test_moe.py).
MOE_H, MOE_I, MOE_E, MOE_SHARED_I = 16, 12, 4, 20
_MOE_DECODER = dict(vocab_size=VOCAB, hidden_size=MOE_H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY.update({
    "mixtral": (lambda: transformers.MixtralConfig(intermediate_size=MOE_I, num_local_experts=MOE_E, **_MOE_DECODER),
                "causal-lm", MOE_I),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=MOE_I, num_experts=MOE_E,
                                                      shared_expert_intermediate_size=MOE_SHARED_I, **_MOE_DECODER),
                  "causal-lm", MOE_I),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=MOE_I, num_experts=MOE_E,
                                                      head_dim=8, **_MOE_DECODER), "causal-lm", MOE_I),
    "olmoe": (lambda: transformers.OlmoeConfig(intermediate_size=MOE_I, num_experts=MOE_E, **_MOE_DECODER), "causal-lm", MOE_I),
    # 4 blocks, 2 sparse (blocks 1 and 3) in encoder and decoder
    "switch_transformers": (lambda: transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=MOE_H, d_ff=MOE_I, d_kv=8, num_layers=4, num_decoder_layers=4, num_heads=2,
        num_experts=MOE_E, expert_capacity=64, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), "seq2seq-lm", MOE_I),
})
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers")
DENSE_FAMILIES = [name for name in TINY if name not in MOE_FAMILIES]


def tiny_config(name: str, **overrides):
    """The tiny config of family ``name`` with attributes overridden (``num_hidden_layers=3``...)."""
    config = TINY[name][0]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny(name: str, seed: int = 0, **overrides):
    """A tiny random model (eval mode) of registry family ``name`` and its task (config ``overrides`` applied)."""
    _, task, _ = TINY[name]
    factory = lambda: tiny_config(name, **overrides)  # noqa: E731
    torch.manual_seed(seed)
    auto = getattr(transformers, {"masked-lm": "AutoModelForMaskedLM", "sequence-classification":
                                  "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
                                  "seq2seq-lm": "AutoModelForSeq2SeqLM"}[task])
    return auto.from_config(factory()).eval(), task


def model_inputs(name: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    if TINY[name][1] == "seq2seq-lm":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def outputs_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save a tiny model of family ``name`` and return (directory, model, task)."""

    def make(name: str, seed: int = 0):
        model, task = build_tiny(name, seed)
        directory = tmp_path / f"{name}-src"
        model.save_pretrained(directory)
        return directory, model, task

    return make


WORDS = [f"w{i}" for i in range(60)]


def save_tokenizer(directory: Path) -> None:
    """A small WordPiece tokenizer (ids < VOCAB) saved into ``directory``, for commands that read text."""
    vocab = Path(directory) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)


def tree_digest(directory: Path) -> str:
    """Hash of every file's name and bytes under ``directory`` (to prove an input is untouched)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
