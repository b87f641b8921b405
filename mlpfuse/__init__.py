"""mlpfuse: one-shot MLP Fusion of transformer feed-forward blocks, before fine-tuning."""

__version__ = "0.1.0"

from .fuse import FuseReport, FuseSettings, fuse_checkpoint, fuse_model  # noqa: E402
from .modeling import TASKS, is_fused, load  # noqa: E402

__all__ = ["FuseReport", "FuseSettings", "TASKS", "__version__", "fuse_checkpoint", "fuse_model", "is_fused", "load"]
