"""The local engine: worker processes, each with one onnxruntime session, fed batches of paths.

At most two batches per worker are in flight, and rows are written in the order the batches
were submitted, so memory stays bounded whatever the number of images and the output order is
the input order.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from coatnet_export.predict.common import Classifier, ClassifierSpec, Meter, decode, read_file
from coatnet_export.predict.parquet import PredictionWriter

_classifier: Classifier | None = None
"""The worker process's session (set by :func:`_start_worker`)."""


def _start_worker(spec: ClassifierSpec, threads: int) -> None:
    global _classifier
    _classifier = Classifier(spec, threads)


def _classify(paths: list[str]) -> list[dict]:
    """Rows for a batch of local paths (runs in a worker)."""
    assert _classifier is not None, "worker not initialised"
    arrays, errors = [], []
    for path in paths:
        data, error = read_file(path)
        if data is not None:
            array, error = decode(data, _classifier.spec.preprocessing)
        else:
            array = None
        arrays.append(array)
        errors.append(error)
    return _classifier.rows(paths, arrays, errors)


def batches(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for path in paths:
        batch.append(path)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Keep spawned workers from re-running the parent's main script.

    A spawned process re-executes ``__main__``'s file before it unpickles its task; for the
    ``coatnet-export`` console script that imports the whole command line, torch included, in
    every worker. The workers need only this module, so the file is hidden while they start.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _write(future: Future, writer: PredictionWriter, meter: Meter) -> None:
    rows = future.result()
    writer.write_rows(rows)
    meter.add(len(rows), sum(row["error"] is not None for row in rows))


def run_local(
    spec: ClassifierSpec,
    paths: Iterable[str],
    writer: PredictionWriter,
    meter: Meter,
    batch_size: int,
) -> None:
    """Classify ``paths`` in ``meter.workers`` processes of ``meter.threads`` threads each."""
    pool = ProcessPoolExecutor(
        meter.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(spec, meter.threads),
    )
    in_flight: deque[Future] = deque()
    with _main_script_hidden():
        try:
            for batch in batches(paths, batch_size):
                in_flight.append(pool.submit(_classify, batch))
                if len(in_flight) >= 2 * meter.workers:
                    _write(in_flight.popleft(), writer, meter)
            while in_flight:
                _write(in_flight.popleft(), writer, meter)
        finally:
            pool.shutdown(wait=not in_flight, cancel_futures=True)
