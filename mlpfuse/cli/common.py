"""What every command shares: error handling and exit codes, consoles, JSON reports, progress."""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer
import yaml
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mlpfuse.checkpoints.output import check_report_path, forget_written, write_report_file, written_outputs
from mlpfuse.cli import EXIT_INTERRUPTED  # defined where nothing heavy is imported
from mlpfuse.errors import InputError, MlpfuseError
from mlpfuse.options import check_types

NO_WRAP_WIDTH = 10_000  # columns of a console that is not a terminal: lines stay whole (greppable CI logs)


class _Console(Console):
    """A rich Console that does not wrap at 80 columns when its output is not a terminal.

    On a terminal (or with COLUMNS set) it behaves as rich's; into a pipe or file, tables and
    messages keep each line whole, and a table's title (which rich wraps to the table's width) is
    printed as a line of its own, so paths stay greppable in CI logs.
    """

    def _no_wrap(self) -> bool:
        return self._width is None and "COLUMNS" not in os.environ and not self.is_terminal

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return ConsoleDimensions(NO_WRAP_WIDTH, size.height) if self._no_wrap() else size

    size = property(_size, Console.size.fset)

    def print(self, *objects, **kwargs) -> None:
        if not (self._no_wrap() and any(isinstance(o, Table) and o.title for o in objects)):
            return super().print(*objects, **kwargs)
        for renderable in objects:
            if isinstance(renderable, Table) and renderable.title:
                super().print(renderable.title, soft_wrap=True, highlight=False)
                renderable = copy.copy(renderable)
                renderable.title = None
            super().print(renderable, **kwargs)


console = _Console()  # results (tables) go to stdout
log = _Console(stderr=True)  # progress and messages go to stderr

EXIT_OK, EXIT_INTERNAL = 0, 1


TERMINATION = {"signalled": False}  # set by the SIGTERM/SIGINT handler of the console script


def terminate(signum, frame):
    """SIGTERM and SIGINT handler: raise KeyboardInterrupt (so staging directories are cleaned up), remembering why."""
    TERMINATION["signalled"] = True
    raise KeyboardInterrupt


def interruption_message() -> str:
    """The truth about outputs when a command stops on Ctrl-C/SIGTERM: written and complete, or nothing."""
    done = written_outputs()
    if done:
        return f"the output was written and is complete: {', '.join(str(p) for p in done)}"
    return "nothing was written (partial output removed)"


def _report_interrupted():
    log.print(f"[bold red]interrupted[/]: {interruption_message()}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INTERRUPTED) from None


def quiet_transformers() -> None:
    """No per-tensor loading bars or head-initialisation reports: progress is ours, errors stay.

    Does not import transformers (a light start): before its import, the environment variables it
    reads are set (a value the user set wins); once imported, its logging is set directly.
    """
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # it read the variable at import: switch its bars off directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def handle_errors(fn):
    """Run a command body: a known error becomes one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or os.environ.get("MLPFUSE_DEBUG") == "1"
        if not debug:
            quiet_transformers()
        forget_written()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MlpfuseError as exc:
            if debug:
                raise
            done = "".join(f"; the output {p} was written and is complete" for p in written_outputs())
            log.print(f"[bold red]error:[/] {escape(str(exc))}{escape(done)}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if debug:
                raise
            _report_interrupted()
        except Exception as exc:  # an internal error: one line unless --debug
            if debug:
                raise
            if TERMINATION["signalled"]:  # torch's C++ code may turn the KeyboardInterrupt into another error
                _report_interrupted()
            log.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def write_json_report(path: str | None, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` ('-' means stdout); nothing when ``path`` is None.

    A path that cannot be written gives a one-line error (exit 2 for a bad path, 3 for a read-only
    or full filesystem); :func:`check_json_path` finds most of these before the work.
    """
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        write_report_file(path, text)


def check_json_path(path: str | None, *models: str | None, files: tuple = (), what: str = "--json") -> None:
    """Before any work: refuse a ``--json`` path that cannot be written or would write into an input.

    ``models`` are the command's model arguments (local directories or 'minilm'; hub ids are
    skipped), ``files`` its input data files. Raises InputError (exit 2) or EnvironmentProblem (3).
    """
    if path is None or path == "-":
        return
    check_report_path(path, local_inputs(*models) + [f for f in files if f and not str(f).startswith("hub:")], what)


def check_inputs(*models: str | None, files: tuple = ()) -> None:
    """Before the heavy imports: a model or data file that is not there is refused now, in a fraction of a second.

    Each local data file's first row is read, so a missing or unreadable file gets the library's own
    message (``hub:`` datasets are left to the command); then each model argument is resolved as the
    library will resolve it (a hub id is fetched now, and found in the cache later). Files and names
    that are no local directory come first: resolving a checkpoint that is there checks it is not
    quantised, which imports torch and transformers.
    """
    from mlpfuse.data import read_table
    from mlpfuse.checkpoints.source import BUNDLED_NAMES, resolve_model

    for file in files:
        if file and not str(file).startswith("hub:"):
            read_table(str(file), limit=1)
    names = [str(name) for name in models if name]
    for name in sorted(names, key=lambda n: n.lower() in BUNDLED_NAMES or Path(n).expanduser().exists()):
        resolve_model(name)


def local_inputs(*models: str | None) -> list[Path]:
    """The local directories named by model arguments (the bundled model's included)."""
    from mlpfuse.checkpoints.source import BUNDLED_NAMES, bundled_model_path

    found = []
    for name in models:
        if not name:
            continue
        if str(name).lower() in BUNDLED_NAMES:
            try:
                found.append(bundled_model_path())
            except MlpfuseError:
                pass
        elif Path(name).expanduser().exists():
            found.append(Path(name).expanduser())
    return found


def results_console(json_path: str | None) -> Console:
    """Where tables go: stdout, or stderr when the JSON report itself goes to stdout."""
    return log if json_path == "-" else console


def load_recipe(path: str | None, allowed: set[str], types: dict[str, tuple] | None = None) -> dict:
    """A YAML recipe as a dict with only ``allowed`` keys ('-' in keys is read as '_').

    ``types`` (field -> allowed Python types, see :func:`mlpfuse.options.check_types`) refuses a
    value of the wrong type (``dim: "384"``, ``seed: "0"``, ``model: [a]``) with a one-line InputError.
    """
    if path is None:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a mapping of field: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InputError(f"recipe {path} has unknown field(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    check_types(data, types or {}, f"recipe {path}")
    return data


def merge(cli_value, recipe: dict, key: str, default=None):
    """CLI flags win over the recipe, the recipe over the default."""
    if cli_value is not None:
        return cli_value
    return recipe.get(key, default)


@contextmanager
def layer_progress(description: str, total: int):
    """A progress bar over layers on a terminal; one plain line per layer otherwise.

    Yields ``advance(text)``, called once per finished layer.
    """
    if log.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("left"), TimeRemainingColumn())
        with Progress(*columns, console=log, transient=True) as progress:
            task = progress.add_task(description, total=total)

            def advance(text: str) -> None:
                progress.update(task, advance=1, description=f"{description}: {text}")

            yield advance
    else:
        started, done = time.monotonic(), [0]

        def advance(text: str) -> None:
            done[0] += 1
            elapsed = time.monotonic() - started
            left = elapsed / done[0] * (total - done[0])
            log.print(f"{description}: {text} [{done[0]}/{total}, about {left:.0f}s left]", highlight=False)

        yield advance
