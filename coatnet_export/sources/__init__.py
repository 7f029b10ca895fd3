"""Where a reference model comes from: checkpoints, their architecture, memory estimates."""

from __future__ import annotations

from typing import Literal

CheckpointFormat = Literal["auto", "torch", "lucid"]
CHECKPOINT_FORMATS: tuple[CheckpointFormat, ...] = ("auto", "torch", "lucid")
"""Which framework wrote a checkpoint (``--checkpoint-format``; auto detects lucid)."""
