"""Fused-MLP modules and loading logic, shipped inside every mlpfuse checkpoint.

This file imports only torch and transformers, so a checkpoint written by mlpfuse loads in a
process that has never heard of mlpfuse:

    AutoModel.from_pretrained(path, trust_remote_code=True)

The same code is what ``mlpfuse.load`` uses. The model returned is the standard transformers
class of the base architecture (e.g. ``BertForSequenceClassification``) with the fused MLP
projections swapped for narrower ones; submodule names are unchanged, so PEFT/LoRA targets match.
"""

import json
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
import transformers
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .configuration_mlpfuse import MlpFuseConfig

REMOTE_CODE_FILES = ("configuration_mlpfuse.py", "modeling_mlpfuse.py")
FUSED_MODEL_TYPE = "mlpfuse"
# Module types of the config's ``mlpfuse.modules`` entries (mlpfuse/checkpoints/format.py re-exports them).
LINEAR_MODULE = "linear"
CONV1D_MODULE = "conv1d"
LOW_RANK_MODULE = "lowrank"
ZERO_MODULE = "zero"
STACKED_EXPERTS_MODULE = "stacked_experts"
EXPERT_LIST_MODULE = "expert_list"
# The cluster sizes P: a persistent buffer, always float32 (exact integers up to 2**24) whatever
# the dtype of the weights, on disk and in memory.
SCALE_BUFFER = "fusion_scale"
SCALE_DTYPE = torch.float32
AUTO_CLASS_ENTRIES = {
    "AutoModel": "MlpFuseModel",
    "AutoModelForSequenceClassification": "MlpFuseForSequenceClassification",
    "AutoModelForTokenClassification": "MlpFuseForTokenClassification",
    "AutoModelForQuestionAnswering": "MlpFuseForQuestionAnswering",
    "AutoModelForMaskedLM": "MlpFuseForMaskedLM",
    "AutoModelForCausalLM": "MlpFuseForCausalLM",
    "AutoModelForSeq2SeqLM": "MlpFuseForSeq2SeqLM",
}


def _times_scale(weight, scale):
    """``weight * scale`` computed in float32 (float64 for float64 weights), rounded once to the weight's dtype."""
    wide = torch.promote_types(weight.dtype, SCALE_DTYPE)
    return (weight.to(wide) * scale.to(wide)).to(weight.dtype)


class _ExactScale:
    """Keeps the ``fusion_scale`` buffer float32 through ``.to(dtype)``, ``.half()``, ``.bfloat16()``.

    ``nn.Module._apply`` casts every floating buffer; P (cluster sizes such as 763) is not
    representable in bf16/fp16, so the buffer is put back in float32 (on the new device).
    """

    def _apply(self, fn, *args, **kwargs):
        before = self._buffers.get(SCALE_BUFFER)
        result = super()._apply(fn, *args, **kwargs)
        after = self._buffers.get(SCALE_BUFFER)
        if before is not None and after is not None and before.dtype == SCALE_DTYPE and after.dtype != SCALE_DTYPE:
            self._buffers[SCALE_BUFFER] = before.to(after.device)  # the exact values, moved only
        return result


class ScaledLinear(_ExactScale, nn.Linear):
    """``nn.Linear`` whose input columns carry a constant scale (the cluster sizes P).

    Forward is ``x @ (W * P).T + b``: P multiplies the (out x k) weight, not the (tokens x k)
    activations, and it stays out of the trainable weight so gradients carry P (MLP Fusion).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer(SCALE_BUFFER, torch.ones(in_features, device=device, dtype=SCALE_DTYPE), persistent=True)

    def forward(self, x):
        return F.linear(x, _times_scale(self.weight, self.fusion_scale), self.bias)


class ScaledConv1D(_ExactScale, Conv1D):
    """GPT-2 ``Conv1D`` (weight stored [in, out]) whose input rows carry the constant scale P."""

    def __init__(self, nf, nx):
        super().__init__(nf, nx)
        self.register_buffer(SCALE_BUFFER, torch.ones(nx, dtype=SCALE_DTYPE), persistent=True)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        weight = _times_scale(self.weight, self.fusion_scale[:, None])
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), weight)
        return x.view(size_out)


# --- LoRA (PEFT) on scaled projections: exact merges (docs/deploy.md) --------------------------------
# PEFT's LoRA layer adds ``B A x`` beside the scaled module and merges by ``W += B A``; the scaled
# forward then multiplies that update by P, so a merged model would differ from the unmerged one.
# Whenever a PEFT LoRA layer takes a scaled module as its base layer, its class becomes a subclass
# that merges ``B A / P`` instead (exact: ``(W + B A / P) P = W P + B A``). Forward, training,
# saving adapters and every other PEFT method are unchanged. peft is never imported here.

def _is_peft_lora_linear(module):
    return any(c.__name__ == "Linear" and c.__module__.startswith("peft.tuners.lora") for c in type(module).__mro__)


class _ScaledLoraMergeMixin:
    """Mixed into PEFT's LoRA ``Linear`` wrapping a ScaledLinear / ScaledConv1D: merges divide by P."""

    _mlpfuse_merging = False

    def _mlpfuse_check(self, adapter_names):
        names = adapter_names if adapter_names is not None else getattr(self, "active_adapters", [])
        variants = [n for n in names if n in getattr(self, "lora_variant", {})]
        if variants:
            raise ValueError(
                f"mlpfuse: cannot merge the LoRA variant (e.g. DoRA) adapter(s) {variants} into a fused projection "
                "(its cluster-size scale P is not part of the variant's maths); use plain LoRA on fused projections, "
                "or keep this adapter unmerged"
            )
        scale = self.get_base_layer().fusion_scale
        if bool((scale == 0).any()):
            raise ValueError("mlpfuse: cannot merge a LoRA adapter into a fused projection with a zero scale entry")

    def merge(self, safe_merge=False, adapter_names=None):
        self._mlpfuse_check(adapter_names)
        self._mlpfuse_merging = True
        try:
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            self._mlpfuse_merging = False

    def unmerge(self):
        self._mlpfuse_merging = True
        try:
            return super().unmerge()
        finally:
            self._mlpfuse_merging = False

    def get_delta_weight(self, adapter):
        delta = super().get_delta_weight(adapter)
        if not self._mlpfuse_merging:
            return delta
        scale = self.get_base_layer().fusion_scale.to(device=delta.device, dtype=torch.float32)
        # Linear weight [out, in]: P scales the columns; Conv1D weight [in, out] (fan_in_fan_out): the rows
        scale = scale[:, None] if getattr(self, "fan_in_fan_out", False) else scale[None, :]
        return (delta.float() / scale).to(delta.dtype)


_SCALED_LORA_CLASSES = {}


def _adopt_scaled_lora(module, name, submodule):
    """Global module-registration hook: a PEFT LoRA layer given a scaled base layer merges exactly."""
    if name != "base_layer" or not isinstance(submodule, (ScaledLinear, ScaledConv1D)):
        return
    cls = type(module)
    if isinstance(module, _ScaledLoraMergeMixin) or not _is_peft_lora_linear(module):
        return
    if cls not in _SCALED_LORA_CLASSES:
        _SCALED_LORA_CLASSES[cls] = type(f"Scaled{cls.__name__}", (_ScaledLoraMergeMixin, cls), {"__module__": cls.__module__})
    module.__class__ = _SCALED_LORA_CLASSES[cls]


_LORA_HOOK_FLAG = f"_mlpfuse_lora_hook_{__name__}"  # once per copy of this file (mlpfuse's, each checkpoint's)
if not getattr(nn.Module, _LORA_HOOK_FLAG, False):
    torch.nn.modules.module.register_module_module_registration_hook(_adopt_scaled_lora)
    setattr(nn.Module, _LORA_HOOK_FLAG, True)


ZERO_MODULE = "zero"


class ZeroProjection(nn.Module):
    """A projection removed by ``merge-layers --drop``: no parameters, outputs zeros of width ``out_features``.

    The up/gate projections of a dropped FF sublayer output width 0 and its down projection zeros,
    so the sublayer adds nothing to the residual stream. ``weight`` is an empty non-persistent buffer
    (never saved or loaded): the families' weight initialisers (GPT-2 ``c_proj``, T5 ``wo``) and
    code that reads ``proj.weight.dtype`` find a tensor of the model's dtype.
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(0), persistent=False)

    def forward(self, x):
        return x.new_zeros(x.shape[:-1] + (self.out_features,))


def tie_shared_modules(model, tied):
    """Make the modules of each ``{"source": path, "targets": [paths]}`` entry ONE module object.

    Paths are relative to ``model.base_model``. The targets' parameters are registered as tied
    weights so ``save_pretrained`` stores them once and ``from_pretrained`` neither expects nor
    re-initialises them.
    """
    if not tied:
        return model
    base = model.base_model
    prefix = "" if base is model else model.base_model_prefix + "."
    mapping = {}
    for entry in tied:
        source = base.get_submodule(entry["source"])
        source._mlpfuse_shared = True  # see _skip_shared_bias_adjustment
        params = {n for n, _ in source.named_parameters()}
        for target in entry["targets"]:
            parent_path, _, name = target.rpartition(".")
            setattr(base.get_submodule(parent_path) if parent_path else base, name, source)
            for n in source.state_dict():  # parameters and persistent buffers (fusion_scale)
                mapping[f"{prefix}{target}.{n}"] = (f"{prefix}{entry['source']}.{n}", n in params)
    # saving drops every shared name; loading ties parameters only (transformers looks buffers up as parameters)
    model._tied_weights_keys = {**(type(model)._tied_weights_keys or {}), **{t: s for t, (s, _) in mapping.items()}}
    model.all_tied_weights_keys = {**(getattr(model, "all_tied_weights_keys", None) or {}),
                                   **{t: s for t, (s, is_param) in mapping.items() if is_param}}
    model._mlpfuse_shared_keys = {**getattr(model, "_mlpfuse_shared_keys", {}), **{t: s for t, (s, _) in mapping.items()}}
    return model


class LowRankLinear(nn.Module):
    """A projection stored as two factors (the svd baseline): ``lowrank_b(lowrank_a(x))``.

    ``lowrank_a`` maps in -> rank (no bias), ``lowrank_b`` rank -> out (with the bias); the dense
    weight is their product. ``weight`` gives that product (read-only) for code that inspects it,
    e.g. T5 reads ``wo.weight.dtype``.
    """

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lowrank_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lowrank_b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self):
        return self.lowrank_b.weight @ self.lowrank_a.weight

    @property
    def bias(self):
        return self.lowrank_b.bias

    def forward(self, x):
        return self.lowrank_b(self.lowrank_a(x))


class _ScaledExpertsMixin(_ExactScale):
    """Stacked experts (``gate_up_proj`` [E, 2k, H], ``down_proj`` [E, H, k]) with per-expert P.

    Mixed into the family's own experts class, so routing, top-k, aux losses and every experts
    implementation (eager, grouped_mm...) of transformers still run; the forward only substitutes
    ``down_proj * P`` for ``down_proj`` (P stays a constant buffer, so gradients carry it).
    """

    _mlpfuse_inside = False

    def _family_forward(self, *args, **kwargs):
        dispatch = super().forward
        eager = getattr(dispatch, "__wrapped__", None)
        if eager is not None and self.down_proj.shape[-1] * self.down_proj.element_size() % 16:
            # transformers' grouped_mm kernels need 16-byte strides, which a narrowed width may lack
            return eager(self, *args, **kwargs)
        return dispatch(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if self._mlpfuse_inside or getattr(self, "fusion_scale", None) is None:
            return self._family_forward(*args, **kwargs)
        scaled = _times_scale(self.down_proj, self.fusion_scale[:, None, :])
        self._mlpfuse_inside = True
        try:
            return torch.func.functional_call(self, {"down_proj": scaled}, args, kwargs)
        finally:
            self._mlpfuse_inside = False


_SCALED_EXPERT_CLASSES = {}


def _narrow_stacked_experts(spec, module):
    """Narrow a stacked experts module in place to width ``spec['width']`` (+ the P buffer if scaled)."""
    weight = module.down_proj
    experts, hidden, k = spec["experts"], weight.shape[1], spec["width"]
    base = type(module)
    if not isinstance(module, _ScaledExpertsMixin):
        if base not in _SCALED_EXPERT_CLASSES:
            _SCALED_EXPERT_CLASSES[base] = type(f"Scaled{base.__name__}", (_ScaledExpertsMixin, base), {})
        module.__class__ = _SCALED_EXPERT_CLASSES[base]
    if spec.get("scaled", False):
        module.register_buffer(SCALE_BUFFER, torch.ones(experts, k, device=weight.device, dtype=SCALE_DTYPE), persistent=True)
    module.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * k, hidden, device=weight.device, dtype=weight.dtype))
    module.down_proj = nn.Parameter(torch.empty(experts, hidden, k, device=weight.device, dtype=weight.dtype))
    module.intermediate_dim = k
    return module


class FusedExpert(nn.Module):
    """One gated expert ``down(act(gate(x)) * up(x))`` of its own width (``down`` scaled when fused)."""

    def __init__(self, hidden, width, act_fn, scaled, device=None, dtype=None):
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(hidden, width, bias=False, device=device, dtype=dtype)
        self.down = (ScaledLinear if scaled else nn.Linear)(width, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down(self.act_fn(self.gate(x)) * self.up(x))


class FusedExpertList(nn.ModuleList):
    """Experts of differing widths, with the stacked experts' call signature and routing maths.

    ``forward(hidden_states, top_k_index, top_k_weights)`` sums each token's chosen experts
    weighted by the router, as the families' eager experts forward does.
    """

    def __init__(self, spec, like):
        weight = like.down_proj
        super().__init__(
            FusedExpert(spec["hidden"], width, like.act_fn, scaled, device=weight.device, dtype=weight.dtype)
            for width, scaled in zip(spec["widths"], spec["scaled"])
        )
        self.num_experts = len(self)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            contribution = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, contribution.to(out.dtype))
        return out


def _build_module(spec, like):
    """Make the replacement module described by one ``modules`` entry of the mlpfuse section."""
    if spec["type"] == STACKED_EXPERTS_MODULE:
        return _narrow_stacked_experts(spec, like)
    if spec["type"] == EXPERT_LIST_MODULE:
        return FusedExpertList(spec, like)
    device = like.weight.device if getattr(like, "weight", None) is not None else None
    dtype = like.weight.dtype if getattr(like, "weight", None) is not None else None
    kind, scaled = spec["type"], spec.get("scaled", False)
    if kind == LINEAR_MODULE:
        cls = ScaledLinear if scaled else nn.Linear
        return cls(spec["in_features"], spec["out_features"], bias=spec.get("bias", True), device=device, dtype=dtype)
    if kind == CONV1D_MODULE:
        module = (ScaledConv1D if scaled else Conv1D)(spec["out_features"], spec["in_features"])
        return module.to(device=device, dtype=dtype)  # fusion_scale stays float32 (_ExactScale)
    if kind == ZERO_MODULE:
        return ZeroProjection(spec["in_features"], spec["out_features"])
    if kind == LOW_RANK_MODULE:
        return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec.get("bias", True),
                             device=device, dtype=dtype)
    raise ValueError(f"mlpfuse: unknown module type {kind!r} in checkpoint config")


def apply_fusion_layout(root, module_specs):
    """Swap the modules named in ``module_specs`` (paths relative to ``root``) for fused ones.

    A spec whose first path component is absent from ``root`` is skipped (an encoder-only class
    loading an encoder-decoder checkpoint); any other missing path is an error.
    """
    for spec in module_specs:
        parent_path, _, name = spec["path"].rpartition(".")
        first = spec["path"].split(".")[0]
        if not hasattr(root, first):
            continue
        if spec["type"] in ("stacked_experts", "expert_list") and int(transformers.__version__.split(".")[0]) < 5:
            raise ValueError(f"mlpfuse: fused Mixture-of-Experts checkpoints need transformers >= 5 (stacked experts); "
                             f"this is transformers {transformers.__version__}")
        parent = root.get_submodule(parent_path) if parent_path else root
        old = getattr(parent, name)
        setattr(parent, name, _build_module(spec, old))
    return root


def fused_config_dict(base_config, section):
    """The config.json dict of a fused checkpoint, from the base config dict and the mlpfuse section."""
    config = {k: v for k, v in base_config.items() if k not in ("auto_map", "mlpfuse", "base_model_type")}
    config["base_model_type"] = base_config["model_type"]
    config["model_type"] = FUSED_MODEL_TYPE
    config["auto_map"] = {"AutoConfig": "configuration_mlpfuse.MlpFuseConfig"}
    config["auto_map"].update({auto: f"modeling_mlpfuse.{entry}" for auto, entry in AUTO_CLASS_ENTRIES.items()})
    config["mlpfuse"] = section
    return config


def write_remote_code(directory):
    """Copy the files that let ``trust_remote_code=True`` load a fused checkpoint."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(directory, name))


def base_config_from(config):
    """The base architecture's config object (e.g. BertConfig) with the mlpfuse section attached."""
    if isinstance(config, MlpFuseConfig) or getattr(config, "model_type", None) == FUSED_MODEL_TYPE:
        data = config.to_dict()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        return config
    if data.get("model_type") == FUSED_MODEL_TYPE:
        data["model_type"] = data.pop("base_model_type")
    section = data.pop("mlpfuse", None)
    for key in ("auto_map", "base_model_type", "transformers_version"):
        data.pop(key, None)
    base = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    base.mlpfuse = section
    return base


_FUSED_CLASSES = {}


def _register_output_recording(cls):
    """Tell transformers what ``cls`` can record (hidden states, attentions).

    transformers keys that registry by ``str(model.__class__)`` and fills it in ``__init__``; a model
    whose class is swapped afterwards (``mlpfuse.fuse_model``) would otherwise return no hidden
    states. The registry moved between versions, hence the two places.
    """
    import importlib

    for module_name in ("transformers.utils.output_capturing", "transformers.modeling_utils"):
        try:
            registry = getattr(importlib.import_module(module_name), "_CAN_RECORD_REGISTRY", None)
        except ImportError:
            continue
        if isinstance(registry, dict):
            dict.__setitem__(registry, str(cls), getattr(cls, "_can_record_outputs", None))
            return


def fused_model_class(base_cls):
    """A subclass of a transformers model class that swaps in the fused MLPs at construction.

    It keeps the base class's name, so ``architectures`` and ``isinstance`` checks stay true, and
    its ``save_pretrained`` writes the fused checkpoint format (config + shipped code).
    """
    if getattr(base_cls, "_mlpfuse_fused", False):
        return base_cls
    if base_cls in _FUSED_CLASSES:
        return _FUSED_CLASSES[base_cls]

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        section = getattr(config, "mlpfuse", None) or {}
        apply_fusion_layout(self.base_model, section.get("modules", []))
        tie_shared_modules(self, section.get("tied", []))

    def save_pretrained(self, save_directory, *args, **kwargs):
        base_cls.save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            path = os.path.join(save_directory, "config.json")
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            section = data.get("mlpfuse") or getattr(self.config, "mlpfuse", None)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(fused_config_dict(data, section), handle, indent=2, sort_keys=True)
                handle.write("\n")
            write_remote_code(save_directory)

    def _adjust_bias(self, output_embeddings, input_embeddings):
        # transformers' tie pass pads/cuts a tied module's bias to weight.shape[0], the output width
        # of an embedding or nn.Linear but the INPUT width of GPT-2's Conv1D ([in, out]). Modules
        # tied by merge-layers are one object already: there is nothing to adjust.
        if getattr(output_embeddings, "_mlpfuse_shared", False):
            return
        adjust = getattr(base_cls, "_adjust_bias", None)
        if adjust is not None:
            adjust(self, output_embeddings, input_embeddings)

    def mark_tied_weights_as_initialized(self, loading_info):
        # A tied target's buffers (fusion_scale) are not in the files and transformers ties parameters
        # only: it would list them as missing and replace them with fresh memory, on the shared
        # module, i.e. the source's loaded P. They were loaded with their source: not missing.
        mark = getattr(base_cls, "mark_tied_weights_as_initialized", None)
        if mark is not None:
            mark(self, loading_info)
        shared, missing = getattr(self, "_mlpfuse_shared_keys", {}), loading_info.missing_keys
        loading_info.missing_keys = {k for k in missing if k not in shared or shared[k] in missing}

    strict = set(getattr(base_cls, "_keep_in_fp32_modules_strict", None) or ())
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x checks this list against parameter names only,
        strict.add(SCALE_BUFFER)  # where the P buffer is not found (it then refuses to build the model)
    cls = type(
        base_cls.__name__, (base_cls,),
        {"__init__": __init__, "save_pretrained": save_pretrained, "_adjust_bias": _adjust_bias, "_mlpfuse_fused": True,
         "mark_tied_weights_as_initialized": mark_tied_weights_as_initialized,
         # the loader then reads P in float32 even for dtype=bfloat16/float16 (P stays exact)
         "_keep_in_fp32_modules_strict": strict,
         # transformers 5 applies a family's checkpoint key renames (GPT-NeoX embed_out -> lm_head)
         # only to classes defined in transformers: keep the base class's module
         "__module__": base_cls.__module__},
    )
    cls.__qualname__ = base_cls.__qualname__
    _register_output_recording(cls)
    _FUSED_CLASSES[base_cls] = cls
    return cls


def _split_config_overrides(base_config, kwargs):
    """Move config overrides (num_labels, id2label, ...) from ``from_pretrained`` kwargs onto the config."""
    overrides = ("num_labels", "id2label", "label2id", "problem_type", "output_hidden_states", "output_attentions")
    for key in overrides:
        if key in kwargs:
            setattr(base_config, key, kwargs.pop(key))
    return kwargs


def load_fused(path, auto_class_name="AutoModel", config=None, *model_args, **kwargs):
    """Load a fused checkpoint as the base architecture's transformers class for ``auto_class_name``."""
    for key in ("trust_remote_code", "adapter_kwargs", "code_revision"):
        kwargs.pop(key, None)
    if config is None:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    base_config = base_config_from(config)
    kwargs = _split_config_overrides(base_config, kwargs)
    auto_cls = getattr(transformers, auto_class_name)
    try:
        base_cls = auto_cls._model_mapping[type(base_config)]
    except KeyError:
        raise ValueError(
            f"mlpfuse: {auto_class_name} has no class for model type {base_config.model_type!r}"
        ) from None
    return fused_model_class(base_cls).from_pretrained(path, *model_args, config=base_config, **kwargs)


class _MlpFuseAutoEntry(PreTrainedModel):
    """Entry point named in ``auto_map``; ``from_pretrained`` returns the base architecture's class."""

    config_class = MlpFuseConfig
    auto_class_name = "AutoModel"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        return load_fused(pretrained_model_name_or_path, cls.auto_class_name, config, *model_args, **kwargs)


def _entry(name, auto_class_name):
    return type(name, (_MlpFuseAutoEntry,), {"auto_class_name": auto_class_name, "__module__": __name__})


MlpFuseModel = _entry("MlpFuseModel", "AutoModel")
MlpFuseForSequenceClassification = _entry("MlpFuseForSequenceClassification", "AutoModelForSequenceClassification")
MlpFuseForTokenClassification = _entry("MlpFuseForTokenClassification", "AutoModelForTokenClassification")
MlpFuseForQuestionAnswering = _entry("MlpFuseForQuestionAnswering", "AutoModelForQuestionAnswering")
MlpFuseForMaskedLM = _entry("MlpFuseForMaskedLM", "AutoModelForMaskedLM")
MlpFuseForCausalLM = _entry("MlpFuseForCausalLM", "AutoModelForCausalLM")
MlpFuseForSeq2SeqLM = _entry("MlpFuseForSeq2SeqLM", "AutoModelForSeq2SeqLM")
