"""Loading fused (and plain) checkpoints as standard transformers models."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from .checkpoint import CheckpointReader, read_config
from .errors import InputError, MlpfuseError
from .remote import modeling_mlpfuse as remote
from .remote.configuration_mlpfuse import MlpFuseConfig
from .remote.modeling_mlpfuse import (
    AUTO_CLASS_ENTRIES,
    FUSED_MODEL_TYPE,
    apply_fusion_layout,
    base_config_from,
    fused_model_class,
    load_fused,
)
from .source import resolve_model

TASKS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}



def _register_with_transformers() -> None:
    """Let the Auto classes (AutoConfig, AutoTokenizer, AutoModel...) open fused checkpoints
    without ``trust_remote_code`` in any process that imported mlpfuse."""
    transformers.AutoConfig.register(FUSED_MODEL_TYPE, MlpFuseConfig, exist_ok=True)
    for auto_name, entry_name in AUTO_CLASS_ENTRIES.items():
        getattr(transformers, auto_name).register(MlpFuseConfig, getattr(remote, entry_name), exist_ok=True)


_register_with_transformers()

__all__ = ["TASKS", "apply_fusion_layout", "fused_model_class", "is_fused", "load", "verify_checkpoint"]


def is_fused(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint written by mlpfuse."""
    return read_config(Path(path)).get("model_type") == FUSED_MODEL_TYPE


def load(path: str | Path, task: str = "base", **kwargs) -> transformers.PreTrainedModel:
    """Load a fused or plain checkpoint as the standard transformers class for ``task``.

    ``task`` is one of :data:`TASKS` (``base`` gives e.g. ``BertModel``, ``causal-lm`` e.g.
    ``LlamaForCausalLM``). Extra keyword arguments go to ``from_pretrained`` (``num_labels``,
    ``dtype``, ``device_map``...). Fused MLPs come back in place, with their scale buffers.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    directory = resolve_model(str(path))
    auto_name = TASKS[task]
    if is_fused(directory):
        try:
            return load_fused(str(directory), auto_name, **kwargs)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return getattr(transformers, auto_name).from_pretrained(str(directory), **kwargs)


def _model_class_for(base_config) -> type:
    """The class named first in ``architectures`` if transformers has it, else the AutoModel class."""
    for name in getattr(base_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(base_config)]


def verify_checkpoint(directory: str | Path) -> int:
    """Check that a written fused checkpoint matches the model its config builds (shapes only).

    Builds the model on the meta device (no memory), then compares every tensor of the checkpoint
    that the model has with the model's shape. Returns the number of tensors checked.
    """
    config = read_config(Path(directory))
    base_config = base_config_from(config)
    with torch.device("meta"):
        model = fused_model_class(_model_class_for(base_config))(base_config)
    expected = {name: tuple(t.shape) for name, t in model.base_model.state_dict().items()}
    reader = CheckpointReader(directory)
    checked = 0
    for key in reader.keys():
        relative = _strip_to_known(key, expected)
        if relative is None:
            continue
        if reader.shape(key) != expected[relative]:
            raise MlpfuseError(
                f"written checkpoint does not match its config: {key} has shape {reader.shape(key)}, "
                f"the model expects {expected[relative]}"
            )
        checked += 1
    for spec in (config.get("mlpfuse") or {}).get("modules", []):
        weight = spec["path"] + (".lowrank_a.weight" if spec["type"] == "lowrank" else ".weight")
        if "tensors" in spec:  # MoE experts modules name their own tensors
            weight = f"{spec['path']}.{spec['tensors'][0]}"
        if spec["type"] != "zero" and not any(k.endswith(weight) for k in reader.keys()):
            raise MlpfuseError(f"written checkpoint lacks the fused module {spec['path']}")
    return checked


def _strip_to_known(key: str, expected: dict) -> str | None:
    """``key`` minus whatever prefix makes it a base-model state-dict name, if any does."""
    parts = key.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in expected:
            return candidate
    return None
