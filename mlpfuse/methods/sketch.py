"""Sketching baseline: a Gaussian Johnson-Lindenstrauss sketch of the intermediate dimension.

With ``S`` an [I, k] matrix of i.i.d. N(0, 1/k) entries (so ``E[S S^T] = Id``), the k-wide MLP is
``act(X W1 S + b1 S) S^T W2 + b2``: ``W_in~ = S^T W_in``, ``b_in~ = S^T b_in`` (gate likewise) and
``W_out~ = W_out S``. The sketch is linear, the activation is not, hence the large output error
the paper reports for it. Seeded by ``options.seed``.

Declared in ``catalog.BUILTIN`` (no calibrated form).
"""

from __future__ import annotations

import math

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, register


def gaussian_sketch(width: int, k: int, seed: int) -> torch.Tensor:
    """[width, k] matrix with N(0, 1/k) entries (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, k, generator=generator, dtype=torch.float64) / math.sqrt(k)


@register("sketch")
def sketch(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Project the I sub-MLPs onto k random Gaussian combinations."""
    s = gaussian_sketch(mlp.width, k, options.seed)

    def project_in(t: torch.Tensor) -> torch.Tensor:  # [I, ...] -> [k, ...]
        return torch.tensordot(s.T, t.double(), dims=1).to(t.dtype)

    return mlp.map_neurons(project_in, lambda w: (w.double() @ s).to(w.dtype))
