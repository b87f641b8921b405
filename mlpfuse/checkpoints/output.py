"""Output handling for every command that writes a checkpoint (fuse, merge-layers, tune, finetune).

One home for the rules that keep the user's data safe:

* the target is checked against the inputs before any work (symlinks resolved): never an input,
  never inside or around one, never the current directory or one of its parents, never empty;
* ``--overwrite`` only ever replaces a directory that an earlier mlpfuse run wrote (its config.json
  carries the ``mlpfuse`` section, or it holds a ``finetune`` report);
* a lock file beside the target (``.NAME.mlpfuse-lock``) makes a second concurrent run to the same
  target fail at once;
* writability of the target's parent is probed first (a read-only filesystem fails before the work);
* the checkpoint is written into ``.NAME.mlpfuse-incomplete-PID-*`` beside the target, marked with
  an ``MLPFUSE_INCOMPLETE`` file, and renamed onto the target at the end with ``renameat2``
  (``RENAME_NOREPLACE``, or ``RENAME_EXCHANGE`` for ``--overwrite``), so a directory that appears
  at the target meanwhile is never replaced (nor, with ``--overwrite``, one that took the place of
  the earlier output: the target must be the very directory it was at the start); signals wait
  during the rename, so an interruption reports truthfully whether the output was written;
* stale temporary directories of killed runs are removed by the next run to the same target;
* a full or read-only filesystem becomes :class:`EnvironmentProblem` (exit 3), leaving nothing;
  a command that can estimate its output's size refuses before the work when the free space is
  below it (:func:`check_free_space`);
* the files a library needs to rebuild the model's pipeline (tokenizer, generation config,
  sentence-transformers modules) are carried from the source by :func:`carry_side_files`.

Library code uses it like this::

    @guarded_outputs                   # releases the claim (lock, temp dir) however the call ends
    def write_something(model, output, overwrite=False):
        source = resolve_model(model)
        claim = claim_output(output, [source], overwrite)   # all checks, before any work
        ...work...
        with staging_directory(claim.target, overwrite) as staging:   # finds the claim
            ...write files into staging...
        # here the output is complete at claim.target
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from mlpfuse.errors import EnvironmentProblem, InputError

try:  # POSIX advisory locks; elsewhere an exclusive create stands in
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

INCOMPLETE_MARKER = "MLPFUSE_INCOMPLETE"
FINETUNE_REPORT = "mlpfuse_finetune.json"
_STAGING_TAG = "mlpfuse-incomplete"
_OLD_TAG = "mlpfuse-old"
_LOCK_TAG = "mlpfuse-lock"

# Files carried from the source checkpoint into every written checkpoint (glob patterns, top level).
TOKENIZER_PATTERNS = (
    "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
    "*.tiktoken", "chat_template*", "preprocessor_config.json",
)
PIPELINE_PATTERNS = (
    "generation_config.json",
    # sentence-transformers: the module list, its config, and the per-module configs
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "sentence_*_config.json",
)
NEVER_CARRIED = {"README.md", "config.json"}  # the writer's own model card and config win
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"

_written: list[Path] = []  # outputs committed by this process (for truthful interruption messages)
_own_staging: set[Path] = set()  # staging directories this process is writing right now
_scopes = threading.local()


def is_unfinished(directory) -> bool:
    """True for the temporary directory of a run that was stopped (not one this process is writing).

    Such a directory may hold a complete-looking checkpoint; commands refuse it as an input.
    """
    path = Path(directory)
    return (path / INCOMPLETE_MARKER).exists() and path.resolve() not in _own_staging


def written_outputs() -> list[Path]:
    """Targets this process has completed (renamed into place) since the last :func:`forget_written`."""
    return list(_written)


def forget_written() -> None:
    """Start a new command: no output written yet."""
    _written.clear()


# ----------------------------------------------------------------------------------------------
# checking the target


def is_mlpfuse_output(directory: Path) -> bool:
    """True when ``directory`` is an earlier output of mlpfuse, the only kind ``--overwrite`` may replace.

    That is: its config.json is a mapping with an ``mlpfuse`` section (fused) or an
    ``mlpfuse_export`` section (exported), or (a plain checkpoint written by ``finetune``) it holds
    config.json and ``mlpfuse_finetune.json``.
    """
    config = Path(directory) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    from mlpfuse.checkpoints.format import EXPORT_SECTION, SECTION  # the format's own names (imported late: format loads torch)

    return (isinstance(data.get(SECTION), dict) or isinstance(data.get(EXPORT_SECTION), dict)
            or (Path(directory) / FINETUNE_REPORT).is_file())


def resolve_target(output) -> Path:
    """The absolute, symlink-resolved target directory of ``-o``; InputError if it is not a path."""
    if output is None:
        raise InputError("no output directory given: pass -o DIR")
    if not isinstance(output, (str, os.PathLike)):
        raise InputError(f"the output must be a directory path, not {type(output).__name__} {output!r}")
    text = os.fspath(output)
    if not text.strip():
        raise InputError("the output path is empty (an unset shell variable?); pass -o DIR")
    return Path(text).expanduser().resolve()


def check_target(target: Path, inputs: Iterable = ()) -> None:
    """Refuse a target that could modify or delete an input or the working directory.

    ``inputs`` are the input checkpoints and files (paths; symlinks are resolved). Raises
    InputError when the target is an input, lies inside one, contains one, is the current
    directory or one of its parents, or is a filesystem root.
    """
    if target.parent == target:
        raise InputError(f"output {target} is a filesystem root; choose a new directory for -o")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise InputError(f"output {target} is the current directory or one of its parents; "
                         "choose a new directory for -o")
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if target == source:
            raise InputError(f"the output must not be the input {source}; choose another -o")
        if source in target.parents:
            raise InputError(f"output {target} lies inside the input {source}; choose a directory outside it for -o")
        if target in source.parents:
            raise InputError(f"output {target} contains the input {source}; choose a directory outside it for -o")


def check_existing(target: Path, overwrite: bool) -> None:
    """Refuse an existing target unless ``overwrite`` and it is an earlier mlpfuse output."""
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise InputError(f"output {target} exists and is not a directory; choose another -o")
    if not overwrite:
        raise InputError(f"output {target} already exists; pass --overwrite to replace it or choose another -o")
    if not is_mlpfuse_output(target):
        raise InputError(f"output {target} exists and is not an earlier mlpfuse output (no mlpfuse section in "
                         "its config.json); --overwrite only replaces those: remove it yourself or choose another -o")


# ----------------------------------------------------------------------------------------------
# errors of the filesystem


_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def environment_problem(exc: BaseException, where: Path, what: str = "-o") -> EnvironmentProblem | None:
    """The EnvironmentProblem an OS-level failure while writing ``where`` stands for, else None.

    Full filesystem (ENOSPC, EDQUOT, also when a library wraps it in its own error), read-only
    filesystem (EROFS) and permission denied map to exit 3 with a one-line message; ``what`` names
    the flag that chose ``where`` (``-o``, ``--json``...).
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit, InputError, EnvironmentProblem)):
        return None
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e).lower() for e in chain)
    place = where.parent
    if codes & {errno.ENOSPC, errno.EDQUOT} or any(t in text for t in _NO_SPACE_TEXT) or _full(place):
        return EnvironmentProblem(f"no space left on the filesystem of {place} while writing {where}; "
                                  f"free some space or choose another {what} (it was not written)")
    if errno.EROFS in codes:
        return EnvironmentProblem(f"cannot write {where}: {place} is on a read-only filesystem; choose another {what}")
    if codes & {errno.EACCES, errno.EPERM}:
        return EnvironmentProblem(f"cannot write {where}: permission denied in {place}; choose another {what}")
    return None


def _full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return stats.f_bavail == 0


def check_free_space(target: Path, needed: int, what: str = "-o") -> None:
    """Refuse (EnvironmentProblem, exit 3) when the filesystem of ``target`` has less than ``needed`` bytes free.

    Called before the work with an estimate of the output's size, so that a disk too small for it
    is found before the hours of compute, not at the write. An unreadable free space passes.
    """
    place = target.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return
    if free < needed:
        raise EnvironmentProblem(f"no space left for {target}: it needs about {_size_text(needed)} and the "
                                 f"filesystem of {place} has {_size_text(free)} free; free some space or choose "
                                 f"another {what} (nothing was done)")


def _size_text(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def _mapped(exc: OSError, where: Path) -> Exception:
    problem = environment_problem(exc, where)
    if problem is not None:
        return problem
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return InputError(f"cannot create {where}: a part of its path is a file, not a directory")
    return EnvironmentProblem(f"cannot write {where}: {exc.strerror or exc}")


# ----------------------------------------------------------------------------------------------
# atomic renames


_libc = None


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """renameat2(2); False when the system or filesystem lacks it (the caller falls back)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover
            _libc = False
    function = getattr(_libc, "renameat2", None) if _libc else None
    if function is None:
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(destination))


def rename_no_replace(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``; FileExistsError if anything (even an empty directory) is there."""
    if _renameat2(source, destination, 1):  # RENAME_NOREPLACE
        return
    if os.path.lexists(destination):  # fallback: a tiny window remains where no renameat2 exists
        raise FileExistsError(errno.EEXIST, "File exists", str(destination))
    os.rename(source, destination)


def exchange(source: Path, destination: Path) -> bool:
    """Swap two existing directories atomically (RENAME_EXCHANGE); False when not supported."""
    return _renameat2(source, destination, 2)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM until the block ends; then they act as they would have (not lost).

    Python runs signal handlers in the main thread between bytecodes, whichever thread the kernel
    picked, so the handlers themselves are swapped for ones that only record the signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    try:
        for number in held:
            previous[number] = signal.signal(number, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in pending:
            handler = previous.get(number)
            if callable(handler):
                handler(number, None)  # e.g. KeyboardInterrupt, now that the rename is recorded
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), number)


# ----------------------------------------------------------------------------------------------
# the claim on a target


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputClaim:
    """An exclusive claim on an output directory: lock, staging directory, final atomic rename.

    Create it with :func:`claim_output`. ``target`` is the resolved output directory, ``staging``
    the temporary directory beside it that becomes the target on :meth:`commit`. :meth:`release`
    removes the staging directory (unless committed) and the lock; it is idempotent.
    """

    def __init__(self, target: Path, overwrite: bool):
        self.target = target
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.committed = False
        self._lock_fd: int | None = None
        self._lock_path = target.parent / f".{target.name}.{_LOCK_TAG}"
        self._created: list[Path] = []  # parent directories this claim made
        self.inputs: list = []
        self.found = None  # what was at the target when claimed (see _identity): commit replaces only that

    # -- set-up
    def _acquire(self) -> None:
        parent = self.target.parent
        missing = parent
        while not os.path.lexists(missing) and missing.parent != missing:
            self._created.append(missing)  # removed again if nothing is written
            missing = missing.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _mapped(exc, self.target) from None
        if not parent.is_dir():
            raise InputError(f"cannot create {self.target}: {parent} is not a directory")
        for _ in range(5):
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
            except FileExistsError:
                raise self._busy() from None
            except OSError as exc:
                raise _mapped(exc, self.target) from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise self._busy() from None
                try:  # the file may have been removed by the previous holder between open and lock
                    current = os.stat(self._lock_path)
                except FileNotFoundError:
                    os.close(fd)
                    continue
                mine = os.fstat(fd)
                if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                    os.close(fd)
                    continue
            self._lock_fd = fd
            break
        else:  # pragma: no cover - lock files removed five times in a row
            raise self._busy()
        try:
            os.ftruncate(self._lock_fd, 0)
            os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            self.release()
            raise _mapped(exc, self.target) from None

    def _busy(self) -> InputError:
        try:
            holder = self._lock_path.read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        who = f"pid {holder}" if holder.isdigit() else "another process"
        return InputError(f"another mlpfuse run ({who}) is writing {self.target}; wait for it to finish or "
                          "choose another -o")

    def _clean_stale(self) -> list[Path]:
        """Remove temporary directories of earlier runs to this target whose process is gone."""
        pattern = re.compile(rf"^\.{re.escape(self.target.name)}\.(?:{_STAGING_TAG}|{_OLD_TAG})-(\d+)(?:-|$)")
        removed = []
        for path in self.target.parent.iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def _make_staging(self) -> None:
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.{_STAGING_TAG}-{os.getpid()}-",
                                            dir=self.target.parent))
            self.staging = staging
            _own_staging.add(staging.resolve())
            staging.chmod(0o755)  # mkdtemp makes it private; the output should read like any directory
            (staging / INCOMPLETE_MARKER).write_text(
                f"Unfinished output of mlpfuse (pid {os.getpid()}) for {self.target}.\n"
                "Not a usable checkpoint: the next mlpfuse run to that target removes it; you may delete it.\n",
                encoding="utf-8")
        except OSError as exc:
            self.release()
            raise _mapped(exc, self.target) from None

    # -- the end
    def commit(self) -> None:
        """Put the staging directory in place of the target, atomically; never replaces what it may not.

        InputError (and the staging directory removed) when something appeared at the target that
        was not there at the start, or that ``--overwrite`` may not replace.
        """
        if self.committed:
            return
        staging, target = self.staging, self.target
        (staging / INCOMPLETE_MARKER).unlink(missing_ok=True)
        old = None
        try:
            with _signals_held():  # a Ctrl-C here acts after the rename is recorded, so it is reported truthfully
                if _identity(target) != self.found:  # appeared, or replaced or changed, while this run worked
                    raise FileExistsError(errno.EEXIST, "File exists", str(target))
                if os.path.lexists(target) and self.overwrite and is_mlpfuse_output(target) and target.is_dir():
                    if exchange(staging, target):
                        old = staging
                    else:  # no atomic exchange: move the old output aside, then rename
                        old = target.parent / f".{target.name}.{_OLD_TAG}-{os.getpid()}"
                        os.rename(target, old)
                        try:
                            rename_no_replace(staging, target)
                        except OSError:
                            os.rename(old, target)  # put the earlier output back
                            old = None
                            raise
                else:
                    rename_no_replace(staging, target)
                self.committed = True
                _written.append(target)
        except FileExistsError:
            self._discard()
            change = "appeared" if self.found is None else "was replaced or changed"
            raise InputError(f"output {target} {change} while this run worked and was left as it is; nothing was "
                             "written: choose another -o (or --overwrite if it is an earlier mlpfuse output)") from None
        except OSError as exc:
            self._discard()
            raise _mapped(exc, target) from None
        finally:
            if old is not None and self.committed:  # the replaced output, now under a temporary name
                shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        if self.staging is not None:
            _own_staging.discard(self.staging.resolve())
            if not self.committed:
                shutil.rmtree(self.staging, ignore_errors=True)

    def release(self) -> None:
        """Remove the uncommitted staging directory and the lock (idempotent)."""
        self._discard()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                current, mine = os.stat(self._lock_path), os.fstat(fd)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(fd)
        if not self.committed:
            for directory in self._created:  # deepest first; only while empty
                with contextlib.suppress(OSError):
                    directory.rmdir()
            self._created = []

    @contextlib.contextmanager
    def write(self):
        """Yield the staging directory; commit on success; on failure remove it and map disk errors."""
        try:
            yield self.staging
        except BaseException as exc:
            self._discard()
            problem = environment_problem(exc, self.target)
            if problem is not None:
                raise problem from None
            raise
        try:
            self.commit()
        except OSError as exc:  # pragma: no cover - commit maps its own errors
            raise _mapped(exc, self.target) from None

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a last resort: a claim never outlives its object
        with contextlib.suppress(Exception):
            self.release()


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What is at ``path`` (not following a symlink): device, inode and change time; None when nothing is.

    The change time tells a directory that took a removed one's inode number apart from it, and
    also changes when entries are added to or removed from the directory itself.
    """
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def claim_output(output, inputs: Iterable = (), overwrite: bool = False) -> OutputClaim:
    """Check ``output`` against ``inputs``, lock it and make its staging directory, before any work.

    ``inputs`` are the paths the command reads (checkpoints and data files). Raises InputError for
    a target that is refused (see :func:`check_target`, :func:`check_existing`) or locked by another
    run, EnvironmentProblem (exit 3) when the target's parent cannot be written (read-only or full
    filesystem). Stale temporary directories of killed runs to the same target are removed.
    Inside a :func:`guarded_outputs` call the claim is released when that call ends.
    """
    target = resolve_target(output)
    inputs = list(inputs)
    check_target(target, inputs)
    check_existing(target, overwrite)
    claim = OutputClaim(target, overwrite)
    try:
        claim._acquire()
        check_existing(target, overwrite)  # again, now that no other mlpfuse run can change it
        claim.found = _identity(target)
        claim._clean_stale()
        claim._make_staging()
    except BaseException:
        claim.release()
        raise
    claim.inputs = inputs  # what the target was checked against
    stack = getattr(_scopes, "stack", None)
    if stack:
        stack[-1].append(claim)
    return claim


def guarded_outputs(function):
    """Decorator: every claim made during the call is released when the call ends (however it ends)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        stack = _scopes.__dict__.setdefault("stack", [])
        stack.append([])
        try:
            return function(*args, **kwargs)
        finally:
            for claim in stack.pop():
                claim.release()

    return wrapper


def _open_claim(target: Path) -> OutputClaim | None:
    for scope in reversed(getattr(_scopes, "stack", None) or []):
        for claim in scope:
            if claim.target == target and not claim.committed:
                return claim
    return None


@contextlib.contextmanager
def staging_directory(target, overwrite: bool):
    """Yield a temporary directory beside ``target``; on success it takes the target's place atomically.

    Uses the claim made earlier in the same :func:`guarded_outputs` call for ``target`` (so the
    checks against the inputs and the lock happened before the work); without one it claims
    ``target`` now. On any failure or interruption the temporary directory is removed and the
    target is untouched, so a half-written output never looks complete.
    """
    claim = _open_claim(resolve_target(target))
    if claim is not None:
        with claim.write() as staging:
            yield staging
        return
    with claim_output(target, (), overwrite) as claim, claim.write() as staging:
        yield staging


# ----------------------------------------------------------------------------------------------
# report files (--json, --plot)


def check_report_path(path, inputs: Iterable = (), what: str = "--json") -> Path:
    """Check, before any work, that a report file can be written at ``path``; returns it resolved.

    InputError when it is a directory, lies inside an input (or is one), or a part of its path is
    a file; EnvironmentProblem (exit 3) when its directory is read-only or not writable. Creates
    nothing (a probe file in an existing directory is removed at once).
    """
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"the {what} path is empty; give a file path")
    file = Path(text).expanduser().resolve()
    if file.is_dir():
        raise InputError(f"{what} {file} is a directory; give a file path")
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if file == source or source in file.parents:
            raise InputError(f"{what} {file} would write into the input {source}; choose a path outside it")
    existing = file.parent
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {what} {file}: {existing} is a file, not a directory")
    try:
        if file.exists():
            with open(file, "ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=existing):
                pass
    except OSError as exc:
        problem = environment_problem(exc, file, what)
        raise (problem or EnvironmentProblem(f"cannot write {what} {file}: {exc.strerror or exc}")) from None
    return file


def write_report_file(path, text: str, what: str = "--json") -> None:
    """Write ``text`` to ``path`` (parents created); disk errors become one-line errors (exit 3)."""
    file = Path(path).expanduser()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
    except OSError as exc:
        problem = environment_problem(exc, file, what)
        if problem is None and exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
            problem = InputError(f"cannot write {what} {file}: {exc.strerror}")
        raise (problem or EnvironmentProblem(f"cannot write {what} {file}: {exc.strerror or exc}")) from None


# ----------------------------------------------------------------------------------------------
# files carried from the source


def carry_side_files(source: Path, staging: Path) -> list[str]:
    """Copy what libraries need besides weights and config to rebuild the source's pipeline.

    Tokenizer files, ``generation_config.json``, and sentence-transformers' ``modules.json``, its
    configs and the folders of its modules (e.g. ``1_Pooling/``) go from ``source`` into ``staging``.
    A file the writer already put there is kept; ``README.md`` and ``config.json`` are never
    copied. A sentence-transformers Transformer module kept in a sub-folder is pointed at the
    top level, where the written weights are. Returns the names carried.
    """
    source, staging = Path(source), Path(staging)
    carried = []
    for pattern in TOKENIZER_PATTERNS + PIPELINE_PATTERNS:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and path.name not in NEVER_CARRIED and not (staging / path.name).exists():
                shutil.copyfile(path, staging / path.name)
                carried.append(path.name)
    carried += _carry_sentence_transformers_modules(source, staging)
    return carried


def _carry_sentence_transformers_modules(source: Path, staging: Path) -> list[str]:
    modules_file = staging / "modules.json"
    if not modules_file.is_file():
        return []
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError:
        return []
    if not isinstance(modules, list):
        return []
    carried, rewritten = [], False
    root = source.resolve()
    for module in modules:
        if not isinstance(module, dict) or not isinstance(module.get("path"), str) or not module["path"]:
            continue
        folder = (source / module["path"]).resolve()
        if root not in folder.parents:  # a path outside the checkpoint is not ours to copy
            continue
        if module.get("type") == _ST_TRANSFORMER:  # the weights written are at the top level, not there
            config = folder / "sentence_bert_config.json"
            if config.is_file() and not (staging / config.name).exists():
                shutil.copyfile(config, staging / config.name)
            module["path"], rewritten = "", True
            continue
        if folder.is_dir() and not (staging / module["path"]).exists():
            shutil.copytree(folder, staging / module["path"])
            carried.append(module["path"] + "/")
    if rewritten:
        modules_file.write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    return carried


__all__ = [
    "INCOMPLETE_MARKER", "OutputClaim", "carry_side_files", "check_existing", "check_free_space", "check_report_path",
    "check_target",
    "claim_output", "write_report_file",
    "environment_problem", "exchange", "forget_written", "guarded_outputs", "is_mlpfuse_output", "is_unfinished",
    "rename_no_replace", "resolve_target", "staging_directory", "written_outputs",
]
