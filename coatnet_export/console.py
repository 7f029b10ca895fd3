"""Progress lines and plain-text tables for the command line (progress goes to stderr)."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any


class Progress:
    """Numbered steps with their durations: ``[2/6] exporting ONNX ... 3.1 s``."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        self._write(f"[{self.done}/{self.total}] {label} ...")
        try:
            yield
        except BaseException:
            self._write(" failed\n")
            raise
        self._write(f" {time.perf_counter() - start:.1f} s\n")

    def note(self, text: str) -> None:
        self._write(f"      {text}\n")

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
