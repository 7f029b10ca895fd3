"""Option types and option groups shared by several commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coatnet_export.errors import InputError
from coatnet_export.quantize.pipeline import QuantOptions
from coatnet_export.validate import Gates


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
