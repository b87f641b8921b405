"""The checkpoint contract: every checkpoint a command writes loads clean, and the load is checked.

Faults of issue 10 each have a test here: GPT-2 merge-layers biases reshaped by transformers' tie
pass (fault 2), the fused class's module hiding checkpoint key renames (fault 3), P rounded in
bf16 (fault 6); plus the load check itself (a corrupted write fails, nothing left behind) and the
Auto-class registration happening when loading, not at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.checkpoints import tensors as checkpoint
from mlpfuse.checkpoints.format import SCALE_BUFFER, base_config_dict, fused_config_dict, write_remote_code
from mlpfuse.checkpoints.modeling import UncleanCheckpoint, verify_checkpoint
from mlpfuse.cli import app
from mlpfuse.remote.modeling_mlpfuse import fused_model_class

from .conftest import TINY, WORDS, build_tiny, save_tokenizer, tiny_config

def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _fresh_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter that imports only what the code imports, stdin closed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, env=env, cwd="/")


def _left_behind(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


# ------------------------------------------------------------------ fault 2: GPT-2 merge-layers

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """tests/conftest.py's tiny GPT-2 (Conv1D's in 32 != out 128) with a tokenizer, and its merge."""
    directory = tmp_path_factory.mktemp("gpt2")
    model, _ = build_tiny("gpt2")
    model.save_pretrained(directory / "src")
    save_tokenizer(directory / "src")
    result = run("merge-layers", directory / "src", "--layers", "0-1", "--no-permute", "-o", directory / "merged")
    assert result.exit_code == 0, result.output
    # what the merged model must compute: both layers use the average of the two MLPs
    expected = transformers.GPT2LMHeadModel.from_pretrained(directory / "src").eval()
    mlps = [expected.transformer.h[i].mlp for i in (0, 1)]
    for name in ("c_fc", "c_proj"):
        for field in ("weight", "bias"):
            mean = (getattr(getattr(mlps[0], name), field) + getattr(getattr(mlps[1], name), field)) / 2
            for mlp in mlps:
                getattr(getattr(mlp, name), field).data.copy_(mean)
    ids = torch.tensor([[1, 7, 12, 30, 4]])
    with torch.no_grad():
        logits = expected(ids).logits
    return directory / "merged", ids, logits


def test_gpt2_merged_layers_load_with_their_bias_shapes_and_the_averaged_mlp(gpt2):
    merged, ids, expected = gpt2
    model = mlpfuse.load(merged, task="causal-lm").eval()
    c_fc, c_proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj
    assert model.transformer.h[1].mlp.c_fc is c_fc
    config = model.config
    assert tuple(c_fc.bias.shape) == (TINY["gpt2"][2],) and tuple(c_proj.bias.shape) == (config.n_embd,)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


# its load through trust_remote_code in a fresh process: tests/test_registry.py's shared load ("gpt2 merged")


# ------------------------------------------------------------------ fault 3: key renames

def test_fused_class_keeps_the_base_module_so_checkpoint_renames_apply(tmp_path):
    """GPT-NeoX hub checkpoints name the head ``embed_out``; transformers renames it to ``lm_head``
    on load, but only for classes it considers its own."""
    base = tiny_config("gpt_neox")
    hidden = base.hidden_size
    cls = fused_model_class(transformers.GPTNeoXForCausalLM)
    assert cls.__module__ == transformers.GPTNeoXForCausalLM.__module__ and not cls.is_custom_code()
    section = {"modules": [
        {"path": "layers.0.mlp.dense_h_to_4h", "type": "linear", "in_features": hidden, "out_features": 6, "bias": True,
         "scaled": False},
        {"path": "layers.0.mlp.dense_4h_to_h", "type": "linear", "in_features": 6, "out_features": hidden, "bias": True,
         "scaled": True},
    ]}
    base.mlpfuse = section
    torch.manual_seed(0)
    model = cls(base)
    directory = tmp_path / "neox"
    directory.mkdir()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["embed_out.weight"] = tensors.pop("lm_head.weight")  # as hub checkpoints name it
    tensors["gpt_neox.layers.0.mlp.dense_4h_to_h." + SCALE_BUFFER] = torch.arange(1.0, 7.0)
    save_file(tensors, directory / "model.safetensors",
              metadata={"format": "pt"})
    config = base_config_dict(json.loads(base.to_json_string()))
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (directory / "config.json").write_text(json.dumps(fused_config_dict(config, section)))
    write_remote_code(directory)

    loaded = mlpfuse.load(directory, task="causal-lm")
    assert torch.equal(loaded.lm_head.weight, tensors["embed_out.weight"])  # not a random head
    assert torch.equal(loaded.gpt_neox.layers[0].mlp.dense_4h_to_h.fusion_scale, torch.arange(1.0, 7.0))
    assert verify_checkpoint(directory) > 0


# ------------------------------------------------------------------ fault 6: P exact in bf16

def _duplicated_llama(directory: Path, sizes=(257, 343)) -> torch.nn.Module:
    """A one-layer LLaMA whose MLP is len(sizes) distinct neurons, repeated ``sizes`` times."""
    model, _ = build_tiny("llama", intermediate_size=sum(sizes), num_hidden_layers=1)
    mlp, hidden = model.model.layers[0].mlp, model.config.hidden_size
    repeats = torch.tensor(sizes)
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight.copy_(torch.randn(len(sizes), hidden).repeat_interleave(repeats, 0))
        mlp.down_proj.weight.copy_(torch.randn(hidden, len(sizes)).repeat_interleave(repeats, 1) / repeats.repeat_interleave(repeats))
    model.save_pretrained(directory)
    return model


@pytest.mark.slow
def test_cluster_sizes_stay_exact_in_bfloat16_on_disk_after_load_and_after_to(tmp_path):
    original = _duplicated_llama(tmp_path / "src")
    out = tmp_path / "bf16"
    result = run("fuse", tmp_path / "src", "--dim", "2", "--dtype", "bfloat16", "--backend", "torch", "-o", out)
    assert result.exit_code == 0, result.output
    stored = load_file(str(out / "model.safetensors"))
    scale_key = next(k for k in stored if k.endswith(SCALE_BUFFER))
    assert stored[scale_key].dtype == torch.float32 and sorted(stored[scale_key].tolist()) == [257.0, 343.0]
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16

    model = mlpfuse.load(out, task="causal-lm", dtype=torch.bfloat16).eval()
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.bfloat16
    assert down.fusion_scale.dtype == torch.float32 and sorted(down.fusion_scale.tolist()) == [257.0, 343.0]
    model.to(torch.float16).to(torch.bfloat16)
    assert down.fusion_scale.dtype == torch.float32 and sorted(down.fusion_scale.tolist()) == [257.0, 343.0]
    ids = torch.tensor([[3, 9, 14, 20]])
    with torch.no_grad():
        logits = model(ids).logits
        reference = original.to(torch.bfloat16)(ids).logits
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), reference.float(), atol=0.05)

    # the same in a fresh process through trust_remote_code: tests/test_registry.py's shared load ("llama bf16")


# ------------------------------------------------------------------ the load check itself

@pytest.fixture
def bert(tmp_path):
    build_tiny("bert")[0].save_pretrained(tmp_path / "src")
    save_tokenizer(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("corruption, named", [
    ("rename", "missing keys"),
    ("reshape", "bert.encoder.layer.0.intermediate.dense.bias"),
    ("scale", "bert.encoder.layer.0.output.dense.fusion_scale"),
])
def test_a_corrupted_write_fails_as_our_bug_and_leaves_nothing(bert, tmp_path, monkeypatch, corruption, named):
    add = checkpoint.ShardedWriter.add

    def corrupt(self, name, tensor):
        if name == "bert.encoder.layer.0.intermediate.dense.weight" and corruption == "rename":
            name = "bert.encoder.layer.0.intermediate.dense.kernel"
        if name == "bert.encoder.layer.0.intermediate.dense.bias" and corruption == "reshape":
            tensor = tensor[:-1]
        if name.endswith(f"layer.0.output.dense.{SCALE_BUFFER}") and corruption == "scale":
            tensor = tensor.to(torch.bfloat16)  # a rounded P
        return add(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardedWriter, "add", corrupt)
    result = run("fuse", bert, "--dim", "7", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "does not load clean" in lines[0] and named in lines[0], result.stderr
    assert _left_behind(tmp_path, "out") == []


def test_merge_and_fuse_outputs_pass_the_check_and_name_their_fused_layers(bert, tmp_path):
    calibration = tmp_path / "cal.tsv"
    calibration.write_text("sentence\n" + "\n".join(" ".join(WORDS[(i * j) % 40] for j in range(8)) for i in range(12)) + "\n")
    assert run("fuse", bert, "--dim", "7", "-o", tmp_path / "f").exit_code == 0
    result = run("merge-layers", tmp_path / "f", "--layers", "0-1", "--calibration", calibration, "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert verify_checkpoint(tmp_path / "m") > 0


def test_the_check_compares_the_reload_with_the_model_in_memory(bert, tmp_path):
    model = mlpfuse.load(bert, task="masked-lm")
    model.save_pretrained(tmp_path / "saved")
    assert verify_checkpoint(tmp_path / "saved", reference=model) > 0
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0].add_(1.0)  # the saved files no longer match
    with pytest.raises(UncleanCheckpoint, match="differ from the model in memory"):
        verify_checkpoint(tmp_path / "saved", reference=model)


# ------------------------------------------------------------------ registration when loading

@pytest.mark.slow
def test_import_registers_nothing_and_load_registers_once(bert, tmp_path):
    assert run("fuse", bert, "--dim", "7", "-o", tmp_path / "f").exit_code == 0
    proc = _fresh_python(f"""
        import sys
        sys.path.insert(0, {str(Path(mlpfuse.__file__).parent.parent)!r})
        import mlpfuse, mlpfuse.checkpoints.modeling
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        print("mlpfuse" in CONFIG_MAPPING)
        mlpfuse.load({str(tmp_path / "f")!r})
        mlpfuse.load({str(tmp_path / "f")!r}, task="masked-lm")
        print("mlpfuse" in CONFIG_MAPPING)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]


def test_the_fuse_check_runs_each_loaded_fused_mlp_against_its_tensors(bert, tmp_path, monkeypatch):
    """A loaded module that ignores P (a wrong forward, right tensors) is caught by the site check."""
    from mlpfuse.remote import modeling_mlpfuse

    monkeypatch.setattr(modeling_mlpfuse.ScaledLinear, "forward",
                        lambda self, x: torch.nn.functional.linear(x, self.weight, self.bias))
    result = run("fuse", bert, "--dim", "7", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "loaded forward differs from its tensors' reference forward: 0" in result.stderr, result.stderr
    assert _left_behind(tmp_path, "out") == []
