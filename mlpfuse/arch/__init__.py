"""Architecture knowledge: the registry of specs, the site resolution, and what a family is (a causal
LM or not, how long its sequences may be), answered from its registry entry."""

from mlpfuse.arch.registry import ARCHITECTURES, entry_for, is_causal_lm, lookup, max_positions, supported_model_types
from mlpfuse.arch.spec import CONV1D, LINEAR, ArchSpec, MLPSite, Projections, SiteTemplate, find_prefix, resolve_sites

__all__ = [
    "ARCHITECTURES", "CONV1D", "LINEAR", "ArchSpec", "MLPSite", "Projections", "SiteTemplate",
    "entry_for", "find_prefix", "is_causal_lm", "lookup", "max_positions", "resolve_sites", "supported_model_types",
]
