"""The ``mlpfuse`` typer app: a thin command line over the library API.

Start-up is light: each command's module is imported only when that command runs (or shows its
--help), and the library behind it (torch, transformers, faiss) only once the command has checked its
inputs, so ``--help`` and a mistyped path answer at once. ``mlpfuse --help`` lists every command from
the table below. Adding a command is one entry in ``COMMANDS``.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperCommand, TyperGroup

from mlpfuse import __version__
from mlpfuse.cli.common import EXIT_INTERRUPTED, TERMINATION, log

# name: (module in mlpfuse.cli, function, one-line help shown by `mlpfuse --help`: the docstring's first line)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fuse": ("fuse_cmd", "fuse", "Fuse the MLPs of a Hugging Face checkpoint (MLP Fusion) and write a loadable checkpoint."),
    "inspect": ("info_cmd", "inspect", "What to know before deploying: fused or exported, widths per layer, remote code, parameter and FLOP savings."),
    "architectures": ("info_cmd", "architectures", "List the supported architectures and where their MLPs live."),
    "merge-layers": ("merge_cmd", "merge_layers", "Merge adjacent feed-forward sublayers into one shared (tied) MLP and write a loadable checkpoint."),
    "bench": ("bench_cmd", "bench", "Measure training-step time, inference time, peak memory, parameters and FLOPs: fused vs original."),
    "tune": ("tune_cmd", "tune", "Tune the fused MLPs so each layer's hidden states match the original model's (paper Sec. 4.4)."),
    "finetune": ("finetune_cmd", "finetune", "Fine-tune (classification, regression, causal LM) and evaluate an original or fused checkpoint."),
    "eval": ("eval_cmd", "evaluate", "Perplexity on a text file: one protocol (windows, no overlap, mean next-token NLL), see docs/llm.md."),
    "export": ("export_cmd", "export", "Fold P into the weights and write the base architecture (llama, bert, gpt2...): loads with plain transformers."),
    "ntk-check": ("ntk_cmd", "ntk_check_command", "Compare compression methods by MLP output error and Adam-NTK error (paper Table 1)."),
}


def load_command(name: str):
    """The click command ``name``, built from its module (imported now, with its heavy dependencies)."""
    module, function, _ = COMMANDS[name]
    callback = getattr(importlib.import_module(f".{module}", __package__), function)
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(callback)
    return typer.main.get_command(single)


class _NotImported(TyperCommand):
    """Stands for a command whose module is not imported yet: its name and one-line help, for listings."""


class LazyGroup(TyperGroup):
    """A typer group whose subcommands are imported only when one is run (or its own --help shown)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name, (_, _, short) in COMMANDS.items():
            self.commands.setdefault(name, _NotImported(name, help=short, short_help=short))

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, _NotImported):  # about to run: import the real one
            command = self.commands[name] = load_command(name)
        return name, command, rest

    def make_context(self, info_name, args, parent=None, **extra):
        """Parse the top-level options; Ctrl-C meanwhile (typer imports lazily here) is one line, exit 130."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except KeyboardInterrupt:
            _interrupted_while_starting()

    def invoke(self, ctx):
        """Run the subcommand; Ctrl-C before its body starts (imports, parsing) is one line, exit 130."""
        debug = "--debug" in [*ctx._protected_args, *ctx.args]
        try:
            return super().invoke(ctx)
        except typer.Exit:  # the exit the command chose, its line printed (an Exit is a RuntimeError)
            raise
        except KeyboardInterrupt:  # command bodies report their own (handle_errors)
            if debug:
                raise
            _interrupted_while_starting()
        except Exception:  # a library import may turn the KeyboardInterrupt into another error
            if debug or not TERMINATION["signalled"]:
                raise
            _interrupted_while_starting()


def _interrupted_while_starting():
    log.print("[bold red]interrupted[/] while starting: nothing was done", highlight=False)
    raise typer.Exit(EXIT_INTERRUPTED) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlpfuse {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="mlpfuse",
    cls=LazyGroup,
    help="Compress the MLP blocks of transformer checkpoints with MLP Fusion before fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """Compress the MLP blocks of transformer checkpoints with MLP Fusion before fine-tuning."""

