"""The load check every command that writes a checkpoint ends with (see ``modeling.verify_checkpoint``).

A checkpoint is checked the way a user will load it: ``mlpfuse.load`` for the checkpoint's task,
with transformers' loading report. Then what transformers did after reading the files is compared
with the files themselves, and the loaded model's forward with a reference that does not go
through transformers' loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointReader, read_config
from .errors import InputError
from .arch.io import ROLE_FIELDS
from .format import CONV1D_MODULE, SCALE_BUFFER, ZERO_MODULE, checkpoint_task, is_fused_config, section_of
from .mlp import MLPWeights

SHOWN_KEYS = 4  # keys named in the one-line message


def _fail(what: str, keys) -> None:
    from .modeling import UncleanCheckpoint

    keys = sorted(str(k) for k in keys)
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    raise UncleanCheckpoint(f"the written checkpoint does not load clean (an mlpfuse bug; nothing was written): "
                            f"{what}: {', '.join(keys[:SHOWN_KEYS])}{more}")


def _load(directory: Path, config: dict):
    """(model, loading info) as ``mlpfuse.load`` gives it for the checkpoint's task."""
    import transformers

    from .modeling import TASKS, load
    from .remote.modeling_mlpfuse import base_config_from, fused_model_class

    task = checkpoint_task(config)
    architecture = next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is not None and (task not in TASKS or _task_class(task, config) is not cls):
        # a class no task of mlpfuse.load gives (BertForPreTraining, T5EncoderModel): load that class
        if is_fused_config(config):
            return fused_model_class(cls).from_pretrained(str(directory), config=base_config_from(config),
                                                          output_loading_info=True, ignore_mismatched_sizes=True)
        return cls.from_pretrained(str(directory), output_loading_info=True, ignore_mismatched_sizes=True)
    # mismatched shapes are then reported (and named) rather than raised
    return load(directory, task=task or "base", output_loading_info=True, ignore_mismatched_sizes=True)


def _task_class(task: str, config: dict):
    """The transformers class ``mlpfuse.load(task=task)`` builds for ``config`` (None if none)."""
    import transformers

    from .format import base_config_dict
    from .modeling import TASKS

    data = base_config_dict(config)
    try:
        config_class = type(transformers.AutoConfig.for_model(data["model_type"]))
        return getattr(transformers, TASKS[task])._model_mapping[config_class]
    except (KeyError, ValueError):
        return None


def _loading_problems(info: dict) -> None:
    for field in ("missing_keys", "unexpected_keys"):
        if info.get(field):
            _fail(field.replace("_", " "), info[field])
    if info.get("mismatched_keys"):
        _fail("shapes differ", [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info["mismatched_keys"]])
    errors = list(info.get("error_msgs") or []) + [f"{k}: {v}" for k, v in (info.get("conversion_errors") or {}).items()]
    if errors:
        _fail("loading errors", [e.splitlines()[0] for e in errors])


def _loaded_name(key: str, state: dict, prefix: str) -> str | None:
    """The loaded model's state-dict name of file tensor ``key`` (base-model prefix added or removed)."""
    if key in state:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in state:
        return key[len(prefix) + 1:]
    if prefix and f"{prefix}.{key}" in state:
        return f"{prefix}.{key}"
    return None


def _compare_tensors(model, reader: CheckpointReader) -> int:
    """Every file tensor found in the loaded model by name has its shape and exact value there."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    reshaped, changed, compared = [], [], 0
    for key in reader.keys():
        name = _loaded_name(key, state, prefix)
        if name is None:  # renamed on load (transformers' conversions); the loading report covers it
            continue
        loaded, stored = state[name], reader.get(key)
        if tuple(loaded.shape) != tuple(stored.shape):
            reshaped.append(f"{key} {tuple(stored.shape)} -> {tuple(loaded.shape)}")
        elif loaded.dtype != stored.dtype and stored.is_floating_point() and key.endswith(SCALE_BUFFER):
            changed.append(f"{key} ({stored.dtype} -> {loaded.dtype})")
        elif not torch.equal(loaded.detach().cpu(), stored.to(loaded.dtype)):
            changed.append(key)
        compared += 1
    if reshaped:
        _fail("tensors come back reshaped", reshaped)
    if changed:
        _fail("tensors come back with other values", changed)
    return compared


def _probe_inputs(model, length: int = 8) -> dict:
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
    ids = (torch.arange(length) * 7 + 3).remainder(vocab)[None, :].to(model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : length // 2]
    return inputs


def _output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    tensor = getattr(out, "logits", None)
    if tensor is None:
        tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return tensor.detach().float().cpu()


def _compare_with_reference(loaded, reference: torch.nn.Module) -> None:
    """Outputs of the loaded model and the in-memory one it was saved from, on a few tokens."""
    was_training = reference.training
    reference.eval()
    try:
        expected = _output(reference, {k: v.to(reference.device) for k, v in _probe_inputs(loaded).items()})
    finally:
        reference.train(was_training)
    loaded.to(reference.device)  # same device, same kernels: equal outputs up to rounding
    got = _output(loaded.eval(), _probe_inputs(loaded))
    dtype = next(loaded.parameters()).dtype
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tolerance, atol=tolerance):
        difference = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
        _fail("the loaded model's outputs differ from the model in memory", [f"max difference {difference}"])


def _site_weights(site, prefix: str, reader: CheckpointReader, source_of: dict) -> MLPWeights:
    """One dense site's MLP read straight from the files (tied targets from their source's tensors).

    Module by module, as ``site.modules`` lists them: a packed ``[gate; up]`` module is split in two,
    a low-rank module is expanded to its dense product, Conv1D weights are transposed.
    """
    values = {}
    for module in site.modules:
        base = f"{prefix}{source_of.get(module.path, module.path)}"
        if f"{base}.lowrank_a.weight" in reader:
            weight = reader.get(f"{base}.lowrank_b.weight").double() @ reader.get(f"{base}.lowrank_a.weight").double()
            bias_key = f"{base}.lowrank_b.bias"
        else:
            weight = reader.get(f"{base}.weight").double()
            weight = weight.T if module.layout == CONV1D_MODULE else weight
            bias_key = f"{base}.bias"
        count = len(module.roles)
        values.update(zip((ROLE_FIELDS[r][0] for r in module.roles), weight.chunk(count, 0) if module.packed else (weight,)))
        if bias_key in reader:
            bias = reader.get(bias_key).double()
            values.update(zip((ROLE_FIELDS[r][1] for r in module.roles), bias.chunk(count, 0) if module.packed else (bias,)))
        if "down" in module.roles and f"{base}.{SCALE_BUFFER}" in reader:
            values["scale"] = reader.get(f"{base}.{SCALE_BUFFER}").double()
    return MLPWeights(**values)


def _loaded_mlp(base, site, x: torch.Tensor) -> torch.Tensor:
    """The loaded modules of ``site`` composed as the MLP (tanh as the activation, on both sides)."""
    outputs = {}
    for module in site.modules:
        if "down" in module.roles:
            continue
        out = base.get_submodule(module.path)(x)
        outputs.update(zip(module.roles, out.chunk(len(module.roles), -1) if module.packed else (out,)))
    up = outputs["up"]
    hidden = torch.tanh(up) if "gate" not in outputs else torch.tanh(outputs["gate"]) * up
    return base.get_submodule(site.module_path("down"))(hidden)


def _checkpoint_prefix(keys: set, sites) -> str:
    """What the checkpoint puts before base-model paths (``""``, ``"model."``...), found from any MLP
    module's weight, dense or low-rank (a fully svd-compressed model has no plain MLP weight)."""
    for site in sites:
        for module in site.modules:
            for suffix in (f"{module.path}.weight", f"{module.path}.lowrank_a.weight"):
                found = sorted(k[: -len(suffix)] for k in keys
                               if k.endswith(suffix) and (k == suffix or k[-len(suffix) - 1] == "."))
                if found:
                    return min(found, key=len)
    return ""


def _compare_sites(loaded, config: dict, reader: CheckpointReader) -> int:
    """Each fused, tied or merged dense MLP of ``loaded`` against its tensors' reference forward."""
    from .arch import lookup, resolve_sites
    from .format import base_config_dict

    section = section_of(config)
    touched = {spec["path"] for spec in section.get("modules", []) if spec.get("type") != ZERO_MODULE}
    zero = {spec["path"] for spec in section.get("modules", []) if spec.get("type") == ZERO_MODULE}
    source_of = {target: entry["source"] for entry in section.get("tied", []) for target in entry["targets"]}
    touched |= set(source_of) | set(source_of.values())
    if not touched:
        return 0
    base_config = base_config_dict(config)
    try:
        spec = lookup(base_config.get("model_type"))
    except InputError:  # a family this mlpfuse has no entry for: the tensor and whole-model checks stand alone
        return 0
    sites = [s for s in resolve_sites(spec, base_config) if not s.experts]
    keys = set(reader.keys())
    prefix = _checkpoint_prefix(keys, sites)
    base = loaded.base_model
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for site in sites:
        paths = {site.module_path(role) for role in site.roles}
        if not paths & touched or paths & zero or not hasattr(base, site.module_path("up").split(".")[0]):
            continue
        mlp = _site_weights(site, prefix, reader, source_of)
        x = torch.randn(5, mlp.hidden, generator=generator, dtype=torch.float64)
        expected = mlp.forward(x, torch.tanh).float()
        with torch.no_grad():
            got = _loaded_mlp(base, site, x.float()).float().cpu()
        scale = expected.abs().max().item() + 1.0
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * scale):
            _fail("a fused MLP's loaded forward differs from its tensors' reference forward", [site.label])
        checked += 1
    return checked


def check_loads_clean(directory: Path, reference: torch.nn.Module | None = None) -> int:
    """See :func:`mlpfuse.modeling.verify_checkpoint`."""
    config = read_config(directory)
    try:
        loaded, info = _load(directory, config)
    except Exception as exc:  # any failure to load what we wrote is our bug
        _fail("it does not load", [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])
    _loading_problems(info)
    reader = CheckpointReader(directory)
    compared = _compare_tensors(loaded, reader)
    loaded.eval()
    if reference is not None:
        _compare_with_reference(loaded, reference)
        return compared
    try:
        output = _output(loaded, _probe_inputs(loaded))
    except Exception as exc:
        _fail("the loaded model's forward fails", [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])
    if not torch.isfinite(output).all():
        _fail("the loaded model's forward is not finite", ["output"])
    if is_fused_config(config):
        loaded.float()  # the site check runs in float32 against float64 references (P stays float32)
        _compare_sites(loaded, config, reader)
    return compared
