"""LoRA (PEFT) for ``finetune --lora``: which modules get adapters, the trainable head, merge or save.

Everything is found from the model in memory, not from a table of architectures:

- **targets** (default): every ``nn.Linear`` / GPT-2 ``Conv1D`` leaf module inside the model's layer
  stacks (the elements of an ``nn.ModuleList``: ``model.layers.3``, ``encoder.layer.3``, ``h.3``), i.e.
  the attention and MLP projections, fused ``ScaledLinear`` / ``ScaledConv1D`` included. Each is named
  to PEFT by the shortest end of its path inside the layer that no module outside the targets ends
  with (``q_proj``; BERT's ``output.dense``, not ``dense``, which would also catch the pooler), so
  the same names apply to the model loaded with any task head. An ``svd`` checkpoint's low-rank
  projections are two ``nn.Linear`` factors (``lowrank_a``, ``lowrank_b``): LoRA goes on the factors
  and merges into them exactly; naming the projection itself is refused in one line.
- **the head** (classification, regression): the top-level children of the task model other than
  its base model that hold parameters (``score``, ``classifier``) train fully (PEFT's
  ``modules_to_save``), since the loader creates them fresh. A causal LM's head stays frozen.

Merging uses PEFT's ``merge_and_unload``; on fused projections mlpfuse's hook
(``remote/modeling_mlpfuse.py``) divides the update by P, so merged outputs equal unmerged ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mlpfuse.errors import EnvironmentProblem, InputError
from mlpfuse.options import check_positive

ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise EnvironmentProblem("--lora needs the peft package: pip install peft") from None
    return peft


def _projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def layer_paths(model: nn.Module) -> dict[str, str]:
    """Full module name -> its path inside its layer, for every module inside a layer stack.

    A layer is an element of an ``nn.ModuleList`` (the first such index from the model's root);
    ``model.layers.0.self_attn.q_proj`` -> ``self_attn.q_proj``. Modules outside every stack
    (embeddings, final norm, heads, a pooler) are absent.
    """
    lists = {name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)}
    inside = {}
    for name, _ in model.named_modules():
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit() and ".".join(parts[:i]) in lists:
                if i + 1 < len(parts):
                    inside[name] = ".".join(parts[i + 1:])
                break
    return inside


def default_targets(model: nn.Module) -> list[str]:
    """PEFT ``target_modules`` naming every linear projection of the layers, and nothing else.

    Returns sorted names, each the shortest dotted end of a projection's in-layer path that no
    other module of the model ends with (so PEFT's suffix match selects exactly the projections).
    Raises InputError when the model has no linear module inside a layer stack.
    """
    types = _projection_types()
    inside = layer_paths(model)
    modules = dict(model.named_modules())
    chosen = {name for name, path in inside.items()
              if isinstance(modules[name], types) and not any(True for _ in modules[name].children())}
    if not chosen:
        raise InputError("the model has no linear projection inside a layer stack for LoRA; name the modules "
                         "with --lora-targets")
    others = [name for name in modules if name and name not in chosen]
    targets = set()
    for name in chosen:
        parts = inside[name].split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            if not any(other == suffix or other.endswith("." + suffix) for other in others):
                targets.add(suffix)
                break
        else:
            targets.add(name)  # no unambiguous end: the full name (PEFT matches it exactly)
    return sorted(targets)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task head(s): top-level children other than ``model.base_model`` with parameters.

    E.g. ``["score"]`` for ``LlamaForSequenceClassification``, ``["classifier"]`` for BERT's; an
    empty list for a bare base model.
    """
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    return [name for name, child in model.named_children()
            if child is not base and any(True for _ in child.parameters())]


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse a ``--lora-targets`` name that matches no module or a module LoRA cannot wrap.

    PEFT's rule: a name matches a module whose full name equals it or ends with ``.name``.
    Raises InputError naming the bad target and the default targets.
    """
    from mlpfuse.remote.modeling_mlpfuse import LowRankLinear

    modules = dict(model.named_modules())
    for target in targets:
        hits = [name for name in modules if name == target or name.endswith("." + target)]
        if not hits:
            raise InputError(f"--lora-targets: no module named {target!r} in the model; the linear projections of "
                             f"its layers are: {', '.join(default_targets(model))}")
        low_rank = [name for name in hits if isinstance(modules[name], LowRankLinear)]
        if low_rank:
            raise InputError(f"--lora-targets: {target!r} is a low-rank (svd) projection ({low_rank[0]}), made of two "
                             f"linear factors; target the factors instead (lowrank_a,lowrank_b; the default does)")


def check_settings(settings) -> None:
    """One-line InputErrors for LoRA values no run can use: ``settings.lora_rank`` (an integer > 0),
    ``lora_alpha`` (> 0), ``lora_dropout`` (in [0, 1)), ``lora_targets`` (None or non-empty names).

    Shared by ``finetune --lora`` and ``bench --lora`` so a flag is refused the same way in both.
    """
    check_positive(settings.lora_rank, "--lora-rank", integer=True)
    check_positive(settings.lora_alpha, "--lora-alpha")
    dropout = settings.lora_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InputError(f"--lora-dropout must be in [0, 1), got {dropout!r}")
    if settings.lora_targets is not None and (not settings.lora_targets
                                              or any(not str(t).strip() for t in settings.lora_targets)):
        raise InputError("--lora-targets needs module names separated by commas, e.g. q_proj,v_proj")


def attach(model: nn.Module, settings, trains_head: bool):
    """Wrap ``model`` in a PEFT LoRA model per ``settings`` (``lora_rank``, ``lora_alpha``,
    ``lora_dropout``, ``lora_targets``); only the adapters, and the head when ``trains_head``, train.

    Returns the ``peft.PeftModel``. Raises InputError for targets that match nothing or cannot take
    LoRA (a norm, a low-rank svd module), EnvironmentProblem without peft. Draws the adapters'
    initial values from torch's global generator (seed it first for a deterministic run).
    """
    peft = _peft()
    targets = list(settings.lora_targets) if settings.lora_targets else default_targets(model)
    check_targets(model, targets)
    heads = head_modules(model) if trains_head else []
    conv = _projection_types()[1]
    matched = [m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    config = peft.LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                             target_modules=targets, modules_to_save=heads or None,
                             fan_in_fan_out=bool(matched) and all(isinstance(m, conv) for m in matched))
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--lora-targets {','.join(targets)}: PEFT cannot put LoRA there: {first}") from None


def summary(peft_model, merged: bool) -> dict:
    """JSON-able facts of a LoRA run: ``trainable_parameters``, ``total_parameters`` (PEFT's count:
    the base model plus adapters and trained head copies), ``merged``, the targets, the head and
    the LoRA hyper-parameters as PEFT recorded them."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    config = peft_model.peft_config["default"]
    return {"trainable_parameters": int(trainable), "total_parameters": int(total), "merged": bool(merged),
            "targets": sorted(config.target_modules), "modules_to_save": sorted(config.modules_to_save or []),
            "rank": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}


def merge(peft_model) -> nn.Module:
    """The base model with the adapters merged in (exact on fused projections) and the trained head
    in place: a plain or fused transformers model that saves like the input checkpoint."""
    try:
        return peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # e.g. NaN weights after training, a zero scale entry
        raise InputError(f"cannot merge the LoRA adapter: {str(exc).splitlines()[0]}; try --no-merge") from None


def save_adapter(peft_model, staging: Path, base: Path, load_base) -> None:
    """Write the adapter (PEFT's files) into ``staging`` and check it loads back on its base.

    ``base``: the base checkpoint directory, recorded as ``base_model_name_or_path`` in
    ``adapter_config.json``. ``load_base()``: a fresh base model as the run loaded it (same task
    head, label count); ``peft.PeftModel.from_pretrained(load_base(), staging)`` must give the
    in-memory model's outputs on a few tokens, else :class:`mlpfuse.checkpoints.modeling.UncleanCheckpoint`.
    """
    peft = _peft()
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(str(staging))
    config = json.loads((staging / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != str(base):
        config["base_model_name_or_path"] = str(base)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    reloaded = peft.PeftModel.from_pretrained(load_base(), str(staging)).eval()
    _check_same_outputs(peft_model, reloaded, staging)


def _check_same_outputs(reference, reloaded, directory: Path) -> None:
    from mlpfuse.checkpoints.modeling import UncleanCheckpoint

    was_training = reference.training
    reference.eval()
    device = next(reference.parameters()).device
    vocab = int(getattr(reference.config, "vocab_size", 0) or 8)
    ids = (torch.arange(1, 9) % max(vocab - 1, 1) + 1).unsqueeze(0).to(device)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        got = reloaded.to(device)(input_ids=ids).logits.float()
    reference.train(was_training)
    difference = (expected - got).abs().max().item()
    if not difference <= 1e-5 * max(1.0, expected.abs().max().item()):
        raise UncleanCheckpoint(f"{directory}: the saved LoRA adapter on its base gives other outputs than the trained "
                                f"model (max difference {difference:.3g}); an mlpfuse bug")
