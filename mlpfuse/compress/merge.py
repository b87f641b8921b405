"""``merge-layers``: align, merge and tie adjacent feed-forward sublayers (cross-layer compression).

After Verma, Murray and Duh, "Merging Feed-Forward Sublayers for Compressed Transformers" (2025):
k adjacent FF sublayers are replaced by ONE shared MLP. Before averaging, each layer's neurons are
permuted to match the first layer's (the anchor) by solving a linear assignment on the
correlation of their pre-activations over calibration text; the residual stream is never
permuted, so each permuted MLP computes exactly what it did before. Baselines: plain averaging
(``mode="average"``) and dropping k-1 of the sublayers (``mode="drop"``, same parameter count).

Data flow: load the model once in memory (calibration activations, candidate evaluation), then
write the checkpoint by streaming the source tensors with the same writer as ``fuse``; the shared
MLP is stored once and the config's ``mlpfuse.checkpoints.tied`` list makes the loader tie the modules.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mlpfuse import __version__
from mlpfuse.arch import MLPSite, is_causal_lm, lookup, resolve_sites
from mlpfuse.checkpoints.output import claim_output, guarded_outputs
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.checkpoints.tensors import parse_size, read_config
from mlpfuse.checkpoints.tied import base_config_dict, busy_paths
from mlpfuse.checkpoints.validate import check_plain_checkpoint
from mlpfuse.compress.merge_session import ModelSession, read_texts, text_tokenizer
from mlpfuse.compress.merge_window import LayerAlignment, apply_window, linear_cka, merged_window, stack_of, window_from_layers, windows
from mlpfuse.compress.merge_write import write_merged
from mlpfuse.errors import InputError
from mlpfuse.options import check_seed

MODES = ("permute", "average", "drop")


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


# ---------------------------------------------------------------- the model in memory

def _check_settings(settings: MergeSettings, sites: list[MLPSite]) -> None:
    check_seed(settings.seed)
    if settings.mode not in MODES:
        raise InputError(f"unknown merge mode {settings.mode!r}; choose {', '.join(MODES)}")
    if (settings.layers is None) == (settings.count is None):
        raise InputError("give exactly one of --layers (a window such as 2-3) or --count (search the best window of k layers)")
    if settings.count is not None:
        longest = max(sum(1 for s in sites if stack_of(s) == stack_of(t)) for t in sites)
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
    causal = is_causal_lm(base_config)
    sites = resolve_sites(spec, base_config)
    _check_settings(settings, sites)
    check_plain_checkpoint(source_dir, config)  # tensors that fit the config, before any loading
    tokenizer = text_tokenizer(source_dir, bool(settings.calibration or settings.eval))
    max_shard = parse_size(settings.max_shard_size)
    inputs = [source_dir, settings.calibration, settings.eval]  # checks, lock, staging: before any work
    target = claim_output(output, [p for p in inputs if p and not str(p).startswith("hub:")], overwrite).target
    candidates_sites = windows(sites, settings.count) if settings.count else [window_from_layers(sites, settings.layers)]
    busy = busy_paths(section)
    candidates_sites = [w for w in candidates_sites if not any(s.module_path(r) in busy for s in w for r in s.roles)]
    if not candidates_sites:
        raise InputError("the chosen layers are already tied or dropped by an earlier merge; choose other layers")
    calibration = read_texts(settings.calibration, settings.column, settings.calibration_limit, "calibration",
                         settings.pair_column)
    evaluation = read_texts(settings.eval, settings.column, settings.eval_limit, "eval", settings.pair_column)

    torch.manual_seed(settings.seed)
    session = ModelSession(source_dir, sites, causal, settings.max_length, settings.batch_size, tokenizer)
    free_sites = [s for s in sites if not any(s.module_path(r) in busy for r in s.roles)]
    candidates_sites = [w for w in candidates_sites if len({session.read(s).w_in.shape for s in w}) == 1]
    if not candidates_sites:
        raise InputError("the layers to merge have different widths (some were fused); merge layers of one width")
    acts = session.activations(calibration, free_sites, settings.max_tokens) if calibration else None
    eval_batches = session.batches(evaluation) if evaluation else None
    reference = session.outputs(eval_batches) if eval_batches and not causal else None
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
        objective="perplexity" if causal else "hidden-state MSE", original_loss=original_loss,
        candidates=candidates, alignment=alignment, parameters={},
        calibration_tokens=int(next(iter(acts.values()))["up"].shape[0]) if acts else 0,
    )
    if acts:
        report.site_labels = [s.label for s in free_sites]
        report.similarity = linear_cka([acts[s.index]["up"] for s in free_sites])
    del session
    write_merged(source_dir, config, base_config, section, sites, window, merged, settings, target,
                      overwrite, max_shard, report, model)
    report.seconds = time.perf_counter() - start
    report.files = sorted(p.name for p in target.iterdir())
    return report


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
