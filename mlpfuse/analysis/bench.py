"""``bench``: training-step time, inference time, peak memory and FLOPs, fused vs original.

Protocol (docs/bench.md):

* every model is built (or loaded) in float32 and trained with AdamW on a fixed random batch; the
  loss is the mean square of the last hidden state (plus that of the pooled output where the model
  has a pooler), so no task head is needed (it would be the same, tiny, for every model);
  ``bf16``/``fp16`` mean autocast mixed precision (fp16 adds a GradScaler on CUDA);
* warm-up steps run model by model; then the timed steps run interleaved (A B A B ...), so drift
  of a shared machine falls on all models alike. Each round times one training step per model
  (zero_grad, forward, backward, AdamW step), then one inference forward per model (eval mode,
  no_grad). CUDA: CUDA events, synchronised after each call; CPU: ``time.perf_counter``;
* peak memory: on CUDA the max allocated bytes during the warm-up training steps of each model,
  measured while it is the newest model on the device (minus what was allocated before it came);
  on CPU each model runs in its own subprocess (same settings, 3 training steps) and the figure is
  its peak resident size during training minus its resident size after imports;
* FLOPs: :mod:`mlpfuse.analysis.flops` (matrix products of one forward, per token).
* ``lora``: the training step trains only the LoRA adapters that ``finetune --lora`` attaches
  (:func:`attach_lora`, :func:`mlpfuse.train.lora.attach`); AdamW holds only them, in the timed run and
  in the memory probe alike.

Presets (``--shape``) build the original from a config with random weights (timing does not depend
on values) and the fused model by fusing a copy in memory. By default the fused copy uses a
round-robin assignment (neuron i joins cluster i mod k: the same shapes and P buffers as MLP
Fusion, without the k-means cost); ``assign="kmeans"`` runs the real method.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Callable

import torch

from mlpfuse import __version__
from mlpfuse.analysis.bench_fuse import fuse_in_memory
from mlpfuse.analysis.flops import count_model
from mlpfuse.arch.presets import PRESETS
from mlpfuse.errors import InputError, MlpfuseError
from mlpfuse.option_fields import LORA
from mlpfuse.options import check_seed
from mlpfuse.runtime import dtype_name, resolve_device

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # runtime.dtype_name -> DTYPES key
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("model", "layers")
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")
ASSIGNMENTS = ("round-robin", "kmeans")
PROBE_STEPS = 3  # training steps in a CPU memory probe: AdamW state exists from step 2 on


# ---------------------------------------------------------------------------------------------
# What to benchmark


@dataclass
class ModelSource:
    """One model to benchmark: a checkpoint, or a config (random weights) optionally fused in memory."""

    label: str
    checkpoint: str | None = None
    config: dict | None = None
    layers: str | None = None
    dim: int | None = None
    assign: str = "round-robin"


def preset_sources(shape: str | dict, layers: str | None = None, dims: list[int] | None = None,
                   assign: str = "round-robin", label: str | None = None) -> list[ModelSource]:
    """The original and one fused model per width in ``dims`` for a preset name or a config dict."""
    if isinstance(shape, dict):
        config, default_layers, default_dims, name = dict(shape), "all", [], label or shape.get("model_type", "custom")
    elif shape in PRESETS:
        preset = PRESETS[shape]
        config, default_layers, default_dims, name = dict(preset.config), preset.layers, [preset.dim], label or shape
    else:
        raise InputError(f"unknown --shape {shape!r}; choose one of: {', '.join(PRESETS)}")
    if assign not in ASSIGNMENTS:
        raise InputError(f"unknown --assign {assign!r}; choose {' or '.join(ASSIGNMENTS)}")
    layers = layers or default_layers
    dims = list(dims or default_dims)
    if not dims:
        raise InputError("give the fused width with --dim")
    sources = [ModelSource(f"{name} original", config=config)]
    for dim in dims:
        sources.append(ModelSource(f"{name} fused {layers}->{dim}", config=config, layers=layers, dim=int(dim), assign=assign))
    return sources


def checkpoint_sources(paths: list[str]) -> list[ModelSource]:
    """One source per checkpoint; the first is the original the others are compared with."""
    if len(paths) < 2:
        raise InputError("give the original checkpoint and at least one fused checkpoint (or use --shape)")
    labels = []
    for path in paths:
        label = Path(path).name or path
        labels.append(label if label not in labels else f"{label} ({len(labels)})")
    return [ModelSource(label, checkpoint=path) for label, path in zip(labels, paths)]


def build_model(source: ModelSource, seed: int = 0) -> torch.nn.Module:
    """The base transformers model (float32, CPU) that ``source`` describes."""
    import transformers

    if source.checkpoint is not None:
        from mlpfuse.checkpoints.modeling import load

        return load(source.checkpoint, task="base", dtype=torch.float32)
    config = dict(source.config)
    model_type = config.pop("model_type")
    torch.manual_seed(seed)  # same seed: the fused model shares every non-MLP weight with the original
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **config))
    model = model.float()
    if source.dim is not None:
        fuse_in_memory(model, source.layers or "all", source.dim, source.assign, seed)
    return model


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class BenchSettings:
    """How to measure. ``device=None`` picks CUDA when available, else the CPU."""

    steps: int = 20
    warmup: int = 3
    batch_size: int = 8
    seq_len: int = 128
    dtype: str = "fp32"
    device: str | None = None
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "model"  # model: one graph for forward+loss; layers: each transformer block (faster to compile)
    adamw: str = "auto"
    lr: float = 1e-5
    seed: int = 0
    memory: bool = True
    inference: bool = True
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    # LoRA (PEFT, mlpfuse/train/lora.py, as ``finetune --lora``): only the adapters train; defaults are finetune's
    lora: bool = False
    lora_rank: int = LORA["lora_rank"].default
    lora_alpha: float = LORA["lora_alpha"].default
    lora_dropout: float = LORA["lora_dropout"].default
    lora_targets: tuple[str, ...] | None = None  # None: every linear projection of the layers

    def validate(self) -> torch.device:
        """Check every field (one-line InputErrors) and return the device to run on."""
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"--warmup must be 0 or more, got {self.warmup}")
        self.dtype = DTYPE_SHORT[dtype_name(self.dtype, flag="--autocast")]
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"unknown --compile-mode {self.compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise InputError(f"unknown --compile-scope {self.compile_scope!r}; choose model or layers")
        if self.adamw not in ADAMW_IMPLS:
            raise InputError(f"unknown --adamw {self.adamw!r}; choose one of: {', '.join(ADAMW_IMPLS)}")
        check_seed(self.seed)
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise InputError(f"--threads must be a positive integer, got {self.threads}")
        if not isinstance(self.lora, bool):
            raise InputError(f"lora must be true or false, got {self.lora!r}")
        from mlpfuse.train.lora import check_settings

        check_settings(self)  # --lora-rank and friends, checked with or without --lora: a bad value is bad
        return resolve_device(self.device)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Timing:
    """Seconds per call over the timed steps: median and spread (quartiles, extremes)."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        ordered = sorted(samples)
        return cls(median(ordered), _quantile(ordered, 0.25), _quantile(ordered, 0.75), ordered[0], ordered[-1], samples)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median else 0.0


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class ModelResult:
    """Everything measured for one model; ``ratios`` are this model / the first (original) model."""

    label: str
    source: str
    fused: bool
    parameters: int
    mlp_parameters: int | None
    mlp_widths: list[int] | None
    flops_per_token: float
    mlp_flops_per_token: float | None
    state_bytes: int
    train_step: Timing
    inference: Timing | None
    train_tokens_per_second: float
    peak_memory_bytes: int | None
    peak_rss_bytes: int | None = None
    trainable_parameters: int | None = None  # what the optimizer holds: every parameter, or the LoRA adapters
    lora: dict | None = None  # with --lora: rank, alpha, dropout, targets, trainable/total parameters (PEFT's count)
    ratios: dict[str, float | None] = field(default_factory=dict)


@dataclass
class BenchReport:
    settings: dict
    device: str
    environment: dict
    models: list[ModelResult]
    memory_method: str | None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = __version__
        data["protocol"] = ("interleaved rounds: one training step per model, then one inference forward per model; "
                            "median and quartiles over the timed rounds")
        return data


RATIO_FIELDS = {
    "train_step": lambda r: r.train_step.median,
    "inference": lambda r: r.inference.median if r.inference else None,
    "peak_memory": lambda r: r.peak_memory_bytes,
    "state_memory": lambda r: r.state_bytes,
    "parameters": lambda r: r.parameters,
    "trainable_parameters": lambda r: r.trainable_parameters,
    "mlp_parameters": lambda r: r.mlp_parameters,
    "flops": lambda r: r.flops_per_token,  # the FLOP bound: the step ratio a purely FLOP-bound run would reach
    "mlp_flops": lambda r: r.mlp_flops_per_token,
}


def _ratios(result: ModelResult, reference: ModelResult) -> dict[str, float | None]:
    ratios = {}
    for name, get in RATIO_FIELDS.items():
        a, b = get(result), get(reference)
        ratios[name] = a / b if a is not None and b else None
    # rounds are interleaved, so per-round ratios cancel the drift of a shared machine
    for name in ("train_step", "inference"):
        mine, theirs = getattr(result, name), getattr(reference, name)
        ratios[f"{name}_paired"] = median(x / y for x, y in zip(mine.samples, theirs.samples)) if mine and theirs else None
    return ratios


# ---------------------------------------------------------------------------------------------
# Running one model


def make_batch(config, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of random token ids (no padding) that every model of the same vocabulary shares."""
    vocab = config.vocab_size
    special = [getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")]
    low = min(max([i for i in special if isinstance(i, int)] + [-1]) + 1, vocab - 1)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def check_seq_len(config, seq_len: int, label: str) -> None:
    """Refuse sequences longer than the model's position table (its family's limit, arch/registry.py)."""
    from mlpfuse.arch import max_positions

    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise InputError(f"--seq-len {seq_len} is longer than {label} allows ({limit} positions)")


def _adamw(model: torch.nn.Module, settings: BenchSettings, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    impl = settings.adamw
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "default"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}.get(impl, {})
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings.lr, **kwargs), impl


def attach_lora(model: torch.nn.Module, settings: BenchSettings) -> tuple[torch.nn.Module, dict | None]:
    """``model`` wrapped for the timed training step: itself, or with ``settings.lora`` the PEFT LoRA
    model of :func:`mlpfuse.train.lora.attach` (the wrapping of ``finetune --lora``: default targets every
    linear projection of the layers; no task head, so nothing else trains).

    Returns the model to train and, with LoRA, its facts: ``rank``, ``alpha``, ``dropout``,
    ``targets``, ``trainable_parameters`` (the adapters) and ``total_parameters`` (PEFT's count:
    base + adapters). The adapters' initial values come from ``torch.manual_seed(settings.seed)``.
    Raises InputError where LoRA cannot go (see :func:`mlpfuse.train.lora.attach`).
    """
    if not settings.lora:
        return model, None
    from mlpfuse.train import lora

    torch.manual_seed(settings.seed)
    wrapped = lora.attach(model, settings, trains_head=False)
    facts = lora.summary(wrapped, merged=False)
    return wrapped, {key: facts[key] for key in ("rank", "alpha", "dropout", "targets", "trainable_parameters",
                                                 "total_parameters")}


class _Runner:
    """One model with its optimizer, batch and (optionally compiled) step functions.

    ``model`` is the plain base model; with ``settings.lora`` the runner trains it wrapped by
    :func:`attach_lora` (``self.model``), and ``self.base`` keeps the plain one.
    """

    def __init__(self, model: torch.nn.Module, batch: dict, settings: BenchSettings, device: torch.device):
        self.base = model
        model, self.lora = attach_lora(model, settings)
        self.model = model.to(device).train()
        self.batch = batch
        self.optimizer, self.adamw = _adamw(model, settings, device)
        dtype = DTYPES[settings.dtype]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 and device.type == "cuda" else None

        def loss_fn(batch):
            out = model(**batch)
            loss = out[0].float().square().mean()
            pooled = getattr(out, "pooler_output", None)  # so that every parameter gets a gradient, as under a task head
            return loss if pooled is None else loss + pooled.float().square().mean()

        def infer_fn(batch):
            return model(**batch)[0]

        self.cudagraphs = settings.compile and settings.compile_mode in ("reduce-overhead", "max-autotune")
        if settings.compile:
            mode = None if settings.compile_mode == "default" else settings.compile_mode
            if settings.compile_scope == "layers":
                for block in transformer_blocks(model):
                    block.compile(mode=mode, dynamic=False)
            else:
                loss_fn, infer_fn = torch.compile(loss_fn, mode=mode), torch.compile(infer_fn, mode=mode)
        self.loss_fn, self.infer_fn = loss_fn, infer_fn

    def train_step(self) -> None:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def infer(self) -> None:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), self.autocast():
            self.infer_fn(self.batch)

    def trainable_parameters(self) -> int:
        """Elements of the parameters the optimizer updates."""
        return sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])

    def state_bytes(self) -> int:
        """Weights + buffers + gradients + optimizer state, in bytes."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the members of its outermost ``nn.ModuleList``s."""
    blocks, taken = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(prefix + ".") for prefix in taken):
            taken.append(name)
            blocks.extend(module)
    return blocks


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _set_mode(runners: list[_Runner], training: bool) -> None:
    for runner in runners:
        runner.model.train(training)


# ---------------------------------------------------------------------------------------------
# CPU memory: one subprocess per model


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def probe_memory(source: ModelSource, settings: BenchSettings) -> dict:
    """Peak resident memory of ``PROBE_STEPS`` training steps of one model, in this process.

    Meant to run in a fresh subprocess (``python -m mlpfuse.analysis.bench``): ``baseline_rss_bytes`` is the
    process after imports (peft's too with ``settings.lora``: the model trains wrapped as in the
    timed run, :func:`attach_lora`), ``peak_rss_bytes`` the peak during training (the model build's own peak
    is excluded where the kernel lets the mark be reset), ``peak_memory_bytes`` their difference.
    """
    if settings.lora:  # peft's import is not the model's memory
        from mlpfuse.train.lora import _peft

        _peft()
    baseline = _proc_status("VmRSS") or _peak_rss()
    device = torch.device("cpu")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = build_model(source, settings.seed)
    batch = make_batch(model.config, settings.batch_size, settings.seq_len, device, settings.seed)
    runner = _Runner(model, batch, settings, device)
    reset = _reset_peak_rss()
    for _ in range(PROBE_STEPS):
        runner.train_step()
    peak = _peak_rss()
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_memory_bytes": peak - baseline,
            "build_excluded": reset, "trainable_parameters": runner.trainable_parameters()}


def _run_probe(source: ModelSource, settings: BenchSettings) -> dict:
    request = json.dumps({"source": asdict(source), "settings": asdict(settings)})
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    env.setdefault("HF_HUB_OFFLINE", "1")
    # a fixed mmap threshold: large blocks go back to the OS when freed, so RSS follows live memory
    # (glibc's dynamic threshold would keep the fused preset's freed full-width weights resident)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    done = subprocess.run([sys.executable, "-m", "mlpfuse.analysis.bench"], input=request, capture_output=True,
                          text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MlpfuseError(f"memory probe for {source.label} failed: {tail}") from None
    if "input_error" in result:  # the child refused the input (e.g. no module LoRA can take): the same one line
        raise InputError(result["input_error"])
    if "error" in result:
        raise MlpfuseError(f"memory probe for {source.label} failed: {result['error']}")
    return result


def _probe_main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        result = probe_memory(ModelSource(**request["source"]), BenchSettings(**request["settings"]))
    except InputError as exc:
        result = {"input_error": str(exc)}
    except Exception as exc:  # reported to the parent as one line
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------
# The benchmark


def environment(device: torch.device) -> dict:
    """Machine and package facts recorded with every report."""
    import transformers

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mlpfuse": __version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(sources: list[ModelSource], settings: BenchSettings,
              on_event: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark ``sources`` (the first is the reference) and return the report. See the module docstring."""
    start = time.perf_counter()
    device = settings.validate()
    if len(sources) < 2:
        raise InputError("bench needs the original and at least one fused model")
    say = on_event or (lambda text: None)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            return _run(sources, settings, device, say, start)
    finally:
        torch.set_num_threads(threads)


def source_config(source: ModelSource):
    """The (base architecture) transformers config of ``source``, without building the model."""
    import transformers

    if source.checkpoint is None:
        config = dict(source.config)
        return transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    from mlpfuse.checkpoints.modeling import checkpoint_config

    return checkpoint_config(source.checkpoint)


def _run(sources, settings, device, say, start) -> BenchReport:
    for source in sources:  # fail before any expensive step
        check_seq_len(source_config(source), settings.seq_len, source.label)
    probes: list[dict | None] = [None] * len(sources)
    memory_method = None
    if settings.memory and device.type == "cpu":
        memory_method = "cpu: peak RSS growth of a subprocess per model (3 training steps)"
        for i, source in enumerate(sources):
            say(f"memory probe (subprocess): {source.label}")
            probes[i] = _run_probe(source, settings)
    elif settings.memory:
        memory_method = "cuda: max allocated during the warm-up training steps, per model"

    runners, counts, peaks = [], [], []
    for source in sources:
        say(f"building {source.label}")
        model = build_model(source, settings.seed)
        batch = make_batch(model.config, settings.batch_size, settings.seq_len, device, settings.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        cpu_batch = make_batch(model.config, 1, settings.seq_len, torch.device("cpu"), settings.seed)
        counts.append(count_model(model, cpu_batch))
        runner = _Runner(model, batch, settings, device)
        say(f"warm-up: {source.label}")
        # memory needs two steps: AdamW allocates its moments during the first
        warm = max(settings.warmup, 2) if settings.memory and device.type == "cuda" else settings.warmup
        for _ in range(warm):
            runner.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before if settings.memory else None)
        if settings.inference:
            runner.model.eval()
            for _ in range(settings.warmup):
                runner.infer()
            runner.model.train()
        runners.append(runner)
    if device.type == "cuda":
        torch.cuda.synchronize()

    train = [[] for _ in runners]
    infer = [[] for _ in runners]
    say(f"timing {settings.steps} interleaved rounds of {len(runners)} models")
    for _ in range(settings.steps):
        for i, runner in enumerate(runners):
            train[i].append(_timed(runner.train_step, device))
        if settings.inference:
            _set_mode(runners, False)
            for i, runner in enumerate(runners):
                infer[i].append(_timed(runner.infer, device))
            _set_mode(runners, True)

    tokens = settings.batch_size * settings.seq_len
    results = []
    for i, (source, runner, count) in enumerate(zip(sources, runners, counts)):
        probe = probes[i]
        timing = Timing.of(train[i])
        results.append(ModelResult(
            label=source.label,
            source=source.checkpoint or f"config {source.config.get('model_type')}"
            + (f", fused {source.layers}->{source.dim} ({source.assign})" if source.dim else ""),
            fused=bool(source.dim) or bool(getattr(runner.base.config, "mlpfuse", None)),
            parameters=count.parameters,
            mlp_parameters=count.mlp_parameters,
            mlp_widths=count.mlp_widths,
            flops_per_token=count.flops_per_token,
            mlp_flops_per_token=count.mlp_flops_per_token,
            state_bytes=runner.state_bytes(),
            train_step=timing,
            inference=Timing.of(infer[i]) if settings.inference else None,
            train_tokens_per_second=tokens / timing.median,
            peak_memory_bytes=probe["peak_memory_bytes"] if probe else (peaks[i] if peaks else None),
            peak_rss_bytes=probe["peak_rss_bytes"] if probe else None,
            trainable_parameters=runner.trainable_parameters(),
            lora=runner.lora,
        ))
        if probe and probe.get("trainable_parameters") != runner.trainable_parameters():
            raise MlpfuseError(f"the memory probe of {source.label} trained {probe.get('trainable_parameters')} "
                               f"parameters, the timed run {runner.trainable_parameters()}; an mlpfuse bug")
    for result in results[1:]:
        result.ratios = _ratios(result, results[0])
    settings_dict = asdict(settings)
    settings_dict["adamw_resolved"] = runners[0].adamw
    return BenchReport(settings=settings_dict, device=str(device), environment=environment(device), models=results,
                       memory_method=memory_method, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Plot


def plot_report(report: BenchReport, path: str | Path) -> Path:
    """A PNG: median times with quartile bars (left) and fused/original ratios with the FLOP bound (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report.models
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [m.label for m in models]
    xs = range(len(models))
    kinds = [("train step", lambda m: m.train_step)] + ([("inference", lambda m: m.inference)] if models[0].inference else [])
    width = 0.8 / len(kinds)
    for j, (name, get) in enumerate(kinds):
        med = [get(m).median * 1e3 for m in models]
        err = [[(get(m).median - get(m).p25) * 1e3 for m in models], [(get(m).p75 - get(m).median) * 1e3 for m in models]]
        left.bar([x + j * width for x in xs], med, width, yerr=err, capsize=3, label=name)
    left.set_xticks([x + width * (len(kinds) - 1) / 2 for x in xs], labels, rotation=15, ha="right", fontsize=8)
    left.set_ylabel("ms (median, quartiles)")
    left.legend()
    lora = f", LoRA r={report.settings['lora_rank']}" if report.settings.get("lora") else ""
    left.set_title(f"{report.settings['dtype']}{lora} batch {report.settings['batch_size']} x seq {report.settings['seq_len']}"
                   f" on {report.environment.get('gpu', report.device)}", fontsize=9)

    names = [n for n in ("train_step", "inference", "peak_memory", "parameters") if models[1].ratios.get(n) is not None]
    width = 0.8 / max(1, len(models) - 1)
    for j, model in enumerate(models[1:]):
        right.bar([x + j * width for x in range(len(names))], [model.ratios[n] for n in names], width, label=model.label)
        right.axhline(model.ratios["flops"], linestyle=":", color=f"C{j}", label=f"FLOP bound {model.ratios['flops']:.2f}")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks([x + width * (len(models) - 2) / 2 for x in range(len(names))], [n.replace("_", " ") for n in names])
    right.set_ylabel("fused / original")
    right.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


if __name__ == "__main__":
    _probe_main()
