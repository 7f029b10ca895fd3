"""``coatnet-export export`` (the default command): build, bake, export, check, validate."""

from __future__ import annotations

from pathlib import Path

import click

from coatnet_export.cli.options import (
    BatchType,
    FloatListType,
    SizeType,
    gate_options,
    quant_options_from,
    quantize_options,
    read_labels,
    validation_inputs_options,
)
from coatnet_export.cli.quantize import quantize_and_show
from coatnet_export.console import Progress, render_table
from coatnet_export.errors import GateFailed, InputError
from coatnet_export.export.onnx_export import ATTENTION_GRAPHS, EXPORTERS
from coatnet_export.gates import RESULT_COLUMNS, Gates
from coatnet_export.preprocess import CROP_MODES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from coatnet_export.sources import CHECKPOINT_FORMATS
from models import get_variant


@click.command()
@click.option(
    "--variant",
    help="Variant name, e.g. coatnet_0 (see `variants`); optional with "
    "a checkpoint, whose architecture is read from its keys and shapes.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="State dict: .pt/.pth (loaded with weights_only=True), .safetensors, a lucid .lcd, "
    "or a timm model folder from the Hugging Face hub (config.json + model.safetensors, or the "
    "hub cache's models--timm--NAME). Without it, seeded random weights are exported.",
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
    "--opset", type=click.IntRange(17, 23), help="ONNX opset (default: 23 dynamo, 17 torchscript)."
)
@click.option(
    "--attention",
    type=click.Choice(ATTENTION_GRAPHS),
    help="Attention in the graph: fused (one ONNX Attention node per block; dynamo, opset 23) "
    "or matmul (MatMul, Add, Softmax, MatMul) [default: fused where the opset allows it].",
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
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Seed for random weights and validation inputs (0 to 2**32-1).",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Class names: a text file with one per line, or a JSON list.",
)
@click.option(
    "--mean",
    type=FloatListType(),
    help="Normalisation mean per channel [default: a timm folder's config.json, "
    f"else {','.join(map(str, IMAGENET_MEAN))}].",
)
@click.option(
    "--std",
    type=FloatListType(),
    help="Normalisation std per channel [default: config.json's, "
    f"else {','.join(map(str, IMAGENET_STD))}].",
)
@click.option(
    "--crop-pct",
    type=click.FloatRange(0, 1, min_open=True),
    help="Centre-crop fraction used by preprocessing [default: config.json's, else 0.875].",
)
@click.option(
    "--interpolation",
    type=click.Choice(list(INTERPOLATIONS)),
    help="Resize filter [default: config.json's, else bicubic].",
)
@click.option(
    "--crop-mode",
    type=click.Choice(CROP_MODES),
    help="center: keep the aspect ratio, centre crop; squash: stretch each axis to "
    "size / crop-pct, centre crop [default: config.json's, else center].",
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
    "--in-process",
    is_flag=True,
    default=None,
    help="Run the PyTorch half in this process (debuggers, profilers) instead of a child that "
    "exits before validation; the peak memory is then about 0.5 GiB higher.",
)
@click.option(
    "--quantize",
    "quantize_mode",
    type=click.Choice(["static", "dynamic"]),
    help="Also write model.int8.onnx (see `coatnet-export quantize`).",
)
@quantize_options
def export(**kw) -> None:
    """Export a variant to ONNX with baked relative biases, check it and validate it."""
    from coatnet_export.export.pipeline import ExportOptions, run_export

    if kw["variant"] is None and kw["checkpoint"] is None:
        raise InputError(
            "give --variant NAME (see `coatnet-export variants`), or a "
            "--checkpoint to read the architecture from"
        )
    if kw["quantize_mode"]:  # refuse bad quantization options before the export's work
        from coatnet_export.quantize import check_options

        check_options(quant_options_from(kw, kw["quantize_mode"], None))
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
        attention=kw["attention"],
        batch=kw["batch"],
        mean=kw["mean"],
        std=kw["std"],
        crop_pct=kw["crop_pct"],
        interpolation=kw["interpolation"],
        crop_mode=kw["crop_mode"],
        labels=read_labels(kw["labels"]) if kw["labels"] else None,
        validate=kw["validate"],
        images=list(kw["images"]),
        samples=kw["samples"],
        gates=Gates(kw["max_rel_error"], kw["min_top1"]),
        threads=kw["threads"],
        force=kw["force"],
        report=kw["report"],
        in_process=kw["in_process"],
    )
    outcome = run_export(options, Progress(enabled=not kw["quiet"]))
    if outcome.results:
        click.echo(render_table(outcome.rows(), RESULT_COLUMNS))
    sizes = ", ".join(
        f"{name} {(outcome.directory / name).stat().st_size / 2**20:.1f} MiB"
        for name in outcome.graph.files
    )
    meta = outcome.metadata
    click.echo(
        f"\n{meta.variant} {meta.img_size[0]}x{meta.img_size[1]}, {meta.num_classes} "
        f"classes, {meta.exporter} opset {meta.opset}, {meta.attention} attention, "
        f"batch {meta.batch}"
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
        quantized = quant_options_from(kw, kw["quantize_mode"], outcome.directory)
        quantize_and_show(quantized, Progress(enabled=not kw["quiet"]))
