"""The typer options of the declared fields (mlpfuse/option_fields.py): one flag name and one help text wherever they appear.

:func:`command` builds a command's options from the declarations: the command function lists only its own
arguments and options, plus ``opts``, which receives the declared ones (``opts.device``, ``opts.seed``...);
``COMMON`` is added to every command. ``recipe=True`` (``fuse``) makes every declared option default to None
(unset), so that :func:`merge_declared` can tell a flag from a recipe value from a default. The ``*_option``
functions below are the same options for commands still written by hand (defaults may differ per command;
names and help texts may not). ``tests/test_cli_flags.py`` walks every command and checks it.
Import-light on purpose (typer, the option and method declarations only): ``mlpfuse --help`` must not pull torch or transformers.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import typer

from ..option_fields import COMMON, COMPRESSION, OUTPUT, RUNTIME, TEXT, TRAINING, Field, Group

from ..methods.catalog import methods_help

# Every built-in method with its help line, read from the declarations (mlpfuse/methods/catalog.py, no torch).
METHODS_HELP = methods_help()

# The help texts of the shared options, declared in mlpfuse/option_fields.py (kept here under their old names).
DEBUG_HELP = COMMON["debug"].help
JSON_HELP = OUTPUT["json_path"].help
OUTPUT_HELP = OUTPUT["output"].help
OVERWRITE_HELP = OUTPUT["overwrite"].help
SEED_HELP = RUNTIME["seed"].help
DEVICE_HELP = RUNTIME["device"].help
MAX_LENGTH_HELP = TEXT["max_length"].help
BATCH_SIZE_HELP = TEXT["batch_size"].help
TEXT_COLUMN_HELP = TEXT["text_column"].help
TEXT_PAIR_COLUMN_HELP = TEXT["pair_column"].help
MAX_STEPS_HELP = TRAINING["max_steps"].help
LOG_EVERY_HELP = TRAINING["log_every"].help
BACKEND_HELP = COMPRESSION["backend"].help
MAX_SHARD_SIZE_HELP = RUNTIME["max_shard_size"].help
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


# --- options generated from the declarations ----------------------------------------------------------------

class Options(SimpleNamespace):
    """The values of a command's declared options for one run: ``opts.device``, ``opts.seed``..."""


def typer_option(field: Field, recipe: bool = False):
    """The typer option of ``field``.

    ``recipe``: the option defaults to None (unset: a recipe value or the declared default applies, see
    :func:`merge_declared`), ``--help`` shows the declared default, and a switch gets its ``--no-`` form
    so that a flag can override the recipe.
    """
    help_text = field.help.replace("{methods}", METHODS_HELP)
    flags = field.flags
    if recipe:
        shown = field.shown
        if field.type is bool:
            flags = tuple(f"{flag}/--no-{flag[2:]}" if flag.startswith("--") and "/" not in flag else flag
                          for flag in flags)
            shown = shown or ("" if field.default else "no-") + field.flags[-1][2:]
        elif shown is None and field.default is not None:
            shown = str(field.default)
        return typer.Option(None, *flags, help=help_text, show_default=shown if shown is not None else True)
    default = ... if field.required else field.default
    return typer.Option(default, *flags, help=help_text, show_default=field.shown if field.shown is not None else True)


def command(*declared: Field | Group, recipe: bool = False):
    """Decorator of a command function: appends the typer options of ``declared`` (fields, or whole groups)
    and of ``COMMON`` to its signature, and runs it under :func:`mlpfuse.cli.common.handle_errors`.

    The function lists its own arguments and options as usual, plus a parameter ``opts`` that receives an
    :class:`Options` with the declared values (each passed through its field's ``parse``). ``recipe``: see
    :func:`typer_option`.
    """
    fields: list[Field] = []
    for item in (*declared, COMMON):
        fields.extend(item if isinstance(item, Group) else (item,))
    common = set(COMMON.names())  # never recipe fields
    names = [f.name for f in fields]
    assert len(set(names)) == len(names), f"a declared option given twice: {names}"

    def decorate(fn):
        from .common import handle_errors  # common imports this module

        signature = inspect.signature(fn, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != "opts"]
        clash = {p.name for p in own} & set(names)
        assert not clash, f"{fn.__name__} declares {clash} itself and through option_fields"
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=typer_option(f, recipe and f.name not in common),
                                   annotation=f.type) for f in fields if f.flags]
        given = {p.name for p in added}

        @functools.wraps(fn)
        def run(*args, **kwargs):
            values = {f.name: kwargs.pop(f.name, None) if f.name in given else f.default for f in fields}
            values = {name: (field.parse(value) if field.parse and value is not None else value)
                      for (name, value), field in zip(values.items(), fields)}
            return fn(*args, **kwargs, opts=Options(**values))

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added  # typer passes keywords
        run.__signature__ = signature.replace(parameters=parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        run.declared = tuple(fields)
        return handle_errors(run)

    return decorate


def merge_declared(opts: Options, recipe: dict, fields) -> dict:
    """Each field's value: its flag wins over the recipe, the recipe over the declared default."""
    merged = {}
    for field in fields:
        value = getattr(opts, field.name, None)
        merged[field.name] = value if value is not None else recipe.get(field.name, field.default)
    return merged
