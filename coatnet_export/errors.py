"""Errors the command line turns into a one-line message and an exit code."""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (arguments, files, directories): exit code 2."""

    exit_code = 2


class GateFailed(Exception):
    """An accuracy or parity gate failed: exit code 1."""

    exit_code = 1
