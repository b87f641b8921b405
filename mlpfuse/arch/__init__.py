"""Architecture knowledge: the registry of specs and the site resolution."""

from .registry import ARCHITECTURES, lookup, supported_model_types
from .spec import CONV1D, LINEAR, ArchSpec, MLPSite, Projections, SiteTemplate, find_prefix, resolve_sites

__all__ = [
    "ARCHITECTURES", "CONV1D", "LINEAR", "ArchSpec", "MLPSite", "Projections", "SiteTemplate",
    "find_prefix", "lookup", "resolve_sites", "supported_model_types",
]
