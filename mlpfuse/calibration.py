"""The calibration pass of ``fuse --calibration``: the model run layer by layer on calibration text.

One forward of the base model (``model.base_model``, no task head) on one calibration batch, with
the model's weights kept on the ``meta`` device except one transformer layer at a time, so a model
larger than memory still streams:

- the model is built from its config with every *parameter* on ``meta`` (buffers are built for real,
  so rotary ``inv_freq``, position ids and causal masks hold their values);
- the modules outside the transformer layers (embeddings, final norm) are loaded once from the
  checkpoint;
- a forward pre-hook on each transformer layer loads that layer's tensors from the checkpoint and a
  forward hook puts it back on ``meta``;
- on each chosen MLP, a pre-hook on its first (up or gate) projection keeps its input ``x``; a
  forward hook on its down projection, whose output is the MLP's output, compresses the MLP with
  ``x`` (padding removed) through the data-aware form of the method, hands the compressed layer to
  ``emit`` (which writes it) and **replaces** the output with the compressed MLP's output on the
  same input: every later layer sees the inputs the already-compressed layers produce.

Per-layer masks and position embeddings (sliding vs global layers) come from the model's own code.
No architecture names: the layers are the children of the module lists that hold the MLP sites,
and the MLP's elementwise activation is identified from the config's activation names checked
against the layer's own forward. Mixture-of-Experts layers and encoder-decoder models are refused
with one line (docs/llm.md).
"""

from __future__ import annotations

import hashlib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .arch import MLPSite
from .arch.io import read_mlp, tensor_names
from .checkpoint import CheckpointReader
from .data import read_table
from .errors import InputError
from .methods import Calibration, MethodOptions
from .mlp import MLPWeights
from .options import check_positive

DEFAULT_LIMIT = 512  # calibration texts (rows of the file)
DEFAULT_MAX_LENGTH = 256  # tokens per calibration sequence (decoders: window of packed text)
DEFAULT_PROTECT = 0.02  # protected neurons: a fraction of the fused width (>= 1: a count)
DEFAULT_RIDGE = 1e-3  # ridge strength alpha of the output refit (scale-free, see methods.calibrated.ridge_refit)
ACTIVATION_TOLERANCE = 1e-3  # relative error allowed when checking a candidate activation against the layer


@dataclass
class CalibrationData:
    """One calibration batch: ``input_ids`` and ``attention_mask`` [sequences, length], and provenance."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    file: str
    sha256: str
    texts: int
    packed: bool

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def check_settings(limit, max_length, protect, ridge, text_column) -> None:
    """Refuse bad calibration values with one-line InputErrors (before any work)."""
    check_positive(limit, "--calibration-limit", integer=True)
    check_positive(max_length, "--max-length", integer=True)
    if max_length < 2:
        raise InputError(f"--max-length must be an integer >= 2, got {max_length!r}")
    check_positive(protect, "--protect", allow_zero=True)
    if protect >= 1 and protect != int(protect):
        raise InputError(f"--protect must be a fraction in [0, 1) or a whole count >= 1, got {protect!r}")
    check_positive(ridge, "--ridge", allow_zero=True)
    if not isinstance(text_column, str) or not text_column:
        raise InputError(f"--text-column must name a column, got {text_column!r}")


def read_calibration(path: str, tokenizer, *, limit: int, max_length: int, text_column: str,
                     packed: bool) -> CalibrationData:
    """Tokenise the first ``limit`` rows of ``text_column`` in the text table ``path``.

    ``packed`` (decoder LMs): the rows are joined with newlines, tokenised without special tokens
    and cut into windows of ``max_length`` tokens (the last one padded), as ``mlpfuse eval`` reads
    text; otherwise one sequence per row, with special tokens, truncated to ``max_length``.
    Raises InputError for a missing file or column, an empty text, or text without tokens.
    """
    from .evaluate import packed_windows, padded_batch

    table = read_table(path, limit=limit)
    texts = table.texts(text_column)
    empty = next((i for i, text in enumerate(texts) if not text.strip() or text == "None"), None)
    if empty is not None:
        raise InputError(f"calibration file {path}: row {empty + 1} of column {text_column!r} is empty; "
                         f"remove empty rows or choose another --text-column")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if packed:
        windows = packed_windows(tokenizer, texts, max_length)
        if not windows:
            raise InputError(f"calibration file {path}: the text gives fewer than 2 tokens")
        ids, mask = padded_batch(windows, tokenizer.pad_token_id)
    else:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
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

    from .modeling import model_class_for

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

    def _load(self, path: str, layer: torch.nn.Module) -> None:
        for name, _ in list(layer.named_parameters()):
            self._load_parameter(f"{path}.{name}")

    def _unload(self, path: str) -> None:
        for name in [n for n in self._meta if n.startswith(f"{path}.")]:
            module, attr, meta = self._meta.pop(name)
            module._parameters[attr] = meta

    @contextmanager
    def streaming(self):
        """Hooks that load each layer before its forward and free it after."""
        handles = []
        for path, layer in self.layers.items():
            handles.append(layer.register_forward_pre_hook(lambda module, args, path=path: self._load(path, module)))
            handles.append(layer.register_forward_hook(lambda module, args, output, path=path: self._unload(path)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for path in self.layers:
                self._unload(path)

    def forward(self, data: CalibrationData) -> torch.Tensor:
        """The base model's last hidden state [sequences, length, hidden] on ``data`` (hooks fire)."""
        kwargs = {"input_ids": data.input_ids.to(self.device), "attention_mask": data.attention_mask.to(self.device)}
        if "use_cache" in inspect.signature(self.base.forward).parameters:
            kwargs["use_cache"] = False
        with torch.no_grad(), self.streaming():
            output = self.base(**kwargs)
        return output[0] if isinstance(output, tuple) else output.last_hidden_state


@dataclass
class CalibrationResult:
    """What the pass measured: the final hidden state's relative error (fused vs original) on the batch."""

    hidden_state_error: float
    tokens: int
    sequences: int


def run_calibrated(stream: StreamingModel, data: CalibrationData, plans: list, keys, options: MethodOptions,
                   protect: float, ridge: float, compress: Callable, emit: Callable) -> CalibrationResult:
    """Compress every planned site on its calibration inputs, in forward order, and emit each result.

    ``compress(plan, mlp, options) -> (compressed MLPWeights, FusedLayer)`` compresses one site with
    ``options.calibration`` set (its ``report`` gets ``relative_error``); ``emit(FusedLayer)``
    writes it. First a plain pass gives the original final hidden state; the fusing pass then
    replaces each chosen MLP's output with its compressed form's. Returns the final hidden state's
    relative error. Raises InputError when a site is not reached by the forward.
    """
    mask = data.attention_mask.to(stream.device).bool()
    reference = stream.forward(data)
    done: set[int] = set()
    handles = []

    def attach(plan):
        site = plan.site
        first = stream.base.get_submodule(site.modules[0].path)
        down = stream.base.get_submodule(site.module_path("down"))
        seen = {}

        def keep_input(module, args):
            seen["x"] = args[0]

        def keep_hidden(module, args):
            seen["h"] = args[0]

        def replace_output(module, args, output):
            x = seen["x"]
            tokens = x[mask]
            mlp = read_mlp(site, tensor_names(site, stream.prefix, keys), stream.reader.get)
            activation = identify_activation(_float(mlp, tokens.device), tokens, seen["h"][mask], stream.config, site.label)
            calibration = Calibration(inputs=tokens.detach().cpu(), activation=activation, protect=protect, ridge=ridge)
            compressed, layer = compress(plan, mlp, replace(options, calibration=calibration))
            fused = _float(compressed, x.device).forward(x, activation).to(output.dtype)
            layer.report.relative_error = relative_error(fused[mask], output[mask])
            seen.clear()
            done.add(site.index)
            emit(layer)
            return fused

        handles.extend([first.register_forward_pre_hook(keep_input), down.register_forward_pre_hook(keep_hidden),
                        down.register_forward_hook(replace_output)])

    try:
        for plan in plans:
            attach(plan)
        fused_hidden = stream.forward(data)
    finally:
        for handle in handles:
            handle.remove()
    missing = [plan.site.label for plan in plans if plan.site.index not in done]
    if missing:
        raise InputError(f"--calibration: the forward pass never reached layer(s) {', '.join(missing)}")
    return CalibrationResult(relative_error(fused_hidden[mask], reference[mask]), data.tokens, int(data.input_ids.shape[0]))
