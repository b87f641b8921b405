"""The ``mlpfuse`` command line. The app itself is in ``commands.py`` (``from mlpfuse.cli import app`` works).

This module imports nothing heavy, so Ctrl-C at any moment of start-up is one line and exit 130.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT), as shells report it


def main() -> None:
    """Console-script entry point: SIGTERM stops like Ctrl-C; Ctrl-C at any point is one line, exit 130.

    A signal the process was started with ignored (``mlpfuse ... &`` in a script) stays ignored.

    Both signals go through ``common.terminate``, which records that a signal came: an error that a
    library turns the KeyboardInterrupt into (transformers' lazy imports do) is still reported as
    an interruption.
    """
    # torch backs CPU tensors of 2 MB and more with transparent huge pages: a fresh 48 MiB buffer
    # (a layer's feature matrix, k-means' sums) is then filled ~4x faster, page faults being most of
    # its cost (docs/results.md, fuse at scale). THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    code = 0
    try:
        from mlpfuse.cli.commands import app
        from mlpfuse.cli.common import terminate

        for number in (signal.SIGTERM, signal.SIGINT):
            # a job a shell started in the background inherits SIGINT ignored: it keeps ignoring the
            # terminal's Ctrl-C, as POSIX tools and Python itself do
            if signal.getsignal(number) is not signal.SIG_IGN:
                signal.signal(number, terminate)
        app()
    except KeyboardInterrupt:  # outside a command body (start-up, imports); commands report their own
        sys.stderr.write("interrupted while starting: nothing was done\n")
        code = EXIT_INTERRUPTED
    except SystemExit as exc:  # the app always ends here: typer exits with the command's status
        code = exc.code
    if code == EXIT_INTERRUPTED:
        _forget_interrupt()
    sys.exit(code)


def _forget_interrupt() -> None:
    """Let ``python -m mlpfuse`` exit 130 after an interruption it reported, not be killed by SIGINT (status -2).

    CPython marks a KeyboardInterrupt that escapes code it runs from a string (``exec``: dataclasses and
    namedtuple build their methods so, during imports) as unhandled even when it is caught later, and at
    exit kills a ``-m`` process with SIGINT. Running one string that succeeds clears the mark.
    """
    exec("None")


def __getattr__(name: str):
    """``app`` (the typer app) is imported on first use."""
    if name == "app":
        from mlpfuse.cli.commands import app

        globals()["app"] = app
        return app
    raise AttributeError(f"module 'mlpfuse.cli' has no attribute {name!r}")
