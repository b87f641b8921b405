"""Options several commands share: one flag name and one help text wherever they appear.

Each command declares a shared option by calling the function here (defaults may differ per
command; names and help texts may not). ``tests/test_cli_flags.py`` walks every command and checks it.
Import-light on purpose (typer only): ``mlpfuse --help`` must not pull torch or transformers.
"""

from __future__ import annotations

import typer

# Every registered method (mlpfuse.methods), written out: importing the registry would import torch.
# tests/test_cli_flags.py checks that no method is missing.
METHODS_HELP = ("fusion (MLP Fusion, the paper), cluster (clustering baseline), or the baselines svd, sketch, mmd, "
                "prune.")

DEBUG_HELP = "Show full tracebacks on errors."
JSON_HELP = "Write a machine-readable report to this path ('-' for stdout)."
OUTPUT_HELP = "Directory to write (must not exist unless --overwrite)."
OVERWRITE_HELP = "Replace an existing output directory."
SEED_HELP = "Random seed (same inputs and seed, same output)."
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda if available)."
MAX_LENGTH_HELP = "Tokens per text (longer ones are truncated)."
BATCH_SIZE_HELP = "Sequences per batch (one forward/backward pass)."
TEXT_COLUMN_HELP = "Column with the text (the first text of a pair)."
TEXT_PAIR_COLUMN_HELP = "Column with the second text of a pair (sentence-pair tasks)."
MAX_STEPS_HELP = "Stop after this many optimizer steps (overrides --epochs)."
LOG_EVERY_HELP = "Without a terminal: one progress line per N steps."
BACKEND_HELP = "k-means backend: auto, faiss or torch."
MAX_SHARD_SIZE_HELP = "Largest safetensors shard, e.g. 5GB or 500MB."
CALIBRATION_LIMIT_HELP = "Rows read from --calibration."
LORA_HELP = "Train LoRA adapters (PEFT) instead of every weight."
LORA_RANK_HELP = "LoRA rank r."
LORA_ALPHA_HELP = "LoRA alpha (the update is scaled by alpha / r)."
LORA_DROPOUT_HELP = "Dropout on the LoRA input."

DebugOption = typer.Option(False, "--debug", help=DEBUG_HELP)
JsonOption = typer.Option(None, "--json", help=JSON_HELP)


def output_option(required: bool = False):
    """``-o/--output DIR``; ``required`` makes it mandatory."""
    return typer.Option(... if required else None, "-o", "--output", help=OUTPUT_HELP)


def overwrite_option(default: bool | None = False):
    """``--overwrite``; ``default=None`` adds ``--no-overwrite`` so a recipe value can be overridden."""
    if default is None:
        return typer.Option(None, "--overwrite/--no-overwrite", help=OVERWRITE_HELP, show_default="no-overwrite")
    return typer.Option(default, "--overwrite", help=OVERWRITE_HELP)


def seed_option(default: int | None = 0, shown: int = 0):
    """``--seed N``; ``default=None`` (a recipe may set it) shows ``shown`` as the default."""
    return typer.Option(default, "--seed", help=SEED_HELP, show_default=str(shown) if default is None else True)


def device_option():
    """``--device``: None means auto (CUDA if available, else CPU)."""
    return typer.Option(None, "--device", help=DEVICE_HELP, show_default="auto")


def max_length_option(default: int = 128):
    """``--max-length``: tokens per text."""
    return typer.Option(default, "--max-length", help=MAX_LENGTH_HELP)


def batch_size_option(default: int = 32):
    """``--batch-size``: sequences per forward/backward pass."""
    return typer.Option(default, "--batch-size", help=BATCH_SIZE_HELP)


def text_column_option(default: str = "sentence", *aliases: str):
    """``--text-column`` (plus old spellings in ``aliases``, e.g. ``--column``)."""
    return typer.Option(default, "--text-column", *aliases, help=TEXT_COLUMN_HELP)


def text_pair_column_option(*aliases: str):
    """``--text-pair-column`` (plus old spellings in ``aliases``); None means single texts."""
    return typer.Option(None, "--text-pair-column", *aliases, help=TEXT_PAIR_COLUMN_HELP)


def max_steps_option():
    """``--max-steps``: None means all epochs."""
    return typer.Option(None, "--max-steps", help=MAX_STEPS_HELP, show_default="all epochs")


def log_every_option(default: int = 10):
    """``--log-every``: one progress line per N steps outside a terminal."""
    return typer.Option(default, "--log-every", help=LOG_EVERY_HELP)


def backend_option(default: str | None = "auto"):
    """``--backend``: k-means backend; ``default=None`` (a recipe may set it) shows ``auto``."""
    return typer.Option(default, "--backend", help=BACKEND_HELP, show_default="auto" if default is None else True)


def max_shard_size_option(default: str | None = "5GB"):
    """``--max-shard-size``; ``default=None`` (a recipe may set it) shows ``5GB``."""
    return typer.Option(default, "--max-shard-size", help=MAX_SHARD_SIZE_HELP,
                        show_default="5GB" if default is None else True)


def calibration_limit_option(default: int | None = 300, shown: int = 300):
    """``--calibration-limit N``: rows read from ``--calibration``; ``default=None`` (a recipe may set it) shows ``shown``."""
    return typer.Option(default, "--calibration-limit", help=CALIBRATION_LIMIT_HELP,
                        show_default=str(shown) if default is None else True)


def optional_max_length_option(shown: int):
    """``--max-length`` defaulting to None (a recipe may set it), shown as ``shown``."""
    return typer.Option(None, "--max-length", help=MAX_LENGTH_HELP, show_default=str(shown))


def optional_text_column_option(shown: str = "sentence"):
    """``--text-column`` defaulting to None (a recipe may set it), shown as ``shown``."""
    return typer.Option(None, "--text-column", help=TEXT_COLUMN_HELP, show_default=shown)


# LoRA (mlpfuse/lora.py): finetune trains with it, bench times its training step. Defaults: finetune's
# FinetuneSettings / bench's BenchSettings (8, 16, 0.05).


def lora_option():
    """``--lora``: train LoRA adapters (PEFT) instead of every weight."""
    return typer.Option(False, "--lora", help=LORA_HELP)


def lora_rank_option(default: int = 8):
    """``--lora-rank r``."""
    return typer.Option(default, "--lora-rank", help=LORA_RANK_HELP)


def lora_alpha_option(default: float = 16.0):
    """``--lora-alpha``: the update is scaled by alpha / r."""
    return typer.Option(default, "--lora-alpha", help=LORA_ALPHA_HELP)


def lora_dropout_option(default: float = 0.05):
    """``--lora-dropout``: dropout on the adapters' input."""
    return typer.Option(default, "--lora-dropout", help=LORA_DROPOUT_HELP)
