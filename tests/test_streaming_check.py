"""The load check above its size threshold: streaming, the model never held whole.

With ``verify.FULL_LOAD_BELOW`` forced to 0 the check on a tiny model takes the path large
checkpoints take (a meta-device load of the files' headers, then one fused MLP at a time filled
from the files); it must accept what the whole-model check accepts and catch what it catches.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.checkpoints import tensors as checkpoint
from mlpfuse.checkpoints import verify
from mlpfuse.checkpoints.format import SCALE_BUFFER
from mlpfuse.checkpoints.modeling import UncleanCheckpoint, verify_checkpoint
from mlpfuse.checkpoints.tensors import CheckpointReader, read_config
from mlpfuse.cli import app
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint

from mlpfuse.arch import lookup, resolve_sites

from .conftest import TINY, save_tokenizer, tiny_config

FAMILIES = list(TINY)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def streaming(monkeypatch):
    """Force the streaming check and count the fused MLPs it runs; the whole-model load must not happen."""
    monkeypatch.setattr(verify, "FULL_LOAD_BELOW", 0)
    counted = []
    compare_sites = verify._compare_sites

    def counting(*args):
        counted.append(compare_sites(*args))
        return counted[-1]

    def no_whole_load(*_):
        raise AssertionError("the streaming check loaded the whole model")

    monkeypatch.setattr(verify, "_compare_sites", counting)
    monkeypatch.setattr(verify, "_load", no_whole_load)
    return counted


def _fused_and_checked(name, method, ratio, tiny_checkpoint, tmp_path):
    source, _, task = tiny_checkpoint(name)
    out = tmp_path / "out"
    fuse_checkpoint(str(source), out, FuseSettings(layers="all", ratio=ratio, method=method, backend="torch"))
    compared = verify_checkpoint(out)
    # the meta model has the real load's names, shapes and dtypes, and the same (empty) loading report
    meta, info = verify._load_meta(out, read_config(out), CheckpointReader(out))
    real, real_info = mlpfuse.load(out, task=task, output_loading_info=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in real.state_dict().items()}
    state, prefix = real.state_dict(), real.base_model_prefix
    assert compared == sum(verify._loaded_name(k, state, prefix) is not None for k in CheckpointReader(out).keys())
    assert all(not info[key] and not real_info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert all(t.is_meta for t in meta.state_dict().values())  # the site check emptied what it filled


@pytest.mark.parametrize("name", FAMILIES)
def test_streaming_check_builds_every_family_as_a_real_load(name, tiny_checkpoint, tmp_path, streaming):
    """Every registered family, fused at half width, passes the streaming check (MoE: experts stacked
    in memory, named per expert in the files) and its meta model is the real load's."""
    _fused_and_checked(name, "fusion", 0.5, tiny_checkpoint, tmp_path)
    dense_sites = sum(1 for s in resolve_sites(lookup(tiny_config(name).model_type), tiny_config(name).to_dict())
                      if not s.experts)
    assert streaming[-1] == dense_sites  # every fused dense MLP ran against its tensors


@pytest.mark.parametrize("name, method, ratio", [("llama", "svd", 0.25), ("bert", "cluster", 0.5)])
def test_streaming_check_on_other_methods(name, method, ratio, tiny_checkpoint, tmp_path, streaming):
    _fused_and_checked(name, method, ratio, tiny_checkpoint, tmp_path)
    assert streaming[-1] == 2


def test_streaming_check_on_merged_layers_with_tied_modules(tiny_checkpoint, tmp_path, streaming):
    source, _, _ = tiny_checkpoint("gpt2")
    save_tokenizer(source)
    result = run("merge-layers", source, "--layers", "0-1", "--no-permute", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert streaming[-1] >= 1  # the merge command's own check, streaming


@pytest.fixture
def bert(tiny_checkpoint):
    source, _, _ = tiny_checkpoint("bert")
    save_tokenizer(source)
    return source


LAYER0 = "bert.encoder.layer.0"


@pytest.mark.parametrize("corruption, named", [
    ("rename", "missing keys"),
    ("reshape", f"{LAYER0}.intermediate.dense.bias"),
    ("scale", f"{LAYER0}.output.dense.{SCALE_BUFFER}"),
    ("drop", f"missing keys: {LAYER0}.output.dense.weight"),
    ("extra", f"unexpected keys: {LAYER0}.output.dense.spare"),
    ("double", f"{LAYER0}.intermediate.dense.weight (torch.float64 -> torch.float32)"),
])
def test_streaming_check_fails_a_corrupted_write(bert, tmp_path, monkeypatch, streaming, corruption, named):
    add = checkpoint.ShardedWriter.add

    def corrupt(self, name, tensor):
        if name == f"{LAYER0}.intermediate.dense.weight" and corruption == "rename":
            name = f"{LAYER0}.intermediate.dense.kernel"
        if name == f"{LAYER0}.intermediate.dense.bias" and corruption == "reshape":
            tensor = tensor[:-1]
        if name == f"{LAYER0}.output.dense.{SCALE_BUFFER}" and corruption == "scale":
            tensor = tensor.to(torch.bfloat16)  # a rounded P
        if name == f"{LAYER0}.output.dense.weight" and corruption == "drop":
            return None
        if name == f"{LAYER0}.output.dense.weight" and corruption == "extra":
            add(self, f"{LAYER0}.output.dense.spare", tensor)
        if name == f"{LAYER0}.intermediate.dense.weight" and corruption == "double":
            tensor = tensor.double() + 1e-12  # values float32 cannot hold: the load would round them
        return add(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardedWriter, "add", corrupt)
    result = run("fuse", bert, "--dim", "7", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "does not load clean" in lines[0] and named in lines[0], result.stderr
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]


def test_streaming_check_runs_the_loaded_modules_forward(bert, tmp_path, monkeypatch, streaming):
    """A fused module that ignores P (right tensors, wrong forward) is caught one site at a time."""
    from mlpfuse.remote import modeling_mlpfuse

    monkeypatch.setattr(modeling_mlpfuse.ScaledLinear, "forward",
                        lambda self, x: torch.nn.functional.linear(x, self.weight, self.bias))
    result = run("fuse", bert, "--dim", "7", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "loaded forward differs from its tensors' reference forward: 0" in result.stderr, result.stderr


def test_streaming_check_compares_the_files_with_the_model_in_memory(bert, tmp_path, streaming):
    model = mlpfuse.load(bert, task="masked-lm")
    model.save_pretrained(tmp_path / "saved")
    assert verify_checkpoint(tmp_path / "saved", reference=model) > 0
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0].add_(1.0)
    with pytest.raises(UncleanCheckpoint, match="differ from the model in memory: bert.encoder.layer.1.output.dense.weight"):
        verify_checkpoint(tmp_path / "saved", reference=model)


def test_small_checkpoints_are_loaded_whole(bert, tmp_path, monkeypatch):
    """Below the threshold the check is the real from_pretrained load (the streaming path is not taken)."""
    monkeypatch.setattr(verify, "_check_streaming", lambda *_: pytest.fail("streaming below the threshold"))
    assert run("fuse", bert, "--dim", "7", "-o", tmp_path / "out").exit_code == 0


def test_an_unreadable_written_file_fails_as_our_bug(bert, tmp_path, monkeypatch):
    close = checkpoint.ShardedWriter.close

    def truncating(self):
        files = close(self)
        path = self.directory / files[0]
        path.write_bytes(path.read_bytes()[:100])
        return files

    monkeypatch.setattr(checkpoint.ShardedWriter, "close", truncating)
    result = run("fuse", bert, "--dim", "7", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "does not load clean" in result.stderr and "cannot read weights file" in result.stderr, result.stderr
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]
