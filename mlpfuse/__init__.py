"""mlpfuse: one-shot MLP Fusion of transformer feed-forward blocks, before fine-tuning.

Importing the package is cheap: torch, transformers and the other heavy libraries are imported the
first time one of the names below is used (``mlpfuse.load``, ``mlpfuse.fuse_checkpoint``, ...).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {  # public name -> the submodule that defines it (imported on first use)
    "FuseReport": "compress.fuse",
    "FuseSettings": "compress.fuse",
    "fuse_checkpoint": "compress.fuse",
    "fuse_model": "compress.fuse",
    "TASKS": "checkpoints.modeling",
    "is_fused": "checkpoints.modeling",
    "load": "checkpoints.modeling",
}

__all__ = ["FuseReport", "FuseSettings", "TASKS", "__version__", "fuse_checkpoint", "fuse_model", "is_fused", "load"]


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlpfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
