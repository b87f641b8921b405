"""The layout left by ``merge-layers``: which MLP modules are tied (stored once) or dropped.

Shared by ``merge-layers`` and ``fuse`` so that a merged checkpoint can be fused, and a fused one
merged. ``mlpfuse.checkpoints.tied`` in the config is a list of ``{"source": path, "targets": [paths]}``
(module paths relative to the base model); dropped projections are ``modules`` entries of type
``zero``. Neither a tied target nor a dropped projection has tensors in the checkpoint.
"""

from __future__ import annotations

from mlpfuse.arch import MLPSite
from mlpfuse.checkpoints.format import ZERO_MODULE, base_config_dict, is_fused_config, section_of
from mlpfuse.errors import InputError

__all__ = ["absent_paths", "base_config_dict", "busy_paths", "carry_merge_layout", "fusable_input", "sites_touching"]


def absent_paths(section: dict | None) -> set[str]:
    """Module paths with no tensors of their own: tied targets and dropped projections."""
    section = section or {}
    paths = {spec["path"] for spec in section.get("modules", []) if spec.get("type") == ZERO_MODULE}
    for entry in section.get("tied", []):
        paths.update(entry["targets"])
    return paths


def busy_paths(section: dict | None) -> set[str]:
    """Module paths an earlier merge tied or dropped (sources included): not to be merged again."""
    paths = absent_paths(section)
    paths.update(entry["source"] for entry in (section or {}).get("tied", []))
    return paths


def sites_touching(sites: list[MLPSite], paths: set[str]) -> set[int]:
    """Indices of the sites with any projection in ``paths``."""
    return {site.index for site in sites if any(site.module_path(role) in paths for role in site.roles)}


def fusable_input(config: dict, model: str) -> tuple[dict, dict | None]:
    """For ``fuse``: the base config of ``model`` and, for a merged checkpoint, its mlpfuse section.

    A checkpoint whose MLPs were already fused is refused (fusing twice would lose P).
    """
    if not is_fused_config(config):
        return config, None
    section = section_of(config)
    if section.get("layers") or not (section.get("tied") or absent_paths(section)):
        raise InputError(f"{model} is already an mlpfuse checkpoint; fuse the original model instead")
    return base_config_dict(config), section


def carry_merge_layout(new_section: dict, prior: dict | None) -> dict:
    """``new_section`` (from fuse) plus the tied/dropped layout and merge records of ``prior``."""
    if not prior:
        return new_section
    zero = [spec for spec in prior.get("modules", []) if spec.get("type") == ZERO_MODULE]
    return {**new_section, "modules": new_section.get("modules", []) + zero, "tied": prior.get("tied", []),
            "merges": prior.get("merges", [])}
