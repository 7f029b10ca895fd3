"""Output directories that appear whole or not at all: build in a staging folder, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from coatnet_export.errors import InputError


def check_destination(final: Path, force: bool) -> None:
    """Fail early if ``final`` exists (without ``force``) or its parent cannot be written."""
    if final.exists() and not force:
        raise InputError(
            f"output {final} already exists; pass --force to replace it, or choose another --output"
        )
    if final.exists() and not final.is_dir():
        raise InputError(f"output {final} exists and is not a directory")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{final.name}.probe-", dir=parent)
    except OSError as exc:
        raise InputError(
            f"output directory {parent} is not writable ({exc.strerror or exc})"
        ) from None
    Path(probe).rmdir()


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``final``; removed on error unless it was published."""
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, final: Path) -> None:
    """Move ``stage`` to ``final`` (replacing what was there) with renames on one filesystem."""
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{stage.name.rsplit('-', 1)[-1]}")
        final.rename(backup)
    stage.rename(final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
