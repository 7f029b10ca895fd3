"""Run a generator function's steps in a spawned process, as if it ran here.

A step function is a generator: it yields each result the caller must act on and receives
the caller's answer; what it returns is the last result. ``run_in_child`` drives it in a fresh
interpreter (``spawn``), so that what the steps import and leave behind (PyTorch: about
0.5 GiB) is gone when the child exits; ``in_process=True`` drives the same steps here
(debuggers, profilers). Progress lines are relayed, exceptions re-raised in the caller, and
the child ends with the caller: signals stop it, and it dies if the caller is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Generator, Iterator
from multiprocessing.connection import Connection
from typing import Any, cast

from coatnet_export.console import Progress
from coatnet_export.errors import InputError

Steps = Callable[..., Generator[Any, Any, Any]]
"""``steps(*args, progress)``: yields results, receives answers, returns the last result."""

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0


class Conversation:
    """The caller's side: :meth:`next` sends an answer and returns the next result."""

    def __init__(
        self, send: Callable[[Any], tuple[bool, Any]], close: Callable[[bool], None]
    ) -> None:
        self._send = send
        self._close = close
        self.finished = False

    def next(self, answer: Any = None) -> Any:
        """The steps' next result, or their return value once they finish."""
        if self.finished:
            raise RuntimeError("the steps have already finished")
        self.finished, result = self._send(answer)
        return result

    def close(self) -> None:
        """End the steps (a child process has exited, its memory returned, when this returns)."""
        self._close(self.finished)
        self.finished = True


@contextlib.contextmanager
def run_in_child(
    steps: str, args: tuple, progress: Progress, *, in_process: bool = False
) -> Iterator[Conversation]:
    """Drive the step function named ``steps`` ("module:function", so that the caller need
    not import its module) as ``function(*args, progress)`` in a spawned process, or here; the
    child is stopped when the block ends, whether or not the steps finished."""
    if in_process:
        generator = named(steps)(*args, progress)
        conversation = Conversation(
            lambda answer: step_here(generator, answer), lambda _: generator.close()
        )
    else:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(
            target=serve, args=(theirs, steps, args, progress.snapshot()), daemon=True
        )
        child.start()
        theirs.close()
        conversation = Conversation(
            lambda answer: exchange(ours, child, answer, progress),
            lambda finished: stop(ours, child, finished),
        )
    try:
        yield conversation
    finally:
        conversation.close()


def named(steps: str) -> Steps:
    """The function ``"module:function"`` names."""
    module, _, function = steps.partition(":")
    return cast(Steps, getattr(importlib.import_module(module), function))


def step_here(generator: Generator[Any, Any, Any], answer: Any) -> tuple[bool, Any]:
    """One step in this process: (finished, result)."""
    try:
        return False, generator.send(answer)
    except StopIteration as done:
        return True, done.value


def exchange(
    connection: Connection,
    child: multiprocessing.process.BaseProcess,
    answer: Any,
    progress: Progress,
) -> tuple[bool, Any]:
    """Send ``answer``; relay progress until the child's next result (finished, result), or
    raise its error."""
    connection.send(answer)
    while True:
        try:
            kind, payload = connection.recv()
        except EOFError:
            child.join(STOP_TIMEOUT_S)
            raise child_died(child.exitcode) from None
        if kind == "progress":
            progress.restore(*payload)
        elif kind == "raise":
            raise payload
        else:
            return kind == "return", payload


def child_died(exitcode: int | None) -> Exception:
    """The error for a child that ended without an answer."""
    if exitcode == -signal.SIGKILL:
        return InputError(
            "the PyTorch process was killed (SIGKILL, most likely out of memory: use a smaller "
            "--img-size, or a machine with more memory)"
        )
    return RuntimeError(f"the PyTorch process ended without an answer (exit code {exitcode})")


def stop(
    connection: Connection, child: multiprocessing.process.BaseProcess, finished: bool
) -> None:
    """Let a finished child exit; terminate one still at work (interrupted, or an error here)."""
    connection.close()
    child.join(STOP_TIMEOUT_S if finished else 0)
    if child.is_alive():
        child.terminate()
        child.join(STOP_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()


class RelayProgress(Progress):
    """The child's progress: every line, and the step count with it, goes to the caller."""

    def __init__(self, connection: Connection, snapshot: tuple[int, int, bool, bool]) -> None:
        super().__init__()
        self.connection = connection
        self.total, self.done, self._open, self.enabled = snapshot

    def _write(self, text: str) -> None:
        self.connection.send(("progress", (*self.snapshot(), text)))

    def write_state(self) -> None:
        """Send the step count and line state alone (they change after a line is written)."""
        self._write("")


def serve(
    connection: Connection, steps: str, args: tuple, snapshot: tuple[int, int, bool, bool]
) -> None:
    """The child: run the steps, one answer at a time, until they finish or fail."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the caller, which stops us
    progress = RelayProgress(connection, snapshot)
    generator = named(steps)(*args, progress)
    with contextlib.suppress(EOFError, BrokenPipeError):
        while True:
            answer = connection.recv()
            try:
                reply: tuple[str, Any] = ("yield", generator.send(answer))
            except StopIteration as done:
                reply = ("return", done.value)
            except BaseException as exc:  # every error goes to the caller
                reply = ("raise", picklable(exc))
            progress.write_state()
            connection.send(reply)
            if reply[0] != "yield":
                return


def picklable(exc: BaseException) -> BaseException:
    """``exc`` itself, its child traceback noted, or a RuntimeError carrying that traceback."""
    text = "".join(traceback.format_exception(exc))
    try:
        exc.add_note(f"raised in the PyTorch process:\n{text}")
        pickle.loads(pickle.dumps(exc))
    except Exception:  # it does not survive pickling
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{text}")
    return exc


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
