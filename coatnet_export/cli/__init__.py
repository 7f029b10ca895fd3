"""The ``coatnet-export`` command line: one group, one module per command.

``coatnet-export --variant NAME ...`` runs the export (the default command). Exit codes: 0 ok,
1 a gate failed, 2 bad input (one ``error:`` line), 130 interrupted.
"""

from __future__ import annotations

import sys

import click

from coatnet_export.cli import bench, export, info, quantize, validate, variants
from coatnet_export.errors import GateFailed, InputError
from models import ConfigError

DEFAULT_COMMAND = "export"


class DefaultCommandGroup(click.Group):
    """A group that runs ``export`` when the first argument is not a sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coatnet-export")
def cli() -> None:
    """Export CoAtNet classifiers to ONNX for CPU inference, proven against onnxruntime.

    Without a sub-command, runs `export`:  coatnet-export --variant coatnet_1
    """


for module in (export, quantize, validate, info, variants, bench):
    cli.add_command(getattr(module, module.__name__.rsplit(".", 1)[-1]))


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
