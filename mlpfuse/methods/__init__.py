"""Compression methods: pure tensor maths from one ``MLPWeights`` to a narrower one.

A method is a function ``(mlp, k, options) -> MLPWeights`` registered under a name; methods never
see architecture names. ``options`` carries seed, k-means backend and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from ..mlp import MLPWeights


@dataclass(frozen=True)
class MethodOptions:
    """Settings shared by all methods."""

    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    kmeans_init: str | None = None  # k-means seeding: "kmeans-parallel" or "greedy"; None = kmeans.DEFAULT_INIT
    clustering: object | None = None  # a precomputed KMeansResult (batched MoE k-means) to use instead of k-means


def clusters_neurons(fn: Method) -> Method:
    """Mark a method that starts from a k-means clustering of the sub-MLPs (it honours ``clustering``)."""
    fn.clusters_neurons = True
    return fn


Method = Callable[[MLPWeights, int, MethodOptions], MLPWeights]
_METHODS: dict[str, Method] = {}


def register(name: str):
    """Decorator: register a method under ``name``."""

    def wrap(fn: Method) -> Method:
        _METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The method called ``name``; an InputError that lists the choices otherwise."""
    _load_builtin()
    if name not in _METHODS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    from . import fusion  # noqa: F401  (registers fusion and cluster)
    from . import mmd, prune, sketch, svd  # noqa: F401  (baselines of ntk-check, docs/ntk-check.md)
