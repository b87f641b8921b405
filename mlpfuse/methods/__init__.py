"""Compression methods: pure tensor maths from one ``MLPWeights`` to a narrower one.

A method is a function ``(mlp, k, options) -> MLPWeights`` registered under a name; methods never
see architecture names. ``options`` carries seed, k-means backend and device.

Each method declares the layouts it can write (``LAYOUTS``, named by ``arch.io.written_layouts``):
a method whose output cannot be stored in a layout (the svd factors in a packed ``gate_up`` tensor
or in stacked expert tensors) is refused before any work by :func:`check_can_write`.
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
    calibration: "Calibration | None" = None  # calibration inputs of this layer: the data-aware form of the method


@dataclass(frozen=True)
class Calibration:
    """One layer's calibration data for the data-aware methods (``fuse --calibration``).

    ``inputs``: the MLP's inputs on the calibration tokens, one [tokens, p] tensor or a sequence of
    such chunks (padding removed); ``activation``: the MLP's elementwise activation (a callable on
    tensors); ``device``: where the statistics are computed (None: the inputs'); ``protect``: protected
    neurons per layer (>= 1: a count; in [0, 1): a fraction of the fused width k); ``ridge``: the
    ridge strength alpha of the closed-form output refit (see ``methods.calibrated.ridge_refit``);
    ``grouping`` (fusion, cluster): ``"select"`` (:func:`methods.calibrated.selected_fusion`: chosen
    representatives, the others folded in) or ``"kmeans"`` (:func:`methods.calibrated.calibrated_fusion`:
    importance-weighted k-means, averaged centroids).
    """

    inputs: object
    activation: Callable
    protect: float = 0.02
    ridge: float = 1e-3
    device: object | None = None
    grouping: str = "select"

    def protected_count(self, k: int, width: int) -> int:
        """Neurons to protect at fused width ``k`` of ``width``: leaves at least one cluster for the rest."""
        m = int(self.protect) if self.protect >= 1 else round(self.protect * k)
        return max(0, min(m, k - 1 if k < width else width))


# Methods that have a data-aware form (``fuse --calibration``); the others are refused with it.
CALIBRATED_METHODS = ("fusion", "cluster", "prune", "svd")


def check_calibrated(name: str) -> None:
    """Refuse ``name`` with ``--calibration`` unless it has a data-aware form. Raises InputError."""
    get_method(name)
    if name not in CALIBRATED_METHODS:
        raise InputError(f"--method {name} has no data-aware form; with --calibration use one of: "
                         f"{', '.join(CALIBRATED_METHODS)} (or drop --calibration)")


def clusters_neurons(fn: Method) -> Method:
    """Mark a method that starts from a k-means clustering of the sub-MLPs (it honours ``clustering``)."""
    fn.clusters_neurons = True
    return fn


Method = Callable[[MLPWeights, int, MethodOptions], MLPWeights]
_METHODS: dict[str, Method] = {}
# Every layout a checkpoint may need written (see arch.io.written_layouts).
LAYOUTS = ("dense", "gated", "conv1d", "packed gate_up", "stacked experts", "expert modules")


def register(name: str, writes: tuple[str, ...] = LAYOUTS):
    """Decorator: register a method under ``name``; ``writes``: the layouts its output can be stored in."""
    unknown = set(writes) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}")

    def wrap(fn: Method) -> Method:
        fn.writes = tuple(layout for layout in LAYOUTS if layout in writes)
        _METHODS[name] = fn
        return fn

    return wrap


def check_can_write(name: str, needs: dict[str, str]) -> None:
    """Refuse ``name`` if it cannot write a layout in ``needs`` (layout -> label of a layer needing it).

    Raises InputError naming the layout, the layer, what the method can write and which methods can.
    """
    method = get_method(name)
    missing = [layout for layout in needs if layout not in method.writes]
    if missing:
        layout = missing[0]
        able = [m for m in method_names() if layout in _METHODS[m].writes]
        raise InputError(f"--method {name} cannot write {layout} (layer {needs[layout]}); {name} writes "
                         f"{', '.join(method.writes)}; for {layout} use {', '.join(able)}")


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
