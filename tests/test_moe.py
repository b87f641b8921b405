"""Expert-wise fusion of Mixture-of-Experts models (tiny random configs, CPU). See docs/moe.md."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.checkpoints.tensors import CheckpointReader
from mlpfuse.cli import app
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint, fuse_model
from mlpfuse.errors import InputError

from .conftest import MOE_E as E
from .conftest import MOE_FAMILIES as FAMILIES
from .conftest import MOE_H as H
from .conftest import MOE_I as I
from .conftest import MOE_SHARED_I as SHARED_I
from .conftest import TINY, build_tiny

TASK = {family: TINY[family][1] for family in FAMILIES}


def _model(family: str):
    """tests/conftest.py's tiny model of ``family``, its expert weights drawn wider."""
    model, _ = build_tiny(family)
    with torch.no_grad():  # spread expert weights so k-means has real clusters
        for name, param in model.named_parameters():
            if "expert" in name:
                param.normal_(0, 0.5)
    return model


def _run(model, ids):
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True, **kwargs)
    routers = out.encoder_router_logits if model.config.is_encoder_decoder else out.router_logits
    routers = [r[0] if isinstance(r, tuple) else r for r in routers if r is not None]
    routers = [r for r in routers if r is not None and r.numel()]
    return out.logits, routers


def _ids():
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def _routers(names):
    return [n for n in names if ".gate.weight" in n and "gate_proj" not in n and "shared" not in n or "router" in n]


def test_every_registered_moe_family_is_tested_here():
    moe = {t for spec in mlpfuse.arch.ARCHITECTURES if any(s.experts for s in spec.sites) for t in spec.model_types}
    assert moe == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_is_exact(family):
    model = _model(family)
    ids = _ids()
    logits, routers = _run(model, ids)
    fused = copy.deepcopy(model)
    report = fuse_model(fused, FuseSettings(ratio=1.0, allow_full_width=True, backend="torch"))
    sparse = [layer for layer in report.layers if layer.experts]
    assert len(sparse) == (4 if family == "switch_transformers" else 2)
    new_logits, new_routers = _run(fused, ids)
    torch.testing.assert_close(new_logits, logits, atol=1e-5, rtol=1e-5)
    assert len(new_routers) == len(routers) > 0
    for a, b in zip(new_routers, routers):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _expected_saving(family: str, k: int, sparse_layers: int, experts: int = E, shared_k: int | None = None) -> int:
    matrices = 2 if family == "switch_transformers" else 3
    saving = sparse_layers * experts * matrices * H * (I - k)
    if family == "qwen2_moe":
        saving += sparse_layers * matrices * H * (SHARED_I - shared_k)
    return saving


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved with save_pretrained (per-expert names on disk)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family in FAMILIES:
        model = _model(family)
        model.save_pretrained(root / family)
        out[family] = (root / family, model)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_checkpoint_loads_with_same_routers(family, saved, tmp_path):
    source, model = saved[family]
    k = 5
    # Switch: only its sparse blocks (encoder.1, encoder.3, decoder.1, decoder.3), so that its first
    # router sees unchanged inputs; its dense blocks are ordinary sites, fused only when named
    layers = "1,3,5,7" if family == "switch_transformers" else "all"
    report = fuse_checkpoint(str(source), tmp_path / "out", FuseSettings(dim=k, layers=layers, seed=0, backend="torch"))
    sparse = 4 if family == "switch_transformers" else 2
    assert len(report.layers) == sparse
    assert sum(len(layer.experts) for layer in report.layers) == sparse * (E + (family == "qwen2_moe"))
    for entry in (e for layer in report.layers for e in layer.experts):
        assert entry["inertia"] is not None and entry["kmeans_seconds"] is not None and entry["width"] <= entry["original_width"]
    params = report.parameters
    assert 0 < params["expert_share_after"] < params["expert_share_before"] < 1

    # router tensors are byte-identical to the input
    src, out = CheckpointReader(source), CheckpointReader(tmp_path / "out")
    routers = _routers(src.keys())
    assert routers
    for name in routers:
        assert torch.equal(src.get(name), out.get(name)) and src.get(name).dtype == out.get(name).dtype

    loaded = mlpfuse.load(tmp_path / "out", task=TASK[family]).eval()
    shared_k = min(k, SHARED_I)  # --dim applies to the shared expert too
    saving = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in loaded.parameters())
    assert saving == _expected_saving(family, k, sparse, shared_k=shared_k)
    assert params["before"] - params["after"] == saving

    ids = _ids()
    logits, routers_ref = _run(model, ids)
    new_logits, routers_new = _run(loaded, ids)
    assert torch.isfinite(new_logits).all() and not torch.allclose(new_logits, logits)
    torch.testing.assert_close(routers_new[0], routers_ref[0], atol=1e-5, rtol=1e-5)

    # save_pretrained round trip: same logits, P buffers bit for bit
    loaded.save_pretrained(tmp_path / "again")
    again = mlpfuse.load(tmp_path / "again", task=TASK[family]).eval()
    torch.testing.assert_close(_run(again, ids)[0], new_logits, atol=0, rtol=0)
    scales = {n: b for n, b in loaded.named_buffers() if n.endswith("fusion_scale")}
    assert scales
    again_buffers = dict(again.named_buffers())
    for name, buffer in scales.items():
        assert torch.equal(again_buffers[name], buffer)
        assert buffer.sum(-1).eq(I if "shared" not in name else SHARED_I).all()  # cluster sizes add up


# A narrow Mixtral through trust_remote_code in a fresh process: tests/test_registry.py's shared load.


def test_switch_sparse_layers_fused_dense_layers_untouched(saved, tmp_path):
    source, _ = saved["switch_transformers"]
    config = json.loads((source / "config.json").read_text())
    sites = mlpfuse.arch.resolve_sites(mlpfuse.arch.lookup("switch_transformers"), config)
    sparse = [s.index for s in sites if s.experts]
    assert [sites[i].label for i in sparse] == ["encoder.1", "encoder.3", "decoder.1", "decoder.3"]
    fuse_checkpoint(str(source), tmp_path / "out", FuseSettings(dim=6, layers=",".join(map(str, sparse)), backend="torch"))
    src, out = CheckpointReader(source), CheckpointReader(tmp_path / "out")
    for stack in ("encoder", "decoder"):
        assert out.shape(f"{stack}.block.1.layer.{1 if stack == 'encoder' else 2}.mlp.experts.expert_0.wi.weight") == (6, H)
    dense = [k for k in src.keys() if ".mlp.wi." in k or ".mlp.wo." in k]
    assert len(dense) == 8
    for name in dense:
        assert torch.equal(src.get(name), out.get(name))
    with pytest.raises(InputError):  # the dense layers are fusable too, but only at a width they have
        fuse_checkpoint(str(source), tmp_path / "bad", FuseSettings(dim=I + 1, layers="0"))


def test_expert_subset_gives_per_expert_widths(saved, tmp_path):
    source, model = saved["qwen2_moe"]
    report = fuse_checkpoint(str(source), tmp_path / "out", FuseSettings(dim=I, experts="0,3", allow_full_width=True, backend="torch"))
    assert [e["expert"] for e in report.layers[0].experts] == ["0.e0", "0.e3"]
    loaded = mlpfuse.load(tmp_path / "out", task="causal-lm").eval()
    experts = loaded.model.layers[0].mlp.experts
    assert [type(e.down).__name__ for e in experts] == ["ScaledLinear", "Linear", "Linear", "ScaledLinear"]
    ids = _ids()
    torch.testing.assert_close(_run(loaded, ids)[0], _run(model, ids)[0], atol=1e-5, rtol=1e-5)  # k == I: exact

    fuse_checkpoint(str(source), tmp_path / "narrow", FuseSettings(dim=3, experts="1,shared", backend="torch"))
    narrow = mlpfuse.load(tmp_path / "narrow", task="causal-lm").eval()
    assert [e.down.in_features for e in narrow.model.layers[1].mlp.experts] == [I, 3, I, I]
    assert narrow.model.layers[1].mlp.shared_expert.down_proj.in_features == 3
    assert torch.isfinite(_run(narrow, ids)[0]).all()


def test_stacked_tensors_on_disk_read_like_per_expert(saved, tmp_path):
    source, model = saved["olmoe"]
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((source / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stacked / "model.safetensors"))
    with safe_open(str(stacked / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.mlp.experts.gate_up_proj" in handle.keys()
    settings = FuseSettings(dim=4, backend="torch", seed=3)
    fuse_checkpoint(str(stacked), tmp_path / "a", settings)
    fuse_checkpoint(str(source), tmp_path / "b", settings)
    a, b = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "b")
    for name in ("model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.fusion_scale"):
        assert torch.equal(a.get(name), b.get(name))


def test_fused_mixtral_trains_with_p_constant():
    model = _model("mixtral").train()
    fuse_model(model, FuseSettings(dim=6, backend="torch"))
    scales = {n: b.clone() for n, b in model.named_buffers() if n.endswith("fusion_scale")}
    assert len(scales) == 2
    batch = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert model.model.layers[0].mlp.experts.down_proj.grad is not None
    for name, buffer in model.named_buffers():
        if name in scales:
            assert torch.equal(buffer, scales[name])


def test_bad_experts_value_is_one_line_error(saved, tmp_path):
    source, _ = saved["mixtral"]
    for bad in ("9", "x", "shared"):
        with pytest.raises(InputError):
            fuse_checkpoint(str(source), tmp_path / "out", FuseSettings(dim=4, experts=bad))
    assert not (tmp_path / "out").exists()


def test_cli_reports_per_expert(saved, tmp_path):
    source, _ = saved["qwen2_moe"]
    result = CliRunner().invoke(app, [
        "fuse", str(source), "--dim", "4", "--experts", "0,shared", "--backend", "torch",
        "-o", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [e["expert"] for e in report["layers"][0]["experts"]] == ["0.e0", "0.shared"]
    assert "expert_share_after" in report["parameters"]
    assert "0.e0" in result.output
    bad = CliRunner().invoke(app, ["fuse", str(source), "--dim", "4", "--experts", "7", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "out of range" in bad.output and "Traceback" not in bad.output
