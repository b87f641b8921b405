"""Layer-wise task-specific tuning (MLP Fusion paper, Sec. 4.4).

The teacher is the original model, the student the fused one. On unlabelled task text, the loss is
the sum over layers of the mean squared error between teacher and student hidden states (padding
positions masked out). Only the weights of the fused MLP modules train; the cluster sizes P are a
buffer and stay constant; everything else is frozen. AdamW, one epoch by default.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointReader, read_config
from .output import carry_side_files, check_target, claim_output, guarded_outputs, staging_directory
from .data import encode_texts, read_table
from .distributed import all_reduce_gradients, all_reduce_sum, is_worker, leave, world
from .errors import InputError
from .modeling import TASKS, is_fused, load
from .options import check_optional_positive, check_positive, check_seed
from .runtime import file_sha256, load_tokenizer, resolve_device
from .source import resolve_model

STATE_SUFFIX = ".tune-state"  # OUTPUT.tune-state/ beside the output holds an interrupted run's state
STATE_VERSION = 1


@dataclass
class TuneSettings:
    """Everything that decides the result of a tuning run."""

    text_column: str = "sentence"
    pair_column: str | None = None
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 128
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    limit: int | None = None
    save_every: int = 100
    device: str | None = None


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

    def to_dict(self) -> dict:
        return asdict(self)


def check_settings(settings: TuneSettings) -> None:
    """One-line InputErrors for values no run can use (a NaN or non-positive --lr, --epochs < 1, ...)."""
    check_positive(settings.lr, "--lr")
    check_positive(settings.weight_decay, "--weight-decay", allow_zero=True)
    check_positive(settings.epochs, "--epochs", integer=True)
    check_positive(settings.batch_size, "--batch-size", integer=True)
    if check_positive(settings.max_length, "--max-length", integer=True) < 2:
        raise InputError(f"--max-length must be at least 2, got {settings.max_length}")
    check_optional_positive(settings.max_steps, "--max-steps")
    check_optional_positive(settings.limit, "--limit")
    check_positive(settings.save_every, "--save-every", integer=True, allow_zero=True)
    check_seed(settings.seed)


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


def _hidden_states(model: torch.nn.Module, encoded: dict) -> tuple:
    """Every layer's hidden states; encoder-decoder models: the encoder's then the decoder's (the text as decoder input)."""
    if getattr(model.config, "is_encoder_decoder", False):
        out = model(**encoded, decoder_input_ids=encoded["input_ids"], decoder_attention_mask=encoded["attention_mask"],
                    output_hidden_states=True)
        return tuple(out.encoder_hidden_states) + tuple(out.decoder_hidden_states)
    return model(**encoded, output_hidden_states=True).hidden_states


def layerwise_loss(student_states, teacher_states, mask: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over layers of the MSE between hidden states, averaged over non-padding tokens.

    ``tokens``: the number of tokens to average over (default: the mask's); under torchrun the
    whole batch's, so that the ranks' losses and gradients add up to the whole batch's.
    """
    weights = mask.unsqueeze(-1).to(student_states[-1].dtype)
    count = (weights.sum() if tokens is None else tokens.to(weights.dtype)) * student_states[-1].shape[-1]
    total = student_states[-1].new_zeros(())
    for student, teacher in zip(student_states[1:], teacher_states[1:]):  # [0] is the embeddings
        total = total + (((student - teacher) ** 2) * weights).sum() / count
    return total


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

    ``texts`` are strings or (text, pair) tuples. With ``state_dir``, the trainable weights,
    optimizer and step are saved there every ``settings.save_every`` steps and on interruption;
    ``resume=True`` continues from that state when its ``identity`` matches. Returns a dict with
    steps, total_steps, initial_loss, final_loss, losses, resumed_from and trainable_parameters.
    """
    if not texts:
        raise InputError("no text to tune on")
    check_settings(settings)
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
    step = start_step
    try:
        for step in range(start_step, len(batches)):
            optimizer.zero_grad(set_to_none=True)
            if size == 1:
                encoded = _encode(tokenizer, [texts[i] for i in batches[step]], settings.max_length, device)
                with torch.no_grad():
                    target = _hidden_states(teacher, encoded)
                loss = layerwise_loss(_hidden_states(student, encoded), target, encoded["attention_mask"])
                value = loss.item()
                if not math.isfinite(value):
                    raise InputError(f"the tuning loss became {value} at step {step + 1}; lower --lr")
                loss.backward()
            else:
                value = _distributed_step(student, teacher, tokenizer, [texts[i] for i in batches[step][rank::size]],
                                          settings.max_length, device, list(named.values()))
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
    }


def _distributed_step(student, teacher, tokenizer, texts: list, max_length: int, device, parameters: list) -> float:
    """One torchrun step on this rank's share ``texts`` of the batch (may be empty): backward, then
    the gradients summed over the ranks. Returns the whole batch's loss (the same on every rank)."""
    encoded = _encode(tokenizer, texts, max_length, device) if texts else None
    tokens = all_reduce_sum(encoded["attention_mask"].sum().double() if texts else torch.zeros((), dtype=torch.float64))
    value = torch.zeros((), dtype=torch.float64)
    if texts:
        with torch.no_grad():
            target = _hidden_states(teacher, encoded)
        loss = layerwise_loss(_hidden_states(student, encoded), target, encoded["attention_mask"], tokens=tokens)
        loss.backward()
        value = loss.detach().double().cpu()
    all_reduce_gradients(parameters)
    return float(all_reduce_sum(value))


def _encode(tokenizer, texts: list, max_length: int, device) -> dict:
    encoded = encode_texts(tokenizer, texts, max_length)
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


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


def _task_of(config: dict) -> str:
    """The loader task matching the checkpoint's saved class, so the head is kept on save."""
    from .format import checkpoint_task

    task = checkpoint_task(config)
    return task if task in TASKS else "base"


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

    Under torchrun the batches are split over the ranks (mlpfuse/distributed.py); ranks > 0 return None.

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
    table = read_table(data, limit=settings.limit)
    texts = table.texts(settings.text_column, settings.pair_column)
    data_sha = file_sha256(data) if Path(data).expanduser().is_file() else ""

    tokenizer = load_tokenizer(fused_dir, fallback=teacher_dir)
    student = load(fused_dir, task=_task_of(config))
    dtype = next(student.parameters()).dtype
    student.float()
    teacher_model = load(teacher_dir, task="base").float()
    if state_dir.exists() and not resume and not worker:
        shutil.rmtree(state_dir)
    identity = {"fused": CheckpointReader(fused_dir).sha256(), "data_sha256": data_sha}
    result = tune_model(student, teacher_model, tokenizer, texts, settings, on_step=None if worker else on_step,
                        state_dir=state_dir, resume=resume, identity=identity)
    if worker:
        return None
    record = {
        "data": str(data), "data_sha256": data_sha, "text_column": settings.text_column,
        "pair_column": settings.pair_column, "rows": len(texts), "teacher": str(teacher),
        "steps": result["steps"], "total_steps": result["total_steps"],
        "initial_loss": result["initial_loss"], "final_loss": result["final_loss"],
        "lr": settings.lr, "batch_size": settings.batch_size, "max_length": settings.max_length,
        "epochs": settings.epochs, "max_steps": settings.max_steps, "seed": settings.seed,
    }
    student.config.mlpfuse = {**(student.config.mlpfuse or {}), "tuning": record}
    student.to("cpu", dtype)
    with staging_directory(target, overwrite) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        carry_side_files(fused_dir, staging)  # e.g. sentence-transformers modules

        from .modeling import verify_checkpoint

        verify_checkpoint(staging, reference=student)
    shutil.rmtree(state_dir, ignore_errors=True)
    return TuneReport(
        fused=str(fused), teacher=str(teacher), data=str(data), data_sha256=data_sha, output=str(target),
        steps=result["steps"], total_steps=result["total_steps"], initial_loss=result["initial_loss"],
        final_loss=result["final_loss"], trainable_parameters=result["trainable_parameters"],
        seconds=time.perf_counter() - start, resumed_from=result["resumed_from"], settings=asdict(settings),
        losses=result["losses"],
    )
