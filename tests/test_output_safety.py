"""No flag, recipe or accident loses data: every command that writes a checkpoint, through the CLI.

Covers: output inside / around / equal to an input, the current directory, an empty path;
``--overwrite`` only over an earlier mlpfuse output; a second concurrent run; a directory that
appears at the target during the run (with ``--overwrite`` too); Ctrl-C after the final rename; a
SIGKILLed run's leftovers; ``--json`` paths checked first; read-only and full output filesystems
(exit 3, nothing left), and too little free space for fuse's estimate (exit 3 before any k-means).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mlpfuse.checkpoints.output as output_module
from mlpfuse.checkpoints.output import INCOMPLETE_MARKER, claim_output
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.compress.merge import MergeSettings, merge_checkpoint
from mlpfuse.errors import InputError
from mlpfuse.train.tune import TuneSettings, tune_checkpoint

from .conftest import tree_digest
from .conftest import make_checkpoints, write_texts

REPO = Path(__file__).resolve().parents[1]


class Sources:
    """A tiny original checkpoint (with tokenizer), its fused copy and a text file, all inputs."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.original, self.fused = make_checkpoints(directory)
        self.data = write_texts(directory / "text.tsv", rows=8)

    def digests(self) -> dict:
        return {p: tree_digest(p) for p in (self.original, self.fused)} | {self.data: self.data.read_bytes()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return Sources(tmp_path_factory.mktemp("inputs"))


# each writer: (its main input, the command line writing to OUT)
WRITERS = {
    "fuse": lambda s, out: (s.original, ["fuse", s.original, "--dim", "8", "-o", out]),
    "merge-layers": lambda s, out: (s.original, ["merge-layers", s.original, "--layers", "0-1", "--no-permute", "-o", out]),
    "tune": lambda s, out: (s.fused, ["tune", s.fused, "--teacher", s.original, "--data", s.data, "--max-steps", "1",
                                      "--batch-size", "4", "--max-length", "16", "-o", out]),
    "finetune": lambda s, out: (s.original, ["finetune", s.original, "--train", s.data, "--max-steps", "1",
                                             "--batch-size", "4", "--max-length", "16", "-o", out]),
}
QUICK = ["fuse", "merge-layers"]  # the writers also run to success (the others take longer)


def run(*args):
    return CliRunner().invoke(__import__("mlpfuse.cli", fromlist=["app"]).app, [str(a) for a in args])


def one_line_error(result, code, fragment):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # progress lines may precede
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def hidden(directory: Path) -> list[str]:
    """Leftovers of mlpfuse beside outputs: temporary, old or lock entries."""
    return sorted(p.name for p in Path(directory).iterdir() if ".mlpfuse-" in p.name)


# ------------------------------------------------------------------ the target against the inputs


@pytest.mark.parametrize("writer", list(WRITERS))
def test_output_inside_or_around_an_input_is_refused_and_the_input_is_untouched(src, writer, tmp_path):
    before = src.digests()
    main, _ = WRITERS[writer](src, "x")
    link = tmp_path / "link"
    link.symlink_to(main, target_is_directory=True)
    for out, flags, fragment in [
        (main / "sub", [], "lies inside the input"),
        (main.parent, ["--overwrite"], "contains the input"),  # PARENT holds IN (and more)
        (main, ["--overwrite"], "must not be the input"),
        (link, ["--overwrite"], "must not be the input"),  # a symlink to the input is the input
        (link / "sub", [], "lies inside the input"),
    ]:
        _, args = WRITERS[writer](src, out)
        one_line_error(run(*args, *flags), 2, fragment)
        assert src.digests() == before, (writer, out)
    assert not (main / "sub").exists()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_empty_output_or_the_working_directory_is_refused(src, writer, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps({"mlpfuse": {}}))  # even an mlpfuse output, when it is the cwd
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out, fragment in [("", "empty"), ("  ", "empty"), (".", "current directory"), ("..", "current directory"),
                          (str(work), "current directory")]:
        _, args = WRITERS[writer](src, out)
        one_line_error(run(*args, "--overwrite"), 2, fragment)
        assert (work / "precious.txt").read_text() == "keep me" and (tmp_path / "work").is_dir()


def test_recipe_output_is_checked_like_the_flag(src, tmp_path):
    before = src.digests()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src.original}\noutput: {src.original / 'inner'}\ndim: 8\noverwrite: true\n")
    one_line_error(run("fuse", "--config", recipe), 2, "lies inside the input")
    recipe.write_text(f"model: {src.original}\noutput: ''\ndim: 8\noverwrite: true\n")
    one_line_error(run("fuse", "--config", recipe), 2, "empty")
    assert src.digests() == before


@pytest.mark.parametrize("writer", QUICK + ["finetune"])  # finetune of a plain model: no mlpfuse section
def test_overwrite_replaces_only_an_earlier_mlpfuse_output(src, writer, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # a checkpoint-looking directory that mlpfuse did not write
    (mine / "notes.txt").write_text("mine")
    _, args = WRITERS[writer](src, mine)
    one_line_error(run(*args, "--overwrite"), 2, "not an earlier mlpfuse output")
    assert (mine / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    _, args = WRITERS[writer](src, empty)
    one_line_error(run(*args, "--overwrite"), 2, "not an earlier mlpfuse output")

    out = tmp_path / "out"
    _, args = WRITERS[writer](src, out)
    assert run(*args).exit_code == 0
    (out / "extra.txt").write_text("from the first run")
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "extra.txt").exists() and (out / "config.json").is_file()
    assert hidden(tmp_path) == []


# ------------------------------------------------------------------ concurrency and races


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_second_run_to_a_locked_output_fails_at_once(src, writer, tmp_path):
    out = tmp_path / "out"
    with claim_output(out, [], overwrite=False):  # another run holds the target
        _, args = WRITERS[writer](src, out)
        one_line_error(run(*args), 2, "another mlpfuse run")
        assert not out.exists()
    assert hidden(tmp_path) == []  # the holder cleaned up its lock and staging directory


@pytest.mark.slow
def test_two_concurrent_fuse_processes_one_wins_the_other_fails_cleanly(src, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "mlpfuse", "fuse", str(src.original), "--dim", "8", "-o", str(out)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another mlpfuse run" in loser or "already exists" in loser, loser
    assert (out / "model.safetensors").is_file() and hidden(tmp_path) == []


def _make_dir_at(target: Path, with_file: bool):
    def callback(*_):
        if not target.exists():
            target.mkdir()
            if with_file:
                (target / "theirs.txt").write_text("created meanwhile")
    return callback


@pytest.mark.parametrize("with_file", [False, True])
@pytest.mark.parametrize("writer", ["fuse", "merge-layers", "tune"])
def test_a_directory_created_at_the_target_during_the_run_is_kept(src, writer, with_file, tmp_path):
    out = tmp_path / "out"
    appear = _make_dir_at(out, with_file)
    with pytest.raises(InputError, match="appeared while this run worked"):
        if writer == "fuse":
            fuse_checkpoint(str(src.original), out, FuseSettings(dim=8), on_layer=appear)
        elif writer == "merge-layers":
            merge_checkpoint(str(src.original), out, MergeSettings(layers="0-1", mode="average"), on_candidate=appear)
        else:
            tune_checkpoint(str(src.fused), str(src.original), str(src.data), out,
                            TuneSettings(max_steps=1, batch_size=4, max_length=16), on_step=appear)
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == (["theirs.txt"] if with_file else [])
    assert [p for p in hidden(tmp_path) if "tune-state" not in p] == []


@pytest.mark.parametrize("before", ["nothing", "an earlier output"])
def test_with_overwrite_an_output_put_at_the_target_during_the_run_is_kept(src, before, tmp_path):
    """--overwrite replaces what was at the target at the start, never what appeared (or took its place) meanwhile."""
    earlier, out = tmp_path / "earlier", tmp_path / "out"
    assert run("fuse", src.original, "--dim", "8", "-o", earlier).exit_code == 0
    if before == "an earlier output":
        shutil.copytree(earlier, out)

    def put_theirs(*_):  # another earlier mlpfuse output, which --overwrite could replace had it been there
        if not (out / "theirs.txt").exists():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(earlier, out)
            (out / "theirs.txt").write_text("created meanwhile")

    change = "appeared" if before == "nothing" else "was replaced or changed"
    with pytest.raises(InputError, match=f"{change} while this run worked and was left as it is"):
        fuse_checkpoint(str(src.original), out, FuseSettings(dim=9), overwrite=True, on_layer=put_theirs)
    assert (out / "theirs.txt").is_file() and json.loads((out / "config.json").read_text())["mlpfuse"]["widths"]["0"] == 8
    assert hidden(tmp_path) == []  # left alone (still theirs, of width 8), the staging folder removed
    assert run("fuse", src.original, "--dim", "9", "-o", out, "--overwrite").exit_code == 0  # there at the start


def _count_calls(monkeypatch, module, name: str) -> list:
    """Count the calls of the real ``module.name`` (it still runs)."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _report_free(monkeypatch, free: int) -> None:
    """shutil.disk_usage as it is, but with ``free`` bytes free."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def test_too_little_free_space_for_the_estimated_output_exits_3_before_any_kmeans(src, tmp_path, monkeypatch):
    from mlpfuse.compress import kmeans

    plain = tmp_path / "plain"
    assert run("fuse", src.original, "--dim", "8", "-o", plain).exit_code == 0
    written = (plain / "model.safetensors").stat().st_size
    seedings = _count_calls(monkeypatch, kmeans, "_seed")  # every k-means run starts with its seeding
    _report_free(monkeypatch, written // 2)
    result = run("fuse", src.original, "--dim", "8", "-o", tmp_path / "out")
    one_line_error(result, 3, "no space left for")
    assert "free some space or choose another -o" in result.stderr and "fusing" not in result.stderr
    assert seedings == []  # no k-means ran
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []
    _report_free(monkeypatch, written)  # the estimate is a bound from below: room for the real output is enough
    result = run("fuse", src.original, "--dim", "8", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert seedings and (tmp_path / "out" / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


# ------------------------------------------------------------------ interruptions


def _signal_after(monkeypatch, name: str):
    """Send ourselves SIGINT right after the real ``output.<name>`` (the final rename) returns."""
    real = getattr(output_module, name)

    def renamed_then_interrupted(*args):
        result = real(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(output_module, name, renamed_then_interrupted)


@pytest.mark.usefixtures("sigint_raises")
@pytest.mark.parametrize("writer", QUICK)
@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_right_after_the_final_rename_says_the_output_was_written(src, writer, overwrite, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _, args = WRITERS[writer](src, out)
    if overwrite:
        assert run(*args).exit_code == 0
        (out / "old.txt").write_text("first run")
    _signal_after(monkeypatch, "exchange" if overwrite else "rename_no_replace")
    result = run(*args, *(["--overwrite"] if overwrite else []))
    assert result.exit_code == 130, result.output
    assert "nothing was written" not in result.stderr
    assert "output was written" in result.stderr and str(out) in result.stderr
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert not (out / INCOMPLETE_MARKER).exists() and hidden(tmp_path) == []  # the replaced output is gone too


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_during_the_work_says_nothing_was_written_and_leaves_nothing(src, tmp_path, monkeypatch):
    import mlpfuse.compress.fuse_layers as fuse_module

    real = fuse_module.fuse_layer

    def layer_then_interrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(fuse_module, "fuse_layer", layer_then_interrupted)
    result = run("fuse", src.original, "--dim", "8", "-o", tmp_path / "out")
    assert result.exit_code == 130 and "nothing was written" in result.stderr, result.output
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


KILLED_RUN = """
import os, signal, sys
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.compress.merge import MergeSettings, merge_checkpoint
kill = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
source, out, writer = sys.argv[1:]
if writer == "fuse":
    fuse_checkpoint(source, out, FuseSettings(dim=8), on_layer=kill)
else:
    merge_checkpoint(source, out, MergeSettings(layers="0-1", mode="average"), on_candidate=kill)
"""


@pytest.mark.parametrize("writer", QUICK)
@pytest.mark.slow
def test_a_killed_run_leaves_a_marked_temp_dir_that_the_next_run_removes(src, writer, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(src.original), str(out), writer],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    stale = [p for p in tmp_path.iterdir() if p.is_dir() and ".mlpfuse-incomplete-" in p.name]
    assert len(stale) == 1 and stale[0].name.startswith(".out.")
    assert "Not a usable checkpoint" in (stale[0] / INCOMPLETE_MARKER).read_text()
    one_line_error(run("fuse", stale[0], "--dim", "8", "-o", tmp_path / "other"), 2, "unfinished mlpfuse output")

    _, args = WRITERS[writer](src, out)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert not stale[0].exists() and hidden(tmp_path) == []
    assert not (out / INCOMPLETE_MARKER).exists()


# ------------------------------------------------------------------ report paths and file systems


@pytest.mark.parametrize("writer", list(WRITERS))
def test_bad_json_path_fails_before_any_work(src, writer, tmp_path):
    before = src.digests()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    main, _ = WRITERS[writer](src, "x")
    for json_path, fragment in [(a_file / "r.json", "is a file"), (tmp_path, "is a directory"),
                                (main / "report.json", "would write into the input")]:
        out = tmp_path / "out"
        _, args = WRITERS[writer](src, out)
        result = run(*args, "--json", json_path)
        one_line_error(result, 2, fragment)
        assert not out.exists() and hidden(tmp_path) == []
    assert src.digests() == before


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: mount a small tmpfs (optionally read-only) under tmp_path; skipped where mount is not allowed."""
    mounted = []

    def make(name: str, size: str = "64k", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("writer", QUICK)
def test_read_only_output_or_json_filesystem_exits_3_before_any_work(src, writer, tmp_path, tmpfs):
    read_only = tmpfs("ro", read_only=True)
    _, args = WRITERS[writer](src, read_only / "out")
    result = run(*args)
    one_line_error(result, 3, "read-only")
    assert "fusing" not in result.stderr and "window" not in result.stderr  # no work was done

    _, args = WRITERS[writer](src, tmp_path / "out")
    result = run(*args, "--json", read_only / "r.json")
    one_line_error(result, 3, "read-only")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("writer", QUICK)
def test_full_filesystem_fails_cleanly_with_no_space_and_leaves_nothing(src, writer, tmpfs):
    tiny = tmpfs("tiny", size="64k")  # room for the lock, not for the weights (about 4 MB)
    _, args = WRITERS[writer](src, tiny / "deep" / "out")
    result = run(*args)
    one_line_error(result, 3, "no space left")
    assert list(tiny.iterdir()) == []


def test_without_renameat2_the_fallback_keeps_the_rules(src, tmp_path, monkeypatch):
    monkeypatch.setattr(output_module, "_renameat2", lambda *args: False)  # as on a system without renameat2
    out = tmp_path / "out"
    assert run("fuse", src.original, "--dim", "8", "-o", out).exit_code == 0
    (out / "old.txt").write_text("first run")
    result = run("fuse", src.original, "--dim", "9", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and hidden(tmp_path) == []
    late = tmp_path / "late"
    with pytest.raises(InputError, match="appeared while this run worked"):
        fuse_checkpoint(str(src.original), late, FuseSettings(dim=8), on_layer=_make_dir_at(late, with_file=True))
    assert (late / "theirs.txt").is_file() and hidden(tmp_path) == []


def test_a_report_that_cannot_be_written_after_the_work_says_the_checkpoint_was(src, tmp_path, tmpfs):
    full = tmpfs("full", size="64k")
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # fill it: an empty probe file still fits, a report not
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    out = tmp_path / "out"
    result = run("fuse", src.original, "--dim", "8", "-o", out, "--json", full / "r.json")
    one_line_error(result, 3, "no space left")
    assert "--json" in result.stderr and f"the output {out} was written and is complete" in result.stderr
    assert (out / "model.safetensors").is_file()


def test_a_run_can_load_its_own_unfinished_output_to_check_it(src, tmp_path):
    import shutil

    import mlpfuse

    with claim_output(tmp_path / "out", [src.original]) as claim:
        assert (claim.staging / INCOMPLETE_MARKER).is_file()
        shutil.copytree(src.original, claim.staging, dirs_exist_ok=True)
        assert mlpfuse.load(claim.staging).config.model_type == "bert"  # e.g. the loads-clean check before commit
    assert not claim.staging.exists() and hidden(tmp_path) == []
