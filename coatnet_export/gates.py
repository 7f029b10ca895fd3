"""Pass criteria of a parity check and the columns of its results.

Plain data, apart from :mod:`coatnet_export.validate` (numpy, the runtimes) so that the command
line can show their defaults without loading anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gates:
    """Pass criteria of a parity check."""

    max_rel_error: float = 1e-4
    """Largest |onnx - torch| allowed, relative to the largest |logit| of the reference."""
    min_top1: float = 1.0
    """Smallest fraction of samples whose top-1 class must agree."""


RESULT_COLUMNS = (
    "case",
    "batch",
    "max_abs",
    "max_rel",
    "mean_abs",
    "min_cosine",
    "top1",
    "top5",
    "nonfinite",
    "passed",
)
