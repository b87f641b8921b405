"""An MLP of m distinct neurons each repeated r times, fused to k = m: exact output and Adam NTK, with
every k-means backend (the method's maths, by plain autograd).

That folded clustering (sqrt(P) in both layers) keeps neither, and that the real modules of a
model keep both only with the standalone scale, is tests/test_ntk.py's duplicated-neurons test
(DESIGN.md, paper Sec. 4.3).
"""

from __future__ import annotations

import pytest
import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, get_method

from .conftest import random_mlp, repeat_neurons

DISTINCT, REPEAT, HIDDEN = 6, 3, 16


def repeated_mlp(seed: int = 0) -> MLPWeights:
    base = random_mlp(DISTINCT, HIDDEN, seed=seed)
    return repeat_neurons(base, torch.arange(DISTINCT).repeat_interleave(REPEAT))


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
