"""Flags mean the same in every command: one name and one help text per shared option."""

from __future__ import annotations

from collections import defaultdict

import pytest
from typer.core import TyperOption

from mlpfuse.cli.commands import COMMANDS, load_command

# Options that mean the same thing wherever they appear.
SHARED = ("--output", "--overwrite", "--seed", "--device", "--max-length", "--batch-size", "--json", "--debug",
          "--text-column", "--text-pair-column", "--max-steps", "--log-every", "--backend", "--max-shard-size",
          "--lora", "--lora-rank", "--lora-dropout")
DATA_FLAGS = {"--data", "--train", "--eval", "--calibration"}  # a command taking one of these reads text
PAIRED = ("tune", "finetune", "ntk-check", "merge-layers")  # every command that reads text reads pairs too
ALIASES = {"--column": "--text-column", "--pair-column": "--text-pair-column"}  # older spellings kept working


@pytest.fixture(scope="module")
def commands():
    return {name: load_command(name) for name in COMMANDS}


def _options(command):
    return [param for param in command.params if isinstance(param, TyperOption)]


def test_a_shared_option_has_one_name_and_one_help_everywhere(commands):
    seen = defaultdict(list)  # flag -> [(command, help, all spellings)]
    for name, command in commands.items():
        for option in _options(command):
            for flag in option.opts:
                seen[flag].append((name, option.help, tuple(option.opts)))
    for flag in SHARED:
        uses = seen[flag]
        assert len(uses) >= 2 or flag == "--max-shard-size", (flag, uses)
        helps = {help_text for _, help_text, _ in uses}
        assert len(helps) == 1, f"{flag} has {len(helps)} help texts: {uses}"
    for name, command in commands.items():
        for option in _options(command):
            if "--output" in option.opts:
                assert "-o" in option.opts, name
            for alias, canonical in ALIASES.items():  # an old spelling only ever next to the canonical one
                if alias in option.opts:
                    assert canonical in option.opts, (name, option.opts)


def test_every_command_that_reads_text_names_its_columns_the_same_way(commands):
    readers = [name for name, command in commands.items()
               if any(set(option.opts) & DATA_FLAGS for option in _options(command))]
    assert set(readers) >= {"tune", "finetune", "ntk-check", "merge-layers"}, readers
    for name in readers:
        flags = {flag for option in _options(commands[name]) for flag in option.opts}
        assert "--text-column" in flags, name
    for name in PAIRED:
        flags = {flag for option in _options(commands[name]) for flag in option.opts}
        assert "--text-pair-column" in flags, name


@pytest.mark.parametrize("flag", ["--column", "--text-column"])
def test_merge_layers_keeps_column_as_an_alias(commands, flag):
    ctx = commands["merge-layers"].make_context("merge-layers", ["model", "-o", "out", flag, "text"])
    assert ctx.params["text_column"] == "text"


def test_every_method_flag_lists_every_method(commands):
    from mlpfuse.methods import BUILTIN, method_names

    builtin = [declaration.name for declaration in BUILTIN]  # not tests' own
    assert {"fusion", "cluster"} <= set(builtin) <= set(method_names())

    method_options = [(name, option) for name, command in commands.items() for option in _options(command)
                      if {"--method", "--methods"} & set(option.opts)]
    assert method_options
    for name, option in method_options:
        for method in builtin:
            assert method in option.help, (name, method)


def test_no_help_text_writes_its_default_as_markup(commands):
    """typer's rich help reads '[default: x]' in a help text as a style tag and drops it: use show_default."""
    for name, command in commands.items():
        for param in command.params:
            assert "[default" not in (getattr(param, "help", None) or ""), (name, param.name)


def test_merge_layers_feeds_the_pair_column_to_the_model(tmp_path):
    """The second text changes the calibration activations, hence the alignment: the flag is not ignored."""
    import random

    from mlpfuse.errors import InputError
    from mlpfuse.compress.merge import MergeSettings, merge_checkpoint

    from .conftest import TEXT_WORDS as WORDS
    from .conftest import make_checkpoints

    original, _ = make_checkpoints(tmp_path)
    rng = random.Random(0)
    rows = ["sentence\tsecond"] + [" ".join(rng.choices(WORDS, k=6)) + "\t" + " ".join(rng.choices(WORDS, k=8))
                                   for _ in range(16)]
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    correlations = {}
    for pair in (None, "second"):
        settings = MergeSettings(layers="0-1", calibration=str(data), pair_column=pair, max_length=32)
        report = merge_checkpoint(str(original), tmp_path / f"out-{pair}", settings)
        correlations[pair] = [row.correlation_before for row in report.alignment]
    assert correlations[None] != correlations["second"]
    with pytest.raises(InputError, match="no column 'third'"):
        merge_checkpoint(str(original), tmp_path / "bad", MergeSettings(layers="0-1", calibration=str(data),
                                                                          pair_column="third"))
    assert not (tmp_path / "bad").exists()
