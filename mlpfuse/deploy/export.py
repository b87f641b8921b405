"""``export``: a fused checkpoint in, a checkpoint of the plain base architecture out.

P (the cluster sizes) matters for training dynamics only; for inference it folds into the down
projection (``W P``). Export folds it, expands low-rank factors (svd) into dense weights, unties
the modules that ``merge-layers`` tied, turns dropped projections into zero neurons, optionally
merges a LoRA adapter first, and writes a checkpoint whose ``model_type`` is the base one (llama,
bert, gpt2, mixtral...): plain ``AutoModel...from_pretrained(OUT)`` loads it, no remote code.

A plain config holds one MLP width per config field (``intermediate_size``, ``n_inner``, ``d_ff``,
``moe_intermediate_size``...). Which tensors each field sizes is found by building the base model on
the meta device with the field changed, so every registered family works without a table here. When
the tensors a field sizes have differing widths, ``pad=True`` appends zero neurons to the narrower
ones (exact: a zero neuron adds ``act(0) * 0 = 0``); without it, export refuses. Padding costs
parameters, which the report gives.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from mlpfuse.checkpoints.format import export_section
from mlpfuse.checkpoints.modeling import model_class_for
from mlpfuse.checkpoints.output import claim_output, guarded_outputs
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.checkpoints.tensors import parse_size, read_config
from mlpfuse.checkpoints.writer import DerivedCheckpoint, write_derived
from mlpfuse.deploy.deployinfo import EXPORT_SECTION, WIDTH_FIELD
from mlpfuse.errors import EnvironmentProblem, InputError, MlpfuseError
from mlpfuse.remote.modeling_mlpfuse import (
    FUSED_MODEL_TYPE,
    FusedExpertList,
    LowRankLinear,
    ScaledConv1D,
    ScaledLinear,
    ZeroProjection,
    _ScaledExpertsMixin,
    base_config_from,
    fused_model_class,
)

_PROBES = (11, 13)  # two values given to a width field to see which tensors it sizes (and by how much)


@dataclass
class ExportReport:
    """What ``export`` wrote. ``widths``: config field -> width written; ``padding``: zero neurons
    added per field and the parameters they cost; ``max_abs_diff``: export vs fused logits."""

    source: str
    output: str
    model_type: str
    architecture: str
    widths: dict = field(default_factory=dict)
    padded: bool = False
    padding: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    adapter: str | None = None
    max_abs_diff: float = 0.0
    files: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---- loading -----------------------------------------------------------------------------------

def load_fused_for_export(directory: Path, adapter: str | None = None) -> torch.nn.Module:
    """The fused model as its ``architectures`` class (heads kept), fp32-exact, adapter merged if given."""
    config = read_config(directory)
    if config.get("model_type") != FUSED_MODEL_TYPE:
        raise InputError(f"{directory} is not an mlpfuse checkpoint (model_type {config.get('model_type')!r}); "
                         "it loads with plain transformers already, nothing to export")
    base_config = base_config_from(config)
    cls = model_class_for(base_config)
    model = fused_model_class(cls).from_pretrained(str(directory), config=base_config).eval()
    if adapter is not None:
        model = merge_adapter(model, adapter)
    return model


def merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """Merge a PEFT LoRA adapter directory trained on the fused model (names kept) into it.

    Uses PEFT's own ``merge_and_unload``; on fused (scaled) projections the merge divides the
    update by P (see docs/deploy.md), so the merged model equals the unmerged one.
    """
    try:
        import peft
    except ImportError:
        raise EnvironmentProblem("--adapter needs the peft package: pip install peft") from None
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json in it)")
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(path))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot apply adapter {adapter} to this model: {exc}") from None
    return wrapped.merge_and_unload().eval()


# ---- fused modules -> plain tensors ------------------------------------------------------------

def _dense(weight: torch.Tensor, like_dtype: torch.dtype) -> torch.Tensor:
    return weight.detach().to(like_dtype).contiguous()


def _folded(module: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors (names relative to the module) that compute what the fused ``module`` computes.

    Returns tensors in the module's own layout (Linear [out, in], Conv1D [in, out]); the caller
    transposes if the plain model uses the other layout. Low-rank factors are multiplied out; a
    dropped projection gives an empty (width 0) weight.
    """
    if isinstance(module, ScaledLinear):
        weight = module.weight.float() * module.fusion_scale.float()[None, :]
        out = {"weight": _dense(weight, module.weight.dtype)}
    elif isinstance(module, ScaledConv1D):
        weight = module.weight.float() * module.fusion_scale.float()[:, None]
        out = {"weight": _dense(weight, module.weight.dtype)}
    elif isinstance(module, LowRankLinear):
        weight = module.lowrank_b.weight.float() @ module.lowrank_a.weight.float()
        out = {"weight": _dense(weight, module.lowrank_b.weight.dtype)}
    elif isinstance(module, ZeroProjection):
        return {"weight": torch.zeros(module.out_features, module.in_features), "_zero": True}
    elif isinstance(module, _ScaledExpertsMixin):
        state = {k: v.detach() for k, v in module.state_dict().items() if k != "fusion_scale"}
        scale = getattr(module, "fusion_scale", None)
        if scale is not None:
            state["down_proj"] = _dense(module.down_proj.float() * scale.float()[:, None, :], module.down_proj.dtype)
        return state
    elif isinstance(module, FusedExpertList):
        return _stack_expert_list(module)
    else:  # a plain nn.Linear / Conv1D (an unscaled projection of a fused MLP)
        return {k: v.detach() for k, v in module.state_dict().items()}
    if getattr(module, "bias", None) is not None:
        out["bias"] = module.bias.detach()
    return out


def _stack_expert_list(module: FusedExpertList) -> dict[str, torch.Tensor]:
    """Experts of differing widths as stacked tensors (gate_up [E, 2K, H], down [E, H, K]), padded to
    the widest expert with zero neurons. Marked ``_padded`` with the neurons added."""
    widths = [expert.gate.weight.shape[0] for expert in module]
    width = max(widths)
    gate_up, down = [], []
    for expert in module:
        pad = width - expert.gate.weight.shape[0]
        d = expert.down.weight.float()
        if isinstance(expert.down, ScaledLinear):
            d = d * expert.down.fusion_scale.float()[None, :]
        gate_up.append(torch.cat([nn.functional.pad(expert.gate.weight.float(), (0, 0, 0, pad)),
                                  nn.functional.pad(expert.up.weight.float(), (0, 0, 0, pad))]))
        down.append(nn.functional.pad(d, (0, pad)))
    dtype = module[0].gate.weight.dtype
    return {"gate_up_proj": torch.stack(gate_up).to(dtype), "down_proj": torch.stack(down).to(dtype),
            "_padded": sum(width - w for w in widths)}


# ---- width fields ------------------------------------------------------------------------------

def _meta_model(cls, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def _width_fields(cls, config) -> dict[str, dict[str, tuple[int, int]]]:
    """Config field -> {state-dict name: (dim, multiple)} of the tensors whose width it sets.

    Found by building the model on the meta device with the field at two probe values: a tensor
    whose dimension ``dim`` grows by ``multiple`` per unit of the field is sized by it (``multiple``
    is 2 for packed gate_up tensors).
    """
    data = config.to_dict()
    fields = {}
    for name, value in data.items():
        if not WIDTH_FIELD.search(name) or isinstance(value, bool) or not (value is None or isinstance(value, int)):
            continue
        shapes = []
        for probe in _PROBES:
            probe_config = config.__class__.from_dict({**data, name: probe})
            try:
                shapes.append({k: tuple(v.shape) for k, v in _meta_model(cls, probe_config).state_dict().items()})
            except Exception:  # noqa: BLE001 - a field the model rejects at that value is not a width
                shapes = []
                break
        if not shapes:
            continue
        controlled = {}
        for key, first in shapes[0].items():
            second = shapes[1].get(key)
            if second is None or first == second or len(first) != len(second):
                continue
            dims = [d for d in range(len(first)) if first[d] != second[d]]
            if len(dims) != 1:
                continue
            growth = (second[dims[0]] - first[dims[0]]) // (_PROBES[1] - _PROBES[0])
            if growth > 0:
                controlled[key] = (dims[0], growth)
        if controlled:
            fields[name] = controlled
    return fields


def _pad_to(tensor: torch.Tensor, dim: int, multiple: int, width: int) -> torch.Tensor:
    """``tensor`` with each of its ``multiple`` packed chunks along ``dim`` padded with zeros to ``width``."""
    chunks = tensor.chunk(multiple, dim=dim) if multiple > 1 else (tensor,)
    padded = []
    for chunk in chunks:
        shape = list(chunk.shape)
        shape[dim] = width - chunk.shape[dim]
        padded.append(torch.cat([chunk, chunk.new_zeros(shape)], dim=dim))
    return torch.cat(padded, dim=dim)


# ---- export ------------------------------------------------------------------------------------

def plain_state_dict(model: nn.Module, plain_like: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """The fused ``model``'s state as tensors of the plain architecture (widths as fused, not padded yet).

    ``plain_like``: the plain model of the same class built from the base config (on the meta
    device). Returns the state dict (top-level names) and the zero neurons already added (experts
    of differing widths in one layer).
    """
    section = getattr(model.config, "mlpfuse", None) or {}
    base = model.base_model
    prefix = "" if base is model else model.base_model_prefix + "."
    plain_base = plain_like.base_model
    paths = [spec["path"] for spec in section.get("modules", []) if hasattr(base, spec["path"].split(".")[0])]
    for entry in section.get("tied", []):
        if hasattr(base, entry["source"].split(".")[0]):
            paths.extend(t for t in [entry["source"], *entry["targets"]] if t not in paths)
    state = {}
    special = set()
    added = 0
    done = set()
    for path in paths:
        module = base.get_submodule(path)
        like = plain_base.get_submodule(path)
        folded = _folded(module)
        added += int(folded.pop("_padded", 0))
        folded["_source_conv1d"] = isinstance(module, Conv1D)  # else nn.Linear layout [out, in]
        fitted = _fit(folded, module, like, path)
        if id(module) in done:  # a tied target: the plain format stores each layer's own copy
            fitted = {name: tensor.clone() for name, tensor in fitted.items()}
        done.add(id(module))
        for name, tensor in fitted.items():
            state[f"{prefix}{path}.{name}"] = tensor
        special.add(f"{prefix}{path}.")
    for key, tensor in model.state_dict().items():
        if any(key.startswith(p) for p in special) or key in state:
            continue
        state[key] = tensor
    return state, added


def _fit(folded: dict, module: nn.Module, like: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Folded tensors in the plain module's layout and names (Linear vs Conv1D; bias as the plain one has)."""
    source_conv = bool(folded.pop("_source_conv1d", False))
    folded.pop("_zero", None)
    out = {}
    like_state = like.state_dict()
    for name, reference in like_state.items():
        if name in folded:
            tensor = folded[name]
            if name == "weight" and reference.dim() == 2 and isinstance(like, Conv1D) != source_conv:
                tensor = tensor.T
            out[name] = tensor.to(reference.dtype).contiguous()
        elif name == "bias":
            # a dropped projection has no bias: zeros are exact (the bias of an up projection runs along the width)
            weight = out.get("weight")
            width = None
            if weight is not None:
                width = weight.shape[1] if isinstance(like, Conv1D) else weight.shape[0]
            out[name] = torch.zeros(width if width is not None else reference.shape[0], dtype=reference.dtype)
        else:
            raise InputError(f"cannot export {path}: the plain {type(like).__name__} has tensor {name!r} "
                             f"that the fused {type(module).__name__} lacks")
    extra = set(folded) - set(like_state)
    if extra:
        raise InputError(f"cannot export {path}: the fused module has tensors {sorted(extra)} the plain model does not")
    return out


def resolve_widths(state: dict, fields: dict, pad: bool, model_type: str) -> tuple[dict, dict]:
    """Pick each width field's value and pad tensors in ``state`` in place where allowed.

    Returns (field -> width, field -> {"width", "from": narrower widths, "tensors" padded, "parameters":
    what the zero neurons cost}).
    Stacked expert tensors are padded to a width whose rows are 16-byte aligned (transformers' grouped
    expert kernels need it) whether or not ``pad`` is set. Raises InputError when widths differ and
    ``pad`` is False.
    """
    widths, padding = {}, {}
    for name, controlled in fields.items():
        seen = {}
        for key, (dim, multiple) in controlled.items():
            if key in state:
                seen[key] = state[key].shape[dim] // multiple
        if not seen:
            continue
        distinct = sorted(set(seen.values()))
        width = distinct[-1]
        if len(distinct) > 1 and not pad:
            raise InputError(
                f"the fused MLPs have different widths ({', '.join(map(str, distinct))}) but a plain {model_type} "
                f"config holds one {name}; pass --pad to pad narrower ones with zero neurons to {width} "
                "(exact, costs parameters), or fuse every layer to one width")
        # stacked experts run through grouped matrix products that need 16-byte row strides
        stacked = [state[k] for k in seen if state[k].dim() == 3]
        align = max((16 // t.element_size() for t in stacked if t.element_size() <= 16), default=1)
        width = -(-width // align) * align
        widths[name] = width
        parameters, tensors = 0, 0
        for key, (dim, multiple) in controlled.items():
            if key in seen and seen[key] != width:
                before = state[key].numel()
                state[key] = _pad_to(state[key], dim, multiple, width)
                parameters += state[key].numel() - before
                tensors += 1
        if tensors:
            padding[name] = {"width": width, "from": [w for w in distinct if w != width], "tensors": tensors,
                             "parameters": parameters, "aligned_to": align if align > 1 else None}
    return widths, padding


@guarded_outputs
def export_checkpoint(model: str, output: str | Path, pad: bool = False, adapter: str | None = None,
                      overwrite: bool = False, max_shard_size: str = "5GB") -> ExportReport:
    """Write fused checkpoint ``model`` as a plain checkpoint of its base architecture to ``output``.

    The output loads with ``AutoModel...from_pretrained(output)`` and no remote code. Before success
    it is reloaded that way: every tensor must load (no missing, unexpected or reshaped one) and its
    outputs on a few tokens must equal the fused model's (fp32: max abs diff below 1e-4 relative).
    Raises InputError (not fused, widths differ without ``pad``, a family whose config cannot hold
    the widths, a bad adapter), EnvironmentProblem (``adapter`` without peft).
    """
    start = time.perf_counter()
    source = resolve_model(str(model))
    max_shard = parse_size(max_shard_size)
    inputs = [source] + ([adapter] if adapter else [])
    target = claim_output(output, inputs, overwrite).target  # checks, lock, staging: before any work
    fused = load_fused_for_export(source, adapter)
    base_config = fused.config
    cls = type(fused).__mro__[1]  # the fused class is a direct subclass of the plain one
    plain_config = base_config.__class__.from_dict({k: v for k, v in base_config.to_dict().items()
                                                    if k not in ("mlpfuse", "architectures")})
    plain_config.architectures = [cls.__name__]
    inputs = _probe_inputs(plain_config)
    reference = _logits(fused, inputs)

    state, expert_pad = plain_state_dict(fused, _meta_model(cls, plain_config))
    fields = _width_fields(cls, plain_config)
    widths, padding = resolve_widths(state, fields, pad, plain_config.model_type)
    if expert_pad and not pad:
        raise InputError("experts of one layer have different widths; a plain config holds one expert width: "
                         "pass --pad to pad narrower experts with zero neurons (exact, costs parameters)")
    for name, width in widths.items():
        setattr(plain_config, name, width)
    fused_parameters = sum(p.numel() for p in fused.parameters())
    exported = _assemble(cls, plain_config, state, fused)
    del state
    report = ExportReport(
        source=str(model), output=str(target), model_type=plain_config.model_type, architecture=cls.__name__,
        widths=widths, padded=bool(padding) or bool(expert_pad), padding=padding, adapter=adapter,
        parameters={"fused": fused_parameters, "exported": sum(p.numel() for p in exported.parameters())},
    )
    if expert_pad:
        report.padding["experts"] = {"neurons": expert_pad}
    setattr(exported.config, EXPORT_SECTION, export_section(getattr(base_config, "mlpfuse", None) or {},
                                                            source=str(model), padded=report.padded, adapter=adapter))
    checkpoint = DerivedCheckpoint(source=source, model=exported, max_shard_bytes=max_shard,
                                   check=lambda staging: verify_export(staging, cls.__name__, inputs, reference))
    del exported, fused  # the writer lets go of the model once saved: the check loads the copy on disk
    report.max_abs_diff = write_derived(target, checkpoint, overwrite)
    report.files = sorted(p.name for p in target.iterdir())
    report.seconds = time.perf_counter() - start
    return report


def _assemble(cls, config, state: dict, fused: nn.Module) -> nn.Module:
    """The plain model holding ``state`` (shared tensors, no second copy); non-persistent buffers
    (rotary tables, position ids) taken from the fused model."""
    model = _meta_model(cls, config)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = sorted(set(expected) - set(state))
    if wrong or missing:
        what = wrong[0] if wrong else missing[0]
        raise InputError(f"cannot export to a plain {config.model_type} checkpoint: {what} does not fit the plain "
                         f"config ({len(wrong)} reshaped, {len(missing)} missing); this family's config cannot "
                         "hold these widths")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    fused_buffers = dict(fused.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if name not in fused_buffers:
                raise MlpfuseError(f"export: buffer {name} has no value")
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent) if parent else model
            module._buffers[leaf] = fused_buffers[name]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _probe_inputs(config) -> dict[str, torch.Tensor]:
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    ids = (torch.arange(2 * 7).reshape(2, 7) * 7 + 3) % max(vocab - 3, 1) + 3
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    first = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    return first.float()


def verify_export(directory: Path, architecture: str, inputs: dict, reference: torch.Tensor) -> float:
    """Reload ``directory`` with plain transformers and compare its outputs with ``reference``.

    Raises MlpfuseError when a tensor is missing, unexpected or reshaped, or when the outputs differ
    by more than 1e-4 relative (fp32; 2e-2 in half precision). Returns the max abs difference.
    """
    cls = getattr(transformers, architecture)
    model, info = cls.from_pretrained(str(directory), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise MlpfuseError(f"the exported checkpoint does not load clean: {problems}")
    got = _logits(model.eval(), inputs)
    if got.shape != reference.shape:
        raise MlpfuseError(f"the exported model's output has shape {tuple(got.shape)}, the fused one {tuple(reference.shape)}")
    diff = float((got - reference).abs().max())
    dtype = next(model.parameters()).dtype
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, float(reference.abs().max()))
    if not diff <= tolerance:
        raise MlpfuseError(f"the exported model's outputs differ from the fused model's by {diff:.3g} (> {tolerance:.3g})")
    return diff
