"""What a compression method is, declared without its maths: :class:`MethodDeclaration`, and the
declarations of the built-in methods (:data:`BUILTIN`), the one place their facts are written.

Import-light on purpose (no torch): the command line reads the method names, help lines and the
ntk-check default comparison from here to build ``--help``. Each implementation module registers
its functions against its declaration (``methods.register``); the registry refuses a module whose
functions do not match what its declaration says (a calibrated form declared but not given, or
the reverse), and ``methods.get_method`` checks that every declared built-in was registered.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every layout a checkpoint may need written (see arch.io.written_layouts).
LAYOUTS = ("dense", "gated", "conv1d", "packed gate_up", "stacked experts", "expert modules")
# The per-layer facts a method may report (``MLPWeights.stats`` keys, ``fuse_report.LayerReport`` fields).
REPORT_FIELDS = ("inertia", "kmeans_seconds", "backend", "rank", "cluster_sizes", "protected", "relative_error")


@dataclass(frozen=True)
class MethodDeclaration:
    """The facts of one compression method.

    ``name``: the ``--method`` value; ``help``: a few words for ``--help``; ``writes``: the layouts
    its output can be stored in (a subset of :data:`LAYOUTS`; others are refused before any work);
    ``calibrated``: what its data-aware form (``fuse --calibration``) does, one line, or None when
    it has none; ``clusters``: it groups the sub-MLPs by k-means and honours a precomputed
    ``MethodOptions.clustering``; ``report_fields``: which of :data:`REPORT_FIELDS` its result's
    ``stats`` fill (the others stay empty in the layer report); ``ntk_default``: it is in
    ntk-check's default comparison; ``module``: the module under ``mlpfuse.methods`` that
    registers it (built-ins, imported on first use; None for a method registered by its caller).
    Raises ValueError for an unknown layout or report field.
    """

    name: str
    help: str
    writes: tuple[str, ...] = LAYOUTS
    calibrated: str | None = None
    clusters: bool = False
    report_fields: tuple[str, ...] = ()
    ntk_default: bool = False
    module: str | None = None

    def __post_init__(self):
        for given, known, what in ((self.writes, LAYOUTS, "layouts"), (self.report_fields, REPORT_FIELDS, "report fields")):
            unknown = set(given) - set(known)
            if unknown:
                raise ValueError(f"method {self.name!r}: unknown {what} {sorted(unknown)}; known: {', '.join(known)}")
        object.__setattr__(self, "writes", tuple(layout for layout in LAYOUTS if layout in self.writes))


_CLUSTER_REPORT = ("inertia", "kmeans_seconds", "backend", "cluster_sizes", "protected", "relative_error")

# In this order: ``--help`` lists them and ntk-check compares them in it.
BUILTIN: tuple[MethodDeclaration, ...] = (
    MethodDeclaration(
        "fusion", "MLP Fusion, the paper", clusters=True, report_fields=_CLUSTER_REPORT, ntk_default=True,
        module="fusion",
        calibrated="chosen representatives (--grouping select) or importance-weighted k-means (kmeans), "
                   "protected neurons, ridge refit of the output weight"),
    MethodDeclaration(
        "cluster", "clustering baseline", clusters=True, report_fields=_CLUSTER_REPORT, ntk_default=True,
        module="fusion", calibrated="the grouping of calibrated fusion, no refit, sqrt(P) folded in"),
    # The factors are stored as a ``lowrank`` module per projection: a packed [gate; up] tensor or
    # stacked expert tensors have no place for them (writing dense products there would save nothing).
    MethodDeclaration(
        "svd", "truncated SVD, rank matched to k's parameters", writes=("dense", "gated", "conv1d", "expert modules"),
        report_fields=("rank", "relative_error"), ntk_default=True, module="svd",
        calibrated="activation-aware (whitened) factors, the output weight refitted then factorised"),
    MethodDeclaration("sketch", "Gaussian sketch", ntk_default=True, module="sketch"),
    MethodDeclaration("mmd", "MMD support points", ntk_default=True, module="mmd"),
    MethodDeclaration(
        "prune", "magnitude pruning", report_fields=("relative_error",), ntk_default=True, module="prune",
        calibrated="importance on the calibration activations, ridge refit of the output weight"),
)


def builtin(name: str) -> MethodDeclaration:
    """The built-in declaration called ``name``; KeyError otherwise."""
    return {d.name: d for d in BUILTIN}[name]


def methods_help() -> str:
    """The built-in methods with their help lines, for ``--method`` and ``--methods``."""
    return ", ".join(f"{d.name} ({d.help})" for d in BUILTIN) + "."


def ntk_default_methods() -> tuple[str, ...]:
    """The methods ntk-check compares when ``--methods`` is not given, in :data:`BUILTIN`'s order."""
    return tuple(d.name for d in BUILTIN if d.ntk_default)
