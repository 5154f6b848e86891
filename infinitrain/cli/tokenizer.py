"""`infinitrain tokenizer train`: a byte-level BPE from local text files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .output import fail

tokenizer_app = typer.Typer(name="tokenizer", no_args_is_help=True,
                            help="Train tokenizers for the models.")


@tokenizer_app.command("train")
def train(
    files: Annotated[list[Path], typer.Argument(
        help="Training text: .txt files (each read whole) and .jsonl files (one document per "
             "line, in --text-field), optionally gzip-compressed.", show_default=False)],
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=259,
                                            help="Tokens in the vocabulary, specials included.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the tokenizer files to.",
                                      show_default=False)],
    text_field: Annotated[str, typer.Option(help="Field holding the text in .jsonl files.")]
        = "text",
) -> None:
    """Train a byte-level BPE with explicit BOS/EOS/PAD; transformers' AutoTokenizer loads it."""
    from ..data.tokenizer import TokenizerError, read_texts, train_tokenizer

    console = Console()
    try:
        with console.status(f"training a {vocab_size}-token BPE on {len(files)} file(s)"):
            tokenizer = train_tokenizer(files, vocab_size, out, text_field=text_field)
            sample = next(read_texts(files[:1], text_field))[:200_000]
    except (FileNotFoundError, TokenizerError) as error:
        fail(str(error))
    table = Table(title=f"Tokenizer written to {out}")
    table.add_column("property")
    table.add_column("value", justify="right")
    table.add_row("vocab size", f"{tokenizer.vocab_size:,}")
    for role in ("bos", "eos", "pad"):
        table.add_row(role.upper(), f"{getattr(tokenizer, f'{role}_token')} = "
                                    f"{getattr(tokenizer, f'{role}_id')}")
    if sample:
        chars = len(sample) / max(len(tokenizer.encode(sample)), 1)
        table.add_row("characters per token", f"{chars:.2f} (first file)")
    for file in sorted(out.iterdir()):
        table.add_row(file.name, f"{file.stat().st_size:,} bytes")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(tokenizer_app)
