"""Root Typer application; each command group lives in its own module and registers itself."""

from __future__ import annotations

import typer

from . import evaluate, export, generate, inspect, model_info, submit, tokenizer, train

app = typer.Typer(
    name="infinitrain",
    help="Train, evaluate and export long-context Infini-Transformers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

for module in (train, submit, evaluate, generate, inspect, export, model_info, tokenizer):
    module.register(app)


@app.callback()
def main() -> None:
    """Train, evaluate and export long-context Infini-Transformers."""
