"""The Ray Data engine: read files -> decode and preprocess -> onnxruntime in an actor pool.

Ray fuses the decoding step into the actors. One CPU is left to reading: a local Ray gets
``workers * threads + 1`` CPUs and each actor asks for ``threads`` of them; an actor pool that
took every CPU would starve the reader and hang. The rows come back to the driver, which writes
them with the same writer as the local engine.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from coatnet_export.errors import InputError
from coatnet_export.predict.common import Classifier, ClassifierSpec, Meter, decode, is_uri
from coatnet_export.predict.parquet import SCHEMA, PredictionWriter
from coatnet_export.preprocess import Preprocessing

QUIET_LOGGERS = ("ray", "ray.data", "ray.data._internal")


def decode_batch(
    batch: dict[str, np.ndarray], preprocessing: Preprocessing, scheme: str | None
) -> dict[str, np.ndarray]:
    """Ray task: file bytes to model inputs; an unreadable image keeps zeros and its error."""
    arrays, errors = [], []
    for data in batch["bytes"]:
        array, error = decode(bytes(data), preprocessing)
        arrays.append(array)
        errors.append(error or "")
    blank = np.zeros((preprocessing.channels, *preprocessing.size), np.float32)
    paths = [str(p) for p in batch["path"]]
    if scheme:  # Ray drops the scheme of non-local paths: s3://bucket/key -> bucket/key
        paths = [p if p.startswith("/") or "://" in p else f"{scheme}://{p}" for p in paths]
    return {
        "path": np.asarray(paths, dtype=object),
        "pixels": np.stack([blank if a is None else a for a in arrays]),
        "error": np.asarray(errors, dtype=object),
    }


class RayClassifier:
    """Ray actor: one onnxruntime session; a batch of decoded images to a table of rows."""

    def __init__(self, spec: ClassifierSpec, threads: int) -> None:
        self.classifier = Classifier(spec, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) or None for e in batch["error"]]
        arrays = [None if e else pixels for pixels, e in zip(batch["pixels"], errors, strict=True)]
        rows = self.classifier.rows([str(p) for p in batch["path"]], arrays, errors)
        return pa.Table.from_pylist(rows, SCHEMA)


def uri_scheme(paths: Sequence[str]) -> str | None:
    """The one URI scheme of ``paths`` (None for local files); mixing filesystems is refused."""
    schemes = {p.split("://", 1)[0] if is_uri(p) else "" for p in paths}
    if len(schemes) > 1:
        raise InputError(
            "inputs mix filesystems (" + ", ".join(sorted(s or "local" for s in schemes)) + "); "
            "give local paths or URIs of one filesystem per run"
        )
    return schemes.pop() or None


def start_ray(address: str | None, cpus_needed: int) -> bool:
    """Connect to ``address`` or start a local Ray with ``cpus_needed`` CPUs; True if started."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot connect to the Ray cluster at {address} ({exc})") from None
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < cpus_needed:
            ray.shutdown()
            raise InputError(
                f"the Ray cluster at {address} has {cpus:g} CPUs; --workers x "
                f"--threads-per-worker plus one for reading needs {cpus_needed} "
                "(use fewer workers)"
            )
        return False
    ray.init(num_cpus=cpus_needed, include_dashboard=False, **options)
    return True


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def run_ray(
    spec: ClassifierSpec,
    paths: list[str],
    writer: PredictionWriter,
    meter: Meter,
    batch_size: int,
) -> None:
    """Classify ``paths`` on Ray Data with ``meter.workers`` actors of ``meter.threads`` threads."""
    import ray

    _quiet_ray_data()
    scheme = uri_scheme(paths)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray 2.60 warns about the keyword form
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = (
            ray.data.read_binary_files(paths, include_paths=True)
            .map_batches(
                decode_batch,  # type: ignore[arg-type]  # ray's stub omits fn_kwargs' parameters
                fn_kwargs={"preprocessing": spec.preprocessing, "scheme": scheme},
                batch_format="numpy",
                batch_size=batch_size,
            )
            .map_batches(
                RayClassifier,
                fn_constructor_args=(spec, meter.threads),
                compute=ray.data.ActorPoolStrategy(size=meter.workers),
                num_cpus=meter.threads,
                batch_size=batch_size,
                batch_format="numpy",
                # no actor restarts: Ray cannot restart an actor whose constructor arguments
                # left the object store (ray#53727); a failed run is continued with --resume
                max_restarts=0,
            )
        )
    tables: Iterable[Any] = dataset.iter_batches(batch_format="pyarrow", batch_size=None)
    for table in tables:
        writer.write_table(table)
        meter.add(table.num_rows, table.num_rows - table.column("error").null_count)
