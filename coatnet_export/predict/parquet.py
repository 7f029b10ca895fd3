"""The predictions file: one Parquet schema, written in row groups under a temporary name.

With ``resume``, the rows of an existing output are copied into the new file first and their
paths are returned, so the engines skip those images. The file appears under its final name
only when the run completes (a failed or interrupted run leaves the old file as it was).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from coatnet_export.errors import InputError

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("top_k_indices", pa.list_(pa.int32())),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_probabilities", pa.list_(pa.float32())),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)
ROW_GROUP = 4096
"""Rows buffered before a row group is written (memory stays bounded)."""


class PredictionWriter:
    """Rows in, Parquet row groups out; buffered up to :data:`ROW_GROUP` rows."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer = writer
        self.pending: list[dict] = []

    def write_rows(self, rows: list[dict]) -> None:
        self.pending.extend(rows)
        if len(self.pending) >= ROW_GROUP:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        self.flush()
        self.writer.write_table(table.select(SCHEMA.names).cast(SCHEMA), ROW_GROUP)

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_pylist(self.pending, SCHEMA), ROW_GROUP)
            self.pending = []


def check_output(output: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite an existing file unless told to resume or replace it."""
    if output.exists() and not output.is_file():
        raise InputError(f"output {output} exists and is not a file")
    if output.exists() and not (resume or force):
        raise InputError(
            f"output {output} already exists (pass --resume to add the missing images, "
            "or --force to replace it)"
        )
    if output.suffix != ".parquet":
        raise InputError(f"output {output} must end in .parquet")


def _carry_over(previous: Path, sha256: str, writer: PredictionWriter) -> set[str]:
    """Copy ``previous``'s rows into ``writer``; the set of their paths."""
    try:
        source = pq.ParquetFile(previous)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(
            f"cannot resume from {previous}: not a readable Parquet file ({exc})"
        ) from None
    if not SCHEMA.equals(source.schema_arrow):
        raise InputError(
            f"cannot resume from {previous}: it was not written by coatnet-export predict "
            "(its columns differ; choose another --output)"
        )
    done: set[str] = set()
    for batch in source.iter_batches(batch_size=ROW_GROUP):
        shas = set(batch.column("model_sha256").to_pylist())
        if shas - {sha256}:
            raise InputError(
                f"cannot resume from {previous}: its rows come from another model "
                f"(sha256 {sorted(shas - {sha256})[0][:12]}...); use a new --output"
            )
        writer.write_table(pa.Table.from_batches([batch]))
        done.update(batch.column("path").to_pylist())
    return done


@contextlib.contextmanager
def prediction_file(
    output: Path, sha256: str, resume: bool
) -> Iterator[tuple[PredictionWriter, set[str]]]:
    """A writer to a temporary file beside ``output`` and the paths already done.

    On success the temporary file replaces ``output``; on any error it is removed. The caller
    holds ``output`` (:func:`coatnet_export.output.claim_file`: locked, its folder made).
    """
    handle, name = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as parquet:
            writer = PredictionWriter(parquet)
            done = _carry_over(output, sha256, writer) if resume and output.exists() else set()
            yield writer, done
            writer.flush()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
