"""Structured pruning baseline: keep the k sub-MLPs of largest importance.

Importance of neuron i is ``||W_in[i]|| * ||W_out[:, i]||`` (times ``||W_gate[i]||`` for gated
MLPs): a magnitude proxy for how much the sub-MLP can contribute to the output. Deterministic
(the seed is unused); ties go to the lower index.

Declared in ``catalog.BUILTIN``; the calibrated form is ``methods.calibrated.calibrated_prune``.
"""

from __future__ import annotations

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.methods import MethodOptions, register
from mlpfuse.methods.calibrated import calibrated_prune


def importance(mlp: MLPWeights) -> torch.Tensor:
    """Per-neuron magnitude score (length I)."""
    score = mlp.w_in.double().norm(dim=1) * mlp.w_out.double().norm(dim=0)
    if mlp.w_gate is not None:
        score = score * mlp.w_gate.double().norm(dim=1)
    return score


def calibrated_prune_form(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """Importance measured on the calibration activations, then a ridge refit of the output weight
    (``methods.calibrated.calibrated_prune``)."""
    c = options.calibration
    return calibrated_prune(mlp, k, c.inputs, c.activation, alpha=c.ridge, device=c.device)


@register("prune", calibrated=calibrated_prune_form)
def prune(mlp: MLPWeights, k: int, options: MethodOptions) -> MLPWeights:
    """The k most important sub-MLPs, unchanged, in their original order."""
    score = importance(mlp)
    order = torch.argsort(-score, stable=True)
    keep = order[:k].sort().values
    pruned = mlp.map_neurons(lambda t: t[keep].clone(), lambda w: w[:, keep].clone())
    pruned.stats = {"kept_importance": float(score[keep].sum() / score.sum())}
    return pruned
