"""The registry of supported architectures. Adding one is one entry here and one tiny-config test."""

from __future__ import annotations

from mlpfuse.arch.spec import CONV1D, POSITION_FIELDS, ArchSpec, ExpertTemplate, Projections, SiteTemplate
from mlpfuse.errors import InputError

_LLAMA_LIKE = Projections(up="up_proj", down="down_proj", gate="gate_proj")
_PACKED = Projections(up=None, down="down_proj", gate_up="gate_up_proj")  # one [gate; up] module
_H_TO_4H = Projections(up="dense_h_to_4h", down="dense_4h_to_h")


def _switch_stack(stack: str, ff: int, count: str) -> SiteTemplate:
    """Switch Transformers encoder or decoder: every ``{stack}_sparse_step``-th block is sparse."""
    mlp = f"{stack}.block.{{i}}.layer.{ff}.mlp"
    return SiteTemplate(mlp, count, stack, experts=ExpertTemplate(
        path=f"{mlp}.experts.expert_{{e}}", count="num_experts", projections=Projections(up="wi", down="wo"),
        router=f"{mlp}.router.classifier", sparse="switch", step=f"{stack}_sparse_step",
        sparse_count=f"num_sparse_{stack}_layers"))


def _qwen_like_experts(sparse: str, shared: str | None = None) -> ExpertTemplate:
    return ExpertTemplate(path="layers.{i}.mlp.experts.{e}", count=("num_experts", "num_local_experts"), projections=_LLAMA_LIKE,
                          router="layers.{i}.mlp.gate", stacked="layers.{i}.mlp.experts", shared=shared,
                          sparse=sparse, step="decoder_sparse_step")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="BERT / RoBERTa",
        model_types=("bert", "roberta"),
        sites=(SiteTemplate("encoder.layer.{i}", "num_hidden_layers"),),
        projections=Projections(up="intermediate.dense", down="output.dense"),
        positions_after_padding=("roberta",),
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
        name="Gemma 2 / Gemma 3 (text)",
        model_types=("gemma2", "gemma3_text"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=_LLAMA_LIKE,
        causal_lm=True,
    ),
    ArchSpec(
        name="OLMo / OLMo 2 / OLMo 3",
        model_types=("olmo", "olmo2", "olmo3"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=_LLAMA_LIKE,
        causal_lm=True,
    ),
    ArchSpec(
        name="Granite / StableLM / Cohere / Helium / SmolLM3 / Ministral (gated, LLaMA-like)",
        model_types=("granite", "stablelm", "cohere", "cohere2", "helium", "smollm3", "ministral", "exaone4", "seed_oss"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=_LLAMA_LIKE,
        causal_lm=True,
    ),
    ArchSpec(
        name="Nemotron / Arcee / Apertus (non-gated up/down)",
        model_types=("nemotron", "arcee", "apertus"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=Projections(up="up_proj", down="down_proj"),
        causal_lm=True,
    ),
    ArchSpec(
        name="Phi-3 / GLM (packed gate_up_proj)",
        model_types=("phi3", "glm"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=_PACKED,
        causal_lm=True,
    ),
    ArchSpec(
        name="Phi (1.x / 2)",
        model_types=("phi",),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=Projections(up="fc1", down="fc2"),
        causal_lm=True,
    ),
    ArchSpec(
        name="GPT-NeoX / Pythia / Persimmon",
        model_types=("gpt_neox", "persimmon"),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=_H_TO_4H,
        causal_lm=True,
    ),
    ArchSpec(
        name="Falcon",
        model_types=("falcon",),
        sites=(SiteTemplate("h.{i}.mlp", "num_hidden_layers"),),
        projections=_H_TO_4H,
        causal_lm=True,
    ),
    ArchSpec(
        name="BLOOM",
        model_types=("bloom",),
        sites=(SiteTemplate("h.{i}.mlp", "n_layer"),),
        projections=_H_TO_4H,
        causal_lm=True,
    ),
    ArchSpec(
        name="OPT",
        model_types=("opt",),
        sites=(SiteTemplate("decoder.layers.{i}", "num_hidden_layers"),),
        projections=Projections(up="fc1", down="fc2"),
        causal_lm=True,
    ),
    ArchSpec(
        name="GPT-J / CodeGen",
        model_types=("gptj", "codegen"),
        sites=(SiteTemplate("h.{i}.mlp", "n_layer"),),
        projections=Projections(up="fc_in", down="fc_out"),
        causal_lm=True,
    ),
    ArchSpec(
        name="GPT-Neo",
        model_types=("gpt_neo",),
        sites=(SiteTemplate("h.{i}.mlp", "num_layers"),),
        projections=Projections(up="c_fc", down="c_proj"),
        causal_lm=True,
    ),
    ArchSpec(
        name="StarCoder2",
        model_types=("starcoder2",),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers"),),
        projections=Projections(up="c_fc", down="c_proj"),
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
    # Mixture-of-Experts families (docs/moe.md): experts fused one by one, routers untouched.
    ArchSpec(
        name="Switch Transformers (MoE)",
        model_types=("switch_transformers",),
        sites=(_switch_stack("encoder", 1, "num_layers"), _switch_stack("decoder", 2, "num_decoder_layers")),
        projections=Projections(up="wi", down="wo"),
    ),
    ArchSpec(
        name="Mixtral (MoE)",
        model_types=("mixtral",),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers", experts=ExpertTemplate(
            path="layers.{i}.block_sparse_moe.experts.{e}", count="num_local_experts",
            projections=Projections(up="w3", down="w2", gate="w1"), router="layers.{i}.mlp.gate",
            stacked="layers.{i}.mlp.experts")),),
        projections=_LLAMA_LIKE,
    causal_lm=True,
    ),
    ArchSpec(
        name="Qwen2-MoE (MoE + shared expert)",
        model_types=("qwen2_moe",),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers",
                            experts=_qwen_like_experts("qwen", shared="layers.{i}.mlp.shared_expert")),),
        projections=_LLAMA_LIKE,
    causal_lm=True,
    ),
    ArchSpec(
        name="Qwen3-MoE (MoE)",
        model_types=("qwen3_moe",),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers", experts=_qwen_like_experts("qwen")),),
        projections=_LLAMA_LIKE,
    causal_lm=True,
    ),
    ArchSpec(
        name="OLMoE (MoE)",
        model_types=("olmoe",),
        sites=(SiteTemplate("layers.{i}.mlp", "num_hidden_layers", experts=_qwen_like_experts("all")),),
        projections=_LLAMA_LIKE,
    causal_lm=True,
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


def _config_dict(config) -> dict:
    """A config.json dict, a transformers config or a fused checkpoint's config as a plain dict
    whose ``model_type`` is the base architecture's."""
    data = dict(config) if isinstance(config, dict) else config.to_dict()
    if data.get("model_type") == "mlpfuse" and data.get("base_model_type"):
        data["model_type"] = data["base_model_type"]
    return data


def entry_for(config) -> ArchSpec | None:
    """The registry entry of ``config``'s model type (a fused checkpoint's: its base type), or None."""
    model_type = _config_dict(config).get("model_type")
    return next((spec for spec in ARCHITECTURES if model_type in spec.model_types), None)


def is_causal_lm(config) -> bool:
    """Whether ``config`` (config.json dict, fused or plain, or a transformers config) describes a
    decoder-only language model: perplexity is its loss, its text is packed into windows.

    A registered family answers from its entry (:attr:`ArchSpec.causal_lm`; tests/test_registry.py
    checks it against transformers' task mappings); an encoder family counts when its config sets
    ``is_decoder``. An unregistered type answers from transformers' mappings: it has a causal-LM
    class and neither a masked-LM nor a sequence-to-sequence one (or ``is_decoder`` is set).
    """
    data = _config_dict(config)
    if data.get("is_encoder_decoder"):
        return False
    spec = entry_for(data)
    if spec is not None:
        return spec.causal_lm or (bool(data.get("is_decoder")) and causal_lm_class(data["model_type"]))
    return causal_lm_class(data.get("model_type")) and (bool(data.get("is_decoder")) or not encoder_class(data.get("model_type")))


def causal_lm_class(model_type: str | None) -> bool:
    """Whether transformers has a causal-LM class for ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def encoder_class(model_type: str | None) -> bool:
    """Whether transformers has a masked-LM or sequence-to-sequence class for ``model_type`` (not decoder-only)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                         MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def max_positions(config) -> int | None:
    """The longest sequence (tokens) ``config`` allows, or None when it names no limit.

    ``config``: a config.json dict (fused or plain) or a transformers config. The first positive
    integer among the entry's :attr:`ArchSpec.position_fields` (unregistered types:
    :data:`~mlpfuse.arch.spec.POSITION_FIELDS`; a ``base_config`` sub-dict counts too), less the
    ``pad_token_id + 1`` rows a RoBERTa-like family keeps before its first position.
    """
    data = _config_dict(config)
    spec = entry_for(data)
    fields = spec.position_fields if spec is not None else POSITION_FIELDS
    for source in (data, data.get("base_config") or {}):
        for name in fields:
            value = source.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                if spec is not None and data.get("model_type") in spec.positions_after_padding:
                    value -= (data.get("pad_token_id") or 0) + 1
                return value
    return None
