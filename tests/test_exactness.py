"""Narrow fusion on every dense family, and the in-memory path against the checkpoint path (tiny random
configs). Full-width exactness through a written checkpoint is tests/test_registry.py's, for every family."""

from __future__ import annotations

import pytest
import torch

import mlpfuse
from mlpfuse import FuseSettings, fuse_checkpoint

from .conftest import DENSE_FAMILIES, TINY, model_inputs, outputs_of

ALL_FAMILIES = DENSE_FAMILIES


@pytest.mark.parametrize("name", ALL_FAMILIES)
@pytest.mark.parametrize("method", ["fusion", "cluster"])
def test_narrow_fusion_loads_and_shrinks(name, method, tiny_checkpoint, tmp_path):
    source, model, task = tiny_checkpoint(name)
    report = fuse_checkpoint(str(source), tmp_path / "out", FuseSettings(layers="0", dim=8, method=method))
    fused = mlpfuse.load(tmp_path / "out", task=task).eval()
    expected_drop = report.layers[0].params_before - report.layers[0].params_after
    assert expected_drop > 0
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(model) - params(fused) == expected_drop
    assert torch.isfinite(outputs_of(fused, model_inputs(name))).all()
    scales = [b for n, b in fused.named_buffers() if n.endswith("fusion_scale")]
    assert len(scales) == (1 if method == "fusion" else 0)
    if scales:
        assert scales[0].sum().item() == TINY[name][2]  # cluster sizes add up to the original width


def test_in_memory_fusion_matches_the_checkpoint_path(tiny_checkpoint, tmp_path):
    source, model, task = tiny_checkpoint("llama")
    settings = FuseSettings(layers="0-1", dim=10, seed=3)
    fuse_checkpoint(str(source), tmp_path / "out", settings)
    from_disk = mlpfuse.load(tmp_path / "out", task=task).eval()
    mlpfuse.fuse_model(model, settings)
    inputs = model_inputs("llama")
    assert torch.equal(outputs_of(model, inputs), outputs_of(from_disk, inputs))


def test_in_memory_fused_model_still_returns_hidden_states():
    from .conftest import build_tiny

    model, _ = build_tiny("bert")
    mlpfuse.fuse_model(model, FuseSettings(layers="0", dim=8))
    outputs = model(**model_inputs("bert"), output_hidden_states=True)
    assert outputs.hidden_states is not None and len(outputs.hidden_states) == 3
