"""Loading fused (and plain) checkpoints as standard transformers models."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mlpfuse.checkpoints.format import FUSED_MODEL_TYPE, is_fused_config
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.checkpoints.tensors import read_config
from mlpfuse.errors import InputError, MlpfuseError
from mlpfuse.remote import modeling_mlpfuse as remote
from mlpfuse.remote.configuration_mlpfuse import MlpFuseConfig
from mlpfuse.remote.modeling_mlpfuse import (
    AUTO_CLASS_ENTRIES,
    apply_fusion_layout,
    fused_model_class,
    load_fused,
)

TASKS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


_REGISTERED = []


def register_with_transformers() -> None:
    """Let the Auto classes (AutoConfig, AutoModel...) open fused checkpoints without ``trust_remote_code``.

    Called by :func:`load` (so by every command that loads), not at import: importing mlpfuse
    changes nothing in transformers. Idempotent.
    """
    if _REGISTERED:
        return
    transformers.AutoConfig.register(FUSED_MODEL_TYPE, MlpFuseConfig, exist_ok=True)
    for auto_name, entry_name in AUTO_CLASS_ENTRIES.items():
        getattr(transformers, auto_name).register(MlpFuseConfig, getattr(remote, entry_name), exist_ok=True)
    _REGISTERED.append(True)


__all__ = ["TASKS", "apply_fusion_layout", "fused_model_class", "is_fused", "load", "register_with_transformers",
           "verify_checkpoint"]


def is_fused(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint written by mlpfuse."""
    return is_fused_config(read_config(Path(path)))


def load(path: str | Path, task: str = "base", **kwargs) -> transformers.PreTrainedModel:
    """Load a fused or plain checkpoint as the standard transformers class for ``task``.

    ``task`` is one of :data:`TASKS` (``base`` gives e.g. ``BertModel``, ``causal-lm`` e.g.
    ``LlamaForCausalLM``). Extra keyword arguments go to ``from_pretrained`` (``num_labels``,
    ``dtype``, ``device_map``...). Fused MLPs come back in place, with their scale buffers.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    directory = resolve_model(str(path))
    register_with_transformers()
    auto_name = TASKS[task]
    if is_fused(directory):
        try:
            return load_fused(str(directory), auto_name, **kwargs)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return getattr(transformers, auto_name).from_pretrained(str(directory), **kwargs)


class UncleanCheckpoint(MlpfuseError):
    """A checkpoint mlpfuse wrote does not load back as written: an mlpfuse bug (exit 1)."""

    exit_code = 1


def model_class_for(base_config) -> type:
    """The transformers class named first in ``architectures`` if transformers has it, else AutoModel's class.

    ``base_config``: a base-architecture config object (e.g. ``LlamaConfig``). Raises KeyError when
    neither names a class transformers knows.
    """
    for name in getattr(base_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(base_config)]


def verify_checkpoint(directory: str | Path, reference: torch.nn.Module | None = None) -> int:
    """Load a just-written checkpoint the way a user will and check that it loads clean.

    Loads ``directory`` with :func:`load` for the checkpoint's task (from ``architectures``), with
    transformers' loading report (not its log, which the CLI silences), and checks:

    - no missing, unexpected or mismatched key, no loading error;
    - every tensor in the files comes back under its name with its shape and exact value (catches
      what transformers changes after loading, e.g. a tied module's bias reshaped, P rounded);
    - the forward: with ``reference`` (the in-memory model that was saved: tune, finetune) the
      outputs on a few tokens are equal; without it (fuse and merge-layers stream and hold no
      model) every fused, tied or merged dense MLP of the loaded model equals the reference forward
      :meth:`MLPWeights.forward` of the tensors read from the files, on random inputs, and the
      whole model runs to finite outputs.

    Checkpoints of ``verify.FULL_LOAD_BELOW`` bytes or more are checked without holding the model
    (memory independent of its size): transformers loads the files' headers onto the meta device
    (same loading report, names, shapes, dtypes), and each fused MLP's modules are filled from the
    files one site at a time for the forward check; with ``reference``, its tensors are compared
    with the files one at a time (docs/checkpoint-format.md, "The load check").

    Returns the number of tensors compared. Raises :class:`UncleanCheckpoint` (exit 1) with one
    line naming the offending keys; callers raise it inside their staging directory, so nothing is
    left behind.
    """
    from mlpfuse.checkpoints.verify import check_loads_clean

    return check_loads_clean(Path(directory), reference)


def saved_task(config: dict | str | Path) -> str:
    """The :func:`load` task that rebuilds the class saved in ``architectures`` of ``config`` (a
    config.json dict, or a checkpoint directory), so the head is kept on save (``base`` when none
    is recorded or it is no task of :data:`TASKS`)."""
    from mlpfuse.checkpoints.format import checkpoint_task

    task = checkpoint_task(config if isinstance(config, dict) else read_config(Path(config)))
    return task if task in TASKS else "base"


def is_causal_lm_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a decoder language model (its family: :func:`mlpfuse.arch.is_causal_lm`)
    loaded with its output head (held-out metric: perplexity)."""
    from mlpfuse.arch import is_causal_lm

    return is_causal_lm(model.config) and model.base_model is not model and model.get_output_embeddings() is not None


def checkpoint_config(path: str | Path) -> transformers.PretrainedConfig:
    """The base architecture's config object of checkpoint ``path`` (plain or fused; a directory, hub id
    or bundled name), its ``mlpfuse`` section attached; no weight is read. Raises InputError as
    :func:`mlpfuse.checkpoints.source.resolve_model` does."""
    return remote.base_config_from(read_config(resolve_model(str(path))))
