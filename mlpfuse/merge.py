"""``merge-layers``: align, merge and tie adjacent feed-forward sublayers (cross-layer compression).

After Verma, Murray and Duh, "Merging Feed-Forward Sublayers for Compressed Transformers" (2025):
k adjacent FF sublayers are replaced by ONE shared MLP. Before averaging, each layer's neurons are
permuted to match the first layer's (the anchor) by solving a linear assignment on the
correlation of their pre-activations over calibration text; the residual stream is never
permuted, so each permuted MLP computes exactly what it did before. Baselines: plain averaging
(``mode="average"``) and dropping k-1 of the sublayers (``mode="drop"``, same parameter count).

Data flow: load the model once in memory (calibration activations, candidate evaluation), then
write the checkpoint by streaming the source tensors with the same writer as ``fuse``; the shared
MLP is stored once and the config's ``mlpfuse.tied`` list makes the loader tie the modules.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import yaml
from scipy.optimize import linear_sum_assignment

from . import __version__
from .arch import MLPSite, find_prefix, lookup, resolve_sites
from .arch.activations import capture, token_rows
from .arch.io import SCALE_BUFFER, module_specs, read_mlp, site_hidden, tensor_names, write_mlp
from .checkpoint import CheckpointReader, ShardedWriter, parse_size, read_config, write_json
from .data import read_table
from .errors import InputError
from .fuse import package_versions
from .output import carry_side_files, claim_output, guarded_outputs, staging_directory
from .mlp import MLPWeights
from .options import check_seed
from .plan import parse_layers
from .format import ZERO_MODULE, fused_config_dict, merge_section, write_remote_code
from .runtime import encoder_decoder_inputs, load_tokenizer
from .source import resolve_model
from .tied import base_config_dict, busy_paths
from .validate import check_plain_checkpoint

MODES = ("permute", "average", "drop")
RECIPE_FILE = "mlpfuse_merge_recipe.yaml"


@dataclass
class MergeSettings:
    """Everything that decides the output of ``merge-layers``."""

    layers: str | None = None  # an explicit window, e.g. "2-3"
    count: int | None = None  # or: search every window of this many adjacent layers
    mode: str = "permute"  # permute (aligned average) | average (plain) | drop (baseline)
    calibration: str | None = None  # text file for the alignment activations
    eval: str | None = None  # text file for the window search loss
    column: str = "sentence"
    pair_column: str | None = None  # second text of a pair (sentence-pair data), tokenised as a pair
    calibration_limit: int = 300
    eval_limit: int = 200
    max_length: int = 128
    max_tokens: int = 10_000  # calibration tokens kept per layer
    batch_size: int = 32
    seed: int = 0
    max_shard_size: str = "5GB"


@dataclass
class Candidate:
    layers: list[int]
    labels: list[str]
    loss: float | None


@dataclass
class LayerAlignment:
    index: int
    label: str
    correlation_before: float | None  # mean correlation with the anchor's neuron of the same index
    correlation_after: float | None  # ... with the anchor's neuron it was assigned to


@dataclass
class MergeReport:
    source: str
    output: str | None
    model_type: str
    mode: str
    window: list[int]
    window_labels: list[str]
    objective: str
    original_loss: float | None
    candidates: list[Candidate]
    alignment: list[LayerAlignment]
    parameters: dict
    similarity: list[list[float]] | None = None  # linear CKA of pre-activations, layer x layer
    site_labels: list[str] = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = __version__
        return data


# ---------------------------------------------------------------- tensor maths (no model, no names)

def fold_scale(mlp: MLPWeights) -> MLPWeights:
    """The same MLP with a fusion scale P folded into ``w_out`` (so neurons can be permuted and averaged)."""
    if mlp.scale is None:
        return mlp
    return replace(mlp, w_out=mlp.w_out * mlp.scale.to(mlp.w_out.dtype)[None, :], scale=None, stats={})


def permute_mlp(mlp: MLPWeights, perm: torch.Tensor) -> MLPWeights:
    """Neuron ``i`` of the result is neuron ``perm[i]`` of ``mlp`` (rows of W_in/W_gate/b, columns of W_out)."""
    mlp = fold_scale(mlp)
    return mlp.map_neurons(lambda t: t[perm], lambda w: w[:, perm])


def average_mlps(mlps: list[MLPWeights]) -> MLPWeights:
    """Element-wise mean of MLPs of one shape (scales folded first)."""
    mlps = [fold_scale(m) for m in mlps]
    shapes = {(m.width, m.hidden, m.gated) for m in mlps}
    if len(shapes) != 1:
        raise InputError(f"cannot merge layers of different shapes (width, hidden, gated): {sorted(shapes)}")

    def mean(name):
        values = [getattr(m, name) for m in mlps]
        if any(v is None for v in values):
            return None
        return torch.stack([v.double() for v in values]).mean(0).to(values[0].dtype)

    return MLPWeights(**{name: mean(name) for name in ("w_in", "w_out", "b_in", "w_gate", "b_gate", "b_out")})


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [I, J] between the columns of ``a`` [N, I] and ``b`` [N, J] (constant columns give 0)."""
    def standardise(x):
        x = x.double()
        x = x - x.mean(0)
        return x / x.norm(dim=0).clamp_min(1e-12)

    return (standardise(a).T @ standardise(b)).float()


def align(anchor: torch.Tensor, other: torch.Tensor, anchor_gate=None, other_gate=None) -> tuple[torch.Tensor, float, float]:
    """The permutation of ``other``'s neurons that maximises their total correlation with ``anchor``'s.

    ``anchor``/``other``: pre-activations [tokens, I]. Gated MLPs add the gate pre-activations and
    one permutation serves both. Returns ``perm`` (neuron ``perm[i]`` of other matches anchor
    neuron ``i``), and the mean up-projection correlation before and after aligning.
    """
    corr = correlation(anchor, other)
    cost = corr if anchor_gate is None else corr + correlation(anchor_gate, other_gate)
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    perm = torch.as_tensor(cols[rows.argsort()], dtype=torch.long)
    before = corr.diagonal().mean().item()
    after = corr[torch.arange(len(perm)), perm].mean().item()
    return perm, before, after


def merge_aligned(mlps: list[MLPWeights], perms: list[torch.Tensor | None]) -> MLPWeights:
    """Permute each MLP by its ``perm`` (None: as is) and average them."""
    return average_mlps([m if p is None else permute_mlp(m, p) for m, p in zip(mlps, perms)])


def linear_cka(xs: list[torch.Tensor], max_tokens: int = 1024) -> list[list[float]]:
    """Linear CKA between every pair of activation matrices [tokens, width] (permutation invariant)."""
    grams = []
    for x in xs:
        x = x[:max_tokens].double()
        x = x - x.mean(0)
        gram = x @ x.T
        grams.append(gram / gram.norm().clamp_min(1e-12))
    return [[float((a * b).sum()) for b in grams] for a in grams]


# ---------------------------------------------------------------- the model in memory

def _stack(site: MLPSite) -> str:
    return site.label.rpartition(".")[0]


def windows(sites: list[MLPSite], k: int) -> list[list[MLPSite]]:
    """Every run of ``k`` adjacent sites within one stack (encoder and decoder never mix)."""
    out = []
    for start in range(len(sites) - k + 1):
        run = sites[start:start + k]
        if len({_stack(s) for s in run}) == 1 and not any(getattr(s, "experts", None) for s in run):
            out.append(run)
    return out


def window_from_layers(sites: list[MLPSite], layers) -> list[MLPSite]:
    """The sites of an explicit ``--layers`` window; InputError unless 2+ adjacent layers of one stack."""
    chosen = parse_layers(layers, len(sites))
    if len(chosen) < 2:
        raise InputError(f"--layers {layers!r} names {len(chosen)} layer; merging needs at least 2 adjacent layers, e.g. 2-3")
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise InputError(f"--layers {layers!r} are not adjacent; give a contiguous range such as {chosen[0]}-{chosen[0] + 1}")
    run = [sites[i] for i in chosen]
    if any(getattr(s, "experts", None) for s in run):
        raise InputError(f"--layers {layers!r} includes mixture-of-experts layers; merge-layers handles dense MLPs only")
    if len({_stack(s) for s in run}) != 1:
        raise InputError(f"--layers {layers!r} spans two stacks ({run[0].label} .. {run[-1].label}); merge within one stack")
    return run


class ModelSession:
    """The original model in memory: read/set one site's MLP, collect activations, compute the loss.

    ``tokenizer`` is needed only to read text (:meth:`batches`); None when no text is read.
    """

    def __init__(self, directory: Path, sites: list[MLPSite], causal: bool, max_length: int, batch_size: int,
                 tokenizer=None):
        from .modeling import load

        self.model = load(str(directory), task="causal-lm" if causal else "base").eval()
        self.base = self.model.base_model
        self.sites, self.causal = sites, causal
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        state = self.base.state_dict()
        self.keys = set(state)

    def batches(self, texts: list) -> list[dict]:
        """Padded batches of strings, or of (text, pair) tuples tokenised as pairs."""
        if self.tokenizer is None:
            raise RuntimeError("ModelSession reads text but was given no tokenizer")
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            pairs = (list(t) for t in zip(*chunk)) if chunk and isinstance(chunk[0], tuple) else (chunk,)
            enc = self.tokenizer(*pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    def _forward(self, batch: dict, model=None):
        model = model or self.model
        return model(**batch, **encoder_decoder_inputs(model, batch))  # decoder input: the text itself

    def read(self, site: MLPSite) -> MLPWeights:
        state = self.base.state_dict()
        mlp = read_mlp(site, tensor_names(site, "", self.keys), lambda k: state[k].detach().clone())
        scale_key = f"{site.module_path('down')}.{SCALE_BUFFER}"
        if scale_key in state:
            mlp.scale = state[scale_key].detach().clone()
        return mlp

    def write(self, site: MLPSite, mlp: MLPWeights) -> None:
        """Put ``mlp`` at ``site`` (same shapes); a folded MLP on a scaled module gets scale 1."""
        if mlp.scale is None and f"{site.module_path('down')}.{SCALE_BUFFER}" in self.keys:
            mlp = replace(mlp, scale=torch.ones(mlp.width))
        tensors = write_mlp(site, mlp, "", next(self.base.parameters()).dtype)
        result = self.base.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"merged tensors did not match the modules: {result.unexpected_keys}")

    @torch.no_grad()
    def activations(self, texts: list[str], sites: list[MLPSite], max_tokens: int) -> dict[int, dict[str, torch.Tensor]]:
        """Pre-activations (up and gate projection outputs) of ``sites`` on non-padding tokens."""
        store: dict[tuple[int, str], list] = {}
        tokens = 0
        with capture(self.base, sites, ("pre",)) as caught:
            for batch in self.batches(texts):
                caught.clear()
                mask = batch["attention_mask"].bool()
                self._forward(batch)
                for site in sites:
                    for role, part in caught.get(site.index, "pre").items():
                        store.setdefault((site.index, role), []).append(token_rows(part, mask).float())
                tokens += int(mask.sum())
                if tokens >= max_tokens:
                    break
        out: dict[int, dict[str, torch.Tensor]] = {}
        for (index, role), chunks in store.items():
            out.setdefault(index, {})[role] = torch.cat(chunks)[:max_tokens]
        return out

    @torch.no_grad()
    def outputs(self, batches: list[dict]) -> list[torch.Tensor]:
        """Reference hidden states of the current model (for the encoder objective)."""
        return [self._hidden(self._forward(b)) for b in batches]

    @staticmethod
    def _hidden(out) -> torch.Tensor:
        parts = [out.last_hidden_state]
        if getattr(out, "encoder_last_hidden_state", None) is not None:
            parts.append(out.encoder_last_hidden_state)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def loss(self, batches: list[dict], reference: list[torch.Tensor] | None) -> float:
        """Perplexity (causal LMs) or masked hidden-state MSE against ``reference`` (others)."""
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            out = self._forward(batch)
            mask = batch["attention_mask"]
            if self.causal:
                logits = out.logits[:, :-1].float()
                labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                           ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
            else:
                hidden = self._hidden(out)
                full_mask = mask if hidden.shape[1] == mask.shape[1] else torch.cat([mask, mask], dim=1)
                diff = (hidden - reference[i]).float().pow(2).mean(-1)
                total += float((diff * full_mask).sum())
                count += int(full_mask.sum())
        mean = total / max(count, 1)
        return float(torch.tensor(mean).exp()) if self.causal else mean


def merged_window(session: ModelSession, window: list[MLPSite], mode: str, acts: dict | None
                  ) -> tuple[MLPWeights | None, list[LayerAlignment]]:
    """The shared MLP for ``window`` (None for drop) and each layer's alignment figures."""
    mlps = [session.read(site) for site in window]
    if mode == "drop":
        return None, []
    anchor = window[0]
    perms: list[torch.Tensor | None] = [None]
    rows = [LayerAlignment(anchor.index, anchor.label, 1.0 if acts else None, 1.0 if acts else None)]
    for site in window[1:]:
        if acts is None:
            perms.append(None)
            rows.append(LayerAlignment(site.index, site.label, None, None))
            continue
        a, b = acts[anchor.index], acts[site.index]
        perm, before, after = align(a["up"], b["up"], a.get("gate"), b.get("gate"))
        perms.append(perm if mode == "permute" else None)
        rows.append(LayerAlignment(site.index, site.label, before, after if mode == "permute" else before))
    return merge_aligned(mlps, perms), rows


def apply_window(session: ModelSession, window: list[MLPSite], mode: str, merged: MLPWeights | None) -> list[MLPWeights]:
    """Put the merged (or dropped) layers into the in-memory model; returns the originals to restore."""
    originals = [session.read(site) for site in window]
    if mode == "drop":
        for site, mlp in zip(window[1:], originals[1:]):
            session.write(site, replace(mlp, w_out=torch.zeros_like(mlp.w_out),
                                        b_out=None if mlp.b_out is None else torch.zeros_like(mlp.b_out)))
    else:
        for site in window:
            session.write(site, merged)
    return originals


def _texts(path: str | None, column: str, limit: int, what: str, pair_column: str | None = None) -> list | None:
    if path is None:
        return None
    texts = [t for t in read_table(path, limit=limit).texts(column, pair_column)
             if (t[0] if isinstance(t, tuple) else t).strip()]
    if not texts:
        raise InputError(f"{what} file {path} has no non-empty text in column {column!r}")
    return texts


def _check_settings(settings: MergeSettings, sites: list[MLPSite]) -> None:
    check_seed(settings.seed)
    if settings.mode not in MODES:
        raise InputError(f"unknown merge mode {settings.mode!r}; choose {', '.join(MODES)}")
    if (settings.layers is None) == (settings.count is None):
        raise InputError("give exactly one of --layers (a window such as 2-3) or --count (search the best window of k layers)")
    if settings.count is not None:
        longest = max(sum(1 for s in sites if _stack(s) == _stack(t)) for t in sites)
        if settings.count < 2:
            raise InputError(f"--count must be at least 2 (merging one layer does nothing), got {settings.count}")
        if settings.count > longest:
            raise InputError(f"--count {settings.count} is larger than the number of layers ({longest})")
        if settings.eval is None:
            raise InputError("--count searches windows by validation loss: pass --eval FILE (text to evaluate on)")
    if settings.layers is not None:
        window_from_layers(sites, settings.layers)
    if settings.mode == "permute" and settings.calibration is None:
        raise InputError("aligning neurons needs calibration text: pass --calibration FILE (or --no-permute / --drop)")


@guarded_outputs
def merge_checkpoint(
    model: str,
    output: str | Path,
    settings: MergeSettings,
    overwrite: bool = False,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> MergeReport:
    """Merge (or drop) adjacent FF sublayers of checkpoint ``model`` and write the result to ``output``."""
    start = time.perf_counter()
    source_dir = resolve_model(model)
    config = read_config(source_dir)
    base_config = base_config_dict(config)
    section = dict(config.get("mlpfuse") or {})
    spec = lookup(base_config.get("model_type"))
    sites = resolve_sites(spec, base_config)
    _check_settings(settings, sites)
    check_plain_checkpoint(source_dir, config)  # tensors that fit the config, before any loading
    # a tokenizer only when text is read (--calibration, --eval): weights and config suffice otherwise, as for fuse
    tokenizer = load_tokenizer(source_dir) if settings.calibration or settings.eval else None
    max_shard = parse_size(settings.max_shard_size)
    inputs = [source_dir, settings.calibration, settings.eval]  # checks, lock, staging: before any work
    target = claim_output(output, [p for p in inputs if p and not str(p).startswith("hub:")], overwrite).target
    candidates_sites = windows(sites, settings.count) if settings.count else [window_from_layers(sites, settings.layers)]
    busy = busy_paths(section)
    candidates_sites = [w for w in candidates_sites if not any(s.module_path(r) in busy for s in w for r in s.roles)]
    if not candidates_sites:
        raise InputError("the chosen layers are already tied or dropped by an earlier merge; choose other layers")
    calibration = _texts(settings.calibration, settings.column, settings.calibration_limit, "calibration",
                         settings.pair_column)
    evaluation = _texts(settings.eval, settings.column, settings.eval_limit, "eval", settings.pair_column)

    torch.manual_seed(settings.seed)
    session = ModelSession(source_dir, sites, spec.causal_lm, settings.max_length, settings.batch_size, tokenizer)
    free_sites = [s for s in sites if not any(s.module_path(r) in busy for r in s.roles)]
    candidates_sites = [w for w in candidates_sites if len({session.read(s).w_in.shape for s in w}) == 1]
    if not candidates_sites:
        raise InputError("the layers to merge have different widths (some were fused); merge layers of one width")
    acts = session.activations(calibration, free_sites, settings.max_tokens) if calibration else None
    eval_batches = session.batches(evaluation) if evaluation else None
    reference = session.outputs(eval_batches) if eval_batches and not spec.causal_lm else None
    original_loss = session.loss(eval_batches, reference) if eval_batches else None

    candidates, best = [], None
    for window in candidates_sites:
        merged, alignment = merged_window(session, window, settings.mode, acts)
        loss = None
        if eval_batches:
            originals = apply_window(session, window, settings.mode, merged)
            loss = session.loss(eval_batches, reference)
            for site, mlp in zip(window, originals):
                session.write(site, mlp)
        candidate = Candidate([s.index for s in window], [s.label for s in window], loss)
        candidates.append(candidate)
        if on_candidate:
            on_candidate(candidate)
        if best is None or (loss is not None and loss < best[0].loss):
            best = (candidate, window, merged, alignment)
    _, window, merged, alignment = best

    report = MergeReport(
        source=model, output=str(target), model_type=base_config["model_type"], mode=settings.mode,
        window=[s.index for s in window], window_labels=[s.label for s in window],
        objective="perplexity" if spec.causal_lm else "hidden-state MSE", original_loss=original_loss,
        candidates=candidates, alignment=alignment, parameters={},
        calibration_tokens=int(next(iter(acts.values()))["up"].shape[0]) if acts else 0,
    )
    if acts:
        report.site_labels = [s.label for s in free_sites]
        report.similarity = linear_cka([acts[s.index]["up"] for s in free_sites])
    del session
    _write_checkpoint(source_dir, config, base_config, section, sites, window, merged, settings, target,
                      overwrite, max_shard, report, model)
    report.seconds = time.perf_counter() - start
    report.files = sorted(p.name for p in target.iterdir())
    return report


def _write_checkpoint(source_dir, config, base_config, section, sites, window, merged, settings, target,
                      overwrite, max_shard, report, model) -> None:
    """Stream the source tensors to ``target`` with the window's layers merged (stored once) or dropped."""
    from .modeling import verify_checkpoint

    reader = CheckpointReader(source_dir)
    keys = set(reader.keys())
    prefix = next((p for p in (find_prefix(keys, s) for s in sites) if p is not None), None)
    if prefix is None:
        raise InputError(f"{model}: no MLP tensors where a {base_config['model_type']} checkpoint keeps them")
    anchor, others = window[0], window[1:]
    other_keys = set()
    for site in others:
        other_keys.update(tensor_names(site, prefix, keys).values())
        other_keys.add(f"{prefix}{site.module_path('down')}.{SCALE_BUFFER}")
    anchor_names = tensor_names(anchor, prefix, keys)
    replaced = set(anchor_names.values()) | {f"{prefix}{anchor.module_path('down')}.{SCALE_BUFFER}"}
    window_paths = {s.module_path(r) for s in window for r in s.roles}
    modules = [m for m in section.get("modules", []) if m["path"] not in window_paths]
    anchor_specs = [m for m in section.get("modules", []) if m["path"] in {anchor.module_path(r) for r in anchor.roles}]

    params = {"before": 0, "after": 0}
    with staging_directory(target, overwrite) as staging:
        writer = ShardedWriter(staging, max_shard)
        if merged is not None:
            for name, tensor in write_mlp(anchor, merged, prefix, reader.get(anchor_names["w_in"]).dtype).items():
                writer.add(name, tensor)
                params["after"] += tensor.numel()
        for key in reader.keys():
            counted = reader.is_floating(key) and not key.endswith(f".{SCALE_BUFFER}")
            numel = _numel(reader.shape(key)) if counted else 0
            params["before"] += numel
            if key in other_keys or (merged is not None and key in replaced):
                continue
            writer.add(key, reader.get(key))
            params["after"] += numel
        writer.close()
        if merged is not None:
            if anchor_specs:  # a fused anchor: same widths, but its scale is now folded in
                modules.extend(module_specs(anchor, merged))
            tied = [{"source": m.path, "targets": [s.modules[j].path for s in others]} for j, m in enumerate(anchor.modules)]
        else:
            modules.extend(anchor_specs)
            tied = []
            hidden = site_hidden(anchor, anchor_names, reader.shape)
            for site in others:
                for module in site.modules:
                    width_in, width_out = (0, hidden) if module.roles == ("down",) else (hidden, 0)
                    modules.append({"path": module.path, "type": ZERO_MODULE, "in_features": width_in,
                                    "out_features": width_out, "bias": False, "scaled": False})
        report.parameters = params
        record = {"mode": settings.mode, "layers": report.window, "layer_labels": report.window_labels,
                  "objective": report.objective, "loss": next((c.loss for c in report.candidates if c.layers == report.window), None),
                  "seed": settings.seed}
        new_section = merge_section(section, version=__version__, modules=modules, tied=tied, record=record,
                                    source=model, packages=package_versions(), parameters=params,
                                    source_sha256=section.get("source_sha256") or reader.sha256())
        write_json(staging / "config.json", fused_config_dict(base_config, new_section))
        write_remote_code(staging)
        carry_side_files(source_dir, staging)
        recipe = {"model": model, **asdict(settings)}
        (staging / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=True), encoding="utf-8")
        verify_checkpoint(staging)


def _numel(shape: tuple) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def plot_similarity(report: MergeReport, path: str | Path) -> None:
    """Heat map of the layer-by-layer activation similarity (linear CKA), the window outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.similarity is None:
        raise InputError("--plot needs activations: pass --calibration FILE")
    labels = report.site_labels
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(labels), 0.6 + 0.5 * len(labels)))
    image = ax.imshow(report.similarity, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    positions = [labels.index(label) for label in report.window_labels if label in labels]
    if positions:
        lo, hi = min(positions) - 0.5, max(positions) + 0.5
        ax.add_patch(matplotlib.patches.Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="red", linewidth=2))
    ax.set_title("FF pre-activation similarity (linear CKA)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
