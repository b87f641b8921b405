"""The model shapes ``bench --shape`` builds with random weights: a transformers config and its default fusion.

Import-light (no torch): the command line lists the names in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A model shape: a transformers config (random weights) and its default fusion."""

    config: dict
    layers: str
    dim: int
    description: str


_BERT_BASE = dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, vocab_size=30522, max_position_embeddings=512)
PRESETS: dict[str, Preset] = {
    "roberta-base": Preset(
        dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
        "4-11", 768, "RoBERTa-base: 12 layers, hidden 768, MLP 3072, vocab 50265 (the paper's model)"),
    "bert-base": Preset(_BERT_BASE, "4-11", 768, "BERT-base: 12 layers, hidden 768, MLP 3072, vocab 30522"),
    "minilm": Preset(
        dict(_BERT_BASE, hidden_size=384, num_hidden_layers=6, intermediate_size=1536),
        "2-5", 384, "all-MiniLM-L6-v2: 6 layers, hidden 384, MLP 1536, vocab 30522"),
    "gpt2": Preset(
        dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
        "4-11", 768, "GPT-2 small: 12 layers, hidden 768, MLP 3072, vocab 50257"),
    "tiny": Preset(
        dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=256, vocab_size=1000, max_position_embeddings=128),
        "all", 64, "a tiny BERT for smoke tests: 2 layers, hidden 64, MLP 256"),
}
