"""MMD baseline: k support points that minimise the MMD to the distribution of the I sub-MLPs.

Each sub-MLP is a point ``w_i`` (a row of ``MLPWeights.neuron_features``). The k support points
``z_j`` minimise the squared maximum mean discrepancy with a Gaussian kernel (bandwidth: the
median pairwise distance of the ``w_i``) between the empirical distributions of the ``w_i`` and
the ``z_j``, by Adam from a seeded random subset of the ``w_i``. The sum over I sub-MLPs becomes
``(I / k) * sum_j``: the constant factor ``p_I / k`` of the paper, kept as the standalone scale P
(uniform), as fusion keeps its cluster sizes.

Declared in ``catalog.BUILTIN`` (no calibrated form).
"""

from __future__ import annotations

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, register

STEPS = 100
LEARNING_RATE = 0.05  # times the features' standard deviation


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 by one matrix product (its backward is much cheaper than cdist's)."""
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def mmd_squared(x: torch.Tensor, z: torch.Tensor, gamma: float, xx_mean: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 estimate between samples ``x`` and ``z`` with kernel exp(-gamma ||a - b||^2)."""
    kxz = torch.exp(-gamma * squared_distances(x, z)).mean()
    kzz = torch.exp(-gamma * squared_distances(z, z)).mean()
    return xx_mean - 2 * kxz + kzz


def support_points(x: torch.Tensor, k: int, seed: int, steps: int = STEPS) -> tuple[torch.Tensor, float]:
    """k points minimising MMD^2 to the rows of ``x``; returns (points, final MMD^2)."""
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    start = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    with torch.no_grad():
        squared = squared_distances(x, x)
        gamma = 1.0 / squared[squared > 0].median().clamp_min(1e-12).item()
        xx_mean = torch.exp(-gamma * squared).mean()
    z = start.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=LEARNING_RATE * x.std().item())
    for _ in range(steps):
        optimizer.zero_grad()
        loss = mmd_squared(x, z, gamma, xx_mean)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = mmd_squared(x, z, gamma, xx_mean).item()
    return z.detach(), final


def _from_features(mlp: MLPWeights, z: torch.Tensor) -> dict:
    """Split feature rows back into the fields ``neuron_features`` concatenated (same order)."""
    fields, column = {}, 0
    for weight_name, bias_name in (("w_gate", "b_gate"), ("w_in", "b_in")):
        weight, bias = getattr(mlp, weight_name), getattr(mlp, bias_name)
        if weight is not None:
            fields[weight_name] = z[:, column:column + weight.shape[1]].to(weight.dtype).contiguous()
            column += weight.shape[1]
        if bias is not None:
            fields[bias_name] = z[:, column].to(bias.dtype).contiguous()
            column += 1
    fields["w_out"] = z[:, column:].T.to(mlp.w_out.dtype).contiguous()
    return fields


@register("mmd")
def mmd(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Support points of the sub-MLP distribution with the uniform scale I / k."""
    z, final = support_points(mlp.neuron_features(), k, options.seed)
    result = MLPWeights(b_out=mlp.b_out, **_from_features(mlp, z))
    result.scale = torch.full((k,), mlp.width / k, dtype=torch.float32)
    result.stats = {"mmd2": final}
    return result
