"""``predict``: check the request, open the output, run an engine, summarise."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coatnet_export.console import Progress
from coatnet_export.errors import InputError
from coatnet_export.limits import check_threads, cores
from coatnet_export.output import check_apart, claim_file

if TYPE_CHECKING:
    from coatnet_export.predict.common import ClassifierSpec, Meter
    from coatnet_export.predict.parquet import PredictionWriter

ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """A predict request, as the command line gives it."""

    export: Path
    inputs: tuple[str, ...]
    output: Path
    engine: str = "local"
    workers: int | None = None
    threads: int = 1
    batch_size: int = 8
    top_k: int = 5
    model: str = "fp32"
    resume: bool = False
    force: bool = False
    address: str | None = None


def default_workers(engine: str, threads: int) -> int:
    """local: every core busy; ray: one core left for reading and decoding."""
    spare = 1 if engine == "ray" else 0
    return max(1, (cores() - spare) // threads)


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(
            f"this needs {module}, which is not installed "
            f"(pip install -c constraints.txt -e '.[{extra}]')"
        )


def _check(options: PredictOptions) -> None:
    from coatnet_export.predict.common import check_inputs

    if options.engine not in ENGINES:
        raise InputError(f"unknown engine {options.engine!r} (choose local or ray)")
    _require("pyarrow", "predict")
    if options.engine == "ray":
        _require("ray", "ray")
    elif options.address:
        raise InputError("--address is for --engine ray")
    check_inputs(options.inputs, allow_uris=options.engine == "ray")
    check_apart(options.output, "--output", [options.export], scanned=image_inputs(options))
    check_workers(options)


def image_inputs(options: PredictOptions) -> list[Path]:
    """The local paths predict reads images from (a glob: its fixed folder)."""
    from coatnet_export.predict.common import GLOB_CHARS, is_uri

    paths = []
    for text in options.inputs:
        if not is_uri(text):
            parts = Path(text.removeprefix("file://")).parts
            fixed = list(itertools.takewhile(lambda p: not set(p) & set(GLOB_CHARS), parts))
            paths.append(Path(*fixed) if fixed else Path("."))
    return paths


def check_workers(options: PredictOptions) -> None:
    """Workers x threads within what this machine can run (a Ray cluster checks its own)."""
    if options.address is None:
        check_threads((options.workers or 1) * options.threads, "--workers x --threads-per-worker")


def _not_done(paths: Iterator[str], done: set[str], counts: dict[str, int]) -> Iterator[str]:
    for path in paths:
        if path in done:
            counts["skipped"] += 1
        else:
            yield path


@dataclass(frozen=True)
class PredictOutcome:
    """The run's summary: how many images, how fast, where the rows went."""

    engine: str
    workers: int
    threads_per_worker: int
    images: int
    errors: int
    images_per_s: float
    wall_s: float
    """From the first image to the last row written (after Ray started)."""
    resumed: int
    """Rows copied from the previous output (--resume)."""
    total_s: float
    """The whole run, starting Ray included."""
    output: str

    def rows(self) -> list[dict]:
        return [self.as_dict()]

    def as_dict(self) -> dict:
        return asdict(self)


def run_predict(options: PredictOptions, progress: Progress) -> PredictOutcome:
    """Classify every input image into ``options.output``; the run's summary.

    The output is locked from the first check to the rename (a second run writing it fails at
    once); a folder made for it is removed again when the run fails.
    """
    from coatnet_export.predict.parquet import check_output

    _check(options)
    check = functools.partial(check_output, resume=options.resume, force=options.force)
    with claim_file(options.output, "--output", check) as output:
        return _predict(options, output, progress)


def _predict(options: PredictOptions, output: Path, progress: Progress) -> PredictOutcome:
    from coatnet_export.predict.common import Meter, iter_images, load_spec
    from coatnet_export.predict.parquet import prediction_file

    spec = load_spec(options.export, options.model, options.top_k)
    workers = options.workers or default_workers(options.engine, options.threads)
    counts = {"skipped": 0}
    started = time.perf_counter()
    with prediction_file(output, spec.sha256, options.resume) as (writer, done):
        pending = _not_done(iter_images(options.inputs), done, counts)
        meter = Meter(options.engine, workers, options.threads, progress.note)
        if options.engine == "local":
            from coatnet_export.predict.local import run_local

            run_local(spec, pending, writer, meter, options.batch_size)
        else:
            _run_on_ray(spec, list(pending), writer, meter, options)
        if meter.images + counts["skipped"] == 0:
            raise InputError("the inputs hold no image files (" + ", ".join(options.inputs) + ")")
    return PredictOutcome(
        **meter.summary(),
        resumed=counts["skipped"],
        total_s=time.perf_counter() - started,
        output=str(options.output),
    )


def _run_on_ray(
    spec: ClassifierSpec,
    paths: list[str],
    writer: PredictionWriter,
    meter: Meter,
    options: PredictOptions,
) -> None:
    """Start (or join) Ray, classify ``paths`` on it, and shut down a Ray this run started."""
    from coatnet_export.predict.ray_data import run_ray, start_ray

    if not paths:
        return
    started = start_ray(options.address, meter.workers * meter.threads + 1)
    try:
        meter.restart()
        run_ray(spec, paths, writer, meter, options.batch_size)
    finally:
        if started:
            import ray

            ray.shutdown()
