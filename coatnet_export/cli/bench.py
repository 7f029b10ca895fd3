"""``coatnet-export bench``: PyTorch eager and ONNX models timed side by side."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import (
    THREADS,
    check_json_path,
    img_size_option,
    json_option,
    runtime_options,
    write_json_to,
)
from coatnet_export.console import Progress, render_table


@click.command()
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--variant",
    help="Also time this variant in PyTorch eager (seeded weights); "
    "without MODELS, it is exported to a temporary fp32 ONNX model first.",
)
@img_size_option("Resolution for --variant [default: the models' or 224 224].")
@click.option(
    "--batch",
    "batches",
    type=click.IntRange(1),
    multiple=True,
    default=(1, 8),
    show_default=True,
    help="Batch sizes (repeat the option).",
)
@click.option(
    "--threads",
    "threads",
    type=THREADS,
    multiple=True,
    help="Thread counts (repeat the option) [default: 1 and all cores].",
)
@click.option(
    "--runs",
    type=click.IntRange(5),
    default=20,
    show_default=True,
    help="Timed runs per target and setting.",
)
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True)
@click.option(
    "--torch/--no-torch",
    "with_torch",
    default=True,
    show_default=True,
    help="Include PyTorch eager.",
)
@runtime_options(multiple=True)
@json_option("the results")
def bench(
    models,
    variant,
    img_size,
    batches,
    threads,
    runs,
    warmup,
    with_torch,
    runtimes,
    precision,
    json_path,
) -> None:
    """Time PyTorch eager, ONNX fp32 and ONNX int8 side by side (p50/p90/p99, images/s).

    MODELS are .onnx files or export directories (whose model.onnx and model.int8.onnx are
    both taken); each runs in every --runtime. Runs are interleaved across targets, after
    warm-up, each runtime as deployed (onnxruntime's worker threads spin between operators).
    """
    from coatnet_export.bench import BENCH_COLUMNS, BenchOptions, describe_peaks, run_bench
    from coatnet_export.runtimes import check_runtime

    options = BenchOptions(
        models=tuple(models),
        variant=variant,
        img_size=img_size,
        batches=tuple(batches),
        threads=tuple(threads),
        runs=runs,
        warmup=warmup,
        with_torch=with_torch,
        runtimes=tuple(dict.fromkeys(runtimes)),
        precision=precision,
    )
    for runtime in options.runtimes:
        check_runtime(runtime, precision if runtime == "openvino" else "f32")
    if json_path:
        check_json_path(json_path, list(models))  # before the benchmark, not after it
    outcome = run_bench(options, Progress())
    if json_path:
        write_json_to(json_path, outcome.as_dict())
        if str(json_path) == "-":
            return
    click.echo(render_table(outcome.rows(), BENCH_COLUMNS))
    click.echo(
        f"model: {outcome.gflop_per_image:.2f} GFLOP per image; {describe_peaks(outcome.peaks)}"
    )
    if any("int8" in row.name for row in outcome.results):
        from coatnet_export.quantize import fastest_int8

        click.echo(f"note: {fastest_int8()}")
