"""One home for what an MLP site sees in a forward pass: its input, its intermediate values, its output.

``fuse --calibration``, ``merge-layers`` and ``ntk-check`` all read a site's tensors from hooks on the
site's modules; the shapes those tensors come in are an architecture fact kept here:

- most families run the MLP on [batch, tokens, d]; some (OPT) flatten tokens first, [batch * tokens, d];
- a packed ``gate_up`` module's output is ``[gate; up]`` along the last dimension;
- the input of the first module is the MLP input ``x``; the input of the down module is the
  intermediate ``h`` (``act(gate) * up``); its output is the MLP output ``y`` (before any bias or norm
  the layer adds outside the site's modules).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mlpfuse.arch.spec import MLPSite


def token_rows(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of real tokens [n, d] of a site tensor, [B, T, d] or flattened [B*T, d], for a mask [B, T]."""
    if tensor.dim() == 2 and tensor.shape[0] == mask.numel():
        return tensor[mask.reshape(-1)]
    return tensor[mask]


def by_sample(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A site tensor as [B, T, d] whether the model ran the MLP on [B, T, d] or on flattened [B*T, d]."""
    return tensor.reshape(*mask.shape, tensor.shape[-1])


def split_roles(output: torch.Tensor, roles: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A module's output by role: a packed ``[gate; up]`` output is split in two along the last dimension."""
    return dict(zip(roles, output.chunk(len(roles), -1) if len(roles) > 1 else (output,)))


class SiteTensors:
    """What hooks on one forward caught, per site index: ``x`` (MLP input), ``h`` (the down module's
    input), ``y`` (its output) and ``pre`` ({role: pre-activation} of the input-side modules)."""

    def __init__(self):
        self.seen: dict[int, dict] = {}

    def clear(self) -> None:
        self.seen.clear()

    def get(self, index: int, name: str):
        return self.seen.get(index, {}).get(name)

    def _put(self, index: int, name: str, value) -> None:
        self.seen.setdefault(index, {})[name] = value


@contextmanager
def capture(base: torch.nn.Module, sites: list[MLPSite], what: tuple[str, ...] = ("x", "h", "y"), on_input=None):
    """Hooks on every site's modules for the duration; yields a :class:`SiteTensors` filled per forward.

    ``what``: which of ``x``, ``h``, ``y``, ``pre`` to keep (as the modules see them: [B, T, d] or
    [B*T, d]; :func:`token_rows` drops padding). ``on_input(index)``: called after a site's ``x`` is
    caught (it may raise to stop the forward early).
    """
    caught, handles = SiteTensors(), []
    try:
        for site in sites:
            for position, module_spec in enumerate(site.modules):
                module = base.get_submodule(module_spec.path)
                if "down" in module_spec.roles:
                    if "h" in what:
                        handles.append(module.register_forward_pre_hook(
                            lambda m, args, i=site.index: caught._put(i, "h", args[0])))
                    if "y" in what:
                        handles.append(module.register_forward_hook(
                            lambda m, args, out, i=site.index: caught._put(i, "y", out)))
                    continue
                if position == 0 and ("x" in what or on_input is not None):
                    def keep_x(m, args, i=site.index):
                        caught._put(i, "x", args[0])
                        if on_input is not None:
                            on_input(i)

                    handles.append(module.register_forward_pre_hook(keep_x))
                if "pre" in what:
                    handles.append(module.register_forward_hook(
                        lambda m, args, out, i=site.index, roles=module_spec.roles:
                        caught.seen.setdefault(i, {}).setdefault("pre", {}).update(split_roles(out, roles))))
        yield caught
    finally:
        for handle in handles:
            handle.remove()
