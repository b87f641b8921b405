"""What a user must know before deploying a checkpoint: fused or exported, widths, remote code, savings.

Used by ``mlpfuse inspect``. FLOPs come from :func:`mlpfuse.flops.count_model` on one sequence of
random token ids, for the checkpoint's model and (for a fused checkpoint) the same architecture at
its original widths; both are built with random weights, so no weights are read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import read_config
from .validate import quantisation
from .remote.modeling_mlpfuse import FUSED_MODEL_TYPE, base_config_from, fused_model_class

from .format import EXPORT_SECTION  # noqa: E402  (provenance key in an exported config.json)
FLOPS_AUTO_LIMIT = 1_000_000_000  # parameters: above this, FLOPs are counted only when asked (the model is built)
WIDTH_FIELD = re.compile(r"(intermediate|inner|d_ff|ffn)", re.IGNORECASE)  # config fields that hold MLP widths


def checkpoint_kind(config: dict) -> str:
    """``fused`` (needs mlpfuse's code), ``exported`` (plain, written by ``mlpfuse export``) or ``plain``."""
    if config.get("model_type") == FUSED_MODEL_TYPE:
        return "fused"
    return "exported" if config.get(EXPORT_SECTION) else "plain"


def width_fields(config: dict) -> dict[str, int]:
    """The config's MLP width fields (intermediate_size, n_inner, d_ff, moe_intermediate_size...)."""
    return {k: v for k, v in config.items() if WIDTH_FIELD.search(k) and isinstance(v, int) and not isinstance(v, bool)}


def _batch(config, length: int = 128) -> dict[str, torch.Tensor]:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or length
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    # two positions short of the table: RoBERTa's position ids start after the padding index
    ids = torch.randint(0, vocab, (1, max(1, min(length, int(limit) - 2))), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = ids
    return batch


def flop_counts(config: dict) -> dict:
    """Forward FLOPs per token and trainable parameters: ``after`` for this checkpoint, ``before`` at the
    original widths (fused checkpoints only). Builds the model(s) with random weights on the CPU."""
    import transformers

    from .flops import count_model
    from .modeling import model_class_for

    base_config = base_config_from(dict(config))
    cls = model_class_for(base_config)
    batch = _batch(base_config)
    result = {"sequence_length": int(batch["input_ids"].shape[1])}
    torch.manual_seed(0)
    fused = config.get("model_type") == FUSED_MODEL_TYPE
    built = fused_model_class(cls)(base_config) if fused else cls(base_config)
    counts = count_model(built.eval(), batch)
    result["after"] = {"flops_per_token": counts.flops_per_token, "mlp_flops_per_token": counts.mlp_flops_per_token,
                       "parameters": counts.parameters}
    if fused:
        del built
        torch.manual_seed(0)
        plain_config = transformers.AutoConfig.for_model(base_config.model_type, **{
            k: v for k, v in base_config.to_dict().items() if k not in ("model_type", "mlpfuse")})
        original = count_model(cls(plain_config).eval(), batch)
        result["before"] = {"flops_per_token": original.flops_per_token,
                            "mlp_flops_per_token": original.mlp_flops_per_token, "parameters": original.parameters}
    return result


def describe(directory: Path, flops: bool | None = None) -> dict:
    """Deployment facts of the checkpoint in ``directory`` as a JSON-ready dict.

    Keys: ``kind`` (fused | exported | plain), ``model_type`` (base architecture), ``quantised`` (how,
    or None; see :func:`mlpfuse.validate.quantisation`: the other commands refuse it), ``remote_code``
    (whether loading needs ``trust_remote_code=True`` or ``import mlpfuse``), ``layers`` (fused: label,
    width before and after), ``width_fields`` (the config's MLP widths), ``parameters`` (before and
    after when known), ``export`` (provenance of an export), ``flops`` (see :func:`flop_counts`; computed
    when ``flops`` is True, or None and the model has at most ``FLOPS_AUTO_LIMIT`` parameters).
    """
    config = read_config(Path(directory))
    kind = checkpoint_kind(config)
    section = config.get("mlpfuse") or {}
    model_type = config.get("base_model_type") if kind == "fused" else config.get("model_type")
    facts = {"kind": kind, "model_type": model_type, "quantised": quantisation(directory), "remote_code": kind == "fused",
             "width_fields": width_fields(config), "parameters": section.get("parameters", {}),
             "export": config.get(EXPORT_SECTION)}
    labels = section.get("layer_labels", section.get("layers", []))
    facts["layers"] = [{"label": str(label), "before": section.get("original_widths", {}).get(str(layer)),
                        "after": section.get("widths", {}).get(str(layer))}
                       for layer, label in zip(section.get("layers", []), labels)]
    if flops is None:
        flops = (section.get("parameters", {}).get("after") or 0) <= FLOPS_AUTO_LIMIT and _small(directory)
    if flops:
        facts["flops"] = flop_counts(config)
        if not facts["parameters"] and "after" in facts["flops"]:
            facts["parameters"] = {"after": facts["flops"]["after"]["parameters"]}
    return facts


def _small(directory: Path) -> bool:
    """Whether the weight files are small enough (about FLOPS_AUTO_LIMIT fp32 parameters) to build the model."""
    size = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) + sum(
        p.stat().st_size for p in Path(directory).glob("*.bin"))
    return size <= 4 * FLOPS_AUTO_LIMIT
