"""Numbers the machine bounds: threads per core, and the integer widths of other programs.

Light on purpose (no numpy, torch or onnxruntime): the command line checks its options with it
before anything heavy loads.
"""

from __future__ import annotations

import os

from coatnet_export.errors import InputError

THREADS_PER_CORE = 4
"""More threads than this many per core only slow a run down (and thousands of them exhaust
memory: each has its own stack)."""
MAX_THREADS = 256
"""The most threads any option may ask for, whatever the machine."""
INT32_MAX = 2**31 - 1


def cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def max_threads() -> int:
    """The most threads one run may ask for on this machine."""
    return max(1, min(MAX_THREADS, THREADS_PER_CORE * cores()))


def threads_problem(count: int) -> str | None:
    """Why ``count`` threads are too many here, or None."""
    if count < 1:
        return f"{count} is not a positive count"
    if count > max_threads():
        return (
            f"{count} is more than this machine runs usefully: at most {max_threads()} "
            f"({THREADS_PER_CORE} per core of its {cores()}, never above {MAX_THREADS})"
        )
    return None


def check_threads(count: int, option: str = "--threads") -> int:
    """``count`` if this machine can run that many threads; else InputError naming ``option``."""
    problem = threads_problem(count)
    if problem is not None:
        raise InputError(f"{option}: {problem}; ask for fewer")
    return count


def check_int32(value: int, option: str, field: str) -> int:
    """``value`` if it fits ``field``, a signed 32-bit field of another program; else
    InputError."""
    if not 0 <= value <= INT32_MAX:
        raise InputError(
            f"{option} {value} is too large for {field}, a signed 32-bit field (at most "
            f"{INT32_MAX:,}; ask for less)"
        )
    return value
