"""ntk-check: how far each compression method moves one layer's MLP output and the Adam NTK.

For a chosen MLP layer, every method (and seed) compresses that layer alone, in memory, on a copy
of the model; on the same tokenised samples we then compare the compressed model with the
original (paper, Table 1):

- output error: ``||H - H~||_F`` of the layer's MLP output (the down projection's output, before
  residual and normalisation), over all non-padding tokens; relative to ``||H||_F``. The same for
  the model's final hidden state.
- Adam NTK error: ``K[a, b] = <grad f(x_a), sign(grad f(x_b))>`` over the parameters of the
  layer's MLP (paper eq. 3; the compressed model's own parameters for ``K~``), ``||K - K~||_F`` and
  ``/ ||K||_F``; the SGD NTK ``<grad f(x_a), grad f(x_b)>`` likewise.

The scalar ``f``: the softmax probability of class 0 of the model's own sequence-classification
head when the checkpoint has one; otherwise of a randomly initialised 2-way linear head (seeded by
``head_seed``, weights N(0, 0.02^2), zero bias) on the masked mean of the final hidden state.

Per-sample gradients: one batched forward/backward gives each projection's inputs and output
cotangents (samples do not interact in eval mode); ``torch.func.vmap`` over ``torch.func.vjp`` of
``functional_call(projection)`` turns them into per-sample parameter gradients. This stays exact
for any projection type (``ScaledLinear`` carries P, ``LowRankLinear`` its factors) and avoids
vmapping transformers' data-dependent mask code.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from mlpfuse.arch import MLPSite, lookup, resolve_sites
from mlpfuse.arch.activations import by_sample, token_rows
from mlpfuse.arch.io import module_width, written_layouts
from mlpfuse.checkpoints.modeling import load, saved_task
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.compress.fuse import FuseSettings, fuse_model
from mlpfuse.compress.plan import parse_layers, target_width
from mlpfuse.data import encode_texts, read_table
from mlpfuse.errors import InputError
from mlpfuse.methods import check_can_write, get_method, ntk_default_methods
from mlpfuse.options import check_seed
from mlpfuse.runtime import encoder_decoder_inputs, load_tokenizer, resolve_device

DEFAULT_METHODS = ntk_default_methods()  # the methods declared with ntk_default (methods/catalog.py)
METRICS = ("output_error", "output_error_rel", "hidden_error", "hidden_error_rel",
           "ntk_error", "ntk_error_rel", "sgd_ntk_error", "sgd_ntk_error_rel")
HEAD_STD = 0.02


@dataclass
class Run:
    """One compressed model compared with the original."""

    label: str
    seed: int | None
    metrics: dict
    mlp_parameters: int
    seconds: float


@dataclass
class MethodSummary:
    """All runs of one method (or one compared checkpoint): mean and sample std over seeds."""

    label: str
    mlp_parameters: int
    mean: dict
    std: dict
    runs: list[Run] = field(default_factory=list)


@dataclass
class NTKReport:
    model: str
    layer: int
    layer_label: str
    dim: int | None
    original_width: int
    original_mlp_parameters: int
    samples: int
    tokens: int
    scalar: str
    device: str
    methods: list[MethodSummary]
    data: str | None = None
    max_length: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Probe:
    """What one model does on the samples: layer MLP output, final hidden state, NTK matrices."""

    mlp_output: torch.Tensor  # [non-padding tokens, hidden]
    hidden: torch.Tensor  # [non-padding tokens, hidden]
    adam: torch.Tensor  # [N, N]
    sgd: torch.Tensor  # [N, N]
    parameters: int


class ScalarOutput:
    """The scalar f of the NTK, per sample (see module docstring)."""

    def __init__(self, model: torch.nn.Module, seed: int):
        self.own_head = type(model).__name__.endswith("ForSequenceClassification")
        if self.own_head:
            self.description = f"softmax class 0 of the model's own head ({type(model).__name__})"
            self.weight = None
            return
        hidden = _hidden_size(model)
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(2, hidden, generator=generator, dtype=torch.float64) * HEAD_STD
        self.description = (f"softmax class 0 of a random linear head (seed {seed}, N(0, {HEAD_STD}^2)) "
                            f"on the masked mean of the final hidden state")

    def __call__(self, outputs, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.own_head:
            return outputs.logits.softmax(-1)[:, 0]
        weights = mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        logits = pooled @ self.weight.to(device=hidden.device, dtype=hidden.dtype).T
        return logits.softmax(-1)[:, 0]


def _hidden_size(model) -> int:
    config = model.config
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise InputError(f"cannot tell the hidden size of a {config.model_type} model")


def chosen_site(model: torch.nn.Module, layer: int) -> MLPSite:
    """The dense MLP site ``layer`` of ``model`` (one-line InputError when out of range or MoE)."""
    config = model.config.to_dict()
    sites = resolve_sites(lookup(config.get("model_type")), config)
    index = parse_layers(str(layer), len(sites))[0]
    site = sites[index]
    if site.experts:
        raise InputError(f"layer {layer} is a Mixture-of-Experts layer; ntk-check supports dense MLP layers")
    return site


def _site_modules(model, site: MLPSite) -> dict[str, torch.nn.Module]:
    """The site's modules by their last role (``down`` for the down projection; a packed module once)."""
    return {module.roles[-1]: model.base_model.get_submodule(module.path) for module in site.modules}


def site_width(model, site: MLPSite) -> int:
    """Intermediate width of ``site`` in ``model``."""
    return module_width(model.base_model, site)


def _forward(model, batch: dict) -> tuple[object, torch.Tensor]:
    outputs = model(**batch, **encoder_decoder_inputs(model, batch), output_hidden_states=True)
    states = getattr(outputs, "decoder_hidden_states", None) or outputs.hidden_states
    return outputs, states[-1]


def _per_sample_grads(module: torch.nn.Module, inputs: torch.Tensor, cotangents: torch.Tensor,
                      chunk: int | None) -> list[torch.Tensor]:
    """Per-sample gradients [B, n] of ``module``'s parameters from its inputs and output cotangents."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def one(x, d):
        _, pull = torch.func.vjp(lambda q: torch.func.functional_call(module, q, (x,)), params)
        return pull(d)[0]

    grads = torch.func.vmap(one, chunk_size=chunk)(inputs, cotangents)
    return [g.reshape(g.shape[0], -1) for g in grads.values()]


def probe(model: torch.nn.Module, site: MLPSite, batches: list[dict], scalar: ScalarOutput,
          chunk: int | None = 8) -> Probe:
    """Run ``model`` on ``batches``: the site's MLP output, final hidden state and NTK matrices."""
    modules = _site_modules(model, site)
    flags = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for module in modules.values():
        for param in module.parameters():
            param.requires_grad_(True)
    captured: dict[str, tuple] = {}
    hooks = [module.register_forward_hook(lambda mod, args, out, role=role: captured.__setitem__(role, (args[0], out)))
             for role, module in modules.items()]
    mlp_outputs, hiddens, grads = [], [], []
    try:
        for batch in batches:
            captured.clear()
            outputs, hidden = _forward(model, batch)
            f = scalar(outputs, hidden, batch["attention_mask"])
            roles = list(modules)
            cotangents = torch.autograd.grad(f.sum(), [captured[role][1] for role in roles])
            keep = batch["attention_mask"].bool()
            mlp_outputs.append(token_rows(captured["down"][1].detach(), keep))
            hiddens.append(hidden.detach()[keep])
            per_batch = []
            for role, cotangent in zip(roles, cotangents):
                per_batch.extend(_per_sample_grads(modules[role], by_sample(captured[role][0].detach(), keep),
                                                   by_sample(cotangent, keep), chunk))
            grads.append(per_batch)
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    adam = sgd = None
    for tensors in zip(*grads):  # one parameter tensor at a time, all samples
        g = torch.cat(tensors)
        adam_part, sgd_part = (g @ g.sign().T).double(), (g @ g.T).double()
        adam = adam_part if adam is None else adam + adam_part
        sgd = sgd_part if sgd is None else sgd + sgd_part
    parameters = sum(p.numel() for m in modules.values() for p in m.parameters())
    return Probe(torch.cat(mlp_outputs), torch.cat(hiddens), adam.cpu(), sgd.cpu(), parameters)


def errors(reference: Probe, other: Probe) -> dict:
    """Absolute and relative output, hidden-state, Adam-NTK and SGD-NTK errors of ``other``."""
    def pair(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        diff = float((a.double() - b.double()).norm())
        return diff, diff / max(float(a.double().norm()), 1e-30)

    values = {}
    for name, a, b in (("output_error", reference.mlp_output, other.mlp_output),
                       ("hidden_error", reference.hidden, other.hidden),
                       ("ntk_error", reference.adam, other.adam),
                       ("sgd_ntk_error", reference.sgd, other.sgd)):
        values[name], values[f"{name}_rel"] = pair(a, b)
    return values


def summarise(label: str, runs: list[Run]) -> MethodSummary:
    """Mean and sample standard deviation (0 for one run) of every metric over ``runs``."""
    mean, std = {}, {}
    for metric in METRICS:
        values = torch.tensor([run.metrics[metric] for run in runs], dtype=torch.float64)
        mean[metric] = float(values.mean())
        std[metric] = float(values.std()) if len(values) > 1 else 0.0
    return MethodSummary(label, runs[0].mlp_parameters, mean, std, runs)


def _batches(inputs: dict, batch_size: int, device) -> list[dict]:
    count = inputs["input_ids"].shape[0]
    return [{k: v[start:start + batch_size].to(device) for k, v in inputs.items()}
            for start in range(0, count, batch_size)]


def ntk_check_model(
    model: torch.nn.Module,
    inputs: dict,
    *,
    layer: int,
    dim: int | None,
    methods: Iterable[str] = DEFAULT_METHODS,
    seeds: int = 3,
    compare: dict | None = None,
    backend: str = "auto",
    device: str | None = None,
    head_seed: int = 0,
    batch_size: int = 16,
    name: str = "<in-memory>",
    on_run: Callable[[Run], None] | None = None,
) -> NTKReport:
    """ntk-check on a model in memory and tokenised ``inputs`` (``input_ids``, ``attention_mask``...).

    ``methods`` are fused on copies of ``model`` at width ``dim`` for seeds 0..seeds-1;
    ``compare`` maps labels to already compressed models. ``model`` itself is left unchanged.
    """
    start = time.perf_counter()
    methods = list(methods)
    compare = dict(compare or {})
    if not methods and not compare:
        raise InputError("nothing to compare: give --methods and/or --compare checkpoints")
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    for method in methods:
        get_method(method)
    site = chosen_site(model, layer)
    for method in methods:  # a method that cannot write this layout is refused before any work
        check_can_write(method, {layout: site.label for layout in written_layouts(site)})
    width = site_width(model, site)
    if methods:
        if dim is None:
            raise InputError("give --dim (the compressed width k) to compress with --methods")
        target_width(width, dim, None)
    torch_device = resolve_device(device)
    reference_model = model.to(torch_device).eval()
    scalar = ScalarOutput(reference_model, head_seed)
    batches = _batches(inputs, batch_size, torch_device)
    reference = probe(reference_model, site, batches, scalar)

    def measure(label, seed, candidate) -> Run:
        began = time.perf_counter()
        result = probe(candidate.to(torch_device).eval(), chosen_site(candidate, layer), batches, scalar)
        run = Run(label, seed, errors(reference, result), result.parameters, time.perf_counter() - began)
        if on_run:
            on_run(run)
        return run

    summaries = []
    for method in methods:
        runs = []
        for seed in range(seeds):
            began = time.perf_counter()
            candidate = copy.deepcopy(model)
            fuse_model(candidate, FuseSettings(layers=[site.index], dim=dim, method=method, seed=seed, backend=backend,
                                               device=device if device not in (None, "auto") else None,
                                               allow_full_width=True))
            fuse_seconds = time.perf_counter() - began
            run = measure(method, seed, candidate)
            run.seconds += fuse_seconds
            runs.append(run)
            del candidate
        summaries.append(summarise(method, runs))
    for label, candidate in compare.items():
        summaries.append(summarise(label, [measure(label, None, candidate)]))
    tokens = int(inputs["attention_mask"].sum())
    return NTKReport(
        model=name, layer=site.index, layer_label=site.label, dim=dim, original_width=width,
        original_mlp_parameters=reference.parameters, samples=int(inputs["input_ids"].shape[0]), tokens=tokens,
        scalar=scalar.description, device=str(torch_device), methods=summaries, seconds=time.perf_counter() - start,
    )


def _task_for(directory: Path) -> str:
    return "sequence-classification" if saved_task(directory) == "sequence-classification" else "base"


def load_for_check(path: str) -> torch.nn.Module:
    """A fused or plain checkpoint, with its classification head when it has one, in eval mode."""
    directory = resolve_model(path)
    return load(str(directory), task=_task_for(directory)).eval()


def tokenise(directory: Path, texts: list, max_length: int) -> dict:
    """Tokenise ``texts`` (strings or (text, pair) tuples) with the checkpoint's tokenizer, padded."""
    return encode_texts(load_tokenizer(directory), texts, max_length)


def ntk_check(
    model: str,
    data: str,
    *,
    text_column: str = "sentence",
    pair_column: str | None = None,
    samples: int = 64,
    max_length: int = 64,
    layer: int = 0,
    dim: int | None = None,
    methods: Iterable[str] = DEFAULT_METHODS,
    seeds: int = 3,
    compare: Iterable[str] = (),
    backend: str = "auto",
    device: str | None = None,
    head_seed: int = 0,
    batch_size: int = 16,
    on_run: Callable[[Run], None] | None = None,
) -> NTKReport:
    """Compare compression methods (and fused checkpoints) on the first ``samples`` rows of ``data``.

    ``model``: checkpoint directory, hub id or 'minilm'; ``compare``: fused checkpoints of the same
    model. Returns an :class:`NTKReport` (see the module docstring for every figure).
    """
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    if max_length < 2:
        raise InputError(f"--max-length must be at least 2, got {max_length}")
    resolve_device(device)  # a device that cannot be used fails before any loading
    check_seed(head_seed, "--head-seed")
    directory = resolve_model(model)
    texts = read_table(data, limit=samples).texts(text_column, pair_column)
    inputs = tokenise(directory, texts, max_length)
    reference = load_for_check(model)
    others = {}
    for path in compare:
        if not Path(path).expanduser().is_dir():
            raise InputError(f"--compare {path}: no such checkpoint directory")
        others[Path(path).name or path] = load_for_check(path)
    report = ntk_check_model(
        reference, inputs, layer=layer, dim=dim, methods=methods, seeds=seeds, compare=others, backend=backend,
        device=device, head_seed=head_seed, batch_size=batch_size, name=model, on_run=on_run,
    )
    report.data, report.max_length = data, max_length
    return report


def plot_report(report: NTKReport, path: str | Path) -> None:
    """A PNG with two bar charts (relative output error, relative Adam-NTK error) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m.label for m in report.methods]
    figure, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(labels) * 2), 4))
    for axis, metric, title in ((axes[0], "output_error_rel", f"layer {report.layer_label} MLP output error"),
                                (axes[1], "ntk_error_rel", "Adam NTK error")):
        means = [m.mean[metric] for m in report.methods]
        stds = [m.std[metric] for m in report.methods]
        axis.bar(labels, means, yerr=stds, capsize=4, color="#4c72b0")
        axis.set_title(f"{title} (relative)")
        axis.tick_params(axis="x", rotation=30)
        positive = [v for v in means if v > 0]
        if positive and max(positive) / min(positive) > 100:
            axis.set_yscale("log")
    figure.suptitle(f"{report.model}: layer {report.layer_label}, k={report.dim}, {report.samples} samples")
    figure.tight_layout()
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)

