"""Layer-wise task-specific tuning (MLP Fusion paper, Sec. 4.4).

The teacher is the original model, the student the fused one. On unlabelled task text, the loss
compares teacher and student hidden states layer by layer (padding positions masked out), from the
first layer that contains a fused MLP on (earlier layers are identical in both models):

- ``layer_loss="variance"`` (default): the mean over those layers of each layer's MSE divided by
  the teacher's variance of that layer's hidden states (a relative error; scale-free, so the
  massive-activation layers of a decoder LLM do not swamp the others);
- ``layer_loss="mse"``: the paper's plain sum over layers of the MSE.

Each sequence's first non-padding token (the attention sink of a decoder) counts with weight
``first_token_weight`` in the MSE and in the variance. With ``kl_weight`` > 0 the KL divergence
between the teacher's and the student's next-token distributions (temperature ``kl_temperature``)
is added, computed from the last hidden states a chunk of tokens at a time so that its memory does
not grow with the vocabulary (:mod:`mlpfuse.train.tune_kl`); otherwise the language-model head is never
run. Only the weights of the fused MLP modules train; the cluster sizes P are a buffer and stay
constant; everything else is frozen.
AdamW, one epoch by default. :func:`held_out_metrics` measures the student before and after on
held-out text: perplexity for causal LMs, the hidden-state relative error otherwise.

:func:`tune_model` does the work on models in memory; :func:`tune_checkpoint` reads a fused
checkpoint and its original, tunes, and writes a fused checkpoint whose ``mlpfuse`` section records
the tuning. Interrupted runs keep their state (see :data:`STATE_SUFFIX`) and continue with
``resume=True``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from mlpfuse.checkpoints.format import tuning_section
from mlpfuse.checkpoints.modeling import is_causal_lm_model, is_fused, load, saved_task
from mlpfuse.checkpoints.output import check_target, claim_output, guarded_outputs
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.checkpoints.tensors import CheckpointReader, read_config
from mlpfuse.checkpoints.writer import DerivedCheckpoint, write_derived
from mlpfuse.errors import InputError
from mlpfuse.runtime import check_window, file_sha256, load_tokenizer, resolve_device
from mlpfuse.train.distributed import all_reduce_gradients, all_reduce_sum, is_worker, leave, world
from mlpfuse.train.tune_data import _encode, held_out_metrics, held_out_texts, pack_texts, training_texts  # noqa: F401  (pack_texts: public)
from mlpfuse.train.tune_kl import KLHeads, chunked_logit_kl, kl_heads, token_kl
from mlpfuse.train.tune_settings import (  # noqa: F401  (public here too)
    DEFAULT_KL_WEIGHT, LAYER_LOSSES, TuneSettings, check_settings, resolve_settings)

STATE_SUFFIX = ".tune-state"  # OUTPUT.tune-state/ beside the output holds an interrupted run's state
STATE_VERSION = 1
RECIPE_FILE = "mlpfuse_tune_recipe.yaml"


@dataclass
class TuneReport:
    fused: str
    teacher: str
    data: str
    data_sha256: str
    output: str | None
    steps: int
    total_steps: int
    initial_loss: float
    final_loss: float
    trainable_parameters: int
    seconds: float
    resumed_from: int = 0
    settings: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    before: dict | None = None  # held-out metrics of the fused student (held_out_metrics)
    after: dict | None = None  # the same after tuning
    reference: dict | None = None  # the teacher's, where it is not trivially perfect (perplexity)
    evaluation: dict | None = None  # where the held-out text came from
    kl_logits: str | None = None  # how the KL term got its logits: "chunks of N tokens", "full", None (no KL)

    def to_dict(self) -> dict:
        return asdict(self)


def fused_module_paths(model: torch.nn.Module) -> list[str]:
    """Paths (relative to ``model.base_model``) of the fused MLP modules recorded in the config."""
    section = getattr(model.config, "mlpfuse", None) or {}
    paths = [spec["path"] for spec in section.get("modules", [])]
    base = model.base_model
    return [p for p in paths if hasattr(base, p.split(".")[0])]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Freeze everything except the fused MLP modules' weights and biases; return those by name."""
    paths = fused_module_paths(model)
    if not paths:
        raise InputError("the student has no fused MLP modules (config has no mlpfuse.modules); fuse it first")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    base = model.base_model
    prefix = next((name + "." for name, module in model.named_modules() if module is base and name), "")
    named = {}
    for path in paths:
        for name, parameter in base.get_submodule(path).named_parameters():
            parameter.requires_grad_(True)
            named[f"{prefix}{path}.{name}"] = parameter
    return named


def first_changed_state(model: torch.nn.Module) -> int:
    """Index into the hidden-state tuple (``output_hidden_states``) of the first state a fused MLP can change.

    ``hidden_states[i + 1]`` is layer ``i``'s output, so a model whose first fused MLP sits in layer
    ``f`` (the first number in its module path) gives ``f + 1``; states before it are the same in
    the teacher and the student. Encoder-decoder models (encoder states, then decoder states): a
    fused decoder layer is counted after the ``num_layers + 1`` encoder states. 1 (every layer's
    output) when no path names a layer number.
    """
    config = model.config
    encoder_states = (getattr(config, "num_layers", None) or getattr(config, "num_hidden_layers", 0)) + 1
    firsts = []
    for path in fused_module_paths(model):
        parts = path.split(".")
        numbers = [int(p) for p in parts if p.isdigit()]
        if not numbers:
            return 1
        offset = encoder_states if getattr(config, "is_encoder_decoder", False) and parts[0] == "decoder" else 0
        firsts.append(offset + numbers[0] + 1)
    return min(firsts) if firsts else 1


def shared_layers(model: torch.nn.Module) -> tuple[str, int] | None:
    """(path of the layer list under ``base_model``, index of the first fused layer) when every fused
    module sits in one ``nn.ModuleList`` of layers (``layers.26.mlp`` -> ``("layers", 26)``); None
    for encoder-decoder models, fused modules in several lists, or a first fused layer of 0.

    The layers before that index are the same in the teacher and the student, so the student can
    replay the teacher's outputs for them instead of computing them (:func:`_replaying`).
    """
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    found = set()
    for path in fused_module_paths(model):
        parts = path.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        if not digits:
            return None
        found.add((".".join(parts[:digits[0]]), int(parts[digits[0]])))
    containers = {container for container, _ in found}
    if len(containers) != 1:
        return None
    container = containers.pop()
    first = min(index for _, index in found)
    if not container or first == 0 or not isinstance(model.base_model.get_submodule(container), torch.nn.ModuleList):
        return None
    return container, first


@contextmanager
def _recording(model: torch.nn.Module, shared: tuple[str, int] | None):
    """Yields a list that collects the outputs of layers ``0 .. first - 1`` of ``model`` as it runs."""
    outputs: list = []
    if shared is None:
        yield outputs
        return
    container, first = shared
    layers = model.base_model.get_submodule(container)
    handles = [layers[i].register_forward_hook(lambda module, args, output: outputs.append(output))
               for i in range(first)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replaying(model: torch.nn.Module, shared: tuple[str, int] | None, outputs: list):
    """While active, layers ``0 .. first - 1`` of ``model`` return ``outputs`` (the teacher's, the same
    weights on the same input) instead of computing them: the student runs only from its first fused layer."""
    if shared is None or len(outputs) != shared[1]:
        yield
        return
    container, first = shared
    layers = model.base_model.get_submodule(container)
    for i in range(first):
        layers[i].forward = (lambda value: lambda *args, **kwargs: value)(outputs[i])
    try:
        yield
    finally:
        for i in range(first):
            del layers[i].forward


def _forward(model: torch.nn.Module, encoded: dict, logits: bool = False, last: bool = False) -> tuple:
    """(hidden states, then the logits with ``logits``, the base model's last hidden state [batch, seq,
    hidden] with ``last``, else None). Without ``logits`` a decoder runs only its base model, never
    the (full-vocabulary) output head. Encoder-decoder models: the encoder's then the decoder's
    states (the text as decoder input)."""
    if getattr(model.config, "is_encoder_decoder", False):
        out = model(**encoded, decoder_input_ids=encoded["input_ids"], decoder_attention_mask=encoded["attention_mask"],
                    output_hidden_states=True)
        return tuple(out.encoder_hidden_states) + tuple(out.decoder_hidden_states), getattr(out, "logits", None) if logits else None
    if logits:
        out = model(**encoded, output_hidden_states=True)
        return out.hidden_states, out.logits
    out = model.base_model(**encoded, output_hidden_states=True)
    return out.hidden_states, out.last_hidden_state if last else None


def token_weights(mask: torch.Tensor, first_token_weight: float = 1.0) -> torch.Tensor:
    """Per-token loss weights [batch, seq] (float): the padding mask, with each row's first
    non-padding token (left or right padding) weighted ``first_token_weight`` instead of 1."""
    weights = mask.to(torch.float32).clone()
    if first_token_weight != 1.0:
        first = (mask.cumsum(dim=1) == 1) & mask.bool()
        weights[first] = float(first_token_weight)
    return weights


def layer_statistics(teacher_states, weights: torch.Tensor, first_layer: int = 1) -> torch.Tensor:
    """Weighted sums of the teacher's states from ``first_layer`` on: float64 [layers, hidden + 2],
    each row ``[sum w, sum w * h (hidden values), sum w * |h|^2]``; sums add up over batches and ranks."""
    rows = []
    w = weights.to(torch.float64).unsqueeze(-1)
    for state in teacher_states[first_layer:]:
        h = state.detach().to(torch.float64)
        rows.append(torch.cat([w.sum().reshape(1), (w * h).sum(dim=(0, 1)), (w * h * h).sum().reshape(1)]))
    return torch.stack(rows)


def layer_variances(statistics: torch.Tensor) -> torch.Tensor:
    """Per-layer variance [layers] (float64) of the teacher's hidden values from :func:`layer_statistics`:
    the weighted mean over tokens and hidden units of the squared deviation from each unit's mean."""
    total, sums, squares = statistics[:, 0], statistics[:, 1:-1], statistics[:, -1]
    hidden = sums.shape[1]
    mean = sums / total.clamp_min(1e-300).unsqueeze(1)
    variance = (squares / total.clamp_min(1e-300) - (mean ** 2).sum(dim=1)) / hidden
    floor = (squares / total.clamp_min(1e-300) / hidden) * 1e-6  # a constant layer: fall back to a tiny share of its mean square
    return torch.maximum(variance, floor).clamp_min(torch.finfo(torch.float32).tiny)


def layerwise_loss(student_states, teacher_states, mask: torch.Tensor, tokens: torch.Tensor | None = None, *,
                   first_layer: int = 1, first_token_weight: float = 1.0, layer_loss: str = "mse",
                   variances: torch.Tensor | None = None) -> torch.Tensor:
    """The layer-wise distillation loss between hidden-state tuples ([batch, seq, hidden] each).

    Layers ``first_layer``.. (``[0]`` is the embeddings) count. Each token's squared error is
    weighted by :func:`token_weights` (padding 0, each row's first token ``first_token_weight``)
    and divided by the total weight ``tokens`` (default: this batch's; under torchrun the whole
    batch's, so that the ranks' losses and gradients add up) times the hidden size.

    ``layer_loss="mse"``: the sum over layers of those MSEs (the paper). ``"variance"``: the mean
    over layers of MSE / the teacher's variance of that layer (``variances`` [layers], default
    from this batch with the same weights: :func:`layer_variances`), a relative error that is
    unchanged when a layer's states are multiplied by a constant.
    """
    weights = token_weights(mask, first_token_weight).to(student_states[-1].dtype).unsqueeze(-1)
    total_weight = weights.sum() if tokens is None else tokens.to(weights.dtype)
    count = total_weight * student_states[-1].shape[-1]
    pairs = list(zip(student_states[first_layer:], teacher_states[first_layer:]))
    if layer_loss == "variance" and variances is None:
        variances = layer_variances(layer_statistics(teacher_states, weights.squeeze(-1), first_layer))
    total = student_states[-1].new_zeros(())
    for index, (student, teacher) in enumerate(pairs):
        term = (((student - teacher) ** 2) * weights).sum() / count
        if layer_loss == "variance":
            term = term / variances[index].to(term.dtype)
        total = total + term
    if layer_loss == "variance" and pairs:
        total = total / len(pairs)
    return total


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
             tokens: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at temperature T, times T^2, summed
    over non-padding tokens and divided by ``tokens`` (default: their count). Logits [batch, seq, vocab].
    Tuning computes the same from the last hidden states chunk by chunk where it can (:mod:`mlpfuse.train.tune_kl`)."""
    per_token = token_kl(student_logits, teacher_logits, temperature)
    weights = mask.to(per_token.dtype)
    count = weights.sum() if tokens is None else tokens.to(per_token.dtype)
    return (per_token * weights).sum() / count * temperature ** 2


def _batch_loss(student, teacher, encoded: dict, settings: TuneSettings, first_layer: int, reduce=None,
                heads: KLHeads | None = None) -> torch.Tensor:
    """The tuning loss of one batch (or of this rank's share when ``reduce`` sums over the ranks).

    The KL term comes from the last hidden states chunk by chunk when ``heads`` are given
    (:func:`mlpfuse.train.tune_kl.kl_heads`), from the full [batch, seq, vocab] logits otherwise."""
    kl = settings.kl_weight > 0
    full_logits, last = kl and heads is None, kl and heads is not None
    mask = encoded["attention_mask"]
    shared = shared_layers(student)
    with torch.no_grad(), _recording(teacher, shared) as early:
        target, target_out = _forward(teacher, encoded, full_logits, last)
    weight_total, token_total, variances = None, None, None
    statistics = None
    if settings.layer_loss == "variance":
        statistics = layer_statistics(target, token_weights(mask, settings.first_token_weight), first_layer)
    if reduce is not None:
        weight_total = reduce(token_weights(mask, settings.first_token_weight).sum().double())
        token_total = reduce(mask.sum().double())
        statistics = reduce(statistics) if statistics is not None else None
    if statistics is not None:
        variances = layer_variances(statistics)
    with _replaying(student, shared, early):
        states, out = _forward(student, encoded, full_logits, last)
    loss = layerwise_loss(states, target, mask, weight_total, first_layer=first_layer,
                          first_token_weight=settings.first_token_weight, layer_loss=settings.layer_loss,
                          variances=variances)
    if full_logits:
        loss = loss + settings.kl_weight * logit_kl(out, target_out, mask, settings.kl_temperature, token_total)
    elif last:
        loss = loss + settings.kl_weight * chunked_logit_kl(out, target_out, heads, mask, settings.kl_temperature,
                                                            token_total)
    return loss


def batch_order(count: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Indices of every batch of every epoch: a seeded permutation per epoch (same seed, same order)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator).tolist()
        batches.extend(order[i:i + batch_size] for i in range(0, count, batch_size))
    return batches


def tune_model(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    texts: list,
    settings: TuneSettings,
    on_step: Callable[[int, int, float], None] | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    identity: dict | None = None,
) -> dict:
    """Tune ``student``'s fused MLPs towards ``teacher``'s hidden states on ``texts``, in place.

    ``texts`` are strings, (text, pair) tuples, or lists of token ids (packed windows: :func:`pack_texts`). With ``state_dir``, the trainable weights,
    optimizer and step are saved there every ``settings.save_every`` steps and on interruption;
    ``resume=True`` continues from that state when its ``identity`` matches. Returns a dict with
    steps, total_steps, initial_loss, final_loss, losses, resumed_from and trainable_parameters.
    """
    if not texts:
        raise InputError("no text to tune on")
    check_settings(settings)
    settings = resolve_settings(settings, is_causal_lm_model(student))
    device = resolve_device(settings.device)
    student.to(device).eval()  # eval: no dropout, so the target and the run are deterministic
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    named = trainable_parameters(student)
    optimizer = torch.optim.AdamW(list(named.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    batches = batch_order(len(texts), settings.batch_size, settings.epochs, settings.seed)
    if settings.max_steps is not None:
        batches = batches[: settings.max_steps]
    identity = {"version": STATE_VERSION, **(identity or {}), "settings": {**asdict(settings), "save_every": None, "device": None},
                "count": len(texts)}
    start_step, losses = 0, []
    if state_dir is not None and resume:
        start_step, losses = _restore(state_dir, identity, named, optimizer)

    rank, size = world()
    writes = state_dir is not None and rank == 0  # under torchrun only rank 0 saves state
    first_layer = first_changed_state(student)
    shape = _statistics_shape(teacher, tokenizer, texts[0], settings, first_layer, device) if size > 1 else None
    heads = _kl_heads(student, teacher, tokenizer, texts[0], settings, device)
    step = start_step
    try:
        for step in range(start_step, len(batches)):
            optimizer.zero_grad(set_to_none=True)
            if size == 1:
                encoded = _encode(tokenizer, [texts[i] for i in batches[step]], settings.max_length, device)
                loss = _batch_loss(student, teacher, encoded, settings, first_layer, heads=heads)
                value = loss.item()
                if not math.isfinite(value):
                    raise InputError(f"the tuning loss became {value} at step {step + 1}; lower --lr")
                loss.backward()
            else:
                value = _distributed_step(student, teacher, tokenizer, [texts[i] for i in batches[step][rank::size]],
                                          settings, device, list(named.values()), first_layer, shape, heads)
                if not math.isfinite(value):  # the same summed value on every rank: all stop
                    raise InputError(f"the tuning loss became {value} at step {step + 1}; lower --lr")
            optimizer.step()
            losses.append(value)
            if on_step:
                on_step(step + 1, len(batches), losses[-1])
            if writes and settings.save_every and (step + 1) % settings.save_every == 0 \
                    and step + 1 < len(batches):
                _save_state(state_dir, identity, named, optimizer, step + 1, losses)
    except KeyboardInterrupt:
        if writes and len(losses) > start_step:
            _save_state(state_dir, identity, named, optimizer, len(losses), losses)
        raise
    finally:
        if size > 1:
            leave()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    tail = losses[-min(len(losses), 10):]
    return {
        "steps": len(losses), "total_steps": len(batches), "resumed_from": start_step,
        "initial_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "losses": losses, "trainable_parameters": sum(p.numel() for p in named.values()),
        "kl_logits": None if not settings.kl_weight else f"chunks of {heads.chunk} tokens" if heads else "full",
    }


def _kl_heads(student, teacher, tokenizer, text, settings: TuneSettings, device) -> KLHeads | None:
    """The output heads for the chunked KL (:func:`mlpfuse.train.tune_kl.kl_heads`, checked on ``text``); None
    without a KL term, for a model that is not a causal LM, or (with a warning) where a head does
    not reproduce its model's logits: the KL then comes from the full logits."""
    if not settings.kl_weight or not is_causal_lm_model(student):
        return None
    heads = kl_heads(student, teacher, _encode(tokenizer, [text], settings.max_length, device))
    if heads is None:
        warnings.warn(f"tune: the chunked KL cannot reproduce the logits of the student or the teacher "
                      f"({type(student).__name__}, {type(teacher).__name__}) from its output head; computing the KL "
                      f"from the full [tokens, vocabulary] logits (memory grows with the vocabulary)", stacklevel=2)
    return heads


def _statistics_shape(teacher, tokenizer, text, settings: TuneSettings, first_layer: int, device) -> tuple:
    """The shape of :func:`layer_statistics` for this model (a rank with no rows in a batch still
    joins the all-reduce with zeros of that shape)."""
    with torch.no_grad():
        states, _ = _forward(teacher, _encode(tokenizer, [text], settings.max_length, device), False)
    return len(states) - first_layer, states[-1].shape[-1] + 2


def _distributed_step(student, teacher, tokenizer, texts: list, settings: TuneSettings, device, parameters: list,
                      first_layer: int, shape: tuple, heads: KLHeads | None = None) -> float:
    """One torchrun step on this rank's share ``texts`` of the batch (may be empty): backward, then
    the gradients summed over the ranks. Returns the whole batch's loss (the same on every rank).

    The loss's normalisers (total token weight, token count, the teacher's layer statistics) are
    summed over the ranks first, so the ranks' losses add up to the one-process loss of the batch."""
    value = torch.zeros((), dtype=torch.float64)
    if texts:
        encoded = _encode(tokenizer, texts, settings.max_length, device)
        loss = _batch_loss(student, teacher, encoded, settings, first_layer, reduce=all_reduce_sum, heads=heads)
        loss.backward()
        value = loss.detach().double().cpu()
    else:  # join the same all-reduces as the other ranks, with nothing to add
        all_reduce_sum(torch.zeros((), dtype=torch.float64))
        all_reduce_sum(torch.zeros((), dtype=torch.float64))
        if settings.layer_loss == "variance":
            all_reduce_sum(torch.zeros(shape, dtype=torch.float64))
    all_reduce_gradients(parameters)
    return float(all_reduce_sum(value))


def hidden_error(student, teacher, tokenizer, texts: list, max_length: int = 128, batch_size: int = 32,
                 device=None) -> float:
    """The student's hidden-state relative error vs the teacher on ``texts``, without gradients.

    Over every non-padding token and hidden unit of each layer from the first fused one on:
    sum of squared differences / (token count x hidden size x the teacher's variance of that
    layer), averaged over those layers (0: identical; 1: as far off as the teacher's spread).
    Statistics are summed over all batches before dividing.
    """
    device = device or next(student.parameters()).device
    first_layer = first_changed_state(student)
    errors, statistics = None, None
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = _encode(tokenizer, texts[start:start + batch_size], max_length, device)
            target, _ = _forward(teacher, encoded, False)
            states, _ = _forward(student, encoded, False)
            weights = encoded["attention_mask"].to(torch.float64).unsqueeze(-1)
            batch_errors = torch.stack([(((s.double() - t.double()) ** 2) * weights).sum()
                                        for s, t in zip(states[first_layer:], target[first_layer:])])
            batch_stats = layer_statistics(target, weights.squeeze(-1), first_layer)
            errors = batch_errors if errors is None else errors + batch_errors
            statistics = batch_stats if statistics is None else statistics + batch_stats
    if errors is None:
        raise InputError("no held-out text to measure the hidden-state error on")
    hidden = statistics.shape[1] - 2
    relative = errors / (statistics[:, 0] * hidden) / layer_variances(statistics)
    return float(relative.mean())


def _save_state(state_dir: Path, identity: dict, named: dict, optimizer, step: int, losses: list) -> None:
    """Write the resumable state into a temporary folder, then swap it in (a crash never leaves half a state)."""
    state_dir = Path(state_dir)
    temp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(temp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    (temp / "state.json").write_text(json.dumps({"identity": identity, "step": step, "losses": losses}), encoding="utf-8")
    shutil.rmtree(state_dir, ignore_errors=True)
    temp.rename(state_dir)


def _no_saved_state(state_dir: Path) -> InputError:
    return InputError(f"--resume: there is no saved state in {state_dir} (no earlier run of this command was "
                      f"interrupted); run without --resume to start from the beginning")


def _restore(state_dir: Path, identity: dict, named: dict, optimizer) -> tuple[int, list]:
    state_file = Path(state_dir) / "state.json"
    if not state_file.is_file():
        raise _no_saved_state(state_dir)
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("identity") != identity:
        raise InputError(f"the saved state in {state_dir} is from a run with other inputs or settings; "
                         f"rerun with the same ones, or delete {state_dir} to start over")
    weights = load_file(str(Path(state_dir) / "trainable.safetensors"))
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(weights[name].to(parameter.device, parameter.dtype))
    optimizer.load_state_dict(torch.load(Path(state_dir) / "optimizer.pt", weights_only=True))
    return int(state["step"]), list(state["losses"])


def state_directory(output: str | Path) -> Path:
    """Where an interrupted run writing ``output`` keeps its state: ``OUTPUT.tune-state`` beside it."""
    target = Path(output).expanduser().resolve()
    return target.with_name(target.name + STATE_SUFFIX)


# Config fields that differ between a fused checkpoint and its original without changing the model's shape.
_NOT_SHAPE = {"mlpfuse", "model_type", "base_model_type", "auto_map", "architectures", "transformers_version",
              "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id", "problem_type", "num_labels"}


def check_teacher(fused_config: dict, teacher_config: dict, fused: str, teacher: str) -> None:
    """The teacher must be the model ``fused`` was made from: same architecture and the same sizes.

    Compares the model type and every integer field the two config.json files share (hidden size,
    layer and head counts, intermediate size...); raises InputError naming the fields that differ.
    """
    if teacher_config.get("model_type") == "mlpfuse":
        raise InputError(f"--teacher {teacher} is a fused checkpoint; the teacher must be the original model")
    if fused_config.get("base_model_type") != teacher_config.get("model_type"):
        raise InputError(f"--teacher {teacher} is a {teacher_config.get('model_type')} model but {fused} was fused "
                         f"from a {fused_config.get('base_model_type')} model; give the original model")
    differ = [f"{key} {teacher_config[key]} vs {value}" for key, value in sorted(fused_config.items())
              if key not in _NOT_SHAPE and key in teacher_config and isinstance(value, int)
              and not isinstance(value, bool) and teacher_config[key] != value]
    if differ:
        raise InputError(f"--teacher {teacher} has other sizes than the model {fused} was fused from "
                         f"({'; '.join(differ[:4])}); give the original model")


@guarded_outputs
def tune_checkpoint(
    fused: str,
    teacher: str,
    data: str,
    output: str | Path,
    settings: TuneSettings,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TuneReport | None:
    """Tune fused checkpoint ``fused`` against original ``teacher`` on text file ``data``; write ``output``.

    Under torchrun the batches are split over the ranks (mlpfuse/train/distributed.py); ranks > 0 return None.

    The output is a fused checkpoint (same format) whose ``mlpfuse.tuning`` records the data file
    and its sha256, steps, losses and settings. It appears only when complete. If interrupted, the
    state is kept in ``OUTPUT.tune-state/`` and ``resume=True`` continues from it (an InputError
    when there is no saved state). Settings, device and teacher are checked before any loading.
    """
    start = time.perf_counter()
    check_settings(settings)
    resolve_device(settings.device)  # a device that cannot be used fails before any loading
    fused_dir, teacher_dir = resolve_model(fused), resolve_model(teacher)
    if not is_fused(fused_dir):
        raise InputError(f"{fused} is not an mlpfuse checkpoint; tune the output of `mlpfuse fuse`")
    if is_fused(teacher_dir):
        raise InputError(f"--teacher {teacher} is a fused checkpoint; the teacher must be the original model")
    inputs = [fused_dir, teacher_dir] + ([data] if not str(data).startswith("hub:") else [])
    worker = is_worker()  # torchrun: ranks > 0 compute their share of each batch; rank 0 writes
    if worker:
        target = Path(output).expanduser().resolve()
    else:
        target = claim_output(output, inputs, overwrite).target  # checks, lock, staging: before any work
        check_target(state_directory(target), inputs)  # the resumable state beside it is deleted at the end
    config = read_config(fused_dir)
    check_teacher(config, read_config(teacher_dir), fused, teacher)
    state_dir = state_directory(target)
    if resume and not (state_dir / "state.json").is_file():
        raise _no_saved_state(state_dir)
    task = saved_task(config)  # the head saved is the head kept
    if settings.kl_weight and task != "causal-lm":
        raise InputError(f"--kl-weight compares next-token distributions and needs a causal language model; "
                         f"{fused} is saved as a {task} model: leave --kl-weight at 0")
    if settings.pack and task != "causal-lm":
        raise InputError(f"--pack joins rows into windows of tokens for a causal language model; {fused} is saved "
                         f"as a {task} model: leave --pack off")
    settings = resolve_settings(settings, task == "causal-lm")
    rows, texts = training_texts(data, settings)
    held_out, evaluation = ([], {"rows": 0}) if worker else held_out_texts(data, settings)
    data_sha = file_sha256(data) if Path(data).expanduser().is_file() else ""

    tokenizer = load_tokenizer(fused_dir, fallback=teacher_dir)
    if settings.pack:
        settings.max_length = check_window(settings.max_length, config, default=TuneSettings.max_length)
        texts = pack_texts(tokenizer, texts, settings.max_length)
        if not texts:
            raise InputError(f"--data {data} gives fewer than 2 tokens to tune on")
    student = load(fused_dir, task=task)
    dtype = next(student.parameters()).dtype
    student.float()
    # a causal LM's teacher keeps its head for the reference perplexity and --kl-weight; the loss
    # without KL runs only the base models (the head is never called then)
    teacher_model = load(teacher_dir, task="causal-lm" if task == "causal-lm" else "base").float()
    if state_dir.exists() and not resume and not worker:
        shutil.rmtree(state_dir)
    before = reference = None
    if held_out:
        device = resolve_device(settings.device)
        student.to(device), teacher_model.to(device)
        before = held_out_metrics(student, teacher_model, tokenizer, held_out, settings)
        if is_causal_lm_model(student):
            reference = held_out_metrics(student, teacher_model, tokenizer, held_out, settings, reference=True)
    identity = {"fused": CheckpointReader(fused_dir).sha256(), "data_sha256": data_sha}
    result = tune_model(student, teacher_model, tokenizer, texts, settings, on_step=None if worker else on_step,
                        state_dir=state_dir, resume=resume, identity=identity)
    if worker:
        return None
    after = held_out_metrics(student, teacher_model, tokenizer, held_out, settings) if held_out else None
    record = {
        "data": str(data), "data_sha256": data_sha, "text_column": settings.text_column,
        "pair_column": settings.pair_column, "rows": rows, "sequences": len(texts),
        "packed": bool(texts) and isinstance(texts[0], list), "teacher": str(teacher),
        "steps": result["steps"], "total_steps": result["total_steps"],
        "initial_loss": result["initial_loss"], "final_loss": result["final_loss"],
        "lr": settings.lr, "batch_size": settings.batch_size, "max_length": settings.max_length,
        "epochs": settings.epochs, "max_steps": settings.max_steps, "seed": settings.seed,
        "layer_loss": settings.layer_loss, "first_token_weight": settings.first_token_weight,
        "kl_weight": settings.kl_weight, "kl_temperature": settings.kl_temperature,
        "evaluation": evaluation, "before": before, "after": after, "reference": reference,
    }
    student.to("cpu", dtype)
    write_derived(target, DerivedCheckpoint(
        source=fused_dir, model=student, section=tuning_section(student.config.mlpfuse or {}, record),
        tokenizer=tokenizer, reference=student, recipe_file=RECIPE_FILE,
        recipe={"fused": str(fused), "teacher": str(teacher), "data": str(data), **asdict(settings)},
        summary=f"tuned layer by layer against {teacher} on {Path(str(data)).name}"), overwrite)
    shutil.rmtree(state_dir, ignore_errors=True)
    return TuneReport(
        fused=str(fused), teacher=str(teacher), data=str(data), data_sha256=data_sha, output=str(target),
        steps=result["steps"], total_steps=result["total_steps"], initial_loss=result["initial_loss"],
        final_loss=result["final_loss"], trainable_parameters=result["trainable_parameters"],
        seconds=time.perf_counter() - start, resumed_from=result["resumed_from"], settings=asdict(settings),
        losses=result["losses"], before=before, after=after, reference=reference, evaluation=evaluation,
        kl_logits=result["kl_logits"],
    )
