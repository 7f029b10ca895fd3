"""Option types and option groups shared by several commands."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from coatnet_export.errors import InputError, os_error_message
from coatnet_export.gates import Gates
from coatnet_export.limits import threads_problem
from coatnet_export.quantize.presets import GATES, TARGET_CHOICES
from coatnet_export.quantize.recipes import RECIPES
from coatnet_export.runtimes import RUNTIMES
from coatnet_export.runtimes.openvino import PRECISIONS

if TYPE_CHECKING:
    from coatnet_export.quantize import QuantOptions


class BatchType(click.ParamType):
    """``dynamic`` or a positive integer."""

    name = "dynamic|N"

    def convert(self, value, param, ctx):
        if value is None or value == "dynamic":
            return None
        if isinstance(value, int) or (str(value).isdigit() and int(value) > 0):
            return int(value)
        self.fail(f"{value!r} is neither 'dynamic' nor a positive integer", param, ctx)


class ThreadsType(click.IntRange):
    """A positive thread (or process) count this machine can run: at most
    :func:`coatnet_export.limits.max_threads`."""

    def __init__(self) -> None:
        super().__init__(min=1)

    def convert(self, value, param, ctx):
        count = super().convert(value, param, ctx)
        problem = threads_problem(count)
        if problem is not None:
            self.fail(f"{problem}; ask for fewer", param, ctx)
        return count


THREADS = ThreadsType()


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
        if str(value).startswith("--"):  # `--img-size 288 --output x` took the next option
            name = param.opts[0] if param is not None else "the option"
            self.fail(f"{name} takes two values, H W (got {value!r} as the second)", param, ctx)
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
            values = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
        if not all(math.isfinite(v) for v in values):
            self.fail(f"{value!r} holds a value that is not a finite number", param, ctx)
        return values


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
        type=THREADS,
        default=None,
        help="Intra-op threads of the runtime (default: all cores).",
    )(func)
    return func


def runtime_options(multiple: bool = False, precision: bool = True):
    """``--runtime`` (repeatable for ``bench``) and OpenVINO's ``--precision``."""

    def decorate(func):
        if precision:
            func = click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default="f32",
                show_default=True,
                help="OpenVINO's inference precision (bf16 runs about 5e-3 off f32's logits, "
                "outside the default parity gate).",
            )(func)
        return click.option(
            "--runtime",
            "runtimes" if multiple else "runtime",
            type=click.Choice(RUNTIMES),
            multiple=multiple,
            default=("onnxruntime",) if multiple else "onnxruntime",
            show_default=True,
            help="Runtime to run the models in"
            + (" (repeat the option to compare runtimes side by side)" if multiple else "")
            + "; openvino needs pip install 'coatnet-export[openvino]'.",
        )(func)

    return decorate


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
            "--target-cpu",
            type=click.Choice(TARGET_CHOICES),
            default="auto",
            show_default=True,
            help="The CPU the int8 model will run on; decides the int8 types and "
            "reduce_range (auto: this machine's CPU).",
        ),
        click.option(
            "--activation-type",
            type=click.Choice(["uint8", "int8"]),
            help="Override the --target-cpu preset (recorded as an override).",
        ),
        click.option(
            "--weight-type",
            type=click.Choice(["uint8", "int8"]),
            help="Override the --target-cpu preset (recorded as an override).",
        ),
        click.option(
            "--reduce-range/--no-reduce-range",
            default=None,
            help="Override the --target-cpu preset (recorded as an override).",
        ),
        click.option(
            "--recipe",
            type=click.Choice(list(RECIPES)),
            default=None,
            help="The int8 layout [default: the one for --runtime: onnxruntime or openvino]; "
            "scripts/bench_quantize.py --recipes compares them on this CPU.",
        ),
        click.option(
            "--gate",
            type=click.Choice(GATES),
            default="auto",
            show_default=True,
            help="What int8 must reach against fp32: top1 (top-1 agreement), cosine (smallest "
            "cosine similarity of the logits); auto: top1 for trained weights, cosine for "
            "seeded ones.",
        ),
        click.option(
            "--min-agreement",
            type=click.FloatRange(0, 1),
            default=0.99,
            show_default=True,
            help="Gate top1: top-1 agreement of int8 with fp32.",
        ),
        click.option(
            "--min-cosine",
            type=click.FloatRange(-1, 1),
            default=0.99,
            show_default=True,
            help="Gate cosine: smallest cosine similarity of int8's logits with fp32's.",
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


def quant_options_from(kw: dict, mode: str, model: Path | None, **more) -> QuantOptions:
    """The quantize options of :func:`quantize_options`' values in ``kw``, for ``model``."""
    from coatnet_export.quantize import QuantOptions

    return QuantOptions(
        model=model,
        mode=mode,
        calibration_data=kw["calibration_data"],
        random_calibration=kw["random_calibration"],
        samples=kw["calibration_samples"],
        method=kw["calibration_method"],
        eval_data=kw["eval_data"],
        target_cpu=kw["target_cpu"],
        activation_type=kw["activation_type"],
        weight_type=kw["weight_type"],
        reduce_range=kw["reduce_range"],
        gate=kw["gate"],
        min_top1=kw["min_agreement"],
        min_cosine=kw["min_cosine"],
        max_fallback_steps=kw["max_fallback_steps"],
        threads=kw.get("threads"),
        recipe=kw["recipe"],
        dynamic_hint="--quantize dynamic" if "quantize_mode" in kw else "--mode dynamic",
        **more,
    )


def json_option(what: str = "the results"):
    """``--json FILE``: every command writes its outcome to a JSON file (``-``: stdout)."""
    return click.option(
        "--json",
        "json_path",
        type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
        help=f"Also write {what} to this JSON file ('-': print it instead of the table).",
    )


def check_json_path(
    path: Path, inputs: list[Path], outputs: list[tuple[str, Path]] | None = None
) -> None:
    """``--json``'s file, checked before the work (``-``, stdout, needs no check)."""
    if str(path) == "-":
        return
    from coatnet_export.output import check_side_file

    check_side_file(path, "--json", inputs, outputs or [])


def write_json_to(path: Path, data: dict | list) -> None:
    """``--json``'s file (``-``: stdout), written through output.py's staging."""
    from coatnet_export.errors import writing
    from coatnet_export.metadata import write_json

    if str(path) == "-":
        click.echo(json.dumps(data, indent=2))
        return
    with writing(path, "--json"):
        write_json(path, data)


def img_size_option(help: str, default: tuple[int, int] | None = None):
    """``--img-size H W``: the one spelling of the image size in every command."""
    return click.option(
        "--img-size",
        type=(SizeType(), SizeType()),
        default=default,
        show_default=default is not None,
        metavar="H W",
        help=help,
    )


def read_labels(path: Path) -> list[str]:
    """Class names from a JSON list or a UTF-8 text file with one name per line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(os_error_message(exc, path, "reading", "--labels")) from None
    if b"\x00" in data:
        raise InputError(
            f"labels file {path} is binary, not text (give a text file with one class name "
            "per line, or a JSON list of strings)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"labels file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from None
    if path.suffix == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"labels file {path} is not valid JSON ({exc.msg})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InputError(f"labels file {path} must hold a JSON list of strings")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise InputError(f"labels file {path} holds no labels (one class name per line)")
    return labels
