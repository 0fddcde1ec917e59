"""How the command line fails: one ``binaryduo: error: ...`` line on stderr and a status code.

Every command module raises :class:`UsageError` for input the user can fix; ``main`` turns it
into the one line and exit status 2, before any compute is spent. Kept apart from the parser so
command modules and the parser import it without importing each other.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from binaryduo.trainer.runtime.console import stderr_line

EXIT_USAGE = 2
EXIT_CHECK_FAILED = 1


class UsageError(Exception):
    """A problem with the command line or its inputs; reported as one line, exit status 2."""


def print_problems(problems: list[str]) -> int:
    """Several problems (e.g. a recipe's), one ``binaryduo: error:`` line each; exit status 2."""
    for problem in problems:
        stderr_line(f"binaryduo: error: {problem}")
    return EXIT_USAGE


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's own errors (a missing option, a bad choice) as the CLI's one
    ``binaryduo: error: ...`` line, exit status 2 (instead of a usage block)."""

    def error(message: str):
        stderr_line(f"binaryduo: error: {parser.prog}: {message}")
        sys.exit(EXIT_USAGE)
    parser.error = error
    return parser


def parse_model_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` model options; values are read as YAML scalars (1, 0.5, true, null, text)."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:
            raise UsageError(f"--option {pair!r}: value is not a YAML scalar ({error})") from None
    return options
