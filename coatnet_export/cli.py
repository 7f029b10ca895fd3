"""The ``coatnet-export`` command line.

``coatnet-export --variant NAME ...`` runs the export (the default command); ``validate``,
``info`` and ``variants`` are sub-commands. Exit codes: 0 ok, 1 a gate failed, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from coatnet_export.checkpoint import CHECKPOINT_FORMATS
from coatnet_export.console import Progress, render_table
from coatnet_export.errors import GateFailed, InputError
from coatnet_export.metadata import write_json
from coatnet_export.onnx_export import EXPORTERS
from coatnet_export.preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing
from coatnet_export.quantize import QuantOptions
from coatnet_export.validate import RESULT_COLUMNS, Gates
from models import ConfigError, get_variant

DEFAULT_COMMAND = "export"


class DefaultCommandGroup(click.Group):
    """A group that runs ``export`` when the first argument is not a sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class BatchType(click.ParamType):
    """``dynamic`` or a positive integer."""

    name = "dynamic|N"

    def convert(self, value, param, ctx):
        if value is None or value == "dynamic":
            return None
        if isinstance(value, int) or (str(value).isdigit() and int(value) > 0):
            return int(value)
        self.fail(f"{value!r} is neither 'dynamic' nor a positive integer", param, ctx)


class SizeType(click.ParamType):
    """A positive image side; ``dynamic`` is refused with the reason."""

    name = "INTEGER"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        if str(value).lower() in ("dynamic", "none", "-1", "?"):
            self.fail(
                "height and width cannot be dynamic: each attention block's relative "
                "position bias is baked for one resolution (only the batch axis can be "
                "dynamic); export once per resolution you deploy",
                param,
                ctx,
            )
        if not str(value).isdigit() or int(value) <= 0:
            self.fail(f"{value!r} is not a positive integer", param, ctx)
        return int(value)


class FloatListType(click.ParamType):
    """Comma-separated floats, e.g. ``0.5,0.5,0.5``."""

    name = "F,F,F"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coatnet-export")
def cli() -> None:
    """Export CoAtNet classifiers to ONNX for CPU inference, proven against onnxruntime.

    Without a sub-command, runs `export`:  coatnet-export --variant coatnet_1
    """


def gate_options(func):
    func = click.option(
        "--max-rel-error",
        type=float,
        default=Gates.max_rel_error,
        show_default=True,
        help="Largest |onnx - torch| allowed, relative to max |logit|.",
    )(func)
    func = click.option(
        "--min-top1",
        type=float,
        default=Gates.min_top1,
        show_default=True,
        help="Smallest top-1 agreement allowed (1.0 = every sample).",
    )(func)
    return func


def validation_inputs_options(func):
    func = click.option(
        "--images",
        type=click.Path(path_type=Path),
        multiple=True,
        help="Image files or folders to validate on, besides random inputs.",
    )(func)
    func = click.option(
        "--samples",
        type=click.IntRange(0),
        default=3,
        show_default=True,
        help="Random single-image inputs to validate on.",
    )(func)
    func = click.option(
        "--report",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Also write the validation report to this JSON file.",
    )(func)
    func = click.option(
        "--threads",
        type=click.IntRange(1),
        default=None,
        help="onnxruntime intra-op threads (default: all cores).",
    )(func)
    return func


def quantize_options(func):
    """Options shared by `quantize` and `export --quantize`."""
    options = [
        click.option(
            "--calibration-data",
            type=click.Path(path_type=Path),
            help="Folder of calibration images (preprocessed as inference does).",
        ),
        click.option(
            "--random-calibration",
            is_flag=True,
            help="Calibrate on random inputs when no images exist (costs accuracy).",
        ),
        click.option(
            "--calibration-samples",
            type=click.IntRange(1),
            default=64,
            show_default=True,
            help="Calibration images to use.",
        ),
        click.option(
            "--calibration-method",
            type=click.Choice(["minmax", "entropy", "percentile"]),
            default="minmax",
            show_default=True,
        ),
        click.option(
            "--eval-data",
            type=click.Path(path_type=Path),
            help="Held-out images for the accuracy report (class sub-folders named "
            "like the labels give accuracy) [default: the calibration folder's "
            "unused images].",
        ),
        click.option(
            "--activation-type",
            type=click.Choice(["uint8", "int8"]),
            help="Override the CPU-based choice.",
        ),
        click.option(
            "--weight-type",
            type=click.Choice(["uint8", "int8"]),
            help="Override the CPU-based choice.",
        ),
        click.option(
            "--reduce-range/--no-reduce-range", default=None, help="Override the CPU-based choice."
        ),
        click.option(
            "--min-agreement",
            type=click.FloatRange(0, 1),
            default=0.99,
            show_default=True,
            help="Gate: top-1 agreement of int8 with fp32.",
        ),
        click.option(
            "--max-fallback-steps",
            type=click.IntRange(0),
            default=4,
            show_default=True,
            help="Steps that return the lowest-SQNR tensors to float on a failed gate.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def quant_options_from(kw: dict, mode: str) -> QuantOptions:
    return QuantOptions(
        mode=mode,
        calibration_data=kw["calibration_data"],
        random_calibration=kw["random_calibration"],
        samples=kw["calibration_samples"],
        method=kw["calibration_method"],
        eval_data=kw["eval_data"],
        activation_type=kw["activation_type"],
        weight_type=kw["weight_type"],
        reduce_range=kw["reduce_range"],
        min_top1=kw["min_agreement"],
        max_fallback_steps=kw["max_fallback_steps"],
        threads=kw.get("threads"),
    )


def run_and_show_quantize(
    target: Path, options: QuantOptions, preprocessing: Preprocessing | None = None
) -> None:
    from coatnet_export.quantize import run_quantize

    output, report = run_quantize(
        target, options, lambda text: click.echo(f"  {text}", err=True), preprocessing
    )
    agreement = report.agreement
    rows = [
        {"metric": "top-1 agreement", "value": agreement.top1},
        {"metric": "top-5 agreement", "value": agreement.top5},
        {"metric": "min cosine", "value": agreement.min_cosine},
        {"metric": "max abs error", "value": agreement.max_abs},
        {"metric": "fp32 accuracy", "value": agreement.fp32_accuracy},
        {"metric": "int8 accuracy", "value": agreement.int8_accuracy},
        {
            "metric": "fp32 / int8 size (MiB)",
            "value": f"{report.sizes['fp32'] / 2**20:.1f} / {report.sizes['int8'] / 2**20:.1f} "
            f"({100 * report.sizes['int8'] / report.sizes['fp32']:.0f} %)",
        },
        {
            "metric": "fp32 / int8 p50 latency (ms)",
            "value": f"{report.latency_ms['fp32']:.2f} / {report.latency_ms['int8']:.2f} "
            f"(x{report.speedup:.2f})",
        },
        {"metric": "nodes kept in float", "value": len(report.excluded_nodes)},
        {"metric": "fallback steps", "value": len(report.fallback_steps)},
    ]
    click.echo(render_table([r for r in rows if r["value"] is not None], ("metric", "value")))
    if report.lowest_sqnr:
        click.echo("\nlowest SQNR tensors (dB):")
        click.echo(render_table(report.lowest_sqnr, ("tensor", "sqnr_db")))
    for note in report.notes:
        click.echo(f"note: {note}")
    if not report.passed:
        raise GateFailed(
            f"int8 top-1 agreement {agreement.top1:.4f} is below the gate "
            f"{options.min_top1}; {output} is written for inspection but should not "
            "be deployed"
        )
    click.echo(f"int8 model -> {output}")


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True
)
@quantize_options
@click.option(
    "--size",
    type=(int, int),
    default=None,
    metavar="H W",
    help="Preprocessing size, for a model without coatnet-export metadata.",
)
@click.option("--mean", type=FloatListType(), default=None, help="With --size.")
@click.option("--std", type=FloatListType(), default=None, help="With --size.")
@click.option("--threads", type=click.IntRange(1), default=None)
def quantize(target: Path, mode: str, size, mean, std, **kw) -> None:
    """Quantize an existing export (directory or model.onnx) to model.int8.onnx."""
    preprocessing = None
    if size is not None:
        preprocessing = Preprocessing(size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    run_and_show_quantize(target, quant_options_from(kw, mode), preprocessing)


@cli.command()
@click.option(
    "--variant",
    help="Variant name, e.g. coatnet_0 (see `variants`); optional with "
    "a checkpoint, whose architecture is read from its keys and shapes.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="State dict: .pt/.pth (loaded with weights_only=True), .safetensors, or a "
    "lucid .lcd. Without it, seeded random weights are exported.",
)
@click.option(
    "--checkpoint-format",
    type=click.Choice(CHECKPOINT_FORMATS),
    default="auto",
    show_default=True,
    help="Which framework wrote the checkpoint (auto detects lucid).",
)
@click.option(
    "--reference-outputs",
    type=click.Path(path_type=Path, dir_okay=False),
    help="An .npz with inputs x and outputs y recorded in the training framework "
    "(e.g. lucid); the ONNX model must match them (rel. error <= 1e-5).",
)
@click.option(
    "--img-size",
    type=(SizeType(), SizeType()),
    default=None,
    metavar="H W",
    help="Input resolution; fixes the relative biases [default: the checkpoint's, "
    "or 224 224]. Only the batch axis can be dynamic.",
)
@click.option(
    "--num-classes", type=click.IntRange(1), help="Classes (default: checkpoint or 1000)."
)
@click.option(
    "--in-channels", type=click.IntRange(1), help="Input channels (default: checkpoint or 3)."
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    help="Output directory (default: ./<variant>/).",
)
@click.option("--exporter", type=click.Choice(EXPORTERS), default="dynamo", show_default=True)
@click.option(
    "--opset", type=click.IntRange(17, 23), help="ONNX opset (default: 20 dynamo, 17 torchscript)."
)
@click.option(
    "--batch",
    type=BatchType(),
    default="dynamic",
    show_default=True,
    help="Batch axis: dynamic, or a fixed size.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for random weights and validation inputs.",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Class names: a text file with one per line, or a JSON list.",
)
@click.option(
    "--mean",
    type=FloatListType(),
    default=",".join(map(str, IMAGENET_MEAN)),
    show_default=True,
    help="Normalisation mean per channel.",
)
@click.option(
    "--std",
    type=FloatListType(),
    default=",".join(map(str, IMAGENET_STD)),
    show_default=True,
    help="Normalisation std per channel.",
)
@click.option(
    "--crop-pct",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.875,
    show_default=True,
    help="Centre-crop fraction used by preprocessing.",
)
@click.option(
    "--interpolation", type=click.Choice(list(INTERPOLATIONS)), default="bicubic", show_default=True
)
@click.option(
    "--validate/--no-validate",
    default=True,
    show_default=True,
    help="Prove parity against onnxruntime before publishing the model.",
)
@validation_inputs_options
@gate_options
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option(
    "--quantize",
    "quantize_mode",
    type=click.Choice(["static", "dynamic"]),
    help="Also write model.int8.onnx (see `coatnet-export quantize`).",
)
@quantize_options
def export(**kw) -> None:
    """Export a variant to ONNX with baked relative biases, check it and validate it."""
    from coatnet_export.pipeline import ExportOptions, run_export

    if kw["variant"] is None and kw["checkpoint"] is None:
        raise InputError(
            "give --variant NAME (see `coatnet-export variants`), or a "
            "--checkpoint to read the architecture from"
        )
    options = ExportOptions(
        architecture=get_variant(kw["variant"]) if kw["variant"] else None,
        output=kw["output"] or (Path(kw["variant"]) if kw["variant"] else None),
        img_size=kw["img_size"],
        in_channels=kw["in_channels"],
        num_classes=kw["num_classes"],
        checkpoint=kw["checkpoint"],
        checkpoint_format=kw["checkpoint_format"],
        reference_outputs=kw["reference_outputs"],
        seed=kw["seed"],
        exporter=kw["exporter"],
        opset=kw["opset"],
        batch=kw["batch"],
        mean=kw["mean"],
        std=kw["std"],
        crop_pct=kw["crop_pct"],
        interpolation=kw["interpolation"],
        labels=read_labels(kw["labels"]) if kw["labels"] else None,
        validate=kw["validate"],
        images=list(kw["images"]),
        samples=kw["samples"],
        gates=Gates(kw["max_rel_error"], kw["min_top1"]),
        threads=kw["threads"],
        force=kw["force"],
    )
    outcome = run_export(
        options, Progress(total=6 if options.validate else 4, enabled=not kw["quiet"])
    )
    if outcome.results:
        click.echo(render_table([r.as_dict() for r in outcome.results], RESULT_COLUMNS))
    if kw["report"]:
        write_json(kw["report"], outcome.validation_report())
    sizes = ", ".join(
        f"{name} {(outcome.directory / name).stat().st_size / 2**20:.1f} MiB"
        for name in outcome.graph.files
    )
    meta = outcome.metadata
    click.echo(
        f"\n{meta.variant} {meta.img_size[0]}x{meta.img_size[1]}, {meta.num_classes} "
        f"classes, {meta.exporter} opset {meta.opset}, batch {meta.batch}"
    )
    click.echo(
        f"graph: {outcome.graph.nodes} nodes, {outcome.graph.table_lookups} table lookups, "
        f"output {outcome.graph.output_shape}; baked biases "
        f"{outcome.baked_bias_bytes / 2**20:.1f} MiB"
    )
    click.echo(f"files: {sizes}")
    for warning in outcome.warnings:
        click.echo(f"warning: {warning}")
    if not outcome.passed:
        raise GateFailed(
            f"validation failed; the model was NOT published to {options.output}. "
            f"It is kept for inspection in {outcome.directory}"
        )
    status = "validated" if outcome.results else "exported without validation"
    click.echo(f"{status} in {outcome.timings['total_s']:.1f} s -> {outcome.directory}")
    if kw["quantize_mode"]:
        click.echo(f"\nquantizing ({kw['quantize_mode']}):")
        run_and_show_quantize(outcome.directory, quant_options_from(kw, kw["quantize_mode"]))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="The checkpoint the model was exported from (default: the seeded weights "
    "recorded in the model).",
)
@validation_inputs_options
@gate_options
def validate(
    model: Path, checkpoint: Path | None, images, samples, report, threads, max_rel_error, min_top1
) -> None:
    """Validate an existing export (directory or .onnx file) against PyTorch."""
    from coatnet_export.revalidate import revalidate

    gates = Gates(max_rel_error, min_top1)
    result = revalidate(model, checkpoint, list(images), samples, gates, threads, Progress(3))
    click.echo(render_table([r.as_dict() for r in result.results], RESULT_COLUMNS))
    for warning in result.warnings:
        click.echo(f"warning: {warning}")
    if report:
        write_json(report, result.report())
    if not result.passed:
        raise GateFailed(f"{result.model_path} does not match its PyTorch reference")
    click.echo(f"{result.model_path} matches its PyTorch reference")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model: Path, as_json: bool) -> None:
    """Show what an export holds: metadata, inputs, outputs, size."""
    from coatnet_export.inspect import describe

    description = describe(model)
    if as_json:
        click.echo(json.dumps(description, indent=2))
        return
    rows = [
        {"field": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
        for k, v in description.items()
    ]
    click.echo(render_table(rows, ("field", "value")))


@cli.command()
@click.option("--img-size", type=(int, int), default=(224, 224), show_default=True, metavar="H W")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def variants(img_size: tuple[int, int], as_json: bool) -> None:
    """List the variants with parameters and multiply-accumulates (computed, no weights)."""
    from models import build_variant, count_macs, count_parameters, get_variant, variant_names

    rows = []
    for name in variant_names():
        model = build_variant(name, img_size=img_size, device="meta")
        spec = get_variant(name)
        rows.append(
            {
                "variant": name,
                "parameters": count_parameters(model),
                "gmacs": round(count_macs(model) / 1e9, 2),
                "heads": spec.num_heads,
                "blocks": "-".join(map(str, spec.num_blocks))
                if spec.tandem is None
                else f"{spec.num_blocks[0]}-{spec.num_blocks[1]}-{spec.num_blocks[2]}-"
                f"({spec.tandem.num_blocks[0]}C+{spec.tandem.num_blocks[1]}T)-"
                f"{spec.num_blocks[4]}",
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["parameters"] = f"{row['parameters']:,}"
    click.echo(
        render_table(
            rows,
            ("variant", "parameters", "gmacs", "heads", "blocks"),
            (
                "variant",
                "parameters",
                f"GMACs@{img_size[0]}x{img_size[1]}",
                "heads",
                "blocks S0-S4",
            ),
        )
    )


@cli.command()
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--variant",
    help="Also time this variant in PyTorch eager (seeded weights); "
    "without MODELS, it is exported to a temporary fp32 ONNX model first.",
)
@click.option(
    "--img-size",
    type=(int, int),
    default=None,
    metavar="H W",
    help="Resolution for --variant [default: the models' or 224 224].",
)
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
    type=click.IntRange(1),
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
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the results to this JSON file.",
)
def bench(models, variant, img_size, batches, threads, runs, warmup, with_torch, json_path) -> None:
    """Time PyTorch eager, ONNX fp32 and ONNX int8 side by side (p50/p90/p99, images/s).

    MODELS are .onnx files or export directories (whose model.onnx and model.int8.onnx are
    both taken). Runs are interleaved across targets, after warm-up, with onnxruntime's
    spinning threads disabled so one runtime cannot slow the next.
    """
    import os
    import tempfile

    from coatnet_export.bench import benchmark, plan_bench

    thread_counts = list(threads) or sorted({1, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as workdir:
        plan = plan_bench(
            list(models),
            variant,
            img_size,
            with_torch,
            Path(workdir),
            lambda text: click.echo(text, err=True),
        )
        rows, peaks = benchmark(
            plan.targets,
            plan.input_shape,
            list(batches),
            thread_counts,
            runs,
            warmup,
            plan.macs_per_image,
            lambda text: click.echo(f"  {text}", err=True),
        )
    table = [r.as_dict() for r in rows]
    for row in table:
        row["pct_of_peak"] = 100 * row["gflops_per_s"] / peaks[row["threads"]]
    click.echo(
        render_table(
            table,
            (
                "name",
                "threads",
                "batch",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "images_per_s",
                "gflops_per_s",
                "pct_of_peak",
            ),
        )
    )
    click.echo(
        f"model: {plan.macs_per_image * 2 / 1e9:.2f} GFLOP per image; 2048^2 fp32 matmul: "
        + ", ".join(f"{peaks[t]:.0f} GFLOP/s at {t} thread(s)" for t in thread_counts)
    )
    if json_path:
        write_json(
            json_path,
            {
                "targets": plan.labels,
                "results": table,
                "matmul_gflops": {str(k): v for k, v in peaks.items()},
                "gflop_per_image": plan.macs_per_image * 2 / 1e9,
            },
        )


def read_labels(path: Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read labels file {path} ({exc.strerror or exc})") from None
    if path.suffix == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"labels file {path} is not valid JSON ({exc.msg})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InputError(f"labels file {path} must hold a JSON list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit codes 0 / 1 (gate failed) / 2 (bad input)."""
    try:
        cli.main(args=argv, prog_name="coatnet-export", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except (InputError, GateFailed) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(0)
