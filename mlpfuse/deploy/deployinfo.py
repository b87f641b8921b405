"""What a user must know before deploying a checkpoint: fused or exported, widths, remote code, savings.

Used by ``mlpfuse inspect``. FLOPs come from :func:`mlpfuse.analysis.flops.count_model` on one sequence of
random token ids, for the checkpoint's model and (for a fused checkpoint) the same architecture at
its original widths; both are built with random weights, so no weights are read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mlpfuse.checkpoints.tensors import read_config
from mlpfuse.checkpoints.validate import quantisation
from mlpfuse.remote.modeling_mlpfuse import FUSED_MODEL_TYPE, base_config_from, fused_model_class

from mlpfuse.checkpoints.format import EXPORT_SECTION  # noqa: E402  (provenance key in an exported config.json)
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

    from mlpfuse.analysis.flops import count_model
    from mlpfuse.checkpoints.modeling import model_class_for

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

    Keys: ``kind`` (fused | exported | plain), ``runtimes`` (see :func:`runtimes`), ``model_type`` (base architecture), ``quantised`` (how,
    or None; see :func:`mlpfuse.checkpoints.validate.quantisation`: the other commands refuse it), ``remote_code``
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
    facts["runtimes"] = runtimes(config, kind)
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


# ---- runtimes ----------------------------------------------------------------------------------

def _per_layer_widths(config: dict) -> list[int]:
    """Distinct MLP widths over the layers of a fused checkpoint (one entry: uniform)."""
    section = config.get("mlpfuse") or {}
    widths = {int(k): int(v) for k, v in (section.get("widths") or {}).items()}
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    # layers left out keep the config's width (GPT-2's n_inner may be None: then the original width of fused ones)
    original = [int(v) for v in (section.get("original_widths") or {}).values()]
    unfused = next(iter(width_fields(config).values()), None) or (max(original) if original else None)
    full = [widths.get(i, unfused) for i in range(layers)] if layers else list(widths.values())
    return sorted({w for w in full if w is not None})


def runtimes(config: dict, kind: str) -> list[dict]:
    """Which runtimes load this checkpoint: ``[{"runtime", "loads", "how", "tested"}]``.

    ``kind``: fused | exported | plain (see :func:`checkpoint_kind`). transformers and llama.cpp facts are
    tested (tests/test_export.py, tests/test_gguf.py); vLLM's are by architecture name only (untested).
    """
    from mlpfuse.arch.gguf_table import gguf_family, supported_text
    from mlpfuse.arch.runtimes import VLLM_ARCHITECTURES

    model_type = config.get("base_model_type") if kind == "fused" else config.get("model_type")
    architecture = ((config.get("architectures") or [None])[0]) or "?"
    rows = []
    if kind == "fused":
        rows.append({"runtime": "transformers", "loads": True, "tested": True,
                     "how": "with remote code: mlpfuse.load(path) or AutoModel...from_pretrained(path, "
                            "trust_remote_code=True); without it after `mlpfuse export`"})
        rows.append({"runtime": "vLLM", "loads": False, "tested": False,
                     "how": "the fused modules (scaled projections) have no vLLM implementation; `mlpfuse export` "
                            "first" + ("" if architecture in VLLM_ARCHITECTURES else
                                       f" (and vLLM lists no {architecture})")})
    else:
        rows.append({"runtime": "transformers", "loads": True, "tested": kind == "exported",
                     "how": "plain AutoModel...from_pretrained(path), no remote code"})
        vllm = architecture in VLLM_ARCHITECTURES
        rows.append({"runtime": "vLLM", "loads": vllm, "tested": False,
                     "how": (f"{architecture} is in vLLM's supported architectures" if vllm else
                             f"vLLM lists no {architecture}")})
    family = gguf_family(model_type or "")
    if family is None:
        rows.append({"runtime": "llama.cpp", "loads": False, "tested": True,
                     "how": f"GGUF export supports {supported_text()}, not {model_type}"})
        return rows
    widths = _per_layer_widths(config) if kind == "fused" else [config.get(k) for k in width_fields(config)][:1]
    if kind == "fused" and len(widths) > 1 and family.per_layer_arch is None:
        rows.append({"runtime": "llama.cpp", "loads": True, "tested": True,
                     "how": f"after `mlpfuse export --format gguf --pad`: llama.cpp's {family.arch} reads one MLP width "
                            f"and the layers have {len(widths)} ({min(widths)}-{max(widths)})"})
    elif kind == "fused" and len(widths) > 1:
        rows.append({"runtime": "llama.cpp", "loads": True, "tested": True,
                     "how": f"after `mlpfuse export --format gguf`: per-layer widths ({min(widths)}-{max(widths)}) as "
                            f"llama.cpp's {family.per_layer_arch} architecture, no padding"})
    elif kind == "fused":
        rows.append({"runtime": "llama.cpp", "loads": True, "tested": True,
                     "how": f"after `mlpfuse export --format gguf` (llama.cpp architecture {family.arch})"})
    else:
        rows.append({"runtime": "llama.cpp", "loads": True, "tested": False,
                     "how": f"convert with llama.cpp's convert_hf_to_gguf.py (architecture {family.arch}), or "
                            "export the fused checkpoint with `mlpfuse export --format gguf` (tested)"})
    return rows


def describe_gguf(path: Path) -> dict:
    """Deployment facts of a GGUF file (``mlpfuse export --format gguf`` or any other): architecture,
    per-layer MLP widths, tensors, whether mlpfuse wrote it, and which runtimes load it."""
    import gguf

    from mlpfuse.arch.gguf_table import GGUF_FAMILIES

    reader = gguf.GGUFReader(str(path))
    fields = {key: reader.fields[key].contents() for key in reader.fields
              if not key.startswith("tokenizer.ggml.") and key != "tokenizer.chat_template"}
    arch = fields.get("general.architecture")
    widths = fields.get(f"{arch}.feed_forward_length")
    per_layer = isinstance(widths, list) and len(set(widths)) > 1
    known = {family.arch for family in GGUF_FAMILIES.values()} | {f.per_layer_arch for f in GGUF_FAMILIES.values()}
    reads_per_layer = {f.per_layer_arch for f in GGUF_FAMILIES.values() if f.per_layer_arch}
    if arch in known and (not per_layer or arch in reads_per_layer):
        llama = {"runtime": "llama.cpp", "loads": True, "tested": True,
                 "how": f"llama.cpp architecture {arch}" + (" with per-layer MLP widths" if per_layer else "")}
    elif per_layer and arch not in reads_per_layer:
        llama = {"runtime": "llama.cpp", "loads": False, "tested": True,
                 "how": f"llama.cpp's {arch} reads one MLP width for all layers, this file has {len(set(widths))}"}
    else:
        llama = {"runtime": "llama.cpp", "loads": None, "tested": False,
                 "how": f"architecture {arch}: not one mlpfuse writes"}
    return {"kind": "gguf", "model_type": arch, "mlpfuse": fields.get("mlpfuse.export.source"),
            "widths": widths if isinstance(widths, list) else [widths], "per_layer": per_layer,
            "tensors": len(reader.tensors), "file_type": fields.get("general.file_type"),
            "runtimes": [llama,
                         {"runtime": "transformers", "loads": None, "tested": False,
                          "how": "from_pretrained(dir, gguf_file=...) dequantises some GGUF architectures"},
                         {"runtime": "vLLM", "loads": None, "tested": False,
                          "how": "vLLM's GGUF loading is experimental"}]}
