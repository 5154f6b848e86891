"""What every command prints the same way: user errors and YAML.

User errors are one ``Error:`` line on stderr and exit status 2. Messages quote user input and
install hints such as ``'infinitrain[wandb]'``, which rich would read as markup and swallow, so
they are escaped here, once, for every command.
"""

from __future__ import annotations

import sys
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
