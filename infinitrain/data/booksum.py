"""BookSum: a book (or chapter) read into memory without loss, then its summary supervised.

Two hub layouts are known: ``kmfoda/booksum`` (chapter level: ``chapter``, ``summary_text``) and
``ubaada/booksum-complete-cleaned`` (``books``/``chapters`` configs: ``text``, and ``summary`` a
list of ``{source, text, analysis}`` from several summary sites). Local files in either layout
work the same way. Books longer than the input budget are truncated and counted in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .documents import Document
from .sources import (
    DatasetSource,
    DataSourceError,
    Row,
    Skipped,
    SourceConfig,
    check_columns,
    column_value,
    load_rows,
)

if TYPE_CHECKING:
    from .sources import Rows
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

LAYOUTS = {"kmfoda/booksum": ("chapter", "summary_text"),
           "ubaada/booksum-complete-cleaned": ("text", "summary")}
"""(book column, summary column) of the known BookSum datasets."""
TITLE_COLUMNS = ("title", "book_id")
"""Where a row names its book: ubaada's ``title``, kmfoda's ``book_id`` ("Emma.chapter 1")."""
SUMMARY_PROMPT = "\n\nSummarize the text above.\nSummary:\n"
"""Separator between the book and its summary; generation starts right after it."""


@dataclass(frozen=True)
class BookSumExample:
    """A book-summary pair, ready for fine-tuning (`to_document`) or for generation."""

    prompt_ids: Tensor
    """[P] int64: BOS, the (possibly truncated) book, SUMMARY_PROMPT."""
    summary_ids: list[int]
    """Tokens of the first reference summary, the fine-tuning target."""
    references: list[str]
    """Every reference summary of this book (ROUGE against several is fairer)."""
    book_tokens: int
    """Book length in tokens before truncation."""
    dropped_tokens: int
    """Book tokens removed to fit max_input_tokens (0: the whole book is in the prompt)."""
    title: str = ""
    """The book's (or chapter's) name where the row gives one, for tables and reports."""

    def to_document(self, eos_id: int) -> Document:
        """The prompt read unsupervised, then the summary and EOS supervised."""
        return Document.from_parts([(self.prompt_ids, False),
                                    ([*self.summary_ids, eos_id], True)])


def summaries(value: Any) -> list[str]:
    """Reference summaries of a cell: a string, or ubaada's list of ``{source, text, ...}``."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, dict):
        return summaries(value.get("text"))
    if isinstance(value, list):
        return [s for item in value for s in summaries(item)]
    return []


def booksum_fields(config: SourceConfig, columns: list[str] | None) -> tuple[str, str]:
    """(book column, summary column): as configured, else the known layout the dataset's name or
    columns match (so local files in either hub format need no settings), else ubaada's."""
    layouts = list(LAYOUTS.values())
    layout = LAYOUTS.get(config.name or "") or next(
        (pair for pair in layouts if columns and set(pair) <= set(columns)), layouts[-1])
    return config.text_field or layout[0], config.summary_field or layout[1]


class BookSumBuilder:
    """Builds examples under one input budget and reports every truncation it makes."""

    def __init__(self, tokenizer: Tokenizer, max_input_tokens: int | None = None,
                 truncate: str = "start", min_tokens: int = 0, label: str = "booksum") -> None:
        self.tokenizer = tokenizer
        self.truncate = truncate
        self.min_tokens = min_tokens
        self.label = label
        self.prompt = tokenizer.encode(SUMMARY_PROMPT)
        self.budget = None if max_input_tokens is None else max_input_tokens - 1 - len(self.prompt)
        if self.budget is not None and self.budget <= 0:
            raise DataSourceError(f"max_input_tokens = {max_input_tokens}: leaves no room for the "
                                  f"book after BOS and the summary request ({len(self.prompt)} "
                                  "tokens)")
        self.books = self.truncated = self.dropped = 0

    def _fit(self, book: list[int]) -> list[int]:
        if self.budget is None or len(book) <= self.budget:
            return book
        if self.truncate == "start":
            return book[len(book) - self.budget:]
        head = (self.budget + 1) // 2
        return book[:head] + book[len(book) - (self.budget - head):]

    def example(self, book: str, references: list[str],
                title: str = "") -> BookSumExample | Skipped:
        """The example for one book, or why there is none (no summary, book below min_tokens)."""
        if not references:
            return Skipped("a row has no summary")
        book_ids = self.tokenizer.encode(book)
        if len(book_ids) < max(self.min_tokens, 1):
            return Skipped(f"a book has {len(book_ids)} tokens, fewer than "
                           f"min_tokens = {self.min_tokens}")
        kept = self._fit(book_ids)
        dropped = len(book_ids) - len(kept)
        self.books += 1
        if dropped:
            self.truncated += 1
            self.dropped += dropped
            if self.truncated & (self.truncated - 1) == 0:  # 1st, 2nd, 4th, 8th, ... truncation
                log.warning("%s: truncated %d of %d books so far to max_input_tokens (dropping "
                            "their %s; %d book tokens dropped in all, %d from the last book)",
                            self.label, self.truncated, self.books, self.truncate, self.dropped,
                            dropped)
        prompt = torch.tensor([self.tokenizer.bos_id, *kept, *self.prompt], dtype=torch.long)
        return BookSumExample(prompt, self.tokenizer.encode(references[0]), references,
                              len(book_ids), dropped, title)


def _examples(config: SourceConfig,
              tokenizer: Tokenizer) -> tuple[Rows, Callable[[Row], BookSumExample | Skipped]]:
    """The source's rows and the function turning one row into an example."""
    rows = load_rows(config)
    book_field, summary_field = booksum_fields(config, rows.column_names)
    title_field = next((name for name in TITLE_COLUMNS if name in (rows.column_names or [])),
                       None)
    rows = check_columns(rows, [book_field, summary_field, *filter(None, [title_field])],
                         config.label)
    builder = BookSumBuilder(tokenizer, config.max_input_tokens, config.truncate,
                             config.min_tokens, config.label)

    def convert(row: Row) -> BookSumExample | Skipped:
        references = summaries(column_value(row, summary_field, config.label))
        title = "" if title_field is None else str(row.get(title_field) or "")
        return builder.example(column_value(row, book_field, config.label) or "", references,
                               title)
    return rows, convert


def booksum_source(config: SourceConfig, tokenizer: Tokenizer) -> DatasetSource:
    """A BookSum training source: each row becomes one book-then-summary document."""
    rows, convert = _examples(config, tokenizer)

    def to_document(row: Row) -> Document | Skipped:
        example = convert(row)
        return example if isinstance(example, Skipped) else example.to_document(tokenizer.eos_id)
    return DatasetSource(config.label, config.weight, rows, to_document)


def load_booksum(config: SourceConfig, tokenizer: Tokenizer) -> Iterator[BookSumExample]:
    """Every usable example of a BookSum source, in stored order (for evaluation)."""
    rows, convert = _examples(config, tokenizer)
    for row in rows:
        example = convert(row)
        if isinstance(example, BookSumExample):
            yield example
