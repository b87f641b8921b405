"""Check a raw checkpoint against the model its config.json builds, before any work.

The model is built from the config on the meta device (no memory, no weights) and every checkpoint
tensor it knows is compared with it: shape, and floating point vs integer. Strict where a wrong
tensor would give a crash or a silently wrong model: the number of layers, the shape of every known
tensor, the presence of every weight matrix inside a layer block (attention and MLP) and of every
MLP tensor that fuse reads, and that those are floating-point. Lenient where real checkpoints differ
from the built model: extra tensors (``pooler`` or task heads, buffers), a name prefix (``bert.``,
``model.``), tensors outside the layer blocks, and Mixture-of-Experts experts (transformers stacks
them in memory while checkpoints name them one by one; they are checked by name and dtype here).

Each problem is an InputError (one line: what is wrong and what to do).

Quantised checkpoints (GPTQ, AWQ, bitsandbytes, compressed-tensors, FP8...) are recognised even
earlier, when a command resolves its model (:func:`check_not_quantised`, from
:func:`mlpfuse.checkpoints.source.resolve_model`): by config.json's ``quantization_config`` or, lacking it, by
the tensor names and dtypes in the safetensors headers. Every command refuses them (exit 2) before
any work; ``inspect`` reports them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlpfuse.arch.io import tensor_names
from mlpfuse.arch.spec import ArchSpec, MLPSite
from mlpfuse.errors import InputError

_FIX = "the checkpoint and its config.json disagree: fix config.json or use the weights it belongs to"


# Tensor name endings that only quantised checkpoints have, and the format they belong to.
_QUANTISED_SUFFIXES = {
    "qweight": "gptq", "qzeros": "gptq", "g_idx": "gptq",  # GPTQ and AWQ (auto-gptq, gptqmodel, autoawq)
    "weight_packed": "compressed-tensors", "weight_scale": "compressed-tensors",
    "weight_zero_point": "compressed-tensors", "weight_global_scale": "compressed-tensors",
    "SCB": "bitsandbytes", "absmax": "bitsandbytes", "quant_map": "bitsandbytes",  # int8, nf4/fp4
}
_LOW_PRECISION = ("F8_", "F6_", "F4", "E8M0")  # safetensors float dtypes of 8 bits and less (float8, MX formats)
_HEADER_LIMIT = 1 << 28  # a safetensors header longer than this is not one (the reader reports the file)


def check_not_quantised(directory, name: str | None = None) -> None:
    """Refuse a quantised checkpoint in ``directory`` with one line (InputError); ``name`` is what the user gave.

    mlpfuse reads, clusters and writes float weights; a quantised checkpoint would be refused later
    for a wrong reason, or fused and then fail to load. Nothing is refused for a missing or broken
    config.json or weight file: the commands report those themselves.
    """
    method = quantisation(directory)
    if method is not None:
        raise InputError(f"{name or directory}: this checkpoint is quantised ({method}); mlpfuse reads float weights "
                         f"only: give it the original or a dequantised copy")


def quantisation(directory) -> str | None:
    """How the checkpoint in ``directory`` is quantised (``"gptq"``, ``"fp8: tensor x is F8_E4M3"``...), or None.

    config.json's ``quantization_config`` (or ``compression_config``) decides when present; else the
    safetensors headers: a tensor named like GPTQ's, bitsandbytes' or compressed-tensors' parts,
    or stored in a float format of 8 bits or less. ``.bin`` weights are judged by the config alone.
    """
    directory = Path(directory)
    config = _json_object(directory / "config.json")
    for key in ("quantization_config", "compression_config"):
        method = _config_method(config.get(key))
        if method is not None:
            return f"{method}, says config.json's {key}"
    for tensor, dtype in _header_dtypes(directory):
        suffix = tensor.rsplit(".", 1)[-1]
        if suffix in _QUANTISED_SUFFIXES or ".quant_state." in tensor:
            return f"{_QUANTISED_SUFFIXES.get(suffix, 'bitsandbytes')}: it holds tensor {tensor}"
        if dtype.startswith(_LOW_PRECISION):
            return f"low-precision floats: tensor {tensor} is {dtype}"
    return None


def _config_method(section) -> str | None:
    """The quantisation method a ``quantization_config`` names (None when there is none)."""
    if not isinstance(section, dict) or not section:
        return None
    method = section.get("quant_method") or section.get("format")
    if not method and (section.get("load_in_4bit") or section.get("load_in_8bit")):
        method = "bitsandbytes"
    return str(method or "an unnamed method")


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _header_dtypes(directory: Path):
    """(tensor name, safetensors dtype) of every tensor in the checkpoint's safetensors headers.

    Reads only the headers (the JSON at the start of each file), of the files the shard index names
    or of ``model.safetensors``; unreadable files and indexes are skipped (the reader reports them).
    """
    weight_map = _json_object(directory / "model.safetensors.index.json").get("weight_map")
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else ["model.safetensors"]
    for file_name in names:
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            continue
        try:
            with open(directory / file_name, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size < _HEADER_LIMIT else {}
        except (OSError, ValueError):
            continue
        for tensor, entry in sorted(header.items()) if isinstance(header, dict) else ():
            if tensor != "__metadata__" and isinstance(entry, dict):
                yield tensor, str(entry.get("dtype", ""))


def build_skeleton(config: dict):
    """The transformers base model (e.g. ``BertModel``) of ``config`` on the meta device.

    Raises InputError when transformers cannot build a model from the config.
    """
    import torch
    import transformers

    data = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map", "mlpfuse")}
    try:
        base = transformers.AutoConfig.for_model(config["model_type"], **data)
        with torch.device("meta"):
            return transformers.AutoModel.from_config(base)
    except Exception as exc:  # a config transformers rejects fails in many ways (ValueError, TypeError, ...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"config.json does not describe a valid {config.get('model_type')} model: {message}; "
                         f"fix config.json") from None


def check_checkpoint(config: dict, reader, spec: ArchSpec, sites: list[MLPSite], prefix: str,
                     skip_paths: set[str] | frozenset = frozenset(), skeleton=None) -> int:
    """Refuse a checkpoint whose tensors do not fit the model ``config`` builds; returns tensors checked.

    ``reader``: a :class:`~mlpfuse.checkpoints.tensors.CheckpointReader`; ``sites``: the MLP sites the config
    resolves to; ``prefix``: what the checkpoint puts before base-model names; ``skip_paths``: module
    paths (base-model relative) that legitimately have no tensors (tied or dropped by merge-layers).
    Raises InputError for a layer count the tensors contradict, a known tensor of another shape, an
    MLP or attention weight that is missing, or an MLP/known floating tensor stored as integers.
    """
    model = skeleton if skeleton is not None else build_skeleton(config)
    expected = {name: (tuple(t.shape), t.is_floating_point()) for name, t in model.state_dict().items()}
    keys = set(reader.keys())
    _check_layer_counts(config, spec, sites, prefix, keys)

    checked = 0
    for key in sorted(keys):
        if not key.startswith(prefix) or key[len(prefix):] not in expected:
            continue
        shape, floating = expected[key[len(prefix):]]
        actual = tuple(reader.shape(key))
        if actual != shape:
            raise InputError(f"{key} has shape {list(actual)} but config.json implies {list(shape)}"
                             f"{_shape_hint(actual, shape, config)}; {_FIX}")
        if floating and not reader.is_floating(key):
            raise InputError(_integer_message(key, reader))
        checked += 1

    moe_paths = tuple(site.path + "." for site in sites if site.experts)
    skipped = tuple(path + "." for path in skip_paths)
    blocks = _block_prefixes(spec, sites)
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2 or not name.startswith(blocks) or name.startswith(moe_paths + skipped):
            continue
        if prefix + name not in keys:
            raise InputError(f"the checkpoint has no tensor {prefix + name} (a weight of a layer block that "
                             f"config.json describes); it is incomplete or from another model")
    for site in sites:
        checked += _check_mlp_tensors(site, prefix, keys, reader, skipped, _expert_shapes(site, expected), config)
    return checked


def check_plain_checkpoint(directory, config: dict) -> None:
    """:func:`check_checkpoint` for a command that loads a whole original checkpoint (merge-layers).

    Checkpoints written by mlpfuse are left to the loader (their widths are recorded in their own
    section, not in the base config). Raises InputError as :func:`check_checkpoint` does.
    """
    from mlpfuse.arch import find_prefix, lookup, resolve_sites
    from mlpfuse.checkpoints.tensors import CheckpointReader

    if config.get("model_type") == "mlpfuse":
        return
    spec = lookup(config.get("model_type"))
    sites = resolve_sites(spec, config)
    reader = CheckpointReader(directory)
    keys = set(reader.keys())
    prefix = next((p for p in (find_prefix(keys, site) for site in sites) if p is not None), None)
    if prefix is None:
        raise InputError(f"{directory}: no MLP tensors where a {config.get('model_type')} checkpoint keeps them")
    check_checkpoint(config, reader, spec, sites, prefix)


def _expert_shapes(site: MLPSite, expected: dict) -> dict[str, tuple] | None:
    """Per-expert weight shapes (nn.Linear [out, in]) of a layer whose experts the model stacks.

    transformers keeps them as ``gate_up_proj`` [E, 2I, H] ([gate; up] along dim 1) and
    ``down_proj`` [E, H, I]; checkpoints name each expert's ``[I, H]``, ``[I, H]`` and ``[H, I]``.
    """
    if not site.experts or not site.stacked:
        return None
    gate_up, down = expected.get(f"{site.stacked}.gate_up_proj"), expected.get(f"{site.stacked}.down_proj")
    if gate_up is None or down is None or len(gate_up[0]) != 3:
        return None
    width, hidden = gate_up[0][1] // 2, gate_up[0][2]
    return {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}


def _check_mlp_tensors(site: MLPSite, prefix: str, keys: set, reader, skipped: tuple,
                       expert_shapes: dict | None = None, config: dict | None = None) -> int:
    """Every tensor fuse reads for ``site`` exists, is floating point and (experts) has the expected shape."""
    units = [site]
    if site.experts:
        stacked = [f"{prefix}{site.stacked}.gate_up_proj", f"{prefix}{site.stacked}.down_proj"] if site.stacked else []
        units = ([] if stacked and all(k in keys for k in stacked) else list(site.experts))
        units += [site.shared] if site.shared else []
        for key in stacked:
            if key in keys and not reader.is_floating(key):
                raise InputError(_integer_message(key, reader))
    count = 0
    for unit in units:
        for role in unit.roles:
            path = unit.module_path(role)
            if (path + ".").startswith(skipped):
                continue
            key = f"{prefix}{path}.weight"
            if key not in keys:
                raise InputError(f"the checkpoint has no MLP tensor {key}; it is incomplete or from another model")
            shape = (expert_shapes or {}).get(role) if unit is not site.shared else None
            if shape is not None and tuple(reader.shape(key)) != shape:
                actual = tuple(reader.shape(key))
                raise InputError(f"{key} has shape {list(actual)} but config.json implies {list(shape)}"
                                 f"{_shape_hint(actual, shape, config or {})}; {_FIX}")
        for key in tensor_names(unit, prefix, keys).values():
            if key in keys:
                if not reader.is_floating(key):
                    raise InputError(_integer_message(key, reader))
                count += 1
    return count


def _block_prefixes(spec: ArchSpec, sites: list[MLPSite]) -> tuple[str, ...]:
    """Base-model name prefixes of every layer block the config has (``encoder.layer.3.``...)."""
    prefixes = []
    for template in spec.sites:
        stack = template.path.split("{i}")[0]
        prefixes += [f"{stack}{i}." for i in range(_depth(stack, sites))]
    return tuple(prefixes)


def _depth(stack: str, sites: list[MLPSite]) -> int:
    return sum(1 for site in sites if site.path.startswith(stack) and site.path[len(stack):].split(".")[0].isdigit())


def _check_layer_counts(config: dict, spec: ArchSpec, sites: list[MLPSite], prefix: str, keys: set) -> None:
    """The number of layers in each stack of the checkpoint equals the one config.json gives."""
    for template in spec.sites:
        stack = template.path.split("{i}")[0]
        pattern = re.compile(re.escape(prefix + stack) + r"(\d+)\.")
        found = {int(m.group(1)) for m in map(pattern.match, keys) if m}
        depth = _depth(stack, sites)
        if found and max(found) + 1 != depth:
            field = template.count if template.count in config else "the layer count"
            raise InputError(f"config.json says {field}={config.get(template.count, depth)} but the checkpoint "
                             f"has tensors for {max(found) + 1} layers in {prefix + stack}N; {_FIX}")


def _shape_hint(actual: tuple, shape: tuple, config: dict) -> str:
    if len(actual) == 2 and actual == shape[::-1]:
        return " (it looks transposed)"
    sizes = [s for a, s in zip(actual, shape) if a != s] if len(actual) == len(shape) else list(shape)
    fields = [f"{k}={v}" for k, v in config.items()
              if isinstance(v, int) and not isinstance(v, bool) and v in sizes and v > 1]
    return f" (config.json: {', '.join(fields)})" if fields else ""


def _integer_message(key: str, reader) -> str:
    return (f"{key} is stored as {reader.dtype(key)}, not floating point: mlpfuse needs float weights "
            f"(a quantised checkpoint must be dequantised first)")


def check_causal_lm(directory: str | Path, model: str) -> None:
    """Refuse a causal-LM task on the checkpoint in ``directory`` (``model``: its name as given) when it is
    not a decoder language model (BERT, T5...): the family decides (:func:`mlpfuse.arch.is_causal_lm`; an
    encoder counts when its config sets ``is_decoder``)."""
    from mlpfuse.arch import is_causal_lm
    from mlpfuse.arch.registry import encoder_class
    from mlpfuse.checkpoints.tensors import read_config

    config = read_config(directory)

    if not is_causal_lm(config):
        model_type = config.get("base_model_type") or config.get("model_type")
        kind = "an encoder" if encoder_class(model_type) else "not a decoder-only model"
        raise InputError(f"--task causal-lm needs a decoder language model, but {model} is a {model_type} model "
                         f"({kind}); use --task classification or regression, or a decoder checkpoint")
