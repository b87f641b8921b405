"""A light start: ``import mlpfuse`` and the informational commands import no heavy library; Ctrl-C
while starting is one line; output that is not a terminal does not wrap."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app

HEAVY = ("torch", "transformers", "faiss", "scipy")

# Runs the command line in this process's place and then reports which heavy modules it imported.
RUN_AND_REPORT = """
import sys
from mlpfuse.cli import main
sys.argv = ["mlpfuse", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = [name for name in {heavy!r} if name in sys.modules]
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=False, **kwargs)


def _heavy_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("HEAVY=")][-1]


def test_import_mlpfuse_imports_no_heavy_library():
    result = _python("-c", f"import sys, mlpfuse; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names_still_resolve_on_first_use():
    assert mlpfuse.load.__module__ == "mlpfuse.modeling"
    assert mlpfuse.FuseSettings.__module__ == "mlpfuse.fuse"
    assert set(mlpfuse.__all__) == set(mlpfuse._LAZY) | {"__version__"}  # every lazy name is public, and only those
    assert set(mlpfuse.__all__) <= set(dir(mlpfuse))
    with pytest.raises(AttributeError):
        mlpfuse.no_such_name  # noqa: B018


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["architectures"]])
def test_informational_commands_import_no_heavy_library(args):
    result = _python("-c", RUN_AND_REPORT.format(heavy=HEAVY), *args)
    assert result.returncode == 0, result.stderr
    assert _heavy_line(result.stderr) == "HEAVY="
    assert result.stdout.strip()


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"mlpfuse {importlib.metadata.version('mlpfuse')}\n"
    assert mlpfuse.__version__ == importlib.metadata.version("mlpfuse")


def test_help_lists_every_command_and_every_method():
    from mlpfuse.cli.commands import COMMANDS
    from mlpfuse.methods import get_method, method_names

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.stdout, name
    fuse_help = CliRunner().invoke(app, ["fuse", "--help"], env={"COLUMNS": "300"}).stdout
    ntk_help = CliRunner().invoke(app, ["ntk-check", "--help"], env={"COLUMNS": "300"}).stdout
    for method in [m for m in method_names() if get_method(m).__module__.startswith("mlpfuse.")]:  # not tests' own
        assert method in fuse_help, method
        assert method in ntk_help, method


def test_a_mistyped_command_gets_a_suggestion_without_importing_any():
    result = CliRunner().invoke(app, ["fusee"])
    assert result.exit_code == 2
    assert "Did you mean 'fuse'" in result.output


def test_listed_one_line_help_is_the_commands_own():
    """The table that lets --help list commands without importing them says what each command's docstring says."""
    from mlpfuse.cli.commands import COMMANDS, load_command

    for name, (_, _, short) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert command.help.splitlines()[0] == short, name


def _interrupt_after_import(module: str, args: list[str], cwd: Path) -> tuple[int, list[str]]:
    """Run ``python -m mlpfuse ARGS``, send SIGINT as soon as ``module`` has been imported.

    ``-X importtime`` reports each import on stderr as it finishes: a sync point that does not depend
    on how fast this machine is. Returns the exit status and stderr without the import-time lines.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLPFUSE_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "mlpfuse", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent, lines = False, []
    try:
        for line in proc.stderr:
            if line.startswith("import time:"):
                if not sent and line.rsplit("|", 1)[-1].strip() == module:
                    proc.send_signal(signal.SIGINT)
                    sent = True
            else:
                lines.append(line.rstrip("\n"))
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert sent, f"{module} was never imported: {lines}"
    return proc.returncode, [line for line in lines if line.strip()]


@pytest.mark.parametrize("module", ["typer", "torch", "mlpfuse.fuse"])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(module, tmp_path):
    code, lines = _interrupt_after_import(module, ["fuse", "minilm", "--layers", "5", "--dim", "64", "-o", "out"],
                                          tmp_path)
    # 130, or killed by SIGINT (CPython re-raises it when a KeyboardInterrupt passed through eval/exec):
    # a shell reports both as 130
    assert code in (130, -signal.SIGINT), (code, lines)
    assert len(lines) == 1 and "interrupted" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_tables_and_messages_do_not_wrap_outside_a_terminal(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    source = tiny_checkpoint("bert")[0]
    output = tmp_path / ("a-long-directory-name-" * 6) / "fused-output"
    result = CliRunner().invoke(app, ["fuse", str(source), "--layers", "1", "--dim", "8", "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert any(f"wrote {output} in" in line for line in result.stdout.splitlines()), result.stdout
    assert any(f"-> {output}" in line for line in result.stdout.splitlines()), result.stdout  # the table title
