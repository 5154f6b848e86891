"""Root Typer application; each command group lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="infinitrain",
    help="Train, evaluate and export long-context Infini-Transformers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
