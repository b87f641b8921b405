"""The standard form every compression method works on: an FFN as a sum of sub-MLPs.

Layouts follow ``nn.Linear``: ``w_in`` is [I, p] (row i = neuron i's input weights), ``w_out`` is
[p, I] (column i = neuron i's output weights). Gated MLPs add ``w_gate`` [I, p] sharing the neuron
index with ``w_in``. ``scale`` (length I) is the constant cluster-size vector P of MLP Fusion,
applied to ``w_out``'s columns; ``None`` means no scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class MLPWeights:
    """One feed-forward block's weights in the standard form (see module docstring)."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    b_in: torch.Tensor | None = None
    w_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_out: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    # Weight field -> (A [r, in], B [out, r]) with that weight == B @ A (the svd baseline). The
    # dense weight is kept for the maths; writers emit the factors instead.
    low_rank: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Intermediate size: the number of sub-MLPs (neurons)."""
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_in.shape[1]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def neuron_features(self) -> torch.Tensor:
        """[I, d] matrix whose row i is sub-MLP i: ``[w_gate_i, b_gate_i, w_in_i, b_in_i, w_out_i]``."""
        parts = []
        for weight, bias in ((self.w_gate, self.b_gate), (self.w_in, self.b_in)):
            if weight is not None:
                parts.append(weight)
            if bias is not None:
                parts.append(bias[:, None])
        # w_out transposed in its own dtype first: a 2-byte transpose then a contiguous widening is
        # about a third faster than widening through the transposed view
        parts.append(self.w_out.T.contiguous() if self.w_out.element_size() < 4 else self.w_out.T)
        # One float32 buffer filled slice by slice: each input is read and converted once.
        out = torch.empty(self.width, sum(p.shape[1] for p in parts), dtype=torch.float32, device=self.w_in.device)
        start = 0
        for part in parts:
            out[:, start:start + part.shape[1]].copy_(part)
            start += part.shape[1]
        return out

    def num_parameters(self) -> int:
        """Trainable parameters (the scale P is a constant buffer and is not counted)."""
        tensors = (self.w_in, self.w_out, self.b_in, self.w_gate, self.b_gate, self.b_out)
        dense = sum(t.numel() for t in tensors if t is not None)
        return dense + sum(a.numel() + b.numel() - (b.shape[0] * a.shape[1]) for a, b in self.low_rank.values())

    def map_neurons(self, in_fn, out_fn) -> "MLPWeights":
        """Apply ``in_fn`` to the neuron-indexed rows of the input side and ``out_fn`` to ``w_out``."""
        return replace(
            self,
            w_in=in_fn(self.w_in),
            b_in=None if self.b_in is None else in_fn(self.b_in),
            w_gate=None if self.w_gate is None else in_fn(self.w_gate),
            b_gate=None if self.b_gate is None else in_fn(self.b_gate),
            w_out=out_fn(self.w_out),
            scale=None,
            stats={},
            low_rank={},
        )

    def forward(self, x: torch.Tensor, activation) -> torch.Tensor:
        """Reference forward ``act(x W_in^T + b_in) * P @ W_out^T + b_out`` (gated: ``act(gate) * up``)."""
        up = torch.nn.functional.linear(x, self.w_in, self.b_in)
        hidden = activation(up) if self.w_gate is None else activation(
            torch.nn.functional.linear(x, self.w_gate, self.b_gate)) * up
        w_out = self.w_out if self.scale is None else self.w_out * self.scale.to(self.w_out.dtype)
        return torch.nn.functional.linear(hidden, w_out, self.b_out)
