"""Errors the command line turns into a one-line message and an exit code.

Exit codes: 0 ok, 1 a gate failed, 2 bad input or environment (arguments, files, disk, memory),
3 an internal error (a bug: please report it), 130 interrupted by SIGINT, 143 by SIGTERM.

The API other modules use: raise :class:`InputError` for bad input; wrap code that writes
files in :func:`writing` so an ``OSError`` (disk full, read-only, permissions) becomes an
:class:`InputError` naming the target; call :func:`check_interrupted` before an irreversible
step; :func:`explain` turns any exception into the line and exit code the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

EXIT_OK = 0
EXIT_GATE = 1
EXIT_INPUT = 2
EXIT_INTERNAL = 3

DISK_FULL_BYTES = 1 << 20
"""A file system with less free space than this, after a failed write, counts as full."""


class InputError(Exception):
    """Bad input from the user (arguments, files, directories) or environment: exit code 2."""

    exit_code = EXIT_INPUT


class GateFailed(Exception):
    """An accuracy or parity gate failed: exit code 1."""

    exit_code = EXIT_GATE


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; unwinds like Ctrl-C, so staging folders are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: int | None = None
"""The first signal received while :func:`handle_signals` is active."""


def _on_signal(signum: int, frame: object) -> None:
    global _received
    if _received is None:
        _received = signum
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (once); handlers restored on exit."""
    global _received
    _received = None
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived, even if a library swallowed it."""
    if _received is not None:
        raise Interrupted(_received)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during a few renames that must not be cut in half."""
    check_interrupted()
    if not _in_main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_ERRNO_TEXT: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space, or choose another {option}"),
    errno.EDQUOT: ("disk quota exceeded", "free space, or choose another {option}"),
    errno.EFBIG: (
        "file too large",
        "free space, raise the file size limit, or choose another {option}",
    ),
    errno.EROFS: ("read-only file system", "choose another {option}"),
    errno.EACCES: ("permission denied", "fix the permissions, or choose another {option}"),
    errno.EPERM: ("operation not permitted", "fix the permissions, or choose another {option}"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ELOOP: ("too many levels of symbolic links", "a symlink loop: fix or remove the link"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "give a file name"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
    errno.EIO: ("input/output error", "check the disk"),
    errno.EMFILE: ("too many open files", "raise the open-file limit: ulimit -n"),
    errno.ENFILE: ("too many open files in the system", "close other programs, then retry"),
    errno.ENOMEM: ("out of memory", "use a smaller model, --img-size or --batch"),
}


def os_error_message(
    exc: OSError, path: Path | str | None = None, doing: str = "accessing", option: str = "--output"
) -> str:
    """``<what> while <doing> <path> (<fix>)`` for an OSError, worded by its errno."""
    what, fix = _ERRNO_TEXT.get(
        exc.errno or 0, (exc.strerror or str(exc) or type(exc).__name__, "")
    )
    target = path if path is not None else exc.filename
    where = f" while {doing} {target}" if target not in (None, "") else ""
    hint = f" ({fix.format(option=option)})" if fix else ""
    return f"{what}{where}{hint}"


def free_bytes(path: Path) -> int | None:
    """Free space for unprivileged users on the file system holding ``path`` (or its parent)."""
    for candidate in (Path(path), *Path(path).parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return None


@contextlib.contextmanager
def writing(target: Path, option: str = "--output") -> Iterator[None]:
    """Turn a failed write under ``target`` into an :class:`InputError` naming it.

    Catches an ``OSError`` anywhere in the exception's chain (libraries wrap them), and any
    other failure (a damaged read-back, say) while the file system is full.
    """
    try:
        yield
    except GateFailed:
        raise
    except Exception as exc:
        cause = None if isinstance(exc, InputError) else _find(exc, OSError)
        if cause is None or cause.errno is None:  # numpy and others raise OSError("problem…")
            free = free_bytes(target)
            if free is not None and free < DISK_FULL_BYTES:
                cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            elif cause is None:
                raise
        message = os_error_message(cause, target, "writing", option)
        raise InputError(message) from exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during, outermost first."""
    seen: set[int] = set()
    queue = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [e for e in (current.__cause__, current.__context__) if e is not None]


Found = TypeVar("Found", bound=BaseException)


def _find(exc: BaseException, kind: type[Found]) -> Found | None:
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def release_interrupted(exc: BaseException) -> None:
    """Free what the frames an interruption unwound still hold, now, with the errors of its
    finalisers dropped: an object a signal left half-built fails in its ``__del__``
    (onnxruntime's ``ModelProtoWithShapeInfo`` lacks ``_tmp_model_path``), which Python would
    print after ``aborted`` at exit."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        for current in _chain(exc):
            if current.__traceback__ is not None:
                traceback.clear_frames(current.__traceback__)
        gc.collect()
    finally:
        sys.unraisablehook = previous


OUT_OF_MEMORY = ("can't allocate memory", "failed to allocate memory", "bad_alloc")
"""What libraries (torch, onnxruntime's arena, C++ allocations) say when memory ran out."""


def _explain_one(exc: BaseException) -> tuple[str, int] | None:
    """The message and exit code of one expected exception, or None."""
    if isinstance(exc, (InputError, GateFailed)):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return os_error_message(exc), EXIT_INPUT
    if isinstance(exc, MemoryError) or any(t in str(exc).lower() for t in OUT_OF_MEMORY):
        return (
            "out of memory (use a smaller --img-size or --batch, or a machine with more memory)",
            EXIT_INPUT,
        )
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})", EXIT_INPUT
    module = type(exc).__module__ or ""
    if module.startswith("google.protobuf"):
        return (
            f"a file is not a readable ONNX/protobuf file ({_first_line(exc)}; is it truncated?)",
            EXIT_INPUT,
        )
    if module.startswith("onnxruntime"):
        return (
            f"onnxruntime failed: {_first_line(exc)} (is the model complete, with its .data "
            "file beside it, and made for this input?)",
            EXIT_INPUT,
        )
    return None


def explain(exc: BaseException) -> tuple[str, int]:
    """The one line to print and the exit code for any exception reaching the CLI's boundary.

    An interruption wins wherever it hides (a library may wrap KeyboardInterrupt); then the
    first expected error in the chain, outermost first; anything else is an internal error.
    """
    chain = list(_chain(exc))
    interrupted = next((e for e in chain if isinstance(e, KeyboardInterrupt)), None)
    if _received is not None or interrupted is not None:
        signum = _received or getattr(interrupted, "signum", None) or signal.SIGINT
        return "aborted", 128 + int(signum)
    for current in chain:
        explained = _explain_one(current)
        if explained is not None:
            message, code = explained
            return f"error: {message}", code
    return (
        f"internal error: {type(exc).__name__}: {_first_line(exc)} (a bug in coatnet-export; "
        "please report it with the command line; COATNET_EXPORT_DEBUG=1 shows the traceback)",
        EXIT_INTERNAL,
    )
