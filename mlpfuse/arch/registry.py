"""The registry of supported architectures. Adding one is one entry here and one tiny-config test."""

from __future__ import annotations

from ..errors import InputError
from .spec import CONV1D, ArchSpec, Projections, SiteTemplate

_LLAMA_LIKE = Projections(up="up_proj", down="down_proj", gate="gate_proj")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="BERT / RoBERTa",
        model_types=("bert", "roberta"),
        sites=(SiteTemplate("encoder.layer.{i}", "num_hidden_layers"),),
        projections=Projections(up="intermediate.dense", down="output.dense"),
    ),
    ArchSpec(
        name="GPT-2",
        model_types=("gpt2",),
        sites=(SiteTemplate("h.{i}.mlp", "n_layer"),),
        projections=Projections(up="c_fc", down="c_proj"),
        layout=CONV1D,
        causal_lm=True,
    ),
    ArchSpec(
        name="LLaMA / Mistral / Qwen2 / Qwen3 / Gemma",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=_LLAMA_LIKE,
        causal_lm=True,
    ),
    ArchSpec(
        name="T5 (v1.0 ReLU, v1.1 gated)",
        model_types=("t5",),
        sites=(
            SiteTemplate("encoder.block.{i}.layer.1.DenseReluDense", "num_layers", "encoder"),
            SiteTemplate("decoder.block.{i}.layer.2.DenseReluDense", "num_decoder_layers", "decoder"),
        ),
        projections=Projections(up="wi", down="wo"),
        gated_projections=Projections(up="wi_1", down="wo", gate="wi_0"),
        gated_flag="feed_forward_proj",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def lookup(model_type: str | None) -> ArchSpec:
    """The spec for ``model_type``; an InputError listing the supported types otherwise."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise InputError(
        f"unsupported model type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )
