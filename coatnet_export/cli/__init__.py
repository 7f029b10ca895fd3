"""The ``coatnet-export`` command line: one group, one module per command.

``coatnet-export --variant NAME ...`` runs the export (the default command). Exit codes: 0 ok,
1 a gate failed, 2 bad input or environment (one ``error:`` line), 3 internal error (a bug),
130 interrupted (SIGINT), 143 terminated (SIGTERM); see :mod:`coatnet_export.errors`.
"""

from __future__ import annotations

import difflib
import importlib
import os
import signal
import sys
import traceback

import click

from coatnet_export.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    explain,
    handle_signals,
    release_interrupted,
)
from models import ConfigError

DEFAULT_COMMAND = "export"
COMMANDS = ("export", "quantize", "validate", "info", "variants", "bench", "predict", "package")
"""Each command is the function of that name in ``coatnet_export.cli.<name>``, imported only
when it runs (or --help lists it): `variants` never loads torch or onnxruntime."""
DEBUG_ENV = "COATNET_EXPORT_DEBUG"
"""Set to 1 to see the traceback of an internal error."""


class UnknownCommand(click.UsageError):
    """A first argument that is neither a command nor an option."""


class Unwound(Exception):
    """Carries an interruption (its ``__cause__``) past click, which would print a blank line
    for it (closing a terminal's ``^C``; :func:`_run` does that for SIGINT on a terminal)."""


class DefaultCommandGroup(click.Group):
    """A group that runs ``export`` when the first argument is an option (``--variant ...``),
    and imports a command's module only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return getattr(importlib.import_module(f"coatnet_export.cli.{name}"), name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Unwound() from exc

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UnknownCommand(
                f"no such command '{name}' ({hint}commands: {', '.join(sorted(COMMANDS))})",
                ctx,
            )
        return super().resolve_command(ctx, args)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coatnet-export")
def cli() -> None:
    """Export CoAtNet classifiers to ONNX for CPU inference, proven against onnxruntime.

    Without a sub-command, runs `export`:  coatnet-export --variant coatnet_1
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line and an exit code for every failure (see the module docstring)."""
    # torch's OpenMP threads otherwise busy-wait after each call, which starves onnxruntime
    # (and everything else) running next to them on a small machine; torch loads later
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with handle_signals():
        code = _run(argv)
    sys.exit(code)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="coatnet-export", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return EXIT_OK
    except click.ClickException as exc:
        click.echo(f"error: {_usage_message(exc)}", err=True)
        return EXIT_INPUT
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_INPUT
    except BrokenPipeError:  # e.g. `coatnet-export info x | head -1`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except SystemExit:
        raise
    except BaseException as exc:  # the boundary: every failure becomes one line
        message, code = explain(exc)
        if code == EXIT_INTERNAL and os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        if message == "aborted":
            release_interrupted(exc)
            if code == 128 + signal.SIGINT and sys.stderr.isatty():
                click.echo(err=True)  # end the line the terminal's ^C is on
        click.echo(message, err=True)
        return code
    return EXIT_OK


def _usage_message(exc: click.ClickException) -> str:
    message = exc.format_message().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and not isinstance(exc, UnknownCommand) and ctx:
        message += f" (see '{ctx.command_path} --help')"
    return message
