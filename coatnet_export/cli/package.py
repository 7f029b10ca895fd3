"""``coatnet-export package DIR --target NAME``: turn an export into a deployment artefact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from coatnet_export.cli.options import THREADS, check_json_path, write_json_to
from coatnet_export.console import render_table
from coatnet_export.errors import InputError
from coatnet_export.targets import TARGETS, PackageOptions, PackageOutcome, run_package

TARGET_OPTIONS: dict[str, str] = {}
"""Each target-specific option's parameter name -> the target that reads it."""


def target_option(target: str, *decls: str, **attrs: Any):
    """A click option read by one target only; its help says which."""

    def decorate(func):
        option = click.option(*decls, **{**attrs, "help": f"[{target}] {attrs.get('help', '')}"})
        func = option(func)
        TARGET_OPTIONS[func.__click_params__[-1].name] = target
        return func

    return decorate


@click.command()
@click.argument("export_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--target",
    "target_name",
    required=True,
    metavar="NAME",
    help=f"What to build: {', '.join(TARGETS)}.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="The new folder of a target that makes one (web, triton); e2e and ort write into DIR.",
)
@click.option("--force", is_flag=True, help="Replace what is already there.")
@click.option(
    "--json",
    "json_file",
    type=click.Path(path_type=Path, allow_dash=True),
    default=None,
    help="Also write what was built (files, table, notes) to this JSON file ('-': print it "
    "instead of the table).",
)
@click.option("--threads", type=THREADS, default=None, help="onnxruntime threads.")
@target_option(
    "e2e",
    "--check-images",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Images or folders to measure the e2e agreement on (default: generated images).",
)
@target_option(
    "ort",
    "--ort-models",
    type=click.Choice(["fp32", "int8", "e2e", "e2e-int8"]),
    multiple=True,
    help="Which models to convert (repeatable; default: every one DIR holds).",
)
@target_option(
    "ort",
    "--ort-style",
    type=click.Choice(["fixed", "runtime"]),
    default="fixed",
    show_default=True,
    help="fixed: optimised for the CPU EP; runtime: for NNAPI / CoreML, optimisations saved "
    "to replay at run time.",
)
@target_option(
    "ort",
    "--ort-platform",
    type=click.Choice(["arm", "amd64"]),
    default="arm",
    show_default=True,
    help="The CPU the .ort files are optimised for (arm: phones, Raspberry Pi, Jetson).",
)
@target_option(
    "web",
    "--web-model",
    type=click.Choice(["auto", "int8", "fp32"]),
    default="auto",
    show_default=True,
    help="The model the page opens with (auto: int8 when the export has one); both are copied.",
)
@target_option(
    "web",
    "--ort-web-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="An npm install of onnxruntime-web to copy the runtime from [default: "
    "$COATNET_ORT_WEB_DIR, tests/browser, the current folder].",
)
@target_option(
    "web",
    "--ort-web-cdn",
    metavar="URL",
    default=None,
    help="Load onnxruntime-web from this URL instead of copying it into the site.",
)
@target_option(
    "triton", "--name", help="The model's name in the repository [default: the variant]."
)
@target_option(
    "triton", "--int8", is_flag=True, help="Serve model.int8.onnx instead of model.onnx."
)
@target_option(
    "triton",
    "--instances",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="CPU model instances (instance_group count).",
)
@target_option(
    "triton",
    "--max-batch-size",
    type=click.IntRange(1),
    default=None,
    help="Largest batch Triton forms (dynamic-batch exports) [default: 8].",
)
@target_option(
    "triton", "--openvino", is_flag=True, help="Ask for the OpenVINO CPU execution accelerator."
)
@click.pass_context
def package(
    ctx: click.Context,
    export_dir: Path,
    target_name: str,
    output: Path | None,
    force: bool,
    json_file: Path | None,
    **options: Any,
) -> None:
    """Build a deployment artefact from the export in DIR.

    \b
    Targets:
      e2e     model.e2e.onnx / model.e2e.int8.onnx: uint8 RGB image in, preprocessing inside
      ort     DIR/ort/*.ort for onnxruntime mobile + the reduced-build operator config
      web     a static site that classifies in the browser (onnxruntime-web), to --output
      triton  a Triton Inference Server model repository, to --output
    """
    foreign = [
        f"--{name.replace('_', '-')} ({owner})"
        for name, owner in TARGET_OPTIONS.items()
        if target_name in TARGETS  # an unknown target: run_package says so
        and owner != target_name
        and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    ]
    if foreign:
        raise InputError(
            f"{', '.join(foreign)}: option(s) for other targets (drop them for --target "
            f"{target_name})"
        )
    own = {k: v for k, v in options.items() if TARGET_OPTIONS.get(k, target_name) == target_name}
    if json_file is not None:  # before the target publishes anything
        outputs = [("--output", output)] if output is not None else []
        check_json_path(json_file, [export_dir, *package_inputs(own)], outputs)
    request = PackageOptions(
        target=target_name, export_dir=export_dir, output=output, force=force, options=own
    )
    show(run_package(request), json_file)


def package_inputs(options: dict[str, Any]) -> list[Path]:
    """The paths a target reads besides DIR (images, an onnxruntime-web install)."""
    return [*options.get("check_images", ()), *filter(None, [options.get("ort_web_dir")])]


def show(outcome: PackageOutcome, json_file: Path | None) -> None:
    """Print the outcome's table, files and notes; write them as JSON when asked."""
    if json_file is not None:
        write_json_to(json_file, outcome.as_dict())
        if str(json_file) == "-":
            return
    rows = outcome.rows()
    if rows:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        click.echo(render_table(rows, columns))
    for path in outcome.files:
        click.echo(f"wrote {path}")
    for note in outcome.notes:
        click.echo(f"note: {note}")
