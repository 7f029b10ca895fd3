"""Progress lines and plain-text tables for the command line (progress goes to stderr)."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class Progress:
    """Numbered steps with their durations: ``[2/6] exporting ONNX ... 3.1 s``.

    A pipeline announces its own steps (:meth:`expect`) and notes (:meth:`note`); a command
    only makes one, enabled or quiet."""

    def __init__(self, enabled: bool = True) -> None:
        self.total = 0
        self.done = 0
        self.enabled = enabled
        self._open = False
        """A step line is written without its end (its duration comes when it ends)."""

    def expect(self, total: int) -> None:
        """How many steps the pipeline will take (it may expect more as it goes)."""
        self.total = total

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        self._write(f"[{self.done}/{max(self.total, self.done)}] {label} ...")
        self._open = True
        try:
            yield
        except BaseException:
            self._end(" failed\n")
            raise
        self._end(f" {time.perf_counter() - start:.1f} s\n")

    def note(self, text: str) -> None:
        if self._open:
            self._write("\n")
            self._open = False
        self._write(f"      {text}\n")

    def counter(self, what: str, total: int, every_s: float = 15.0) -> Callable[[int], None]:
        """A callback for ``done`` items out of ``total``: a note at most every ``every_s``."""
        last = [time.perf_counter()]

        def report(done: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= every_s or done == total:
                last[0] = now
                self.note(f"{what} {done}/{total}")

        return report

    def snapshot(self) -> tuple[int, int, bool, bool]:
        """The state another process's progress continues from (steps, open line, enabled)."""
        return self.total, self.done, self._open, self.enabled

    def restore(self, total: int, done: int, is_open: bool, enabled: bool, text: str) -> None:
        """Take over another process's state after it wrote ``text``, and write it here."""
        self.total, self.done, self._open = total, done, is_open
        if enabled:
            self._write(text)

    def _end(self, text: str) -> None:
        self._write(text if self._open else f"      ...{text}")
        self._open = False

    def _write(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(text)
            sys.stderr.flush()


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def render_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    """A left-aligned text table of ``rows`` showing ``columns``."""
    headers = list(headers or columns)
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def join(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([join(headers), join(["-" * w for w in widths]), *map(join, cells)])


@contextlib.contextmanager
def quiet_libraries():
    """Keep libraries' own chatter (exporter progress, quantizer logging) off the console."""
    loggers = [
        logging.getLogger(name)
        for name in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@functools.cache
def warn_once(text: str) -> None:
    """``warning: text`` on stderr, once per process."""
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()
