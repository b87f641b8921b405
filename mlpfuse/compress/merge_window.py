"""``merge-layers``: the windows of adjacent layers to merge, and the neuron maths of merging them.

Neurons of two layers are matched by the correlation of their pre-activations on calibration text
(a linear assignment, scipy's ``linear_sum_assignment``), permuted to match, and averaged; the
fusion scale P of a fused input is folded in first. Linear CKA measures how alike layers are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from scipy.optimize import linear_sum_assignment

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.compress.plan import parse_layers
from mlpfuse.errors import InputError


@dataclass
class LayerAlignment:
    index: int
    label: str
    correlation_before: float | None  # mean correlation with the anchor's neuron of the same index
    correlation_after: float | None  # ... with the anchor's neuron it was assigned to


def stack_of(site) -> str:
    """The stack (encoder, decoder, layer) a site belongs to, from its label."""
    return site.label.rpartition(".")[0]


def windows(sites: list[MLPSite], k: int) -> list[list[MLPSite]]:
    """Every run of ``k`` adjacent sites within one stack (encoder and decoder never mix)."""
    out = []
    for start in range(len(sites) - k + 1):
        run = sites[start:start + k]
        if len({stack_of(s) for s in run}) == 1 and not any(getattr(s, "experts", None) for s in run):
            out.append(run)
    return out


def window_from_layers(sites: list[MLPSite], layers) -> list[MLPSite]:
    """The sites of an explicit ``--layers`` window; InputError unless 2+ adjacent layers of one stack."""
    chosen = parse_layers(layers, len(sites))
    if len(chosen) < 2:
        raise InputError(f"--layers {layers!r} names {len(chosen)} layer; merging needs at least 2 adjacent layers, e.g. 2-3")
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise InputError(f"--layers {layers!r} are not adjacent; give a contiguous range such as {chosen[0]}-{chosen[0] + 1}")
    run = [sites[i] for i in chosen]
    if any(getattr(s, "experts", None) for s in run):
        raise InputError(f"--layers {layers!r} includes mixture-of-experts layers; merge-layers handles dense MLPs only")
    if len({stack_of(s) for s in run}) != 1:
        raise InputError(f"--layers {layers!r} spans two stacks ({run[0].label} .. {run[-1].label}); merge within one stack")
    return run


def fold_scale(mlp: MLPWeights) -> MLPWeights:
    """The same MLP with a fusion scale P folded into ``w_out`` (so neurons can be permuted and averaged)."""
    if mlp.scale is None:
        return mlp
    return replace(mlp, w_out=mlp.w_out * mlp.scale.to(mlp.w_out.dtype)[None, :], scale=None, stats={})


def permute_mlp(mlp: MLPWeights, perm: torch.Tensor) -> MLPWeights:
    """Neuron ``i`` of the result is neuron ``perm[i]`` of ``mlp`` (rows of W_in/W_gate/b, columns of W_out)."""
    mlp = fold_scale(mlp)
    return mlp.map_neurons(lambda t: t[perm], lambda w: w[:, perm])


def average_mlps(mlps: list[MLPWeights]) -> MLPWeights:
    """Element-wise mean of MLPs of one shape (scales folded first)."""
    mlps = [fold_scale(m) for m in mlps]
    shapes = {(m.width, m.hidden, m.gated) for m in mlps}
    if len(shapes) != 1:
        raise InputError(f"cannot merge layers of different shapes (width, hidden, gated): {sorted(shapes)}")

    def mean(name):
        values = [getattr(m, name) for m in mlps]
        if any(v is None for v in values):
            return None
        return torch.stack([v.double() for v in values]).mean(0).to(values[0].dtype)

    return MLPWeights(**{name: mean(name) for name in ("w_in", "w_out", "b_in", "w_gate", "b_gate", "b_out")})


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [I, J] between the columns of ``a`` [N, I] and ``b`` [N, J] (constant columns give 0)."""
    def standardise(x):
        x = x.double()
        x = x - x.mean(0)
        return x / x.norm(dim=0).clamp_min(1e-12)

    return (standardise(a).T @ standardise(b)).float()


def align(anchor: torch.Tensor, other: torch.Tensor, anchor_gate=None, other_gate=None) -> tuple[torch.Tensor, float, float]:
    """The permutation of ``other``'s neurons that maximises their total correlation with ``anchor``'s.

    ``anchor``/``other``: pre-activations [tokens, I]. Gated MLPs add the gate pre-activations and
    one permutation serves both. Returns ``perm`` (neuron ``perm[i]`` of other matches anchor
    neuron ``i``), and the mean up-projection correlation before and after aligning.
    """
    corr = correlation(anchor, other)
    cost = corr if anchor_gate is None else corr + correlation(anchor_gate, other_gate)
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    perm = torch.as_tensor(cols[rows.argsort()], dtype=torch.long)
    before = corr.diagonal().mean().item()
    after = corr[torch.arange(len(perm)), perm].mean().item()
    return perm, before, after


def merge_aligned(mlps: list[MLPWeights], perms: list[torch.Tensor | None]) -> MLPWeights:
    """Permute each MLP by its ``perm`` (None: as is) and average them."""
    return average_mlps([m if p is None else permute_mlp(m, p) for m, p in zip(mlps, perms)])


def linear_cka(xs: list[torch.Tensor], max_tokens: int = 1024) -> list[list[float]]:
    """Linear CKA between every pair of activation matrices [tokens, width] (permutation invariant)."""
    grams = []
    for x in xs:
        x = x[:max_tokens].double()
        x = x - x.mean(0)
        gram = x @ x.T
        grams.append(gram / gram.norm().clamp_min(1e-12))
    return [[float((a * b).sum()) for b in grams] for a in grams]



def merged_window(session: ModelSession, window: list[MLPSite], mode: str, acts: dict | None
                  ) -> tuple[MLPWeights | None, list[LayerAlignment]]:
    """The shared MLP for ``window`` (None for drop) and each layer's alignment figures."""
    mlps = [session.read(site) for site in window]
    if mode == "drop":
        return None, []
    anchor = window[0]
    perms: list[torch.Tensor | None] = [None]
    rows = [LayerAlignment(anchor.index, anchor.label, 1.0 if acts else None, 1.0 if acts else None)]
    for site in window[1:]:
        if acts is None:
            perms.append(None)
            rows.append(LayerAlignment(site.index, site.label, None, None))
            continue
        a, b = acts[anchor.index], acts[site.index]
        perm, before, after = align(a["up"], b["up"], a.get("gate"), b.get("gate"))
        perms.append(perm if mode == "permute" else None)
        rows.append(LayerAlignment(site.index, site.label, before, after if mode == "permute" else before))
    return merge_aligned(mlps, perms), rows


def apply_window(session: ModelSession, window: list[MLPSite], mode: str, merged: MLPWeights | None) -> list[MLPWeights]:
    """Put the merged (or dropped) layers into the in-memory model; returns the originals to restore."""
    originals = [session.read(site) for site in window]
    if mode == "drop":
        for site, mlp in zip(window[1:], originals[1:]):
            session.write(site, replace(mlp, w_out=torch.zeros_like(mlp.w_out),
                                        b_out=None if mlp.b_out is None else torch.zeros_like(mlp.b_out)))
    else:
        for site in window:
            session.write(site, merged)
    return originals
