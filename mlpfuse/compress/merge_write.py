"""``merge-layers``: write the merged checkpoint, streaming the source's tensors with the window's
layers stored once (merged, tied by the config section) or dropped (zero modules)."""

from __future__ import annotations

from dataclasses import asdict

from mlpfuse.arch import find_prefix
from mlpfuse.arch.io import SCALE_BUFFER, module_specs, site_hidden, tensor_names, write_mlp
from mlpfuse.checkpoints.format import ZERO_MODULE, merge_section
from mlpfuse.checkpoints.tensors import CheckpointReader
from mlpfuse.checkpoints.writer import DerivedCheckpoint, DerivedWriter
from mlpfuse.errors import InputError

RECIPE_FILE = "mlpfuse_merge_recipe.yaml"


def write_merged(source_dir, config, base_config, section, sites, window, merged, settings, target,
                      overwrite, max_shard, report, model) -> None:
    """Stream the source tensors to ``target`` with the window's layers merged (stored once) or dropped."""
    reader = CheckpointReader(source_dir)
    keys = set(reader.keys())
    prefix = next((p for p in (find_prefix(keys, s) for s in sites) if p is not None), None)
    if prefix is None:
        raise InputError(f"{model}: no MLP tensors where a {base_config['model_type']} checkpoint keeps them")
    anchor, others = window[0], window[1:]
    other_keys = set()
    for site in others:
        other_keys.update(tensor_names(site, prefix, keys).values())
        other_keys.add(f"{prefix}{site.module_path('down')}.{SCALE_BUFFER}")
    anchor_names = tensor_names(anchor, prefix, keys)
    replaced = set(anchor_names.values()) | {f"{prefix}{anchor.module_path('down')}.{SCALE_BUFFER}"}
    window_paths = {s.module_path(r) for s in window for r in s.roles}
    modules = [m for m in section.get("modules", []) if m["path"] not in window_paths]
    anchor_specs = [m for m in section.get("modules", []) if m["path"] in {anchor.module_path(r) for r in anchor.roles}]

    params = {"before": 0, "after": 0}
    with DerivedWriter(target, overwrite, max_shard) as writer:
        if merged is not None:
            for name, tensor in write_mlp(anchor, merged, prefix, reader.get(anchor_names["w_in"]).dtype).items():
                writer.add(name, tensor)
                params["after"] += tensor.numel()
        for key in reader.keys():
            counted = reader.is_floating(key) and not key.endswith(f".{SCALE_BUFFER}")
            numel = _numel(reader.shape(key)) if counted else 0
            params["before"] += numel
            if key in other_keys or (merged is not None and key in replaced):
                continue
            writer.add(key, reader.get(key))
            params["after"] += numel
        if merged is not None:
            if anchor_specs:  # a fused anchor: same widths, but its scale is now folded in
                modules.extend(module_specs(anchor, merged))
            tied = [{"source": m.path, "targets": [s.modules[j].path for s in others]} for j, m in enumerate(anchor.modules)]
        else:
            modules.extend(anchor_specs)
            tied = []
            hidden = site_hidden(anchor, anchor_names, reader.shape)
            for site in others:
                for module in site.modules:
                    width_in, width_out = (0, hidden) if module.roles == ("down",) else (hidden, 0)
                    modules.append({"path": module.path, "type": ZERO_MODULE, "in_features": width_in,
                                    "out_features": width_out, "bias": False, "scaled": False})
        report.parameters = params
        record = {"mode": settings.mode, "layers": report.window, "layer_labels": report.window_labels,
                  "objective": report.objective, "loss": next((c.loss for c in report.candidates if c.layers == report.window), None),
                  "seed": settings.seed}
        section = merge_section(section, modules=modules, tied=tied, record=record, source=model, parameters=params,
                                source_sha256=section.get("source_sha256") or reader.sha256())
        writer.commit(DerivedCheckpoint(source=source_dir, config=base_config, section=section,
                                        recipe={"model": model, **asdict(settings)}, recipe_file=RECIPE_FILE,
                                        summary=f"layers {', '.join(report.window_labels)} "
                                                f"{'merged into one' if merged is not None else 'dropped but the first'} "
                                                f"(merge-layers, mode {settings.mode})"))


def _numel(shape: tuple) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
