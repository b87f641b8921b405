"""Architecture specs as data: where each layer's MLP tensors live and how they are laid out.

A spec names, for a family of ``model_type``s, the MLP *sites* (a path template such as
``encoder.layer.{i}`` plus the config attribute holding the number of layers) and the projection
module names inside each site. Paths are relative to the transformers *base model*
(``model.base_model``); checkpoints may add a prefix (``bert.``, ``model.``), found by
:func:`find_prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass

LINEAR = "linear"  # nn.Linear: weight [out, in]
CONV1D = "conv1d"  # GPT-2 Conv1D: weight [in, out]


@dataclass(frozen=True)
class Projections:
    """Module names of one MLP's projections, relative to its site.

    ``gate_up``: one module whose output holds the gate rows then the up rows (``[gate; up]``,
    [2I, H] as ``nn.Linear``, e.g. Phi-3's ``gate_up_proj``); ``up`` and ``gate`` are then None.
    """

    up: str | None
    down: str
    gate: str | None = None
    gate_up: str | None = None

    @property
    def gated(self) -> bool:
        return bool(self.gate or self.gate_up)

    def describe(self) -> str:
        """Human-readable module names, e.g. ``up_proj, down_proj, gate gate_proj``."""
        if self.gate_up:
            return f"{self.gate_up} (packed gate, up), {self.down}"
        return f"{self.up}, {self.down}" + (f", gate {self.gate}" if self.gate else "")


@dataclass(frozen=True)
class SiteModule:
    """One module of an MLP site: its ``name`` (the projection attribute), path (base-model relative),
    the roles it holds (``("up",)``, ``("down",)`` or ``("gate", "up")`` packed along its output)
    and its weight layout (``LINEAR`` or ``CONV1D``)."""

    name: str
    path: str
    roles: tuple[str, ...]
    layout: str

    @property
    def packed(self) -> bool:
        return len(self.roles) > 1


@dataclass(frozen=True)
class ExpertTemplate:
    """The experts of a Mixture-of-Experts layer (see ``arch/moe.py`` and docs/moe.md).

    ``path``: one expert's module as checkpoints name it, with ``{i}`` (layer) and ``{e}`` (expert);
    ``count``: config attribute with the number of experts; ``stacked``: the module that holds all
    experts as 3D tensors (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) in transformers v5,
    or None when experts are real modules (Switch); ``shared``: a shared expert fused like a dense MLP
    (with the spec's projections); ``router``: left untouched; ``sparse``: which layers are sparse
    (``all``, ``qwen``: ``mlp_only_layers`` + ``decoder_sparse_step``, ``switch``: every ``step``-th).
    """

    path: str
    count: str | tuple[str, ...]
    projections: Projections
    router: str
    stacked: str | None = None
    shared: str | None = None
    sparse: str = "all"
    step: str | None = None
    sparse_count: str | None = None


@dataclass(frozen=True)
class SiteTemplate:
    """A stack of MLPs: ``path`` with ``{i}`` for the layer, ``count`` the config attribute of its depth.

    ``experts``: set for MoE families; sparse layers then become expert groups, the others stay dense.
    """

    path: str
    count: str
    label: str = "layer"
    experts: ExpertTemplate | None = None


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class ArchSpec:
    """One registry entry. ``gated_flag``: config attribute that switches to ``gated_projections``."""

    name: str
    model_types: tuple[str, ...]
    sites: tuple[SiteTemplate, ...]
    projections: Projections
    layout: str = LINEAR
    gated_projections: Projections | None = None
    gated_flag: str | None = None
    causal_lm: bool = False  # a decoder-only language model (perplexity, packed text): see registry.is_causal_lm
    # config fields that may name the size of the position table, the first positive one wins (registry.max_positions)
    position_fields: tuple[str, ...] = POSITION_FIELDS
    # model types whose position ids start after the padding index (RoBERTa): pad_token_id + 1 rows are not usable
    positions_after_padding: tuple[str, ...] = ()

    def projections_for(self, config: dict) -> Projections:
        """The projections this config uses (T5 v1.1 is gated, T5 v1.0 is not)."""
        if self.gated_flag and self.gated_projections and _gated(config, self.gated_flag):
            return self.gated_projections
        return self.projections


def _gated(config: dict, flag: str) -> bool:
    value = config.get(flag)
    if flag == "feed_forward_proj":
        return str(value or "").startswith("gated-")
    return bool(value)


@dataclass(frozen=True)
class MLPSite:
    """One concrete MLP in a model: its global index, label and module paths (base-model relative)."""

    index: int
    label: str
    path: str
    projections: Projections
    layout: str
    experts: tuple["MLPSite", ...] = ()  # MoE layer: one dense-like site per expert (checkpoint naming)
    stacked: str | None = None  # MoE layer: module holding the stacked expert tensors in memory
    shared: "MLPSite | None" = None  # MoE layer: shared expert

    def module_path(self, role: str) -> str:
        """Path of the module holding ``role`` (``up``, ``gate`` or ``down``); packed roles share one."""
        name = getattr(self.projections, role)
        if name is None and role in ("gate", "up") and self.projections.gate_up:
            name = self.projections.gate_up
        return f"{self.path}.{name}"

    @property
    def modules(self) -> tuple[SiteModule, ...]:
        """The site's modules, each once, in the order gate, up (or packed gate_up), down."""
        p = self.projections
        if p.gate_up:
            return (SiteModule(p.gate_up, f"{self.path}.{p.gate_up}", ("gate", "up"), self.layout),
                    SiteModule(p.down, f"{self.path}.{p.down}", ("down",), self.layout))
        return tuple(SiteModule(getattr(p, role), self.module_path(role), (role,), self.layout) for role in self.roles)

    @property
    def packed(self) -> bool:
        """Whether gate and up live in one packed module."""
        return bool(self.projections.gate_up)

    def probe_names(self) -> list[str]:
        """Tensor names (base-model relative) whose presence in a checkpoint locates this site."""
        if not self.experts:
            return [f"{self.module_path('up')}.weight"]
        names = [f"{self.experts[0].module_path('up')}.weight"]
        return names + ([f"{self.stacked}.gate_up_proj"] if self.stacked else [])

    @property
    def roles(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.projections.gated else ("up", "down")


def resolve_sites(spec: ArchSpec, config: dict) -> list[MLPSite]:
    """Every MLP site of a model with this config, numbered across stacks (encoder first)."""
    projections = spec.projections_for(config)
    sites: list[MLPSite] = []
    for template in spec.sites:
        depth = config.get(template.count)
        if depth is None and template.count == "num_decoder_layers":
            depth = config.get("num_layers")
        for i in range(int(depth or 0)):
            label = f"{template.label}.{i}" if len(spec.sites) > 1 else str(i)
            site = MLPSite(len(sites), label, template.path.format(i=i), projections, spec.layout)
            if template.experts is not None:
                from mlpfuse.arch.moe import moe_site  # noqa: PLC0415  (moe builds on this module)

                site = moe_site(site, template.experts, config, i, int(depth), projections)
            sites.append(site)
    return sites


def find_prefix(keys, site: MLPSite) -> str:
    """The prefix a checkpoint puts before base-model paths (``""``, ``"bert."``, ``"model."``...)."""
    for suffix in site.probe_names():
        candidates = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix) and (k == suffix or k[-len(suffix) - 1] == "."))
        if candidates:
            return min(candidates, key=len)
    return None
