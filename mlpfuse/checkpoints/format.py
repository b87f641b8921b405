"""The fused checkpoint format, in one place: type names, the config ``mlpfuse`` section, the task.

A fused checkpoint is a transformers checkpoint whose ``config.json`` has ``model_type``
:data:`FUSED_MODEL_TYPE`, the original ``base_model_type``, an ``auto_map`` to the shipped remote
code, and an ``mlpfuse`` section:

- ``modules``: one entry per replaced module, ``{"path", "type", ...}`` with ``type`` one of
  :data:`MODULE_TYPES` (paths relative to the transformers base model);
- ``tied``: ``[{"source": path, "targets": [paths]}]`` modules stored once (merge-layers);
- provenance: ``version``, ``method``, ``layers``, ``widths``, ``seed``, ``source``,
  ``source_sha256``, ``packages``, ``parameters``, ``merges``, ``tuning``...

The cluster sizes P are the persistent buffer :data:`SCALE_BUFFER` of each scaled module, stored
and kept in :data:`SCALE_DTYPE` whatever the weights' dtype. The constants live in the shipped
remote code (which must import only torch and transformers) and are re-exported here; mlpfuse's
own code takes them from this module.
"""

from __future__ import annotations

from mlpfuse.remote.modeling_mlpfuse import (  # noqa: F401  (re-exported)
    CONV1D_MODULE,
    EXPERT_LIST_MODULE,
    FUSED_MODEL_TYPE,
    LINEAR_MODULE,
    LOW_RANK_MODULE,
    REMOTE_CODE_FILES,
    SCALE_BUFFER,
    SCALE_DTYPE,
    STACKED_EXPERTS_MODULE,
    ZERO_MODULE,
    fused_config_dict,
    write_remote_code,
)

SECTION = "mlpfuse"  # the config.json key of the section
EXPORT_SECTION = "mlpfuse_export"  # provenance key of an exported (plain, P folded) config.json
MODULE_TYPES = (LINEAR_MODULE, CONV1D_MODULE, LOW_RANK_MODULE, ZERO_MODULE, STACKED_EXPERTS_MODULE, EXPERT_LIST_MODULE)
# Class-name endings of ``architectures`` -> the task of ``mlpfuse.load`` that rebuilds that class.
_TASK_SUFFIXES = {
    "ForSequenceClassification": "sequence-classification", "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering", "ForMaskedLM": "masked-lm", "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm", "ForConditionalGeneration": "seq2seq-lm", "Model": "base",
}


def is_fused_config(config: dict) -> bool:
    """True when a ``config.json`` dict is a fused checkpoint's."""
    return isinstance(config, dict) and config.get("model_type") == FUSED_MODEL_TYPE


def section_of(config: dict) -> dict:
    """The ``mlpfuse`` section of a config dict (empty for a plain checkpoint)."""
    return dict(config.get(SECTION) or {}) if isinstance(config, dict) else {}


def base_config_dict(config: dict) -> dict:
    """The base architecture's config dict (an mlpfuse checkpoint's ``base_model_type`` restored)."""
    if not is_fused_config(config):
        return dict(config)
    base = {k: v for k, v in config.items() if k not in (SECTION, "auto_map", "base_model_type")}
    base["model_type"] = config["base_model_type"]
    return base


def checkpoint_task(config: dict) -> str | None:
    """The ``mlpfuse.load`` task that rebuilds the class saved in ``architectures``, or None.

    ``GPT2LMHeadModel`` -> ``causal-lm``, ``BertModel`` -> ``base``; None when no class is recorded
    or its head is none of the tasks (``BertForPreTraining``).
    """
    for name in config.get("architectures") or []:
        for suffix, task in _TASK_SUFFIXES.items():
            if name.endswith(suffix):
                return task
    return None


def fuse_section(*, method: str, layers: list, seed: int, backend: str | None, dtype: str,
                 source: str, source_sha256: str, parameters: dict, modules: list) -> dict:
    """The section ``fuse`` writes. ``layers``: the fused layers' reports (``index``, ``label``,
    ``width``, ``original_width``); ``modules``: the module entries that rebuild them. The writer
    (mlpfuse/checkpoints/writer.py) adds ``version`` and ``packages``."""
    return {
        "method": method,
        "layers": [layer.index for layer in layers],
        "layer_labels": [layer.label for layer in layers],
        "widths": {str(layer.index): layer.width for layer in layers},
        "original_widths": {str(layer.index): layer.original_width for layer in layers},
        "seed": seed,
        "backend": backend,
        "dtype": dtype,
        "source": source,
        "source_sha256": source_sha256,
        "parameters": parameters,
        "modules": modules,
    }


def memory_section(prior: dict, *, method: str, seed: int, backend: str | None, layers: list, modules: list) -> dict:
    """The section ``fuse_model`` gives a model in memory: ``prior`` (its section, maybe empty) with
    the newly fused ``layers`` (reports: ``index``, ``width``) and their module entries added."""
    from mlpfuse import __version__

    return {
        "version": __version__, "method": method, "seed": seed, "backend": backend,
        "layers": sorted(set(prior.get("layers", [])) | {layer.index for layer in layers}),
        "widths": {**prior.get("widths", {}), **{str(layer.index): layer.width for layer in layers}},
        "modules": prior.get("modules", []) + modules,
    }


def merge_section(prior: dict, *, modules: list, tied: list, record: dict, source: str, parameters: dict,
                  source_sha256: str) -> dict:
    """The section ``merge-layers`` writes: ``prior`` (the input's section, maybe empty) with the
    window's modules, tied entries and merge ``record`` added (the writer adds ``version`` and ``packages``)."""
    section = {
        "method": prior.get("method", "merge-layers"),
        "layers": prior.get("layers", []), "widths": prior.get("widths", {}),
        **{k: v for k, v in prior.items() if k not in ("modules", "tied", "merges")},
        "modules": modules, "tied": prior.get("tied", []) + tied,
        "merges": prior.get("merges", []) + [record],
        "source": prior.get("source", source), "parameters": parameters,
    }
    if "source_sha256" not in prior:
        section["source_sha256"] = source_sha256
    return section


def tuning_section(prior: dict, record: dict) -> dict:
    """The section ``tune`` writes: ``prior`` (the fused input's) with the tuning ``record``."""
    return {**prior, "tuning": record}


def export_section(prior: dict, *, source: str, padded: bool, adapter: str | None) -> dict:
    """The provenance an exported (plain) config.json keeps under :data:`EXPORT_SECTION`, from the
    fused input's section ``prior``."""
    return {"source": source, "method": prior.get("method"), "fused_widths": prior.get("widths"),
            "padded": padded, "adapter": adapter, "version": prior.get("version")}
