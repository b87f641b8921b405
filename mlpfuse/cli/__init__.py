"""The ``mlpfuse`` command line: a thin typer app over the library API."""

import signal

import typer

from .bench_cmd import bench
from .common import terminate
from .finetune_cmd import finetune
from .fuse_cmd import fuse
from .info_cmd import architectures, inspect
from .merge_cmd import merge_layers
from .ntk_cmd import ntk_check_command
from .tune_cmd import tune

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
app.command("merge-layers")(merge_layers)
app.command()(bench)
app.command()(tune)
app.command()(finetune)
app.command(name="ntk-check")(ntk_check_command)
app.command(name="eval")(__import__("mlpfuse.cli.eval_cmd", fromlist=["evaluate"]).evaluate)


def main() -> None:
    signal.signal(signal.SIGTERM, terminate)
    app()
