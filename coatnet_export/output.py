"""Outputs that appear whole or not at all, checked before the work starts.

A directory output: :func:`claim` (check the destination, lock it against a second writer,
remove what a killed run left behind) -> :func:`staging` (a hidden folder beside it) ->
:func:`publish` (renames, with signals held back). A file output: :func:`check_output_file`
up front (a side file such as ``--json``, written last: checked before any other output is
published), or :func:`claim_file` (locked, its parents made) for a command's main file; then
:func:`atomic_file` to write it under a temporary name and rename it. :func:`check_apart`
keeps every output apart from every input and from the other outputs; :func:`check_member_name`
keeps a name given for a path inside an output (``--name``) inside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from coatnet_export.errors import InputError, os_error_message, signals_deferred

STALE_PATTERNS = ("partial-*", "old-*", "probe-*")
"""Hidden siblings ``.NAME.<pattern>`` that a run killed by SIGKILL can leave behind."""


def absolute(path: Path) -> Path:
    """``path`` made absolute and normalised (``out/..`` and ``.`` resolved by name)."""
    return Path(os.path.abspath(path))


def check_destination(final: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail early if ``final`` cannot be (re)placed: exists without ``force``, is a symlink or
    a file, holds the current directory or one of ``inputs``, or its parent is not writable.
    """
    final = absolute(final)
    _check_not_symlink(final, "--output")
    if final.exists():
        if not force:
            raise InputError(
                f"output {final} already exists; pass --force to replace it, or choose "
                "another --output"
            )
        if not final.is_dir():
            raise InputError(f"output {final} exists and is not a directory")
        _check_not_holding_cwd(final)
    check_apart(final, "--output", inputs)
    _check_writable_dir(_existing_ancestor(final.parent), "--output")


def _check_not_symlink(path: Path, option: str) -> None:
    try:
        is_link = path.is_symlink()
        if is_link:
            os.stat(path)
    except OSError as exc:
        raise InputError(f"{option} {path}: {os_error_message(exc, doing='resolving')}") from None
    if is_link:
        raise InputError(
            f"{option} {path} is a symbolic link (to {os.readlink(path)}); give the "
            "directory it points to, or another path"
        )


def _check_not_holding_cwd(final: Path) -> None:
    cwd = Path.cwd().resolve()
    real = final.resolve()
    if cwd == real or real in cwd.parents:
        raise InputError(
            f"output {final} is the current directory or holds it: --force would delete it "
            "(choose a new directory for --output)"
        )


def check_apart(
    path: Path,
    option: str,
    inputs: Iterable[Path] = (),
    outputs: Iterable[tuple[str, Path]] = (),
    scanned: Iterable[Path] = (),
) -> None:
    """Refuse an output ``path`` that is one of ``inputs`` or of the other ``outputs`` (each
    ``(option, path)``), holds one, or lies inside one, whatever ``--force`` says: writing it
    would replace or delete what the command reads, or what it writes besides.

    ``scanned`` inputs are folders the command takes only some files from (predict's images):
    an output may be written among those files, never be or hold one of them.
    """
    real = absolute(path).resolve()
    others = [("the input", p, True) for p in inputs]
    others += [(f"the {name}", p, True) for name, p in outputs]
    others += [("the input", p, False) for p in scanned]
    for what, other, whole in others:
        theirs = absolute(other).resolve()
        if real == theirs:
            raise InputError(
                f"{option} {path} is {what} {other}: writing it would replace it (choose "
                f"another {option})"
            )
        if real in theirs.parents:
            raise InputError(
                f"{option} {path} holds {what} {other}: writing it would delete it (move it, "
                f"or choose another {option})"
            )
        if whole and theirs in real.parents:
            raise InputError(
                f"{option} {path} is inside {what} {other} (give {option} a path outside it)"
            )


def check_side_file(
    path: Path, option: str, inputs: Iterable[Path] = (), outputs: Iterable[tuple[str, Path]] = ()
) -> None:
    """A file written after the command's main output (``--json``, ``--report``): writable,
    and apart from every input and output. Call it before the main output is published."""
    check_output_file(path, option)
    check_apart(path, option, inputs, outputs)


def check_member_name(name: str, option: str) -> str:
    """``name`` if it names one entry directly inside an output folder; else InputError.

    Refused: empty, ``.``, ``..``, a path with a separator, an absolute path.
    """
    reason = None
    if not name:
        reason = "it is empty"
    elif name in (".", ".."):
        reason = f"{name!r} is not a name but the folder {'itself' if name == '.' else 'above'}"
    elif os.path.isabs(name):
        reason = "it is an absolute path"
    elif "/" in name or os.sep in name or "\x00" in name:
        reason = "it holds a path separator (a name, not a path)"
    if reason is not None:
        raise InputError(
            f"{option} {name!r} must name one entry inside the output: {reason} (give a "
            f"plain name, e.g. {option} my_model)"
        )
    return name


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        if path.is_symlink():  # a dangling link or a loop in the path
            _check_not_symlink(path, "--output")
        path = path.parent
    return path


def _check_writable_dir(directory: Path, option: str) -> None:
    if not directory.is_dir():
        raise InputError(f"{option}: {directory} is not writable: it is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".coatnet-export.probe-", dir=directory)).rmdir()
    except OSError as exc:
        raise InputError(
            f"{option}: directory {directory} is not writable "
            f"({os_error_message(exc, option=option)})"
        ) from None


def check_output_file(path: Path, option: str = "--report") -> None:
    """Fail early if ``path`` cannot be written as a file: its directory must exist and be
    writable, and ``path`` must not be a directory, a symlink loop or a special file.
    """
    path = absolute(path)
    try:
        parent = os.stat(path.parent)
    except FileNotFoundError:
        raise InputError(
            f"{option} {path}: directory {path.parent} does not exist (create it first, or "
            f"choose another {option})"
        ) from None
    except OSError as exc:
        raise InputError(f"{option} {path}: {os_error_message(exc, doing='resolving')}") from None
    if not stat.S_ISDIR(parent.st_mode):
        raise InputError(f"{option} {path}: {path.parent} is not a directory")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise InputError(f"{option} {path}: {os_error_message(exc, doing='resolving')}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{option} {path} is a directory (give a file name)")
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{option} {path} exists and is not a regular file")
    _check_writable_dir(path.parent, option)


def check_input_file(path: Path, what: str, fix: str) -> None:
    """InputError unless ``path`` is a readable regular file, saying what it is instead:
    missing, a directory, something else (``fix``: how to give the right file)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist ({fix})") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: {os_error_message(exc, doing='resolving')}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a directory, not a file ({fix})")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file ({fix})")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (its own: concurrent writers never share one); renamed
    onto it, with a normal file's mode, when the block succeeds."""
    path = absolute(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        Path(tmp).chmod(0o666 & ~umask)  # mkstemp makes it private
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def lock(final: Path, option: str = "--output") -> Iterator[None]:
    """An exclusive lock on writing ``final``: ``.NAME.lock`` beside it, held by flock.

    A second holder fails at once, naming the first one's pid. The lock file is removed on
    release; a holder that finds its file replaced meanwhile locks the new one instead.
    """
    final = absolute(final)
    path = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(
                f"another coatnet-export is writing {final} (pid {holder}); wait for it to "
                f"finish, or choose another {option}"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def claim(final: Path, force: bool, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Check ``final``, create its parents, lock it and clean stale staging; yields it absolute.

    Parents created here are removed again if the block fails, so a failed command leaves
    the file system as it found it.
    """
    final = absolute(final)
    check_destination(final, force, inputs)
    with parents_made(final), lock(final):
        check_destination(final, force, inputs)  # another run may have published meanwhile
        clean_stale(final)
        yield final


@contextlib.contextmanager
def claim_file(path: Path, option: str, check: Callable[[Path], None]) -> Iterator[Path]:
    """A command's main output file: ``check(path)`` it, create its parents, lock it and check
    it again under the lock (another run may have written it meanwhile); yields it absolute.

    Parents created here are removed again if the block fails.
    """
    path = absolute(path)
    check(path)
    _check_writable_dir(_existing_ancestor(path.parent), option)
    with parents_made(path), lock(path, option):
        check(path)
        yield path


@contextlib.contextmanager
def parents_made(path: Path) -> Iterator[None]:
    """Create the missing folders above ``path``; remove them again if the block fails."""
    missing = []
    directory = absolute(path).parent
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except OSError as exc:
                raise InputError(os_error_message(exc, folder, "creating")) from None
            created.append(folder)
        yield
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def clean_stale(final: Path) -> list[Path]:
    """Remove staging folders that a killed run left beside ``final``; call with the lock held.

    If a run was killed between its two renames (the old output moved aside, the new one not
    yet in place), the old output is put back first.
    """
    final = absolute(final)
    siblings = {
        p for pattern in STALE_PATTERNS for p in final.parent.glob(f".{final.name}.{pattern}")
    }
    backups = sorted(
        (p for p in siblings if p.name.startswith(f".{final.name}.old-")),
        key=lambda p: p.stat().st_mtime,
    )
    if backups and not final.exists():
        backups[-1].rename(final)
        siblings.discard(backups[-1])
    for path in siblings:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return sorted(siblings)


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``final``; removed on error unless it was published."""
    final = absolute(final)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, final: Path) -> None:
    """Move ``stage`` to ``final`` (replacing what was there) with renames on one filesystem.

    Not after a signal (even one a library swallowed), and signals wait until it is done.
    """
    final = absolute(final)
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
    with signals_deferred():
        backup = None
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{stage.name.rsplit('-', 1)[-1]}")
            final.rename(backup)
        stage.rename(final)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
