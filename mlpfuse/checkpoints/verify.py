"""The load check every command that writes a checkpoint ends with (see ``modeling.verify_checkpoint``).

A checkpoint is checked the way a user will load it: ``mlpfuse.load`` for the checkpoint's task,
with transformers' loading report. Then what transformers did after reading the files is compared
with the files themselves, and the loaded model's forward with a reference that does not go
through transformers' loading.

Checkpoints whose weight files hold ``FULL_LOAD_BELOW`` bytes or more are checked without holding
the model (memory independent of the model size): transformers builds the model on the meta device
from the files' headers (same class, config, key renames, tie pass, dtype rules as a real load),
its loading report and its tensors' names, shapes and dtypes are compared with the headers, and the
fused MLPs' forward is checked one site at a time, each site's modules filled from the files and
emptied again.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch

from mlpfuse.arch.io import ROLE_FIELDS
from mlpfuse.checkpoints.format import CONV1D_MODULE, SCALE_BUFFER, ZERO_MODULE, checkpoint_task, is_fused_config, section_of
from mlpfuse.checkpoints.tensors import CheckpointReader, read_config
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.errors import InputError

SHOWN_KEYS = 4  # keys named in the one-line message
# Weight files of this many bytes or more are checked streaming (the model is never held whole);
# smaller ones are loaded whole with from_pretrained, exactly as a user loads them.
FULL_LOAD_BELOW = 128 * 2**20


def _fail(what: str, keys) -> None:
    from mlpfuse.checkpoints.modeling import UncleanCheckpoint

    keys = sorted(str(k) for k in keys)
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    raise UncleanCheckpoint(f"the written checkpoint does not load clean (an mlpfuse bug; nothing was written): "
                            f"{what}: {', '.join(keys[:SHOWN_KEYS])}{more}")


def _load(directory: Path, config: dict):
    """(model, loading info) as ``mlpfuse.load`` gives it for the checkpoint's task."""
    import transformers

    from mlpfuse.checkpoints.modeling import TASKS, load
    from mlpfuse.remote.modeling_mlpfuse import base_config_from, fused_model_class

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

    from mlpfuse.checkpoints.format import base_config_dict
    from mlpfuse.checkpoints.modeling import TASKS

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
    _tensor_problems(reshaped, changed)
    return compared


def _tensor_problems(reshaped: list, changed: list) -> None:
    if reshaped:
        _fail("tensors come back reshaped", reshaped)
    if changed:
        _fail("tensors come back with other values", changed)


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


def _site_weights(site, prefix: str, reader, source_of: dict, dtype: torch.dtype = torch.float64) -> MLPWeights:
    """One dense site's MLP read straight from the files (tied targets from their source's tensors).

    Module by module, as ``site.modules`` lists them: a packed ``[gate; up]`` module is split in two,
    a low-rank module is expanded to its dense product, Conv1D weights are transposed. ``reader``:
    anything with ``get(name)`` and ``in``; tensors come back in ``dtype``.
    """
    values = {}
    for module in site.modules:
        base = f"{prefix}{source_of.get(module.path, module.path)}"
        if f"{base}.lowrank_a.weight" in reader:
            weight = reader.get(f"{base}.lowrank_b.weight").to(dtype) @ reader.get(f"{base}.lowrank_a.weight").to(dtype)
            bias_key = f"{base}.lowrank_b.bias"
        else:
            weight = reader.get(f"{base}.weight").to(dtype)
            weight = weight.T if module.layout == CONV1D_MODULE else weight
            bias_key = f"{base}.bias"
        count = len(module.roles)
        values.update(zip((ROLE_FIELDS[r][0] for r in module.roles), weight.chunk(count, 0) if module.packed else (weight,)))
        if bias_key in reader:
            bias = reader.get(bias_key).to(dtype)
            values.update(zip((ROLE_FIELDS[r][1] for r in module.roles), bias.chunk(count, 0) if module.packed else (bias,)))
        if "down" in module.roles and f"{base}.{SCALE_BUFFER}" in reader:
            values["scale"] = reader.get(f"{base}.{SCALE_BUFFER}").to(dtype)
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


class _ReadOnce:
    """A reader that keeps what it read, in float32 (one site's tensors: dropped with the site)."""

    def __init__(self, reader: CheckpointReader):
        self.reader, self.read = reader, {}

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str) -> torch.Tensor:
        """The tensor, floating point ones in float32 (P is stored so; lower precisions widen exactly)."""
        if name not in self.read:
            tensor = self.reader.get(name)
            self.read[name] = tensor.float() if tensor.is_floating_point() else tensor
        return self.read[name]


@contextmanager
def _filled_from_files(base, site, prefix: str, reader: "_ReadOnce", source_of: dict):
    """Fill a meta-loaded site's modules in float32 from their file tensors, and empty them after.

    Modules already holding data (a whole-model load) are left as they are. A tied target is the
    same module object as its source; its tensors are read under the source's names.
    """
    filled = []
    try:
        for module in site.modules:
            loaded = base.get_submodule(module.path)
            if not any(t.is_meta for t in loaded.state_dict().values()) or any(loaded is m for m in filled):
                continue
            base_name = f"{prefix}{source_of.get(module.path, module.path)}"
            tensors = {n: reader.get(f"{base_name}.{n}") for n in loaded.state_dict()}
            filled.append(loaded)
            loaded.load_state_dict(tensors, strict=True, assign=True)
        yield
    finally:
        for loaded in filled:
            loaded.to("meta")


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
    from mlpfuse.arch import lookup, resolve_sites
    from mlpfuse.checkpoints.format import base_config_dict

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
        files = _ReadOnce(reader)  # the reference and the filled modules share each tensor, read once
        mlp = _site_weights(site, prefix, files, source_of, torch.float32)
        x = torch.randn(5, mlp.hidden, generator=generator, dtype=torch.float64).float()
        expected = mlp.forward(x, torch.tanh)
        with torch.no_grad(), _filled_from_files(base, site, prefix, files, source_of):
            got = _loaded_mlp(base, site, x).float().cpu()
        scale = expected.abs().max().item() + 1.0
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * scale):
            _fail("a fused MLP's loaded forward differs from its tensors' reference forward", [site.label])
        checked += 1
    return checked


def _model_class(directory: Path, config: dict):
    """(class, config object) that :func:`_load` builds for the checkpoint, without loading anything."""
    import transformers

    from mlpfuse.checkpoints.modeling import TASKS, register_with_transformers
    from mlpfuse.remote.modeling_mlpfuse import base_config_from, fused_model_class

    register_with_transformers()
    task = checkpoint_task(config)
    fused = is_fused_config(config)
    architecture = next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None or (task in TASKS and _task_class(task, config) is cls):
        model_config = base_config_from(config) if fused else transformers.AutoConfig.from_pretrained(str(directory))
        cls = getattr(transformers, TASKS[task or "base"])._model_mapping[type(model_config)]
    else:
        model_config = base_config_from(config) if fused else cls.config_class.from_pretrained(str(directory))
    return (fused_model_class(cls) if fused else cls), model_config


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _header_state(reader: CheckpointReader) -> dict:
    """The files' tensors as meta tensors of their stored shape and dtype (headers only, no data read)."""
    state = {}
    for key in reader.keys():
        dtype = _TORCH_DTYPES.get(reader.dtype(key))
        if dtype is None:
            _fail("tensors of a dtype this check cannot read", [f"{key} ({reader.dtype(key)})"])
        state[key] = torch.empty(reader.shape(key), dtype=dtype, device="meta")
    return state


def _load_meta(directory: Path, config: dict, reader: CheckpointReader):
    """(model on the meta device, loading info) for the files' headers, no data read.

    The model is built the way ``from_pretrained`` builds it before reading weights (the class and
    config :func:`_load` uses, constructed under the meta device in the dtype a plain load gives,
    its weights tied), without going through ``from_pretrained`` itself: its meta-device path is
    not a supported use and broke with transformers 5.25 (the ``kernels`` pass refuses "meta").
    The loading report is then worked out from the headers (:func:`_meta_loading_info`).
    """
    cls, model_config = _model_class(directory, config)
    with torch.device("meta"):
        model = cls._from_config(model_config, dtype=torch.get_default_dtype())
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval(), _meta_loading_info(model, reader)


def _file_names(model) -> dict[str, list[dict[str, tuple]]]:
    """Each of ``model``'s state-dict names -> the ways a checkpoint may hold it, each {file name: shape}.

    The name itself always; transformers 5 also converts some tensors between checkpoint and memory
    (per-expert MoE tensors stacked into one, legacy renames), and ``revert_weight_conversion``
    (the mapping ``save_pretrained`` uses), applied here to meta tensors, gives the converted form.
    """
    state = model.state_dict(keep_vars=True)
    forms = {name: [{name: tuple(tensor.shape)}] for name, tensor in state.items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: no conversions
        return forms
    for name, tensor in state.items():
        converted = {key: tuple(value.shape) for key, value in revert_weight_conversion(model, {name: tensor}).items()}
        if converted != forms[name][0]:
            forms[name].append(converted)
    return forms


def _ignored(model, attribute: str) -> list:
    return [re.compile(p) for p in getattr(model, attribute, None) or ()]


def _meta_loading_info(model, reader: CheckpointReader) -> dict:
    """The loading report (missing, unexpected and mismatched keys) of ``model`` against the headers.

    A name is found in the files as itself or with the base-model prefix added or removed (as
    ``from_pretrained`` does). Weights tied to each other (the same parameter under several names)
    need one of their names in the files; names the class declares ignorable on load are ignored.
    """
    prefix = getattr(model, "base_model_prefix", "")
    files = {key: reader.shape(key) for key in reader.keys()}

    def in_files(name: str) -> str | None:
        for candidate in (name, f"{prefix}.{name}" if prefix else None,
                          name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
            if candidate is not None and candidate in files:
                return candidate
        return None

    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    file_names = _file_names(model)
    missing, found, mismatched = [], set(), []
    for names in groups.values():
        forms = [form for name in names for form in file_names[name]]
        held = [form for form in forms if all(in_files(f) for f in form)]
        if not held:  # reported under the name the model has
            missing.append(names[0])
            continue
        for form in held:
            for file_name, shape in form.items():
                stored = in_files(file_name)
                found.add(stored)
                if tuple(files[stored]) != shape:
                    mismatched.append((stored, tuple(files[stored]), shape))
    ignore_missing = _ignored(model, "_keys_to_ignore_on_load_missing")
    missing = [k for k in missing if not any(p.search(k) for p in ignore_missing)]
    ignore_unexpected = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    unexpected = [k for k in files if k not in found and not any(p.search(k) for p in ignore_unexpected)]
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}


_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
                   (torch.float16, torch.float64), (torch.float32, torch.float64)}


def _compare_headers(model, reader: CheckpointReader) -> int:
    """Every file tensor found in the meta-loaded model by name has its shape there, and a dtype that
    holds its stored values exactly (P: its stored dtype). Returns the number compared."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    reshaped, changed, compared = [], [], 0
    for key in reader.keys():
        name = _loaded_name(key, state, prefix)
        if name is None:  # renamed on load; the loading report covers it
            continue
        loaded, stored = state[name], _TORCH_DTYPES[reader.dtype(key)]
        if tuple(loaded.shape) != reader.shape(key):
            reshaped.append(f"{key} {reader.shape(key)} -> {tuple(loaded.shape)}")
        elif loaded.dtype != stored and (key.endswith(SCALE_BUFFER) or (stored, loaded.dtype) not in _EXACT_WIDENING):
            changed.append(f"{key} ({stored} -> {loaded.dtype})")
        compared += 1
    _tensor_problems(reshaped, changed)
    return compared


def _compare_with_reference_tensors(reference: torch.nn.Module, reader: CheckpointReader) -> None:
    """Every file tensor equals the in-memory model's tensor of that name, one tensor at a time."""
    state = reference.state_dict()
    prefix = getattr(reference, "base_model_prefix", "")
    changed = []
    for key in reader.keys():
        name = _loaded_name(key, state, prefix)
        if name is None:
            continue
        held = state[name].detach()
        stored = reader.get(key)
        if tuple(held.shape) != tuple(stored.shape) or not torch.equal(held.cpu(), stored.to(held.dtype)):
            changed.append(key)
    if changed:
        _fail("the written tensors differ from the model in memory", changed)


def _check_whole(directory: Path, config: dict, reader: CheckpointReader, reference) -> int:
    """The check with the whole model loaded by ``from_pretrained`` (checkpoints below FULL_LOAD_BELOW)."""
    try:
        loaded, info = _load(directory, config)
    except Exception as exc:  # any failure to load what we wrote is our bug
        _fail("it does not load", [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])
    _loading_problems(info)
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
        loaded.float()  # the site check runs in float32, as its references (P stays float32)
        _compare_sites(loaded, config, reader)
    return compared


def _check_streaming(directory: Path, config: dict, reader: CheckpointReader, reference) -> int:
    """The check without holding the model: meta load, headers, per-site forwards (and reference tensors)."""
    from mlpfuse.checkpoints.modeling import UncleanCheckpoint

    try:
        model, info = _load_meta(directory, config, reader)
    except UncleanCheckpoint:
        raise
    except Exception as exc:  # any failure to load what we wrote is our bug
        _fail("it does not load", [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])
    _loading_problems(info)
    compared = _compare_headers(model, reader)
    if reference is not None:
        _compare_with_reference_tensors(reference, reader)
    if is_fused_config(config):
        _compare_sites(model.eval(), config, reader)
    return compared


def weight_bytes(reader: CheckpointReader) -> int:
    """Bytes of a checkpoint's weight files."""
    return sum(file.stat().st_size for file in reader.files)


def check_loads_clean(directory: Path, reference: torch.nn.Module | None = None) -> int:
    """See :func:`mlpfuse.checkpoints.modeling.verify_checkpoint`."""
    config = read_config(directory)
    try:
        reader = CheckpointReader(directory)
    except InputError as exc:  # unreadable files we wrote: our bug, as a failed load
        _fail("it does not load", [str(exc)])
    if reader.is_safetensors and weight_bytes(reader) >= FULL_LOAD_BELOW:
        return _check_streaming(directory, config, reader, reference)
    return _check_whole(directory, config, reader, reference)
