"""The calibration pass of ``fuse --calibration``: a batched sequential pipeline, layer by layer.

The design of llm-compressor's "sequential" pipeline and of GPTQ's: the calibration sequences go
through the model one transformer layer at a time, in mini-batches (``--calibration-batch-size``),
with only that layer's weights in memory (read once from the memory-mapped files):

1. **Capture** (:meth:`StreamingModel.capture`): the base model (no task head) runs on each
   mini-batch with every transformer layer replaced by a recorder that keeps the call's arguments
   (hidden states, masks, position embeddings: per layer, so sliding and global layers each get
   their own) and passes the hidden states through. Parameters live on ``meta`` except the
   embeddings and the modules outside the layers.
2. **Per layer**, on the cached inputs of every mini-batch: run the original layer and catch each
   chosen MLP's input ``x`` (padding removed) and, on the first mini-batch, its intermediate values
   (to identify the activation); compress the MLP from statistics accumulated over the cached
   ``x`` chunks (``methods.calibrated``); run the layer again with the compressed MLP's output in
   place of the original's: those outputs are the next layer's inputs, so every later layer is
   compressed on what the already-compressed layers produce.
3. **Reference**: the uncompressed chain runs beside it on its own cached inputs (it is the same
   chain until the first compressed layer); the last layer's outputs of both chains give the
   reported ``hidden_state_error``.

The caches (both chains' hidden states and one layer's MLP inputs) stay on the compute device when
they fit, else in CPU memory ("offloaded", said in the report); a calibration that cannot fit in
CPU memory either is refused before any work, naming the flags that shrink it. No architecture
names: the layers are the children of the module lists that hold the MLP sites, and the MLP's
elementwise activation is identified from the config's activation names checked against the
layer's own forward. Mixture-of-Experts layers and encoder-decoder models are refused with one
line (docs/llm.md).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from mlpfuse.arch import MLPSite
from mlpfuse.arch.activations import capture, token_rows
from mlpfuse.arch.io import read_mlp, tensor_names
from mlpfuse.checkpoints.tensors import CheckpointReader
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.data import read_table
from mlpfuse.errors import InputError
from mlpfuse.methods import Calibration, MethodOptions
from mlpfuse.options import CALIBRATION_DEFAULTS, check_positive

# The field's usual calibration for decoders (GPTQ, llm-compressor): 128 sequences of 2,048 tokens
# (shortened to the model's positions). Encoders read one sentence per sequence: 512 of them.
DEFAULT_LIMIT = 128  # decoders: sequences (windows of packed text)
DEFAULT_ENCODER_LIMIT = 512  # encoders: sequences (rows)
DEFAULT_MAX_LENGTH = CALIBRATION_DEFAULTS["max_length"]  # tokens per calibration sequence
DEFAULT_BATCH_SIZE = CALIBRATION_DEFAULTS["calibration_batch_size"]  # sequences per mini-batch of the layer-by-layer pass
DEFAULT_PROTECT = CALIBRATION_DEFAULTS["protect"]  # protected neurons: a fraction of the fused width (>= 1: a count)
DEFAULT_RIDGE = CALIBRATION_DEFAULTS["ridge"]  # ridge strength alpha of the output refit (scale-free, see methods.calibrated.ridge_refit)
DEFAULT_GROUPING = CALIBRATION_DEFAULTS["grouping"]  # calibrated fusion/cluster: representatives by selection (or "kmeans")
GROUPINGS = ("select", "kmeans")
ACTIVATION_TOLERANCE = 1e-3  # relative error allowed when checking a candidate activation against the layer


@dataclass
class CalibrationData:
    """The calibration sequences: ``input_ids`` and ``attention_mask`` [sequences, length], and provenance."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    file: str
    sha256: str
    texts: int
    packed: bool

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) mini-batches of ``size`` sequences, in order."""
        return [(self.input_ids[i:i + size], self.attention_mask[i:i + size])
                for i in range(0, self.input_ids.shape[0], size)]


_LIMIT = re.compile(r"^\s*(\d+)\s*([km]?)\s*(sequences?|seqs?|tokens?)?\s*$", re.IGNORECASE)


def parse_limit(value) -> tuple[int, str]:
    """``--calibration-limit`` as (count, "sequences" | "tokens"): an integer counts sequences;
    ``"65536 tokens"``, ``"64k tokens"``, ``"128 sequences"`` say which. Raises InputError."""
    if isinstance(value, int) and not isinstance(value, bool):
        count, unit = value, "sequences"
    else:
        match = _LIMIT.match(str(value)) if isinstance(value, str) else None
        if match is None:
            raise InputError(f"--calibration-limit must be a count of sequences (128) or of tokens "
                             f"('65536 tokens', '64k tokens'), got {value!r}")
        count = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[match.group(2).lower()]
        unit = "tokens" if (match.group(3) or "").lower().startswith("token") else "sequences"
    if count < 1:
        raise InputError(f"--calibration-limit must be at least 1, got {value!r}")
    return count, unit


def check_settings(limit, max_length, protect, ridge, text_column, batch_size=DEFAULT_BATCH_SIZE,
                   grouping=DEFAULT_GROUPING) -> None:
    """Refuse bad calibration values with one-line InputErrors (before any work)."""
    if limit is not None:
        parse_limit(limit)
    check_positive(batch_size, "--calibration-batch-size", integer=True)
    check_positive(max_length, "--max-length", integer=True)
    if max_length < 2:
        raise InputError(f"--max-length must be an integer >= 2, got {max_length!r}")
    check_positive(protect, "--protect", allow_zero=True)
    if protect >= 1 and protect != int(protect):
        raise InputError(f"--protect must be a fraction in [0, 1) or a whole count >= 1, got {protect!r}")
    check_positive(ridge, "--ridge", allow_zero=True)
    if grouping not in GROUPINGS:
        raise InputError(f"--grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    if not isinstance(text_column, str) or not text_column:
        raise InputError(f"--text-column must name a column, got {text_column!r}")


def read_calibration(path: str, tokenizer, *, limit, max_length: int, text_column: str,
                     packed: bool) -> CalibrationData:
    """Tokenise calibration text from ``text_column`` of the text table ``path``.

    ``limit``: see :func:`parse_limit` (sequences or tokens). ``packed`` (decoder LMs): the rows are
    joined with newlines and cut into windows of ``max_length`` tokens as ``mlpfuse eval`` reads text
    (the last one padded); ``limit`` sequences are that many windows. Otherwise one sequence per
    row, with special tokens, truncated to ``max_length``. Raises InputError for a missing file or
    column, an empty text, or text without tokens.
    """
    from mlpfuse.train.evaluate import packed_windows, padded_batch

    count, unit = parse_limit(limit)
    # a row gives at least one token: no more rows than tokens are needed
    table = read_table(path, limit=count * max_length if packed and unit == "sequences" else count)
    texts = table.texts(text_column)
    empty = next((i for i, text in enumerate(texts) if not text.strip() or text == "None"), None)
    if empty is not None:
        raise InputError(f"calibration file {path}: row {empty + 1} of column {text_column!r} is empty; "
                         f"remove empty rows or choose another --text-column")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if packed:
        windows = packed_windows(tokenizer, texts, max_length,
                                 limit_tokens=count * max_length if unit == "sequences" else count)
        if not windows:
            raise InputError(f"calibration file {path}: the text gives fewer than 2 tokens")
        ids, mask = padded_batch(windows, tokenizer.pad_token_id)
    else:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if unit == "tokens":  # the first rows that hold ``count`` tokens
            keep = int(torch.searchsorted(mask.sum(1).cumsum(0), torch.tensor(count))) + 1
            ids, mask = ids[:keep], mask[:keep]
            ids, mask = ids[:, :int(mask.sum(1).max())], mask[:, :int(mask.sum(1).max())]
    return CalibrationData(ids, mask, str(path), digest, len(texts), packed)


@contextmanager
def _parameters_on_meta():
    """While active, every parameter a module registers is created on the ``meta`` device (buffers are not)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_meta_model(source_dir: Path):
    """The checkpoint's transformers model (float32, eval), parameters on ``meta``, buffers real."""
    import transformers

    from mlpfuse.checkpoints.modeling import model_class_for

    config = transformers.AutoConfig.from_pretrained(str(source_dir))
    config._attn_implementation = "eager"  # the reference implementation, on every device
    with _parameters_on_meta():
        model = model_class_for(config)._from_config(config, dtype=torch.float32)
    return model.eval()


def layer_path(site_path: str) -> str:
    """The transformer layer holding an MLP site: its path up to the first numeric component."""
    parts = site_path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None:
        raise InputError(f"cannot find the transformer layer of {site_path}: --calibration does not support this model")
    return ".".join(parts[:index + 1])


def _activation_candidates(config: dict):
    """(name, function) pairs: activations named in the config first, then every transformers activation."""
    from transformers.activations import ACT2FN

    named = [v for v in config.values() if isinstance(v, str) and v in ACT2FN]
    for name in dict.fromkeys(named + list(ACT2FN)):
        try:
            yield name, ACT2FN[name]
        except (TypeError, ValueError, ImportError, KeyError):  # one that needs arguments or a missing package
            continue


def identify_activation(mlp: MLPWeights, x: torch.Tensor, h: torch.Tensor, config: dict, label: str) -> Callable:
    """The elementwise activation that reproduces the layer's own intermediate ``h`` [tokens, I] from ``x``.

    Tries the activations named in the config first. Raises InputError when none matches (the MLP
    is not of the form the methods assume).
    """
    up = torch.nn.functional.linear(x, mlp.w_in.float(), None if mlp.b_in is None else mlp.b_in.float())
    gate = None if mlp.w_gate is None else torch.nn.functional.linear(
        x, mlp.w_gate.float(), None if mlp.b_gate is None else mlp.b_gate.float())
    scale = float(h.abs().max().clamp_min(1e-12))
    best = None
    for name, fn in _activation_candidates(config):
        with torch.no_grad():
            guess = fn(up) if gate is None else fn(gate) * up
        if guess.shape != h.shape or not torch.isfinite(guess).all():
            continue
        error = float((guess - h).abs().max()) / scale
        if error <= ACTIVATION_TOLERANCE:
            return fn
        best = min(best or (error, name), (error, name))
    raise InputError(f"layer {label}: the MLP's activation is none of transformers' activations (closest: "
                     f"{best[1] if best else '?'}); --calibration does not support this model")


def _float(mlp: MLPWeights, device) -> MLPWeights:
    def cast(t):
        return None if t is None else t.to(device=device, dtype=torch.float32)

    return replace(mlp, **{f: cast(getattr(mlp, f)) for f in ("w_in", "w_out", "b_in", "w_gate", "b_gate", "b_out", "scale")},
                   low_rank={})


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (float64; 0 when both are zero)."""
    diff = float((approx.double() - exact.double()).norm())
    norm = float(exact.double().norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a transformer layer is called with: its first positional argument, or
    ``hidden_states=``. Raises InputError for a layer called otherwise."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise InputError("--calibration: the model calls its layers without hidden states first; "
                         "this model is not supported with --calibration")
    return hidden


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_tensor(output) -> torch.Tensor:
    """A layer's output hidden states: the tensor itself, or the first element of its tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _like(output, hidden: torch.Tensor):
    """``output``'s structure (a tensor or a tuple) with ``hidden`` as its hidden states."""
    return hidden if isinstance(output, torch.Tensor) else (hidden,) + tuple(output[1:])


@dataclass
class LayerCall:
    """How the model calls one layer on one mini-batch: the arguments besides the hidden states."""

    args: tuple
    kwargs: dict

    def __call__(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = _with_hidden(self.args, self.kwargs, hidden)
        return _first_tensor(layer(*args, **kwargs))


class StreamingModel:
    """A checkpoint's base model with one transformer layer in memory at a time (see module docstring)."""

    def __init__(self, source_dir: Path, reader: CheckpointReader, prefix: str, sites: list[MLPSite],
                 device: str | torch.device = "cpu"):
        self.reader, self.prefix, self.device = reader, prefix, torch.device(device)
        self.model = build_meta_model(source_dir)
        self.base = self.model.base_model
        self.config = self.model.config.to_dict()
        containers = {layer_path(site.path).rsplit(".", 1)[0] for site in sites}
        self.layers = {f"{c}.{name}": module for c in sorted(containers)
                       for name, module in self.base.get_submodule(c).named_children()}
        self._meta: dict[str, tuple[torch.nn.Module, str, torch.nn.Parameter]] = {}
        for name, param in list(self.base.named_parameters()):
            if not any(name.startswith(f"{path}.") for path in self.layers):
                self._load_parameter(name)
        for module in self.base.modules():  # buffers to the device (parameters are loaded there)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)

    def _load_parameter(self, name: str) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.base.get_submodule(module_name)
        meta = module._parameters[attr]
        key = f"{self.prefix}{name}"
        if key not in self.reader:
            raise InputError(f"--calibration: the checkpoint has no tensor {key}, which the model's forward needs")
        tensor = self.reader.get(key)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise InputError(f"--calibration: tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(meta.shape)}")
        self._meta.setdefault(name, (module, attr, meta))
        module._parameters[attr] = torch.nn.Parameter(tensor.to(self.device, torch.float32), requires_grad=False)

    def load(self, path: str) -> None:
        """Read layer ``path``'s parameters from the files onto the device."""
        for name, _ in list(self.layers[path].named_parameters()):
            self._load_parameter(f"{path}.{name}")

    def unload(self, path: str) -> None:
        """Put layer ``path``'s parameters back on ``meta``."""
        for name in [n for n in self._meta if n.startswith(f"{path}.")]:
            module, attr, meta = self._meta.pop(name)
            module._parameters[attr] = meta

    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if "use_cache" in inspect.signature(self.base.forward).parameters:
            kwargs["use_cache"] = False
        return kwargs

    def capture(self, batches: list) -> tuple[list[torch.Tensor], dict[str, list[LayerCall]]]:
        """(first layer's input hidden states per mini-batch, each layer's :class:`LayerCall` per mini-batch).

        Every layer is replaced by a recorder for the duration: one forward of the base model per
        mini-batch computes the embeddings, masks and position embeddings with the model's own
        code and no layer's weights. The first call runs the real first layer once to learn the
        structure of a layer's output (a tensor or a tuple), which the recorders return.
        """
        paths = list(self.layers)
        calls: dict[str, list[LayerCall]] = {path: [] for path in paths}
        first: list[torch.Tensor] = []
        shape: dict = {}

        def recorder(path: str, layer: torch.nn.Module):
            def record(*args, **kwargs):
                hidden = _hidden_of(args, kwargs)
                rest_args, rest_kwargs = _with_hidden(args, kwargs, None) if args else (
                    (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
                calls[path].append(LayerCall(rest_args, rest_kwargs))
                if path == paths[0]:
                    first.append(hidden)
                if "output" not in shape:
                    self.load(path)
                    try:
                        shape["output"] = type(layer).forward(layer, *args, **kwargs)
                    finally:
                        self.unload(path)
                return _like(shape["output"], hidden)
            return record

        for path, layer in self.layers.items():
            layer.forward = recorder(path, layer)
        try:
            with torch.no_grad():
                for ids, mask in batches:
                    self.base(**self._inputs(ids, mask))
        finally:
            for layer in self.layers.values():
                del layer.forward
        missing = [path for path in paths if len(calls[path]) != len(batches)]
        if missing:
            raise InputError(f"--calibration: the forward pass never reached layer(s) {', '.join(missing)}")
        return first, calls


@dataclass
class CalibrationResult:
    """What the pass measured and how it ran."""

    hidden_state_error: float  # the last layer's output, compressed vs original chain (relative)
    tokens: int
    sequences: int
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "cpu"
    cache: str = "cpu"  # where the cached hidden states and MLP inputs were kept
    layer_seconds: dict = field(default_factory=dict)  # layer path -> seconds (compressed layers)


def _bytes_available(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_device(data: CalibrationData, hidden: int, device: torch.device) -> torch.device:
    """Where the pass keeps its caches: ``device`` when they fit in half of its free memory, else
    the CPU. Raises InputError when they do not fit in CPU memory either."""
    need = 3 * data.tokens * hidden * 4 + data.input_ids.numel() * hidden * 8  # 2 chains + MLP inputs, padding
    if device.type == "cuda" and need < 0.5 * (_bytes_available(device) or 0):
        return device
    free = _bytes_available(torch.device("cpu"))
    if free is not None and need > 0.8 * free:
        raise InputError(f"--calibration needs about {need / 2**30:.1f} GiB for {data.tokens:,} tokens and "
                         f"only {free / 2**30:.1f} GiB is free; lower --calibration-limit or --max-length")
    return torch.device("cpu")


def run_calibrated(stream: StreamingModel, data: CalibrationData, plans: list, keys, options: MethodOptions,
                   protect: float, ridge: float, compress: Callable, emit: Callable,
                   batch_size: int = DEFAULT_BATCH_SIZE, grouping: str = DEFAULT_GROUPING) -> CalibrationResult:
    """Compress every planned site on its calibration inputs, layer by layer, and emit each result.

    ``compress(plan, mlp, options) -> (compressed MLPWeights, FusedLayer)`` compresses one site with
    ``options.calibration`` set (its ``report`` gets ``seconds``, the whole layer's);
    ``emit(FusedLayer)`` writes it. See the module docstring for the passes. Raises InputError when
    a site is not reached by the forward.
    """
    batches = data.batches(batch_size)
    masks = [mask.to(stream.device).bool() for _, mask in batches]
    hidden, calls = stream.capture(batches)
    store = cache_device(data, int(hidden[0].shape[-1]), stream.device)
    chain = [h.to(store) for h in hidden]
    reference = None  # the original chain, once it differs from the compressed one
    by_layer: dict[str, list] = {}
    for plan in plans:
        by_layer.setdefault(layer_path(plan.site.path), []).append(plan)
    unknown = [plan.site.label for path, group in by_layer.items() if path not in stream.layers for plan in group]
    if unknown:
        raise InputError(f"--calibration: the forward pass never reached layer(s) {', '.join(unknown)}")
    seconds: dict[str, float] = {}

    def run(layer, path, inputs):
        return [calls[path][b](layer, inputs[b].to(stream.device)).to(store) for b in range(len(batches))]

    with torch.no_grad():
        for path, layer in stream.layers.items():
            started = time.perf_counter()
            stream.load(path)
            group = by_layer.get(path, [])
            if not group:
                if reference is not None:
                    reference = run(layer, path, reference)
                chain = run(layer, path, chain)
                stream.unload(path)
                continue
            # until the first compressed layer both chains are one: the original layer's outputs are the reference
            inputs, outputs = _capture_mlp_inputs(stream, layer, path, group, calls, chain, masks, store,
                                                  keep_outputs=reference is None)
            reference = outputs if reference is None else run(layer, path, reference)
            compressed = {}
            for plan in group:
                mlp = read_mlp(plan.site, tensor_names(plan.site, stream.prefix, keys), stream.reader.get)
                x, first_h = inputs.pop(plan.site.index)  # the MLP inputs go as soon as the site is compressed
                activation = identify_activation(_float(mlp, first_h.device), x[0].to(first_h.device), first_h,
                                                 stream.config, plan.site.label)
                calibration = Calibration(inputs=x, activation=activation, protect=protect, ridge=ridge,
                                          device=stream.device, grouping=grouping)
                weights, fused_layer = compress(plan, mlp, replace(options, calibration=calibration))
                compressed[plan.site.index] = (activation, weights, fused_layer)
            chain = _run_compressed(stream, layer, path, group, compressed, calls, chain, store)
            stream.unload(path)
            seconds[path] = time.perf_counter() - started
            for plan in group:
                fused_layer = compressed[plan.site.index][2]
                fused_layer.report.seconds = seconds[path]
                emit(fused_layer)
    if reference is None:
        reference = chain
    error = _chain_error(chain, reference, masks)
    return CalibrationResult(error, data.tokens, int(data.input_ids.shape[0]), batch_size, str(stream.device),
                             str(store), seconds)


class _Captured(Exception):
    """Raised by a hook once every MLP input of a layer is caught: the rest of its forward is not needed."""


def _capture_mlp_inputs(stream, layer, path, group, calls, chain, masks, store, keep_outputs: bool):
    """Run the original layer on the cached inputs: each site's MLP inputs as chunks (padding removed)
    with its first mini-batch's intermediate values. With ``keep_outputs`` the layer's outputs too;
    without, each mini-batch after the first stops as soon as its MLP inputs are caught."""
    inputs = {plan.site.index: ([], None) for plan in group}
    stop = {"armed": False}
    outputs = []

    def caught_input(index):
        if stop["armed"] and all(caught.get(plan.site.index, "x") is not None for plan in group):
            raise _Captured

    with capture(stream.base, [plan.site for plan in group], ("x", "h"), on_input=caught_input) as caught:
        for b, call in enumerate(calls[path]):
            caught.clear()
            stop["armed"] = b > 0 and not keep_outputs
            try:
                out = call(layer, chain[b].to(stream.device))
                if keep_outputs:
                    outputs.append(out.to(store))
            except _Captured:
                pass
            for plan in group:
                index = plan.site.index
                if caught.get(index, "x") is None:
                    raise InputError(f"--calibration: the forward pass never reached layer {plan.site.label}")
                chunks, first_h = inputs[index]
                chunks.append(token_rows(caught.get(index, "x"), masks[b]).float().to(store))
                if first_h is None:
                    inputs[index] = (chunks, token_rows(caught.get(index, "h"), masks[b]).float())
    return inputs, outputs


@contextmanager
def _compressed_in_place(stream, group, compressed):
    """While active, each site's MLP computes only its compressed form: the input-side modules return
    a width-1 zero (cheap, whatever the MLP does with it) and the output module returns the compressed
    MLP's output on the input the first module saw."""
    saved = []
    try:
        for plan in group:
            site = plan.site
            activation, weights, _ = compressed[site.index]
            fused = _float(weights, stream.device)
            seen = {}
            for position, module_spec in enumerate(site.modules):
                module = stream.base.get_submodule(module_spec.path)
                saved.append(module)
                if "down" in module_spec.roles:
                    module.forward = lambda h, seen=seen, fused=fused, act=activation: \
                        fused.forward(seen["x"].float(), act).to(h.dtype)
                else:
                    first = position == 0
                    width = len(module_spec.roles) if module_spec.packed else 1

                    def cheap(x, seen=seen, first=first, width=width):
                        if first:
                            seen["x"] = x
                        return x.new_zeros(x.shape[:-1] + (width,))

                    module.forward = cheap
        yield
    finally:
        for module in saved:
            module.__dict__.pop("forward", None)


def _run_compressed(stream, layer, path, group, compressed, calls, chain, store):
    """The layer's outputs with each chosen MLP replaced by its compressed form: the next layer's inputs."""
    with _compressed_in_place(stream, group, compressed):
        return [calls[path][b](layer, chain[b].to(stream.device)).to(store) for b in range(len(chain))]


def _chain_error(chain: list, reference: list, masks: list) -> float:
    """``||chain - reference|| / ||reference||`` over the real tokens of every mini-batch."""
    diff = norm = 0.0
    for got, want, mask in zip(chain, reference, masks):
        got, want = token_rows(got, mask.to(got.device)).double(), token_rows(want, mask.to(want.device)).double()
        diff += float((got - want).pow(2).sum())
        norm += float(want.pow(2).sum())
    return math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else float("inf"))
