"""Files shared by export and import: the target directory, the tokenizer and its fit."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..data.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_tokenizer

TOKENIZER_FILES = (
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
"""Files of a Hugging Face tokenizer directory; the rest of a directory (weights, a README) is not
the tokenizer's."""


def check_new_dir(out: Path) -> None:
    """Refuse to write into anything but a new or empty directory (never mix two models)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new one")


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy the tokenizer files of ``source`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def checked_tokenizer(directory: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer in ``directory``, if every id it produces has a row in the model's
    embedding (a model may have more rows than the tokenizer has tokens, never fewer)."""
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but "
                             f"the model's vocabulary has {vocab_size}: they do not belong "
                             "together")
    return tokenizer
