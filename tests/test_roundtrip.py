"""Save / load round trips, determinism, sharding, dtype, PEFT names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mlpfuse
from mlpfuse import FuseSettings, fuse_checkpoint

from .conftest import model_inputs, outputs_of


def _fuse(source, out, **kw):
    settings = FuseSettings(**{"layers": "all", "dim": 9, **kw})
    return fuse_checkpoint(str(source), out, settings)


def test_load_and_save_pretrained_round_trip_keeps_logits_and_scale_bits(tiny_checkpoint, tmp_path):
    source, _, task = tiny_checkpoint("roberta")
    _fuse(source, tmp_path / "fused")
    first = mlpfuse.load(tmp_path / "fused", task=task).eval()
    first.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "mlpfuse"
    second = mlpfuse.load(tmp_path / "again", task=task).eval()
    inputs = model_inputs("roberta")
    assert torch.equal(outputs_of(first, inputs), outputs_of(second, inputs))
    scales = lambda m: {n: b for n, b in m.named_buffers() if n.endswith("fusion_scale")}  # noqa: E731
    assert scales(first) and all(torch.equal(scales(first)[n], scales(second)[n]) for n in scales(first))
    on_disk = load_file(str(tmp_path / "fused" / "model.safetensors"))
    disk_scales = {k: v for k, v in on_disk.items() if k.endswith("fusion_scale")}
    assert len(disk_scales) == 2 and all(v.sum().item() == 40 for v in disk_scales.values())


# The trust_remote_code load in a process without mlpfuse (narrow checkpoints of bert, roberta, gpt2,
# llama) and its refusal without trust_remote_code: tests/test_registry.py's one shared fresh process.


def test_same_seed_gives_byte_identical_weights_and_another_seed_does_not(tiny_checkpoint, tmp_path):
    source, _, _ = tiny_checkpoint("llama")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        _fuse(source, tmp_path / name, seed=seed)
    read = lambda name: (tmp_path / name / "model.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")


def test_sharded_output_has_an_index_and_loads_the_same(tiny_checkpoint, tmp_path):
    source, _, task = tiny_checkpoint("gpt2")
    _fuse(source, tmp_path / "single")
    _fuse(source, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    inputs = model_inputs("gpt2")
    a = outputs_of(mlpfuse.load(tmp_path / "single", task=task).eval(), inputs)
    b = outputs_of(mlpfuse.load(tmp_path / "sharded", task=task).eval(), inputs)
    assert torch.equal(a, b)


def test_sharded_input_is_read(tiny_checkpoint, tmp_path):
    _, model, task = tiny_checkpoint("llama")
    model.save_pretrained(tmp_path / "src-sharded", max_shard_size="20KB")
    assert (tmp_path / "src-sharded" / "model.safetensors.index.json").is_file()
    _fuse(tmp_path / "src-sharded", tmp_path / "out", dim=44, allow_full_width=True)
    inputs = model_inputs("llama")
    assert torch.allclose(outputs_of(mlpfuse.load(tmp_path / "out", task=task).eval(), inputs),
                          outputs_of(model, inputs), atol=1e-5)


def test_legacy_bin_input_is_read(tiny_checkpoint, tmp_path):
    source, model, task = tiny_checkpoint("bert")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((source / "config.json").read_text())
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    _fuse(legacy, tmp_path / "out", dim=37, allow_full_width=True)
    inputs = model_inputs("bert")
    assert torch.allclose(outputs_of(mlpfuse.load(tmp_path / "out", task=task).eval(), inputs),
                          outputs_of(model, inputs), atol=1e-5)


def test_output_dtype_is_applied(tiny_checkpoint, tmp_path):
    source, _, task = tiny_checkpoint("qwen2")
    _fuse(source, tmp_path / "bf16", dtype="bfloat16")
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for k, t in tensors.items() if not k.endswith("fusion_scale")} == {torch.bfloat16}
    assert {t.dtype for k, t in tensors.items() if k.endswith("fusion_scale")} == {torch.float32}  # P exact
    model = mlpfuse.load(tmp_path / "bf16", task=task)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_peft_lora_targets_still_match_fused_modules(tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    source, _, task = tiny_checkpoint("llama")
    _fuse(source, tmp_path / "fused")
    model = mlpfuse.load(tmp_path / "fused", task=task)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["up_proj", "down_proj", "gate_proj"]))
    wrapped = [n for n, m in lora.named_modules() if n.endswith("mlp.down_proj") and hasattr(m, "lora_A")]
    assert len(wrapped) == 2
    inputs = model_inputs("llama")
    loss = lora(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
