"""The ``fuse`` pipeline: plan -> execute -> write, from a checkpoint to a fused one, streaming.

1. plan (mlpfuse/compress/fuse_plan.py): check the inputs, claim the output, choose each site's width, all
   before any work;
2. execute (mlpfuse/compress/fuse_layers.py): compress the sites layer by layer (``--calibration``: on
   calibration text, mlpfuse/compress/fuse_calibration.py) and stream every tensor to the writer;
3. write (mlpfuse/checkpoints/writer.py): config section, remote code, side files, recipe, card, load check.

:func:`fuse_model` (mlpfuse/compress/fuse_memory.py) applies the same maths in place to a model already in
memory (used by ntk-check, tune and the tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlpfuse.checkpoints.output import check_free_space, claim_output, guarded_outputs
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.checkpoints.writer import DerivedWriter
from mlpfuse.compress.fuse_calibration import calibration_data
from mlpfuse.compress.fuse_layers import execute, layer_computer
from mlpfuse.compress.fuse_memory import fuse_model  # noqa: F401  (public: mlpfuse.compress.fuse.fuse_model)
from mlpfuse.compress.fuse_plan import check_source, plan_fuse
from mlpfuse.compress.fuse_report import FuseReport, LayerReport, derived_checkpoint, fuse_report
from mlpfuse.option_fields import FUSE_FIELDS
from mlpfuse.options import check_seed
from mlpfuse.train.distributed import is_worker, rank_device, serve

__all__ = ["FuseReport", "FuseSettings", "LayerReport", "fuse_checkpoint", "fuse_model"]


_D = {f.name: f.default for f in FUSE_FIELDS}  # the declared defaults (mlpfuse/option_fields.py)


@dataclass
class FuseSettings:
    """Everything that decides the output of ``fuse`` (a YAML recipe holds the same fields).

    Each field but ``allow_full_width`` is declared, with its type, default and help, in
    mlpfuse/option_fields.py (``FUSE_FIELDS``); the defaults here are read from there.
    """

    layers: str | list = _D["layers"]
    dim: int | None = _D["dim"]
    ratio: float | None = _D["ratio"]
    method: str = _D["method"]
    backend: str = _D["backend"]
    device: str | None = _D["device"]
    seed: int = _D["seed"]
    dtype: str = _D["dtype"]
    per_layer: dict = field(default_factory=dict)  # None (a recipe's ``per_layer:`` left empty) is read as {}
    max_shard_size: str = _D["max_shard_size"]
    allow_full_width: bool = False
    multiple_of: int = _D["multiple_of"]  # every fused width rounded down to a multiple of this (never below 1 or above the original)
    experts: str | list | None = _D["experts"]  # MoE: experts to fuse in each chosen sparse layer (None = all)
    kmeans_init: str = _D["kmeans_init"]  # k-means seeding: kmeans-parallel (k-means||) or greedy (k-means++)
    # --calibration: the data-aware form of the method, on calibration text run layer by layer (calibration.py)
    calibration: str | None = _D["calibration"]  # text table (as read_table reads it); None = data-free
    # sequences (an int) or "N tokens"; None: 128 sequences for decoders, 512 for encoders
    calibration_limit: int | str | None = _D["calibration_limit"]
    max_length: int = _D["max_length"]  # tokens per calibration sequence (shortened to the model's positions)
    calibration_batch_size: int = _D["calibration_batch_size"]  # sequences per mini-batch of the layer-by-layer pass
    text_column: str = _D["text_column"]
    protect: float = _D["protect"]  # protected neurons per layer: fraction of the fused width, or a count >= 1
    ridge: float = _D["ridge"]  # ridge strength alpha of the output refit
    grouping: str = _D["grouping"]  # calibrated fusion/cluster: "select" or "kmeans" (methods.calibrated)

    def __post_init__(self):
        if self.per_layer is None:
            self.per_layer = {}


@guarded_outputs
def fuse_checkpoint(
    model: str,
    output: str | Path,
    settings: FuseSettings,
    overwrite: bool = False,
    on_layer: Callable[[LayerReport], None] | None = None,
    on_start: Callable[[list], None] | None = None,
) -> FuseReport | None:
    """Fuse the chosen MLPs of checkpoint ``model`` and write a loadable checkpoint to ``output``.

    Streams: reads one layer's tensors at a time from memory-mapped files and writes shards as
    they fill; the output appears only when complete (temporary directory + rename). Under
    torchrun the layers are split over the ranks (mlpfuse/train/distributed.py); ranks > 0 return None.
    Raises InputError for bad inputs or settings (before any work), EnvironmentProblem for a
    disk too small or a device that cannot be used.
    """
    start = time.perf_counter()
    check_seed(settings.seed)
    source = check_source(model, settings, resolve_model)
    # checks, lock, staging: before any work (under torchrun only rank 0, the writer, claims the output)
    target = None if is_worker() else claim_output(output, [source.directory], overwrite).target
    plan = plan_fuse(source, settings, rank_device(settings.device))
    if target is not None:  # a disk too small for the output is found now, not after the k-means
        check_free_space(target, plan.output_bytes)
    if settings.calibration is not None:
        plan.calibration = calibration_data(settings, source.directory)
    if is_worker():  # torchrun: ranks > 0 compress their share of the layers for rank 0, which writes
        serve(plan.plans, layer_computer(plan, settings))
        return None
    if on_start:
        on_start(plan.plans)
    # shard writes overlap the fusing; a failure stops the writer before the staging folder goes
    with DerivedWriter(target, overwrite, source.max_shard, background=True) as out:
        done = execute(plan, settings, out.add, on_layer)
        done.files = out.close_tensors()
        report = fuse_report(plan, settings, done, str(target))
        report.seconds = time.perf_counter() - start
        out.commit(derived_checkpoint(plan, settings, report, done))
    report.files = sorted(p.name for p in target.iterdir())
    return report
