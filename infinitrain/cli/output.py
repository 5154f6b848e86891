"""What every command prints the same way: user errors and YAML.

The error policy, one for every command: a user mistake is one ``Error:`` line on stderr and exit
status 2, never a traceback; a program bug keeps its traceback. :func:`reported` draws the line:
around a whole command (`pretrain`, `submit`) it turns only the project's typed errors into that
line; around the few statements that check one option's value (`eval`, `export`: ``--model``,
``--data``, ``--lengths``) it also takes ValueError and OSError, which there can only mean a bad
value. Messages quote user input and install hints such as ``'infinitrain[wandb]'``, which rich
would read as markup and swallow, so they are escaped here, once, for every command.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax


def fail(message: str) -> NoReturn:
    """Print ``message`` as the one ``Error:`` line of a user mistake and exit with status 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/] {escape(message)}",
                                               highlight=False)
    raise typer.Exit(2)


class UsageError(Exception):
    """A user mistake found by a command itself: reported as one line, exit status 2."""


OPTION_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, OSError)
"""What a bad value raises in the statements that check one option (see the module's policy)."""


@contextlib.contextmanager
def reported(option: str | None = None,
             errors: tuple[type[BaseException], ...] = OPTION_ERRORS) -> Iterator[None]:
    """Turn ``errors`` raised inside the block into one ``Error:`` line, prefixed with
    ``option`` when given."""
    try:
        yield
    except errors as error:
        fail(str(error) if option is None else f"{option} {error}")


def counted(n: int, noun: str) -> str:
    """``1 token``, ``2 tokens``: a count with its noun in the right number."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def print_yaml(text: str) -> None:
    """YAML highlighted in a terminal, verbatim otherwise: piped or redirected output must parse
    back to the same document, and rich would wrap its long lines at 80 columns."""
    if sys.stdout.isatty():
        Console().print(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))
    else:
        sys.stdout.write(text if text.endswith("\n") else f"{text}\n")
