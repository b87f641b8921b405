"""The settings of ``tune``: every field that decides a tuning run, its defaults (the command-line ones
declared in ``option_fields.TUNING``), the model-dependent defaults and the one-line checks."""

from __future__ import annotations

from dataclasses import dataclass

from mlpfuse.errors import InputError
from mlpfuse.option_fields import TUNING
from mlpfuse.options import check_optional_positive, check_positive, check_seed


@dataclass
class TuneSettings:
    """Everything that decides the result of a tuning run."""

    text_column: str = "sentence"
    pair_column: str | None = None
    lr: float = TUNING["lr"].default
    batch_size: int = 32
    max_length: int = 128
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    limit: int | None = None
    save_every: int = 100
    device: str | None = None
    layer_loss: str | None = None  # None: "variance" for causal LMs, "mse" (the paper's) for other models
    first_token_weight: float = TUNING["first_token_weight"].default
    kl_weight: float | None = None  # None: DEFAULT_KL_WEIGHT for causal LMs, 0 for other models
    kl_temperature: float = TUNING["kl_temperature"].default
    eval_data: str | None = None
    eval_rows: int = TUNING["eval_rows"].default
    pack: bool | None = None  # causal LMs: None packs (see pack_texts); encoders: never


LAYER_LOSSES = ("variance", "mse")
DEFAULT_KL_WEIGHT = 1.0  # causal LMs, measured on SmolLM2-135M (docs/tune-finetune.md)


def resolve_settings(settings: TuneSettings, causal_lm: bool) -> TuneSettings:
    """``settings`` with the model-dependent defaults filled in: ``kl_weight`` None becomes
    DEFAULT_KL_WEIGHT for a causal LM and 0 otherwise; ``pack`` None becomes ``causal_lm``;
    ``layer_loss`` None becomes "variance" for a causal LM and "mse" otherwise."""
    from dataclasses import replace

    kl = settings.kl_weight if settings.kl_weight is not None else (DEFAULT_KL_WEIGHT if causal_lm else 0.0)
    pack = settings.pack if settings.pack is not None else causal_lm
    layer_loss = settings.layer_loss or ("variance" if causal_lm else "mse")
    return replace(settings, kl_weight=kl, pack=pack, layer_loss=layer_loss)



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
    if settings.layer_loss is not None and settings.layer_loss not in LAYER_LOSSES:
        raise InputError(f"--layer-loss must be one of {', '.join(LAYER_LOSSES)}, got {settings.layer_loss!r}")
    check_positive(settings.first_token_weight, "--first-token-weight", allow_zero=True)
    if settings.kl_weight is not None:
        check_positive(settings.kl_weight, "--kl-weight", allow_zero=True)
    check_positive(settings.kl_temperature, "--kl-temperature")
    check_positive(settings.eval_rows, "--eval-rows", integer=True, allow_zero=True)
