"""BookSum: the book is read unsupervised, only the summary is learned; truncation is reported."""

from __future__ import annotations

import csv
import itertools
import logging

import pytest

from infinitrain.data import (
    IGNORE_INDEX,
    BookSumBuilder,
    DataSourceError,
    SourceConfig,
    StreamConfig,
    build_streams,
    load_booksum,
)
from infinitrain.data.booksum import SUMMARY_PROMPT

N = 64


def chapters(data_dir, **fields) -> SourceConfig:
    return SourceConfig(kind="booksum", **fields,
                        files=[str(data_dir / "booksum-sample" / "kmfoda-chapters" / "test.csv")])


def test_streams_supervise_only_summary_tokens(data_tokenizer, data_dir, data_split_documents):
    tok = data_tokenizer
    with open(data_dir / "booksum-sample" / "kmfoda-chapters" / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summaries = {tuple(tok.encode(r["summary_text"])): r for r in rows}
    streams = build_streams([chapters(data_dir)], StreamConfig(streams=2, segment_len=N,
                                                               segments_per_window=8), tok)
    split = data_split_documents(list(itertools.islice(streams, 20)), N)
    finished = [doc for docs in split for doc in docs[:-1]]
    assert len(finished) >= 5
    prompt = tok.encode(SUMMARY_PROMPT)
    for ids, labels, _ in finished:
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        first, last = supervised[0], supervised[-1]
        assert supervised == list(range(first, last + 1))  # one contiguous run
        target = labels[first:last + 1]
        assert target[-1] == tok.eos_id
        row = summaries[tuple(target[:-1])]  # exactly the reference summary, then EOS
        # everything before is the chapter and the request, read without loss
        assert ids[first + 1 - len(prompt):first + 1] == prompt
        assert tok.decode(ids[1:first + 1 - len(prompt)]) == row["chapter"]


def test_both_hub_layouts_are_recognised(data_tokenizer, data_dir):
    books = SourceConfig(kind="booksum", files=[
        str(data_dir / "booksum-sample" / "ubaada-books" / "test.jsonl")])
    (book,) = load_booksum(books, data_tokenizer)
    assert book.book_tokens > 100_000 and book.dropped_tokens == 0
    assert book.references[0].startswith("Sir Walter Elliot")
    assert len(list(load_booksum(chapters(data_dir), data_tokenizer))) == 5


@pytest.mark.parametrize("truncate", ["start", "middle"])
def test_truncation_keeps_the_budget_and_is_reported(data_tokenizer, data_dir, caplog, truncate):
    tok = data_tokenizer
    with caplog.at_level(logging.WARNING, logger="infinitrain.data.booksum"):
        examples = list(load_booksum(chapters(data_dir, max_input_tokens=600, truncate=truncate),
                                     tok))
    assert all(len(e.prompt_ids) == 600 for e in examples)
    assert all(e.dropped_tokens == e.book_tokens - (600 - 1 - len(tok.encode(SUMMARY_PROMPT)))
               for e in examples)
    assert "truncated 1 of 1 books" in caplog.text and "truncated 4 of 4 books" in caplog.text
    assert f"dropping their {truncate}" in caplog.text


def test_truncation_drops_the_configured_part(data_tokenizer):
    tok = data_tokenizer
    book = " ".join(f"w{i}" for i in range(400))
    ids = tok.encode(book)
    prompt = len(tok.encode(SUMMARY_PROMPT))
    budget = 101
    start = BookSumBuilder(tok, budget + 1 + prompt, "start").example(book, ["A summary."])
    middle = BookSumBuilder(tok, budget + 1 + prompt, "middle").example(book, ["A summary."])
    assert start.prompt_ids[1:1 + budget].tolist() == ids[-budget:]
    assert middle.prompt_ids[1:1 + budget].tolist() == ids[:51] + ids[-50:]
    untouched = BookSumBuilder(tok, None).example(book, ["A summary."])
    assert untouched.prompt_ids[1:-prompt].tolist() == ids and untouched.dropped_tokens == 0


def test_budget_too_small_for_the_prompt_is_refused(data_tokenizer):
    with pytest.raises(DataSourceError, match="max_input_tokens = 5: leaves no room"):
        BookSumBuilder(data_tokenizer, 5)
