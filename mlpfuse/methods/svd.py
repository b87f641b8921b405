"""Truncated-SVD baseline: every projection of the MLP becomes a rank-r product ``B @ A``.

The intermediate width I is kept; each weight ``W`` [out, in] is replaced by its best rank-r
approximation, stored as factors ``A = sqrt(S_r) V_r^T`` [r, in] and ``B = U_r sqrt(S_r)`` [out, r]
(a ``lowrank`` module in checkpoints, see ``remote/modeling_mlpfuse.LowRankLinear``). Biases stay.

Parameter matching: ``r`` is the largest rank whose parameter count does not exceed that of a
k-wide fused MLP, i.e. for a plain MLP ``2 r (p + I) + I + p <= 2 k p + k + p`` (p hidden, I
intermediate); for MiniLM (p = 384, I = 1536) at k = 384, r = 76. Deterministic.

Declared in ``catalog.BUILTIN`` (it writes no packed ``gate_up`` or stacked expert tensors: the
factors are stored as a ``lowrank`` module per projection); the calibrated form is
``methods.calibrated.calibrated_svd`` at the same rank.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, register
from mlpfuse.methods.calibrated import calibrated_svd

WEIGHTS = ("w_gate", "w_in", "w_out")
NEURON_BIASES = ("b_in", "b_gate")


def _present(mlp: MLPWeights, names) -> list[torch.Tensor]:
    return [getattr(mlp, name) for name in names if getattr(mlp, name) is not None]


def fused_parameter_count(mlp: MLPWeights, k: int) -> int:
    """Parameters of a k-wide MLP of the same form (what fusion at width k keeps)."""
    weights = len(_present(mlp, WEIGHTS)) * k * mlp.hidden
    biases = len(_present(mlp, NEURON_BIASES)) * k + (mlp.hidden if mlp.b_out is not None else 0)
    return weights + biases


def matched_rank(mlp: MLPWeights, k: int) -> int:
    """Largest rank r >= 1 whose factorised MLP has at most the fused parameter count at width k."""
    width, hidden = mlp.width, mlp.hidden
    fixed = len(_present(mlp, NEURON_BIASES)) * width + (hidden if mlp.b_out is not None else 0)
    per_rank = len(_present(mlp, WEIGHTS)) * (width + hidden)
    rank = (fused_parameter_count(mlp, k) - fixed) // per_rank
    return int(max(1, min(rank, width, hidden)))


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with ``B @ A`` the best rank-r approximation of ``weight``."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def calibrated_svd_form(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Activation-aware factors and an output refit (``methods.calibrated.calibrated_svd``), rank
    matched to k as :func:`svd`."""
    c = options.calibration
    return calibrated_svd(mlp, matched_rank(mlp, k), c.inputs, c.activation, alpha=c.ridge, device=c.device)


@register("svd", calibrated=calibrated_svd_form)
def svd(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Rank-r factorisations of all projections, r matched to fusion's parameter count at k."""
    rank = matched_rank(mlp, k)
    factors, dense = {}, {}
    for name in WEIGHTS:
        weight = getattr(mlp, name)
        if weight is None:
            continue
        first, second = low_rank_factors(weight, rank)
        factors[name] = (first, second)
        dense[name] = (second.double() @ first.double()).to(weight.dtype)
    return replace(mlp, **dense, scale=None, stats={"rank": rank}, low_rank=factors)
