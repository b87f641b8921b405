"""The ``mlpfuse`` command line: a thin typer app over the library API."""

import typer

from .fuse_cmd import fuse
from .info_cmd import architectures, inspect

app = typer.Typer(
    name="mlpfuse",
    help="Compress the MLP blocks of transformer checkpoints with MLP Fusion before fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(fuse)
app.command()(inspect)
app.command()(architectures)


def main() -> None:
    app()
