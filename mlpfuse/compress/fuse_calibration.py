"""``fuse --calibration``: the glue between the fuse pipeline and the layer-by-layer calibration pass.

The checks before any work, the calibration batch (mlpfuse/compress/calibration.py reads and tokenises it),
the pass itself (each compressed site handed on as it comes) and the record of what the pass saw,
which goes into the report, the config section and the recipe.
"""

from __future__ import annotations

from pathlib import Path

from mlpfuse.arch import is_causal_lm
from mlpfuse.checkpoints.tensors import read_config
from mlpfuse.compress.calibration import (
    DEFAULT_ENCODER_LIMIT,
    DEFAULT_LIMIT,
    DEFAULT_MAX_LENGTH,
    StreamingModel,
    check_settings,
    read_calibration,
    run_calibrated,
)
from mlpfuse.errors import InputError
from mlpfuse.option_fields import CALIBRATION

# FuseSettings fields that only --calibration reads (left out of a data-free run's recipe)
CALIBRATION_FIELDS = CALIBRATION.names()


def check_calibration(settings, config: dict, merged_layout) -> None:
    """Refuse what ``--calibration`` cannot do, before any work (one-line InputErrors)."""
    from mlpfuse.train.distributed import active
    from mlpfuse.checkpoints.format import is_fused_config
    from mlpfuse.methods import check_calibrated

    check_settings(settings.calibration_limit, settings.max_length, settings.protect, settings.ridge,
                   settings.text_column, settings.calibration_batch_size, settings.grouping)
    check_calibrated(settings.method)
    if active():
        raise InputError("--calibration runs the model layer by layer in one process: run it without torchrun")
    if merged_layout or is_fused_config(config):
        raise InputError("--calibration needs an original (unfused, unmerged) checkpoint as input")
    if config.get("is_encoder_decoder"):
        raise InputError("--calibration does not support encoder-decoder models yet; fuse them without --calibration")


def calibration_data(settings, source_dir: Path):
    """The tokenised calibration batch (decoder LMs: packed windows of newline-joined text)."""
    from mlpfuse.runtime import check_window, load_tokenizer

    # sequences must fit the model's positions (the default adapts to them)
    settings.max_length = check_window(settings.max_length, read_config(source_dir), default=DEFAULT_MAX_LENGTH)
    causal = is_causal_lm(read_config(source_dir))
    if settings.calibration_limit is None:
        settings.calibration_limit = DEFAULT_LIMIT if causal else DEFAULT_ENCODER_LIMIT
    tokenizer = load_tokenizer(source_dir)
    return read_calibration(settings.calibration, tokenizer, limit=settings.calibration_limit,
                            max_length=settings.max_length, text_column=settings.text_column, packed=causal)


def run_calibration(settings, plan, emit):
    """The layer-by-layer calibration pass over ``plan`` (a :class:`~mlpfuse.compress.fuse_plan.FusePlan`);
    each compressed site goes to ``emit``. Returns the pass's result (errors, tokens, timings)."""
    from mlpfuse.arch.io import tensor_names
    from mlpfuse.compress.fuse_layers import compress_dense
    from mlpfuse.runtime import resolve_device

    stream = StreamingModel(plan.source.directory, plan.reader, plan.prefix, plan.sites, resolve_device(settings.device))

    def compress(layer_plan, mlp, layer_options):
        names = tensor_names(layer_plan.site, plan.prefix, plan.keys)
        layer = compress_dense(layer_plan, mlp, settings.method, layer_options, plan.prefix, set(names.values()),
                               plan.source.dtype)
        return layer.compressed, layer

    return run_calibrated(stream, plan.calibration, plan.plans, plan.keys, plan.options, settings.protect,
                          settings.ridge, compress, emit, settings.calibration_batch_size,
                          grouping=settings.grouping)


def calibration_record(settings, data, result) -> dict:
    """The calibration settings, data provenance and whole-model error (config section, report, recipe)."""
    return {"file": data.file, "sha256": data.sha256, "texts": data.texts, "tokens": result.tokens,
            "sequences": result.sequences, "packed": data.packed, "calibration_limit": settings.calibration_limit,
            "max_length": settings.max_length, "text_column": settings.text_column, "protect": settings.protect,
            "ridge": settings.ridge, "grouping": settings.grouping, "hidden_state_error": result.hidden_state_error,
            "batch_size": result.batch_size, "device": result.device, "cache": result.cache,
            "layer_seconds": result.layer_seconds}
