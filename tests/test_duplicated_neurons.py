"""An MLP of m distinct neurons each repeated r times, fused to k = m: exact output and Adam NTK.

Folded clustering (sqrt(P) in both layers) keeps neither (DESIGN.md, paper Sec. 4.3).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mlpfuse import FuseSettings, fuse_model
from mlpfuse.methods import MethodOptions, get_method
from mlpfuse.mlp import MLPWeights

from .conftest import tiny_config

DISTINCT, REPEAT, HIDDEN = 6, 3, 16


def repeated_mlp(seed: int = 0) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)
    w_in, b_in = torch.randn(DISTINCT, HIDDEN, generator=g), torch.randn(DISTINCT, generator=g)
    w_out, b_out = torch.randn(HIDDEN, DISTINCT, generator=g), torch.randn(HIDDEN, generator=g)
    return MLPWeights(
        w_in=w_in.repeat_interleave(REPEAT, 0).double(), b_in=b_in.repeat_interleave(REPEAT).double(),
        w_out=w_out.repeat_interleave(REPEAT, 1).double(), b_out=b_out.double(),
    )


def adam_ntk(params: list[torch.Tensor], scalar_fns) -> torch.Tensor:
    """K[a, b] = <grad f_a, sign(grad f_b)> over ``params``, by plain autograd."""
    grads = []
    for fn in scalar_fns:
        g = torch.autograd.grad(fn(), params)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    stacked = torch.stack(grads)
    return stacked @ stacked.sign().T


def mlp_ntk(mlp: MLPWeights, x: torch.Tensor) -> torch.Tensor:
    params = [t.clone().requires_grad_(True) for t in (mlp.w_in, mlp.b_in, mlp.w_out, mlp.b_out)]

    def f(row):
        return lambda: MLPWeights(params[0], params[2], params[1], b_out=params[3], scale=mlp.scale).forward(
            x[row], torch.nn.functional.gelu).sum()

    return adam_ntk(params, [f(i) for i in range(len(x))])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_fusion_is_exact_in_output_and_adam_ntk(backend):
    pytest.importorskip("faiss") if backend == "faiss" else None
    mlp = repeated_mlp()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fused = get_method("fusion")(mlp, DISTINCT, MethodOptions(backend=backend))
    assert sorted(fused.scale.tolist()) == [REPEAT] * DISTINCT
    act = torch.nn.functional.gelu
    assert torch.allclose(fused.forward(x, act), mlp.forward(x, act), atol=1e-10)
    assert torch.allclose(mlp_ntk(fused, x), mlp_ntk(mlp, x), rtol=1e-9, atol=1e-9)


def test_folded_clustering_keeps_neither():
    mlp = repeated_mlp()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clustered = get_method("cluster")(mlp, DISTINCT, MethodOptions(backend="torch"))
    act = torch.nn.functional.gelu
    assert not torch.allclose(clustered.forward(x, act), mlp.forward(x, act), atol=1e-4)
    original, folded = mlp_ntk(mlp, x), mlp_ntk(clustered, x)
    assert (folded - original).norm() / original.norm() > 1e-2


def _bert_with_repeated_layer():
    config = tiny_config("bert", vocab_size=50, hidden_size=HIDDEN, num_attention_heads=2,
                         intermediate_size=DISTINCT * REPEAT, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).double().eval()
    mlp = repeated_mlp()
    layer = model.encoder.layer[0]
    with torch.no_grad():
        layer.intermediate.dense.weight.copy_(mlp.w_in)
        layer.intermediate.dense.bias.copy_(mlp.b_in)
        layer.output.dense.weight.copy_(mlp.w_out)
    return model


def _model_ntk(model, module_names, ids):
    params = [p for n, p in model.named_parameters() if any(n.startswith(m) for m in module_names)]
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fns = [lambda row=row: model(input_ids=ids[row:row + 1]).last_hidden_state[0, 0] @ direction for row in range(len(ids))]
    return adam_ntk(params, fns)


@pytest.mark.parametrize("method, exact", [("fusion", True), ("cluster", False)])
def test_real_modules_keep_the_ntk_only_with_the_standalone_scale(method, exact):
    original = _bert_with_repeated_layer()
    fused = _bert_with_repeated_layer()
    fuse_model(fused, FuseSettings(layers="0", dim=DISTINCT, method=method, backend="torch"))
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(3))
    same_output = torch.allclose(fused(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state, atol=1e-9)
    mlp_modules = ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    k_orig, k_fused = _model_ntk(original, mlp_modules, ids), _model_ntk(fused, mlp_modules, ids)
    same_ntk = torch.allclose(k_fused, k_orig, rtol=1e-7, atol=1e-9)
    assert same_output == exact and same_ntk == exact
