"""Sources: local files in every supported format through `datasets`, and clear errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from infinitrain.data import (
    DataSourceError,
    SourceConfig,
    StreamConfig,
    build_source,
    build_streams,
    load_rows,
    text_source,
)


def test_each_local_format_gives_one_document_per_row(data_tokenizer, data_dir, tmp_path):
    (tmp_path / "a.txt").write_text("First book.\nStill the first book.\n")
    (tmp_path / "b.txt").write_text("Second book.")
    docs = list(text_source(SourceConfig(files=[str(tmp_path / "*.txt")]), data_tokenizer))
    assert [data_tokenizer.decode(d.ids, skip_special_tokens=False) for d in docs] == [
        "<|begin_of_text|>First book.\nStill the first book.\n<|end_of_text|>",
        "<|begin_of_text|>Second book.<|end_of_text|>"]  # each .txt file whole
    counts = {"pg19-sample/*.parquet": 2, "books/austen.jsonl.gz": 6, "books/kjv.jsonl.gz": 66,
              "booksum-sample/kmfoda-chapters/test.csv": 5}
    for pattern, rows in counts.items():
        assert len(load_rows(SourceConfig(files=[str(data_dir / pattern)]))) == rows


def test_min_tokens_keeps_only_long_documents(data_tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["short", "word " * 50, "tiny one", "word " * 10]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs = list(text_source(SourceConfig(files=[str(path)], min_tokens=20), data_tokenizer))
    assert [data_tokenizer.decode(d.ids) for d in docs] == [texts[1]]


def test_missing_file_is_named(data_tokenizer, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataSourceError, match=f"{missing}: no such file"):
        build_source(SourceConfig(files=[str(missing)]), data_tokenizer)
    with pytest.raises(DataSourceError, match="matches no file"):
        build_source(SourceConfig(files=[str(tmp_path / "*.parquet")]), data_tokenizer)


def test_wrong_text_field_lists_the_columns(data_tokenizer, data_dir):
    config = SourceConfig(files=[str(data_dir / "pg19-sample" / "*.parquet")], text_field="body")
    with pytest.raises(DataSourceError, match="no column 'body'; available columns: "
                                              "short_book_title, publication_date, url, text"):
        build_source(config, data_tokenizer)


def test_exclude_holds_whole_documents_out_and_refuses_values_that_match_nothing(data_dir):
    books = [str(data_dir / "books" / "austen.jsonl.gz")]
    kept = load_rows(SourceConfig(files=books, exclude={"title": ["Emma", "Persuasion"]}))
    assert kept["title"] == ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park",
                             "Northanger Abbey"]
    with pytest.raises(DataSourceError, match="exclude title = 'Persuasio' matches no row"):
        load_rows(SourceConfig(files=books, exclude={"title": ["Persuasio"]}))
    with pytest.raises(DataSourceError, match="exclude names column 'name'"):
        load_rows(SourceConfig(files=books, exclude={"name": ["Emma"]}))
    with pytest.raises(DataSourceError, match="hides its needles in Landmark's filler; remove "
                                              "exclude"):
        SourceConfig(kind="passkey", exclude={"title": ["Emma"]})


def test_empty_dataset_is_an_error(data_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataSourceError, match="empty"):
        build_source(SourceConfig(files=[str(empty)]), data_tokenizer)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,title\n")
    with pytest.raises(DataSourceError, match=r"header\.csv"):
        build_source(SourceConfig(files=[str(header_only)]), data_tokenizer)


def test_all_documents_shorter_than_the_filter_is_an_error(data_tokenizer, data_dir):
    config = SourceConfig(files=[str(data_dir / "pg19-sample" / "*.parquet")],
                          min_tokens=10_000_000)
    streams = build_streams([config], StreamConfig(streams=1, segment_len=64,
                                                   segments_per_window=2), data_tokenizer)
    with pytest.raises(DataSourceError, match=r"every one of the 2 documents .* was skipped "
                                              r"\(a document has \d+ tokens, fewer than "
                                              r"min_tokens = 10000000\)"):
        next(streams)


def test_fewer_documents_than_ranks_is_an_error(data_tokenizer, data_dir):
    config = SourceConfig(files=[str(data_dir / "pg19-sample" / "*.parquet")])
    streams = build_streams([config], StreamConfig(streams=1, segment_len=64,
                                                   segments_per_window=2), data_tokenizer,
                            rank=2, world_size=3)
    with pytest.raises(DataSourceError, match="no documents for rank 2 of 3"):
        next(streams)


def test_unreachable_hub_dataset_fails_fast_and_suggests_local_files(data_tokenizer):
    with pytest.raises(DataSourceError, match=r"cannot load hub dataset 'emozilla/pg19'.*files:"):
        build_source(SourceConfig(name="emozilla/pg19", streaming=True), data_tokenizer)


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "needs exactly one of name"),
    ({"name": "emozilla/pg19", "files": ["x.jsonl"]}, "needs exactly one of name"),
    ({"kind": "passkey", "name": "emozilla/pg19", "files": ["x.jsonl"]},
     "at most one of name .* or files"),
    ({"files": ["x.jsonl"], "max_input_tokens": 100}, "only used by kind = 'booksum'"),
    ({"files": ["x.jsonl"], "passkey_length": 100}, "only used by kind = 'passkey'"),
    ({"files": ["x.jsonl"], "weight": 0}, "weight = 0: must be > 0"),
    ({"files": ["x.jsonl"], "split": "test"}, "local files form a single split"),
    ({"kind": "passkey", "depth_min": 0.8, "depth_max": 0.2}, "depth_min <= depth_max"),
])
def test_bad_source_configs_name_the_field(fields, message):
    with pytest.raises(DataSourceError, match=message):
        SourceConfig(**fields)


def test_mixture_follows_the_weights(data_tokenizer, data_kjv_snippets):
    text = SourceConfig(files=[str(data_kjv_snippets)], weight=3.0)
    passkey = SourceConfig(kind="passkey", passkey_length=100, weight=1.0)
    streams = build_streams([text, passkey], StreamConfig(streams=4, segment_len=128,
                                                          segments_per_window=1), data_tokenizer)
    for _ in itertools.islice(streams, 400):
        pass
    state = streams.state_dict()
    from_passkey = state["cursors"][1][1]  # passkey positions read = documents drawn from it
    assert state["draws"] > 200
    assert 0.15 < from_passkey / state["draws"] < 0.35


def test_a_curriculum_switches_sources_at_their_steps_and_resumes_there(data_tokenizer):
    """Short prompts until step 3, long ones from step 3 on, 2 windows per step (accumulation):
    every document starts within its source's steps, and a restored position continues exactly."""
    short = SourceConfig(kind="passkey", passkey_length=100, until_step=3)
    long = SourceConfig(kind="passkey", passkey_length=300, from_step=3, weight=2.0)
    config = StreamConfig(streams=2, segment_len=32, segments_per_window=4, windows_per_step=2)

    def windows():
        return build_streams([short, long], config, data_tokenizer)

    started_at: list[set[int]] = [set(), set()]  # steps in which each source started documents
    read = [0, 0]
    for index, window in enumerate(itertools.islice(windows(), 16)):
        for source, (_, position, _) in enumerate(window.position["cursors"]):
            if position > read[source]:
                started_at[source].add(index // 2)
            read[source] = position
    assert started_at[0] == {0, 1, 2}
    assert started_at[1] and min(started_at[1]) == 3
    expected = list(itertools.islice(windows(), 12))
    resumed = windows()
    resumed.load_state_dict(expected[4].position)
    for got, want in zip(itertools.islice(resumed, 7), expected[5:], strict=True):
        assert torch.equal(got.input_ids, want.input_ids)


def test_what_a_data_option_names_becomes_a_source(tmp_path):
    from infinitrain.data.sources import DataSourceError, source_for

    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')
    (tmp_path / "notes.md").write_text("not data")
    folder = source_for(str(tmp_path), split="test", min_tokens=5)
    assert folder.files == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert folder.min_tokens == 5 and folder.name is None
    assert source_for(str(tmp_path / "*.txt"), split="test").files == [str(tmp_path / "*.txt")]
    hub = source_for("emozilla/pg19", split="test", config=None)
    assert (hub.name, hub.split, hub.files) == ("emozilla/pg19", "test", [])
    with pytest.raises(DataSourceError, match="not a hub dataset name"):
        source_for(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="directory holds no"):
        source_for(str(tmp_path / "empty"))


def test_passkey_needles_hide_in_the_text_of_the_sources_files_less_what_it_excludes(
        data_dir, data_tokenizer):
    """Training can hide needles in real prose while evaluation keeps novels no prompt ever saw:
    the haystack is the source's files, read whole, without the excluded titles."""
    books = [str(data_dir / "books" / "austen.jsonl.gz")]
    held_out = ["Northanger Abbey", "Persuasion"]
    config = SourceConfig(kind="passkey", files=books, exclude={"title": held_out},
                          passkey_length=400)
    assert config.label == f"passkey (400 tokens) in {books[0]}"
    source = build_source(config, data_tokenizer)
    haystack = source.generator.haystack
    kept = load_rows(SourceConfig(files=books, exclude={"title": held_out}))
    assert len(haystack) > 100_000
    assert data_tokenizer.decode(haystack[:200].tolist()) in "\n\n".join(kept["text"])
    every = load_rows(SourceConfig(files=books))
    opening = {title: text[:200] for title, text in zip(every["title"], every["text"],
                                                         strict=True)}
    text = data_tokenizer.decode(haystack.tolist())
    assert all(opening[title] not in text for title in held_out)
    assert all(opening[title] in text for title in kept["title"])
    document = next(iter(source.epoch(rank=0, world_size=1, epoch=0, seed=3)))
    prompt = data_tokenizer.decode(document.ids.tolist())
    assert "The pass key is" in prompt and "The grass is green" not in prompt
