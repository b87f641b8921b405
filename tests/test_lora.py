"""LoRA (PEFT) on fused projections: merged outputs equal unmerged ones (docs/deploy.md)."""

from __future__ import annotations

import pytest
import torch

import mlpfuse
from mlpfuse.compress.fuse import FuseSettings, fuse_model
from mlpfuse.remote.modeling_mlpfuse import ScaledConv1D, ScaledLinear

from .conftest import build_tiny, model_inputs, outputs_of

peft = pytest.importorskip("peft")

# family -> LoRA targets covering every fused projection (the scaled down projection included)
TARGETS = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc", "c_proj"]}
SCALED = {"llama": ScaledLinear, "gpt2": ScaledConv1D}


def _fused(name: str):
    model, task = build_tiny(name)
    width = model.config.to_dict().get("intermediate_size") or model.config.n_inner or 4 * model.config.n_embd
    fuse_model(model, FuseSettings(dim=width // 3, seed=0))
    assert any(isinstance(m, SCALED[name]) for m in model.modules())
    return model, task


def _train_lora(model, name: str, steps: int = 3):
    """A few real optimizer steps so the adapter's update is far from zero (B starts at zero)."""
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name]))
    inputs = model_inputs(name)
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=0.05)
    lora.train()
    for _ in range(steps):
        loss = lora(**inputs).logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return lora.eval()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_merge_and_unload_on_fused_model_equals_unmerged(name):
    model, _ = _fused(name)
    lora = _train_lora(model, name)
    inputs = model_inputs(name)
    unmerged = outputs_of(lora, inputs)
    with lora.disable_adapter():
        without = outputs_of(lora, inputs)
    assert (unmerged - without).abs().max() > 1e-2, "the adapter must change the outputs for the test to mean anything"
    merged = lora.merge_and_unload()
    assert (outputs_of(merged, inputs) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_adapter_saved_then_merged_in_a_new_model_survives_save_and_reload(name, tmp_path):
    """The deployment path: save the adapter, load fused model + adapter afresh, merge, save, reload."""
    model, task = _fused(name)
    fused_dir, adapter_dir, merged_dir = tmp_path / "fused", tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(fused_dir)
    lora = _train_lora(model, name)
    inputs = model_inputs(name)
    unmerged = outputs_of(lora, inputs)
    lora.save_pretrained(adapter_dir)

    fresh = peft.PeftModel.from_pretrained(mlpfuse.load(fused_dir, task=task), adapter_dir).eval()
    assert (outputs_of(fresh, inputs) - unmerged).abs().max() < 1e-5
    merged = fresh.merge_and_unload(safe_merge=True)
    merged.save_pretrained(merged_dir)
    reloaded = mlpfuse.load(merged_dir, task=task).eval()
    assert (outputs_of(reloaded, inputs) - unmerged).abs().max() < 1e-5


def test_unmerge_restores_the_fused_weights():
    model, _ = _fused("llama")
    lora = _train_lora(model, "llama")
    down = lora.base_model.model.model.layers[0].mlp.down_proj
    before = down.get_base_layer().weight.detach().clone()
    down.merge()
    assert not torch.allclose(down.get_base_layer().weight, before)
    down.unmerge()
    assert torch.allclose(down.get_base_layer().weight, before, atol=1e-6)


def test_dora_merge_on_a_fused_projection_is_refused():
    model, _ = _fused("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, use_dora=True, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="fused projection"):
        lora.merge_and_unload()


@pytest.mark.slow
def test_exact_merge_with_only_transformers_and_peft_through_trust_remote_code(tmp_path):
    """The hook ships in the checkpoint's own code: no mlpfuse import needed for an exact merge."""
    import subprocess
    import sys

    model, _ = _fused("gpt2")
    model.save_pretrained(tmp_path / "fused")
    code = (
        "import sys, torch, transformers, peft\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "assert 'mlpfuse' not in sys.modules\n"
        "lora = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=['c_proj'], fan_in_fan_out=True))\n"
        "torch.manual_seed(0)\n"
        "for n, p in lora.named_parameters():\n"
        "    if 'lora_B' in n: torch.nn.init.normal_(p, std=0.5)\n"
        "ids = torch.tensor([[5, 6, 7, 8]])\n"
        "with torch.no_grad():\n"
        "    before = lora(input_ids=ids).logits\n"
        "    after = lora.merge_and_unload()(input_ids=ids).logits\n"
        "print((after - before).abs().max().item())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fused")], check=False, capture_output=True, text=True,
                            cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
