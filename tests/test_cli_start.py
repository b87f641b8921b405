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
from mlpfuse.cli.commands import COMMANDS

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
    assert mlpfuse.load.__module__ == "mlpfuse.checkpoints.modeling"
    assert mlpfuse.FuseSettings.__module__ == "mlpfuse.compress.fuse"
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


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_commands_help_imports_no_heavy_library(command):
    """``fuse --help`` cost 11-14 s of CPU (torch, transformers, torch.distributed) before it printed."""
    result = _python("-c", RUN_AND_REPORT.format(heavy=HEAVY), command, "--help")
    assert result.returncode == 0, result.stderr
    assert _heavy_line(result.stderr) == "HEAVY="
    assert "Usage:" in result.stdout


# a mistyped model or data path in each command -> (arguments, the one-line error)
MISTYPED = {
    "fuse": (["./no-such-model", "--dim", "8", "-o", "out"], "no such checkpoint directory: ./no-such-model"),
    "fuse --calibration": (["minilm", "--ratio", "0.5", "--calibration", "no-such.tsv", "-o", "out"],
                           "data file no-such.tsv not found"),
    "tune": (["./no-such-model", "--teacher", "minilm", "--data", "x.tsv", "-o", "out"], "no such checkpoint directory"),
    "tune --data": (["minilm", "--teacher", "minilm", "--data", "no-such.tsv", "-o", "out"], "data file no-such.tsv not found"),
    "finetune": (["./no-such-model", "--train", "x.tsv", "-o", "out"], "no such checkpoint directory"),
    "finetune --train": (["minilm", "--train", "no-such.tsv", "-o", "out"], "data file no-such.tsv not found"),
    "eval": (["./no-such-model", "--data", "x.tsv"], "no such checkpoint directory"),
    "export": (["./no-such-model", "-o", "out"], "no such checkpoint directory"),
    "ntk-check": (["minilm", "--data", "no-such.tsv"], "data file no-such.tsv not found"),
    "bench": (["minilm", "./no-such-model"], "no such checkpoint directory"),
    "merge-layers": (["./no-such-model", "-o", "out"], "no such checkpoint directory"),
    "merge-layers --calibration": (["minilm", "--calibration", "no-such.tsv", "-o", "out"], "data file no-such.tsv not found"),
    "inspect": (["./no-such-model"], "no such checkpoint directory"),
}


@pytest.mark.parametrize("case", sorted(MISTYPED))
def test_a_mistyped_path_is_refused_before_any_heavy_import(case, tmp_path):
    args, message = MISTYPED[case]
    (tmp_path / "x.tsv").write_text("sentence\tlabel\na fine film\t1\n")  # a data file that is there
    result = _python("-c", RUN_AND_REPORT.format(heavy=HEAVY), case.split()[0], *args, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("HEAVY=")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], lines
    assert _heavy_line(result.stderr) == "HEAVY="
    assert not (tmp_path / "out").exists()


def test_the_fuse_recipe_takes_every_fuse_setting():
    """A recipe key is a FuseSettings field (or model/output/overwrite); every field can be given in one."""
    from dataclasses import fields

    from mlpfuse.cli import fuse_cmd
    from mlpfuse.compress.fuse import FuseSettings

    settings = {f.name for f in fields(FuseSettings)} - {"allow_full_width"}
    assert fuse_cmd.RECIPE_FIELDS == settings | {"model", "output", "overwrite"}


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"mlpfuse {importlib.metadata.version('mlpfuse')}\n"
    assert mlpfuse.__version__ == importlib.metadata.version("mlpfuse")


def test_help_lists_every_command():
    """(Every --method option listing every method: tests/test_cli_flags.py.)"""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.stdout, name


def test_a_mistyped_command_gets_a_suggestion_without_importing_any():
    result = CliRunner().invoke(app, ["fusee"])
    assert result.exit_code == 2
    assert "Did you mean 'fuse'" in result.output


def test_listed_one_line_help_is_the_commands_own():
    """The table that lets --help list commands without importing them says what each command's docstring says."""
    from mlpfuse.cli.commands import load_command

    for name, (_, _, short) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert command.help.splitlines()[0] == short, name


FUSE_ARGS = ["fuse", "minilm", "--layers", "5", "--dim", "64", "-o", "out"]
STARTING = "interrupted while starting: nothing was done"
NOTHING_WRITTEN = "interrupted: nothing was written (partial output removed)"  # the command body had started


def _mlpfuse(args: list[str], cwd: Path, env: dict | None = None, importtime: bool = False,
             sigint=signal.SIG_DFL) -> subprocess.Popen:
    """``python -m mlpfuse ARGS`` with stderr piped (``-X importtime`` reports each import there as it finishes).

    The child starts with SIGINT as ``sigint`` says: by default as a terminal's foreground job has it,
    whether or not pytest itself was started in the background (which starts it ignored).
    """
    env = {k: v for k, v in (env or os.environ).items() if k != "MLPFUSE_DEBUG"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.Popen([sys.executable, *flags, "-m", "mlpfuse", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def _interrupt_when(proc: subprocess.Popen, ready) -> tuple[int, list[str]]:
    """Send SIGINT once ``ready(line)`` is true of a stderr line; the exit status and the stderr lines
    (without import-time lines, which serve only as sync points that do not depend on this machine's speed)."""
    sent, lines = False, []
    try:
        for line in proc.stderr:
            if not sent and ready(line):
                proc.send_signal(signal.SIGINT)
                sent = True
            if not line.startswith("import time:") and line.strip():
                lines.append(line.rstrip("\n"))
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert sent, f"never ready to interrupt: {lines}"
    return proc.returncode, lines


@pytest.mark.parametrize("module", ["mlpfuse.cli.commands", "typer", pytest.param("torch", marks=pytest.mark.slow),
                                    pytest.param("mlpfuse.compress.fuse", marks=pytest.mark.slow)])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(module, tmp_path):
    proc = _mlpfuse(FUSE_ARGS, tmp_path, importtime=True)
    code, lines = _interrupt_when(
        proc, lambda line: line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == module)
    assert code == 130, lines
    assert lines in ([STARTING], [NOTHING_WRITTEN])  # the library is imported once the command's inputs are checked
    assert not (tmp_path / "out").exists()


# Makes start-up raise KeyboardInterrupt inside code run from a string (as dataclasses and namedtuple
# build their methods), as a Ctrl-C landing there would: CPython then killed `python -m` with SIGINT.
CTRL_C_IN_EXEC = """
import sys

class CtrlCInExec:
    def find_spec(self, name, path=None, target=None):
        if name == "mlpfuse.cli.commands":
            sys.meta_path.remove(self)
            exec("raise KeyboardInterrupt")

sys.meta_path.insert(0, CtrlCInExec())
"""


def test_ctrl_c_inside_generated_code_while_starting_still_exits_130(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(CTRL_C_IN_EXEC)
    path = os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    proc = _mlpfuse(FUSE_ARGS, tmp_path, env={**os.environ, "PYTHONPATH": path})
    lines = [line for line in proc.communicate(timeout=120)[1].splitlines() if line.strip()]
    assert (proc.returncode, lines) == (130, [STARTING])


def test_a_fuse_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """``mlpfuse fuse ... &`` in a script: the shell starts it with SIGINT ignored, and the terminal's
    Ctrl-C (meant for the script) must not stop it."""
    proc = _mlpfuse(FUSE_ARGS, tmp_path, sigint=signal.SIG_IGN)
    code, lines = _interrupt_when(proc, lambda line: line.startswith("fusing: layer 5 "))
    assert code == 0, lines
    assert not any("interrupted" in line for line in lines), lines
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ctrl_c_during_a_fuse_is_one_true_line_and_exit_130(tmp_path):
    """The command reports the interruption; nothing else adds a second (false) line."""
    proc = _mlpfuse(["fuse", "minilm", "--layers", "0-5", "--dim", "64", "-o", "out"], tmp_path)
    code, lines = _interrupt_when(proc, lambda line: line.startswith("fusing: layer 0 "))
    assert code == 130, lines
    assert [line for line in lines if not line.startswith("fusing: layer")] == [NOTHING_WRITTEN], lines
    assert not (tmp_path / "out").exists()


def test_tables_and_messages_do_not_wrap_outside_a_terminal(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    source = tiny_checkpoint("bert")[0]
    output = tmp_path / ("a-long-directory-name-" * 6) / "fused-output"
    result = CliRunner().invoke(app, ["fuse", str(source), "--layers", "1", "--dim", "8", "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert any(f"wrote {output} in" in line for line in result.stdout.splitlines()), result.stdout
    assert any(f"-> {output}" in line for line in result.stdout.splitlines()), result.stdout  # the table title
