"""Compression methods: pure tensor maths from one ``MLPWeights`` to a narrower one.

A method declares itself once, in a :class:`~mlpfuse.methods.catalog.MethodDeclaration`: its name,
help line, the layouts it can write (``LAYOUTS``, named by ``arch.io.written_layouts``; a method whose
output cannot be stored in a layout, the svd factors in a packed ``gate_up`` tensor, is refused
before any work by :func:`check_can_write`), what its calibrated form is (or None), whether it
clusters, its report fields and whether ntk-check compares it by default. Its module registers
the functions against that declaration; the registered :class:`Method` carries the declaration's
facts and runs the data-free form ``(mlp, k, options) -> MLPWeights``, or the calibrated form when
``options.calibration`` is set. Methods never see architecture names.

This ``__init__`` and ``catalog`` import no torch: the command line reads the declarations for
``--help``; the implementations (fusion.py, svd.py, ...) are imported on the first lookup.

Adding a method is one module plus its registration::

    from mlpfuse.methods import MethodDeclaration, register

    @register(MethodDeclaration("first", help="keep the first k neurons"))
    def first(mlp, k, options):
        return mlp.map_neurons(lambda t: t[:k].clone(), lambda w: w[:, :k].clone())

(``register(declaration, calibrated=fn)`` adds a calibrated form.) A built-in method's declaration
goes into ``catalog.BUILTIN`` (with ``module=`` its file) and the module registers it by name,
``@register("first")``, so that ``--help`` lists it without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mlpfuse.errors import InputError
from mlpfuse.methods.catalog import BUILTIN, LAYOUTS, REPORT_FIELDS, MethodDeclaration, builtin, methods_help, ntk_default_methods

if TYPE_CHECKING:
    from mlpfuse.compress.mlp import MLPWeights

__all__ = ["BUILTIN", "LAYOUTS", "REPORT_FIELDS", "Calibration", "Method", "MethodDeclaration", "MethodOptions",
           "check_calibrated", "check_can_write", "get_method", "method_names", "methods_help", "ntk_default_methods", "register", "unregister"]


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


MethodFn = Callable[["MLPWeights", int, MethodOptions], "MLPWeights"]


@dataclass(frozen=True)
class Method:
    """A registered method: its :class:`MethodDeclaration` and its functions.

    Calling it, ``method(mlp, k, options)`` [an MLP of width I -> one of width k, or of rank matched
    to k for svd], runs ``run`` (data-free), or ``calibrated_form`` when ``options.calibration`` is
    set; a method without a calibrated form then raises InputError.
    """

    declaration: MethodDeclaration
    run: MethodFn
    calibrated_form: MethodFn | None = None

    def __call__(self, mlp: "MLPWeights", k: int, options: MethodOptions) -> "MLPWeights":
        if options.calibration is None:
            return self.run(mlp, k, options)
        if self.calibrated_form is None:
            check_calibrated(self.name)
        return self.calibrated_form(mlp, k, options)

    @property
    def name(self) -> str:
        return self.declaration.name

    @property
    def writes(self) -> tuple[str, ...]:
        return self.declaration.writes

    @property
    def clusters(self) -> bool:
        return self.declaration.clusters

    @property
    def report_fields(self) -> tuple[str, ...]:
        return self.declaration.report_fields


_METHODS: dict[str, Method] = {}
_builtin_loaded = False


def register(declaration: MethodDeclaration | str, calibrated: MethodFn | None = None):
    """Decorator: register the data-free form ``fn(mlp, k, options)`` of the method ``declaration``
    declares (a built-in's name: its entry in ``catalog.BUILTIN``), with ``calibrated`` its data-aware
    form; returns the :class:`Method`.

    Raises ValueError for a name that is neither declared nor a declaration, a calibrated form
    given without being declared or declared without being given, and a name already registered
    with another declaration.
    """
    if isinstance(declaration, str):
        try:
            declaration = builtin(declaration)
        except KeyError:
            raise ValueError(f"method {declaration!r} is not declared: pass a MethodDeclaration, or add "
                             f"one to mlpfuse/methods/catalog.py BUILTIN") from None
    if (declaration.calibrated is None) != (calibrated is None):
        said = "declares no calibrated form but one was given" if calibrated else "declares a calibrated form but none was given"
        raise ValueError(f"method {declaration.name!r} {said}")
    known = _METHODS.get(declaration.name)
    if known is not None and known.declaration != declaration:
        raise ValueError(f"a method {declaration.name!r} is already registered")

    def wrap(fn: MethodFn) -> Method:
        method = Method(declaration, fn, calibrated)
        _METHODS[declaration.name] = method
        return method

    return wrap


def unregister(name: str) -> None:
    """Forget the method called ``name`` (one a caller registered; tests clean up with it)."""
    _METHODS.pop(name, None)


def check_calibrated(name: str) -> None:
    """Refuse ``name`` with ``--calibration`` unless it has a data-aware form. Raises InputError."""
    if get_method(name).calibrated_form is None:
        able = [m for m in method_names() if _METHODS[m].calibrated_form is not None]
        raise InputError(f"--method {name} has no data-aware form; with --calibration use one of: "
                         f"{', '.join(able)} (or drop --calibration)")


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
    """Every registered method's name, sorted (the built-ins and any a caller registered)."""
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    """Import the modules of the built-in declarations (they register themselves) and check that
    each registered what it declares. Raises RuntimeError for a declared built-in left unregistered."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    for declaration in BUILTIN:
        importlib.import_module(f"{__name__}.{declaration.module}")
    missing = [d.name for d in BUILTIN if _METHODS.get(d.name) is None or _METHODS[d.name].declaration != d]
    if missing:
        raise RuntimeError(f"built-in methods declared in catalog.BUILTIN but not registered: {missing}")
    _builtin_loaded = True
