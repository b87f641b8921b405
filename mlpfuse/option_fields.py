"""Every option of the command line and the ``fuse`` recipe, declared once: name, type, default, help, flag.

A :class:`Field` is one option; a :class:`Group` is the options of one concern:

- ``COMMON``: on every command (``--debug``);
- ``OUTPUT``: what a command writes (``-o/--output``, ``--overwrite``, ``--json``);
- ``RUNTIME``: how a command runs (``--device``, ``--seed``, ``--threads``, ``--max-shard-size``);
- ``TEXT``: how text is read (``--text-column``, ``--text-pair-column``, ``--max-length``, ``--batch-size``);
- ``TRAINING``: loops of optimizer steps (``--max-steps``, ``--log-every``);
- ``COMPRESSION``: what ``fuse`` compresses and how (``--layers``, ``--dim``, ``--method``, ...);
- ``CALIBRATION``: ``fuse --calibration`` (its limit, sequence length, batch, protect, ridge, grouping).

Everything else is derived from these declarations: the typer options of each command
(:func:`mlpfuse.cli.options.command`), the YAML types a recipe may hold (:func:`recipe_types`), which
``FuseSettings`` fields only ``--calibration`` reads, and the library's defaults (``FuseSettings``,
``mlpfuse.calibration``). Adding an option shared by every command is one :class:`Field` in ``COMMON``.
A command may give a shared option its own default (``TEXT["max_length"].using(64)``); the flag, the type
and the help text stay the same everywhere (tests/test_cli_flags.py checks it).

Import-light on purpose (the standard library only): ``mlpfuse --help`` must not pull torch or typer's
callers' libraries, and the library reads its defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

__all__ = ["Field", "Group", "COMMON", "OUTPUT", "RUNTIME", "TEXT", "TRAINING", "TUNING", "FINETUNE_TASKS", "LORA", "COMPRESSION", "CALIBRATION",
           "FUSE_FIELDS", "recipe_types", "parse_calibration_limit"]

_NONE = type(None)


@dataclass(frozen=True)
class Field:
    """One option.

    ``name``: the Python name (a settings field, a recipe key, the command body's ``opts.NAME``);
    ``type``: the Python type of the command-line value (str, int, float, bool);
    ``default``: the library's default (None: unset, the command or library decides);
    ``help``: one help text wherever the option appears;
    ``flags``: its command-line spellings (empty: a recipe-only field); ``--x/--no-x`` makes a switch pair;
    ``shown``: what ``--help`` shows as the default, where the default itself would mislead or show nothing;
    ``types``: the YAML types a recipe may hold (default: ``type``, and empty when the default is None);
    ``parse``: turns the command-line value into the settings value (e.g. a count given as text).
    """

    name: str
    type: type
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    shown: str | None = None
    types: tuple | None = None
    parse: Callable[[Any], Any] | None = None
    required: bool = False  # a mandatory option (no default)

    def using(self, default: Any = None, *, shown: str | None = None, aliases: tuple[str, ...] = (),
              required: bool = False) -> Field:
        """This option with a command's own default (and ``shown``), older ``aliases`` or ``required``."""
        return replace(self, default=default, shown=shown, flags=self.flags + tuple(aliases), required=required)

    def recipe_types(self) -> tuple:
        """The YAML types a recipe value of this field may have (see mlpfuse.options.check_types)."""
        if self.types is not None:
            return self.types
        return (self.type, _NONE) if self.default is None else (self.type,)


class Group:
    """The options of one concern, in the order ``--help`` lists them."""

    def __init__(self, name: str, *fields: Field):
        self.name = name
        self.fields = tuple(fields)
        self._by_name = {f.name: f for f in self.fields}
        assert len(self._by_name) == len(self.fields), f"{name}: a field declared twice"

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields}


def parse_calibration_limit(value: str | int | None):
    """``--calibration-limit`` as given: a plain count stays an integer (sequences), ``"64k tokens"`` text."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def parse_name_list(text: str, flag: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``; InputError (one line) on an empty name."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        from mlpfuse.errors import InputError

        raise InputError(f"{flag} {text!r}: give module names separated by commas, e.g. q_proj,v_proj")
    return names


# --- on every command ------------------------------------------------------------------------------------
COMMON = Group(
    "common",
    Field("debug", bool, False, "Show full tracebacks on errors.", ("--debug",)),
)

# --- what a command writes -------------------------------------------------------------------------------
OUTPUT = Group(
    "output",
    Field("output", str, None, "Directory to write (must not exist unless --overwrite).", ("-o", "--output"),
          types=(str,)),
    Field("overwrite", bool, False, "Replace an existing output directory.", ("--overwrite",)),
    Field("json_path", str, None, "Write a machine-readable report to this path ('-' for stdout).", ("--json",)),
)

# --- how a command runs ----------------------------------------------------------------------------------
RUNTIME = Group(
    "runtime",
    Field("device", str, None, "cpu, cuda, cuda:N or auto (cuda if available).", ("--device",), shown="auto"),
    Field("seed", int, 0, "Random seed (same inputs and seed, same output).", ("--seed",)),
    Field("threads", int, None, "CPU threads for torch (e.g. 1 on a shared machine).", ("--threads",),
          shown="torch's"),
    Field("max_shard_size", str, "5GB", "Largest safetensors shard, e.g. 5GB or 500MB.", ("--max-shard-size",),
          types=(str, int)),
)

# --- how text is read ------------------------------------------------------------------------------------
TEXT = Group(
    "text",
    Field("text_column", str, "sentence", "Column with the text (the first text of a pair).", ("--text-column",)),
    Field("pair_column", str, None, "Column with the second text of a pair (sentence-pair tasks).",
          ("--text-pair-column",)),
    Field("max_length", int, 128, "Tokens per text (longer ones are truncated).", ("--max-length",)),
    Field("batch_size", int, 32, "Sequences per batch (one forward/backward pass).", ("--batch-size",)),
)

# --- loops of optimizer steps ----------------------------------------------------------------------------
TRAINING = Group(
    "training",
    Field("max_steps", int, None, "Stop after this many optimizer steps (overrides --epochs).", ("--max-steps",),
          shown="all epochs"),
    Field("log_every", int, 10, "Without a terminal: one progress line per N steps.", ("--log-every",)),
)

# --- tune (mlpfuse/train/tune.py): TuneSettings reads its defaults here ---------------------------------------
TUNING = Group(
    "tuning",
    Field("lr", float, 1e-4, "AdamW learning rate.", ("--lr",)),
    Field("first_token_weight", float, 1.0,
          "Loss weight of each sequence's first token (the attention sink); 0 masks it.", ("--first-token-weight",)),
    Field("kl_temperature", float, 1.0, "Softmax temperature of the KL term.", ("--kl-temperature",)),
    Field("eval_rows", int, 256, "Held-out rows for the before/after report (0: no report).", ("--eval-rows",)),
)

# --- finetune (mlpfuse/train/finetune.py) ------------------------------------------------------------------
FINETUNE_TASKS = ("classification", "regression", "causal-lm")  # --task

# --- LoRA (PEFT, mlpfuse/train/lora.py): finetune trains with it, bench times its training step ---------------
LORA = Group(
    "lora",
    Field("lora", bool, False, "Train LoRA adapters (PEFT) instead of every weight.", ("--lora",)),
    Field("lora_rank", int, 8, "LoRA rank r.", ("--lora-rank",)),
    Field("lora_alpha", float, 16.0, "LoRA alpha (the update is scaled by alpha / r).", ("--lora-alpha",)),
    Field("lora_dropout", float, 0.05, "Dropout on the LoRA input.", ("--lora-dropout",)),
    Field("lora_targets", str, None, "Comma list of module names for LoRA (default: every linear projection of "
          "the layers).", ("--lora-targets",), parse=lambda text: parse_name_list(text, "--lora-targets")),
)

# --- what fuse compresses and how (FuseSettings; a recipe holds the same fields) -------------------------
COMPRESSION = Group(
    "compression",
    Field("layers", str, "all", "MLP layers to fuse: 4-11, 0,2,4 or all.", ("--layers",), types=(str, int, list)),
    Field("dim", int, None, "Fused intermediate width k.", ("--dim",)),
    Field("ratio", float, None, "Fused width as a fraction of the original (instead of --dim).", ("--ratio",)),
    Field("multiple_of", int, 1, "Round every fused width down to a multiple of N (tensor cores, GGUF blocks); "
          "never below N's first multiple or above the original.", ("--multiple-of",)),
    # {methods}: the registered methods, filled in by the command line (mlpfuse.cli.options.METHODS_HELP)
    Field("method", str, "fusion", "Compression method: {methods}", ("--method",)),
    Field("backend", str, "auto", "k-means backend: auto, faiss or torch.", ("--backend",)),
    Field("kmeans_init", str, "kmeans-parallel", "k-means seeding: kmeans-parallel (k-means||) or greedy (k-means++).",
          ("--kmeans-init",)),
    Field("experts", str, None, "MoE models: experts to fuse in each chosen sparse layer, e.g. 0,3 or 0-7,shared.",
          ("--experts",), shown="all", types=(str, int, list, _NONE)),
    Field("dtype", str, "auto", "Output dtype: auto (keep), float32, bfloat16, float16.", ("--dtype",)),
    Field("per_layer", dict, None, "Per-layer overrides (recipe only): {layer: {dim: N} or {ratio: R}}.",
          types=(dict, _NONE)),
)

# --- fuse --calibration: only read with a calibration file -----------------------------------------------
CALIBRATION = Group(
    "calibration",
    Field("calibration", str, None, "Text file (.tsv/.csv/.jsonl): data-aware fusion/prune/svd, the model run "
          "layer by layer on it (docs/llm.md).", ("--calibration",)),
    # None: 128 sequences for decoders, 512 for encoders (calibration.DEFAULT_LIMIT / DEFAULT_ENCODER_LIMIT)
    Field("calibration_limit", str, None, "With --calibration: sequences to use (128), or tokens ('65536 tokens', "
          "'64k tokens').", ("--calibration-limit",), shown="128 sequences (decoders), 512 (encoders)",
          types=(int, str, _NONE), parse=parse_calibration_limit),
    TEXT["max_length"].using(2048),
    Field("calibration_batch_size", int, 8, "With --calibration: sequences per mini-batch of the layer-by-layer pass.",
          ("--calibration-batch-size",)),
    TEXT["text_column"],
    Field("protect", float, 0.02, "With --calibration: neurons per layer kept unmerged, the most important; a "
          "fraction of the fused width, or a count >= 1.", ("--protect",)),
    Field("ridge", float, 1e-3, "With --calibration: ridge strength alpha of the output-weight refit (scale-free).",
          ("--ridge",)),
    Field("grouping", str, "select", "With --calibration, fusion/cluster: how neurons form clusters: select "
          "(representatives by output-aware pivoted Cholesky on the activation Gram, the others folded into the one "
          "they correlate with most) or kmeans (importance-weighted k-means of the weights, centroids averaged).",
          ("--grouping",)),
)

# Every field of FuseSettings that a recipe may set (all but allow_full_width), in --help's order.
FUSE_FIELDS = (*COMPRESSION, RUNTIME["device"], RUNTIME["seed"], RUNTIME["max_shard_size"], *CALIBRATION)


def recipe_types(*fields: Field) -> dict[str, tuple]:
    """Field name -> the YAML types a recipe value may have, for :func:`mlpfuse.options.check_types`."""
    return {f.name: f.recipe_types() for f in fields}
